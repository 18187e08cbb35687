//! The only way the datastore builds statements: unnamed (never cached as named prepared
//! statements), so that every statement works through PgBouncer in `pool_mode = transaction`
//! with `max_prepared_statements = 0`. A named statement prepared on one server connection
//! would be missing (or already exist) on the next one PgBouncer hands us. Together with
//! [`super::Datastore::run`] opening a transaction around every operation (which keeps
//! PgBouncer on one server connection between the parse and the execute message), this is
//! all PgBouncer needs. `clippy.toml` forbids calling `sqlx::query*` directly elsewhere.
//!
//! Custom types (the `replication_job_state` enum) are passed and read as text: sqlx looks
//! their OIDs up with named statements of its own.
#![allow(clippy::disallowed_methods)]

use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::{Query, QueryAs, QueryScalar};
use sqlx::{FromRow, Postgres};

/// `sqlx::query`, unnamed.
pub fn query(sql: &str) -> Query<'_, Postgres, PgArguments> {
    sqlx::query(sql).persistent(false)
}

/// `sqlx::query_as`, unnamed.
pub fn query_as<'q, O>(sql: &'q str) -> QueryAs<'q, Postgres, O, PgArguments>
where
    O: for<'r> FromRow<'r, PgRow>,
{
    sqlx::query_as(sql).persistent(false)
}

/// `sqlx::query_scalar`, unnamed.
pub fn query_scalar<'q, O>(sql: &'q str) -> QueryScalar<'q, Postgres, O, PgArguments>
where
    (O,): for<'r> FromRow<'r, PgRow>,
{
    sqlx::query_scalar(sql).persistent(false)
}

/// The connection of one [`super::Datastore::run`] operation, inside its transaction. It is
/// an `Executor` like `&mut PgConnection` (write `.fetch_one(&mut *conn)`); the lifetime
/// `'env` lets the operation's closure borrow from its caller (the reference `&'c mut
/// Tx<'env>` can only exist while `'env` does, which is what allows the returned future to
/// hold borrows of `'env`).
pub struct Tx<'env> {
    pub(super) tx: sqlx::Transaction<'static, Postgres>,
    pub(super) env: std::marker::PhantomData<&'env ()>,
}

impl std::fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tx")
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = sqlx::PgConnection;
    fn deref(&self) -> &sqlx::PgConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for Tx<'_> {
    fn deref_mut(&mut self) -> &mut sqlx::PgConnection {
        &mut self.tx
    }
}

type Stream<'e, T> = futures::stream::BoxStream<'e, Result<T, sqlx::Error>>;
type Future<'e, T> = futures::future::BoxFuture<'e, Result<T, sqlx::Error>>;

impl<'c> sqlx::Executor<'c> for &'c mut Tx<'_> {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> Stream<'e, sqlx::Either<sqlx::postgres::PgQueryResult, PgRow>>
    where
        'c: 'e,
        E: 'q + sqlx::Execute<'q, Postgres>,
    {
        (&mut *self.tx).fetch_many(query)
    }

    fn fetch_optional<'e, 'q: 'e, E>(self, query: E) -> Future<'e, Option<PgRow>>
    where
        'c: 'e,
        E: 'q + sqlx::Execute<'q, Postgres>,
    {
        (&mut *self.tx).fetch_optional(query)
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [sqlx::postgres::PgTypeInfo],
    ) -> Future<'e, sqlx::postgres::PgStatement<'q>>
    where
        'c: 'e,
    {
        (&mut *self.tx).prepare_with(sql, parameters)
    }

    fn describe<'e, 'q: 'e>(self, sql: &'q str) -> Future<'e, sqlx::Describe<Postgres>>
    where
        'c: 'e,
    {
        (&mut *self.tx).describe(sql)
    }
}
