DROP VIEW valid_primaries;
