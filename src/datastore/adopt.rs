//! Taking over the database of a running Go Praefect, in place.
//!
//! Go Praefect records its migrations in the same `schema_migrations` table under its own ids
//! (2020–2022), and leaves a schema with the same tables and columns as ours but some objects
//! named or written differently. A database is recognised as Go's by those ids; adopting it
//! renames what is named differently, records our base migrations as applied (their tables
//! are already there, with every row), and lets the migrations after the base run as usual:
//! `20261122000700` adds our queue indexes and `20261122000800` replaces the views, the NOTIFY
//! function and triggers with ours and adds the write-lock table, `20261202000100` adds the
//! dequeue's index, and `20261202000200` drops the job locks' foreign keys and adds the
//! queue's functions. `sql-migrate` runs the
//! adoption and those migrations in one transaction, so a failure leaves Go's database as it
//! was.
//!
//! What differs in Go's schema, and what adoption does about it:
//! - `replication_queue_job_lock`'s primary key is named `replication_queue_job_lock_pk`:
//!   renamed to `replication_queue_job_lock_pkey`.
//! - The unique index of `node_status` is `shard_node_names_on_node_status_idx`: renamed.
//! - `repository_assignments (repository_id, storage)` is a unique index
//!   (`repository_assignments_new_pkey`), not a constraint: it becomes the constraint
//!   `repository_assignments_repository_id_storage_key`, keeping the index.
//! - The NOTIFY triggers name their transition tables `old`/`new` and call Go's function;
//!   `valid_primaries` and `healthy_storages` are Go's texts: all replaced by 000800.
//! - `repository_reference_write_locks` does not exist: created by 000800.
//! - `shard_primaries` and `virtual_storages` are leftovers of Go's older failover modes that
//!   nothing reads any more; they are left in place, rows and all.
//! - Go Praefect 15.0 lacks Go's last migration, which deletes the queued jobs of maintenance
//!   change types no version runs any more; adoption deletes them the same way.
//!
//! Go Praefect cannot use the database afterwards: it does not know our migration ids (its
//! `sql-migrate` refuses unknown ones) and its NOTIFY payloads come from the function that
//! adoption replaces. That is why `sql-migrate` adopts only when asked to explicitly.

use std::collections::HashSet;

/// Go Praefect's migration ids, in the order it applies them. A database with all of them was
/// last migrated by Go Praefect 15.1 or later (the set has not changed since); one without
/// only the last was migrated by 15.0.
pub const GO_PRAEFECT_MIGRATIONS: [&str; 42] = [
    "20200109161404_hello_world",
    "20200113151438_1_test_migration",
    "20200224220728_job_queue",
    "20200225220728_readd_job_queue",
    "20200324001604_add_sql_election_tables",
    "20200422131451_add_shard_read_only_column",
    "20200512131219_replication_job_indexing",
    "20200527103816_drop_old_gitaly_tables",
    "20200602154246_remember_previous_writable_primary",
    "20200707101830_repositories_table",
    "20200810055650_replication_queue_cleanup",
    "20200921154417_repositories_nullable_generation",
    "20200921170311_repositories_primary_column",
    "20201006125956_trigger_repository_update_generation",
    "20201102115118_variable_replication_factor",
    "20201102171914_virtual_storage_configuration",
    "20201126165633_repository_assignments_table",
    "20201208163237_cleanup_notifiactions_payload",
    "20201231075619_remove_unused_assigned_column",
    "20210223130233_delete_replica_unique_index",
    "20210225101159_replication_queue_target_index",
    "20210525143540_healthy_storages_view",
    "20210525173505_valid_primaries_view",
    "20210607124235_optimize_valid_primaries_view",
    "20210727085659_repository_ids",
    "20210906130405_add_replica_path",
    "20210906145021_link_repository_id",
    "20210914115710_storage_cleanups_table",
    "20210921131816_backfill_replica_path",
    "20210922091614_repository_id_primary_key_indexes",
    "20210922143752_storage_repositories_cascade_delete",
    "20210923155827_valid_primaries_view_repository_id",
    "20210927083631_repository_path_index",
    "20211018142158_valid_primaries_view_join_repo_id",
    "20211025113445_remove_cancelled_replication_events",
    "20211105100456_check_non_null_repository_id",
    "20211105100458_non_nullable_repository_id",
    "20220215160117_replication_queue_cleanup_again",
    "20220303105110_background_verification_columns",
    "20220404131105_stale_verification_lease_index",
    "20220407111624_ignore_verification_in_triggers",
    "20220520083313_remove_maintenance_replication_events",
];

/// Recorded in `schema_migrations` when a Go Praefect database was adopted. It sorts before
/// our own migrations, after Go's.
pub const ADOPTION_ID: &str = "20261122000000_adopt_go_praefect";

/// Our migrations whose objects a Go Praefect database already has (under other names, see
/// the module doc): adoption records them as applied. The migrations after the last of them
/// run on the adopted database as on any other.
pub const BASE_MIGRATIONS: [&str; 6] = [
    "20261122000100_replication_queue",
    "20261122000200_repositories",
    "20261122000300_node_status",
    "20261122000400_valid_primaries",
    "20261122000500_change_notifications",
    "20261122000600_cleanup_and_locks",
];

