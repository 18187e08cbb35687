-- Repository metadata: one row per repository of a virtual storage (its id, replica path,
-- latest generation and current primary), one row per physical replica known to exist with
-- the generation it holds, and the storages each repository is assigned to.
CREATE TABLE repositories (
    repository_id bigserial PRIMARY KEY,
    virtual_storage text NOT NULL,
    relative_path text NOT NULL,
    generation bigint,
    "primary" text,
    replica_path text
);

CREATE UNIQUE INDEX repository_lookup_index ON repositories (virtual_storage, relative_path);
CREATE INDEX repository_replica_path_index ON repositories (replica_path, virtual_storage);

CREATE TABLE storage_repositories (
    virtual_storage text NOT NULL,
    relative_path text NOT NULL,
    storage text NOT NULL,
    generation bigint NOT NULL,
    repository_id bigint NOT NULL REFERENCES repositories (repository_id) ON DELETE CASCADE,
    verified_at timestamp with time zone,
    verification_leased_until timestamp with time zone,
    PRIMARY KEY (virtual_storage, relative_path, storage)
);

CREATE UNIQUE INDEX storage_repositories_new_pkey ON storage_repositories (repository_id, storage);

-- The background verifier takes the least recently verified replicas that nobody leases.
CREATE INDEX verification_queue ON storage_repositories (verified_at NULLS FIRST)
    WHERE verification_leased_until IS NULL;
CREATE INDEX verification_leases ON storage_repositories (verification_leased_until)
    WHERE verification_leased_until IS NOT NULL;

-- No rows for a repository means every configured storage is assigned.
CREATE TABLE repository_assignments (
    virtual_storage text NOT NULL,
    relative_path text NOT NULL,
    storage text NOT NULL,
    repository_id bigint NOT NULL REFERENCES repositories (repository_id) ON DELETE CASCADE,
    PRIMARY KEY (virtual_storage, relative_path, storage),
    UNIQUE (repository_id, storage),
    FOREIGN KEY (virtual_storage, relative_path)
        REFERENCES repositories (virtual_storage, relative_path)
        ON UPDATE CASCADE ON DELETE CASCADE
);

-- Kept for runbooks: the highest generation any replica of a repository holds.
CREATE VIEW repository_generations AS
    SELECT virtual_storage, relative_path, max(generation) AS generation
    FROM storage_repositories
    GROUP BY virtual_storage, relative_path;
