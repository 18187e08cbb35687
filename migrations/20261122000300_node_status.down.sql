DROP VIEW healthy_storages;
DROP TABLE node_status;