/// The adoption's statements (see the module doc).
pub const ADOPTION_SQL: &str = r#"
-- Go Praefect 15.0 had not yet purged the jobs of maintenance change types.
DELETE FROM replication_queue_job_lock
WHERE job_id IN (
    SELECT id FROM replication_queue
    WHERE job ->> 'change' IN ('gc', 'repack_full', 'repack_incremental', 'cleanup', 'pack_refs',
                               'write_commit_graph', 'midx_repack', 'optimize_repository',
                               'prune_unreachable_objects')
);
DELETE FROM replication_queue
WHERE job ->> 'change' IN ('gc', 'repack_full', 'repack_incremental', 'cleanup', 'pack_refs',
                           'write_commit_graph', 'midx_repack', 'optimize_repository',
                           'prune_unreachable_objects');

ALTER TABLE replication_queue_job_lock
    RENAME CONSTRAINT replication_queue_job_lock_pk TO replication_queue_job_lock_pkey;

ALTER INDEX shard_node_names_on_node_status_idx RENAME TO shard_node_praefect_on_node_status_idx;

ALTER TABLE repository_assignments
    ADD CONSTRAINT repository_assignments_repository_id_storage_key
    UNIQUE USING INDEX repository_assignments_new_pkey;
"#;

/// Who last migrated a database, judged by the ids in its `schema_migrations`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lineage {
    /// No Go Praefect id: a database of ours (or an empty one).
    Ours,
    /// Go Praefect's, adopted already.
    Adopted,
    /// Go Praefect's, ready to adopt: every Go id, or every one but the last (Go 15.0).
    GoPraefect { version: &'static str },
    /// Go Praefect's, but not one we can adopt: why.
    Unadoptable(String),
}

/// Judges a database by the migration ids it has applied.
pub fn lineage(applied: &HashSet<String>) -> Lineage {
    let go: Vec<&str> = GO_PRAEFECT_MIGRATIONS
        .iter()
        .copied()
        .filter(|id| applied.contains(*id))
        .collect();
    if go.is_empty() {
        return Lineage::Ours;
    }
    if applied.contains(ADOPTION_ID) {
        return Lineage::Adopted;
    }
    let base_applied = BASE_MIGRATIONS
        .iter()
        .filter(|id| applied.contains(**id))
        .count();
    if base_applied > 0 {
        return Lineage::Unadoptable(format!(
            "the database has migrations of both Go Praefect and praefect-rs ({base_applied} of \
             our base migrations) but was never adopted; restore it from the backup taken before \
             the first praefect-rs run"
        ));
    }
    let all = GO_PRAEFECT_MIGRATIONS.len();
    let is_prefix = GO_PRAEFECT_MIGRATIONS[..go.len()] == go[..];
    match (go.len(), is_prefix) {
        (n, true) if n == all => Lineage::GoPraefect {
            version: "15.1 or later",
        },
        (n, true) if n == all - 1 => Lineage::GoPraefect { version: "15.0" },
        (n, _) => Lineage::Unadoptable(format!(
            "the database was migrated by a Go Praefect older than 15.0 ({n} of its {all} \
             migrations applied); upgrade Go Praefect to 15.0 or later and run its sql-migrate \
             first"
        )),
    }
}

/// Whether `id` is a migration this binary knows of besides its own (Go's, the adoption).
pub fn is_foreign_known(id: &str) -> bool {
    id == ADOPTION_ID || GO_PRAEFECT_MIGRATIONS.contains(&id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> HashSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn go_databases_are_told_apart_by_their_ids() {
        assert_eq!(lineage(&ids(&[])), Lineage::Ours);
        assert_eq!(lineage(&ids(&BASE_MIGRATIONS)), Lineage::Ours);
        assert_eq!(
            lineage(&ids(&GO_PRAEFECT_MIGRATIONS)),
            Lineage::GoPraefect {
                version: "15.1 or later"
            }
        );
        assert_eq!(
            lineage(&ids(&GO_PRAEFECT_MIGRATIONS[..41])),
            Lineage::GoPraefect { version: "15.0" }
        );
        assert!(matches!(
            lineage(&ids(&GO_PRAEFECT_MIGRATIONS[..30])),
            Lineage::Unadoptable(why) if why.contains("older than 15.0")
        ));
        let mut holes = ids(&GO_PRAEFECT_MIGRATIONS);
        holes.remove(GO_PRAEFECT_MIGRATIONS[3]);
        assert!(matches!(lineage(&holes), Lineage::Unadoptable(_)));
        let mut adopted = ids(&GO_PRAEFECT_MIGRATIONS);
        adopted.extend(ids(&BASE_MIGRATIONS));
        assert!(
            matches!(lineage(&adopted), Lineage::Unadoptable(why) if why.contains("never adopted"))
        );
        adopted.insert(ADOPTION_ID.to_string());
        assert_eq!(lineage(&adopted), Lineage::Adopted);
    }

    #[test]
    fn the_base_is_a_prefix_of_our_migrations() {
        let ours: Vec<String> = super::super::migrations::known_migrations()
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(ours[..BASE_MIGRATIONS.len()], BASE_MIGRATIONS);
        assert!(ADOPTION_ID < ours[0].as_str());
        assert!(*GO_PRAEFECT_MIGRATIONS.last().unwrap() < ADOPTION_ID);
    }
}
