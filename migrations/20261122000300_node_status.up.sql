-- Health observations: every router upserts, once per health round, when it last tried to
-- reach each node and when it last saw it healthy.
CREATE TABLE node_status (
    id bigserial PRIMARY KEY,
    praefect_name varchar(511) NOT NULL,
    shard_name varchar(255) NOT NULL,
    node_name varchar(255) NOT NULL,
    last_contact_attempt_at timestamp with time zone,
    last_seen_active_at timestamp with time zone
);

CREATE UNIQUE INDEX shard_node_praefect_on_node_status_idx
    ON node_status (praefect_name, shard_name, node_name);
CREATE INDEX shard_name_on_node_status_idx ON node_status (shard_name, node_name);

-- A storage is healthy when at least half (rounded up) of the routers that are active for its
-- virtual storage saw it healthy in the last 10 seconds. A router is active when it tried to
-- reach any node of that virtual storage in the last 60 seconds.
CREATE VIEW healthy_storages AS
    SELECT seen.shard_name AS virtual_storage, seen.node_name AS storage
    FROM node_status AS seen
    WHERE seen.last_seen_active_at >= now() - interval '10 seconds'
    GROUP BY seen.shard_name, seen.node_name
    HAVING count(DISTINCT seen.praefect_name) >= (
        SELECT ceil(count(DISTINCT active.praefect_name) / 2.0)
        FROM node_status AS active
        WHERE active.shard_name = seen.shard_name
          AND active.last_contact_attempt_at >= now() - interval '60 seconds'
    );
