DROP VIEW repository_generations;
DROP TABLE repository_assignments;
DROP TABLE storage_repositories;
DROP TABLE repositories;
