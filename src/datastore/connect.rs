//! Connecting to PostgreSQL the way Praefect needs on a Patroni cluster: `host`/`port` may
//! list several servers (as libpq allows), and we only ever talk to the one that accepts
//! writes. sqlx has no `target_session_attrs`, so every new connection checks
//! `pg_is_in_recovery()` and `transaction_read_only` itself, and a connection that reports a
//! read-only or shutdown error makes the writer be searched for again (see `writer.rs`).
//!
//! Connections may go through PgBouncer in `pool_mode = transaction`: the startup packet
//! carries only parameters PgBouncer tracks (no `extra_float_digits`), and the role check
//! uses the simple query protocol, which needs no statement to survive between messages.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

use crate::config::DatabaseConnection;

use super::DatastoreError;

/// SQLSTATEs after which a connection must not be reused: read-only transaction, admin
/// shutdown, crash shutdown, cannot connect now (server starting or in recovery).
pub const READ_ONLY_SQLSTATES: &[&str] = &["25006", "57P01", "57P02", "57P03"];

/// One candidate server of a (possibly multi-host) connection setting.
#[derive(Clone, Debug)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub options: PgConnectOptions,
}

impl Target {
    /// "host:port", for messages.
    pub fn describe(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Pool sizing and timeouts.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    pub max_connections: u32,
    /// Bound on establishing one connection (TCP, TLS, startup, role check).
    pub connect_timeout: Duration,
    /// Bound on one query, so that a hung statement cannot hang a worker (gitaly#3486).
    pub query_timeout: Duration,
    /// Connections are recycled after this long, so that clients do not stay on a demoted
    /// server for ever even without an error.
    pub max_lifetime: Duration,
    pub application_name: String,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_connections: 16,
            connect_timeout: Duration::from_secs(10),
            query_timeout: Duration::from_secs(5),
            max_lifetime: Duration::from_secs(5 * 60),
            application_name: "praefect".to_string(),
        }
    }
}

/// Expands `[database]`-style settings into the candidate servers, in order. Unset keys fall
/// back to the PG* environment variables and libpq's defaults, as libpq does.
pub fn targets(conn: &DatabaseConnection) -> Result<Vec<Target>, DatastoreError> {
    let invalid = |message: String| DatastoreError::Settings(message);
    // `extra_float_digits` is not a parameter PgBouncer tracks: sending it makes PgBouncer
    // refuse the connection unless `ignore_startup_parameters` lists it. We never read floats
    // whose last digits matter.
    let mut base = PgConnectOptions::new().extra_float_digits(None);
    if !conn.user.is_empty() {
        base = base.username(&conn.user);
    }
    if !conn.password.is_empty() {
        base = base.password(&conn.password);
    }
    if !conn.dbname.is_empty() {
        base = base.database(&conn.dbname);
    }
    if !conn.sslmode.is_empty() {
        let mode = PgSslMode::from_str(&conn.sslmode)
            .map_err(|_| invalid(format!("unsupported sslmode {:?}", conn.sslmode)))?;
        base = base.ssl_mode(mode);
    }
    if !conn.sslcert.is_empty() {
        base = base.ssl_client_cert(&conn.sslcert);
    }
    if !conn.sslkey.is_empty() {
        base = base.ssl_client_key(&conn.sslkey);
    }
    if !conn.sslrootcert.is_empty() {
        base = base.ssl_root_cert(&conn.sslrootcert);
    }
    let hosts: Vec<String> = if conn.host.is_empty() {
        vec![base.get_host().to_string()]
    } else {
        conn.host.split(',').map(|h| h.trim().to_string()).collect()
    };
    let ports: Vec<u16> = if conn.port.is_empty() {
        vec![base.get_port()]
    } else {
        conn.port
            .split(',')
            .map(|p| {
                p.trim()
                    .parse::<u16>()
                    .map_err(|_| invalid(format!("invalid port {p:?}")))
            })
            .collect::<Result<_, _>>()?
    };
    if ports.len() != 1 && ports.len() != hosts.len() {
        return Err(invalid(format!(
            "{} ports given for {} hosts",
            ports.len(),
            hosts.len()
        )));
    }
    Ok(hosts
        .into_iter()
        .enumerate()
        .map(|(i, host)| {
            let port = if ports.len() == 1 { ports[0] } else { ports[i] };
            // The name is kept, not resolved: sqlx resolves it again at every new connection,
            // so a DNS name that moves to another server (Consul) is followed.
            let mut options = base.clone().host(&host).port(port);
            if host.starts_with('/') {
                options = options.socket(&host);
            }
            Target {
                host,
                port,
                options,
            }
        })
        .collect())
}

/// Whether the server behind `conn` accepts writes. One round trip of the simple protocol (a
/// `&str` without arguments runs as a simple query), so it works through a transaction
/// pooler too.
pub async fn is_writable(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    use sqlx::Executor;
    writable_row(conn.fetch_one(WRITABLE_SQL).await?)
}

/// [`is_writable`] on the listener's connection.
pub async fn listener_is_writable(
    listener: &mut sqlx::postgres::PgListener,
) -> Result<bool, sqlx::Error> {
    use sqlx::Executor;
    writable_row(listener.fetch_one(WRITABLE_SQL).await?)
}

const WRITABLE_SQL: &str =
    "SELECT pg_is_in_recovery()::text, current_setting('transaction_read_only')";

fn writable_row(row: sqlx::postgres::PgRow) -> Result<bool, sqlx::Error> {
    use sqlx::Row;
    let in_recovery: String = row.try_get(0)?;
    let read_only: String = row.try_get(1)?;
    Ok(in_recovery != "true" && read_only != "on")
}

/// Connects to `target` and tells whether it accepts writes, all within `timeout`.
async fn probe_writable(target: &Target, timeout: Duration) -> Result<bool, DatastoreError> {
    let probe = async {
        let mut conn = target.options.connect().await?;
        let writable = is_writable(&mut conn).await;
        let _ = conn.close().await;
        writable
    };
    match tokio::time::timeout(timeout, probe).await {
        Ok(Ok(writable)) => Ok(writable),
        Ok(Err(source)) => Err(DatastoreError::Connect {
            target: target.describe(),
            source,
        }),
        Err(_) => Err(DatastoreError::ConnectTimeout {
            target: target.describe(),
            timeout,
        }),
    }
}

/// Finds a target that accepts writes: probes them all at once and takes the first that
/// answers writable (Patroni lets only one be), without waiting for servers that hang. With
/// a single target, its own error is returned; a read-only server is an error either way:
/// we never write through a replica.
pub async fn find_writable(
    targets: &[Target],
    timeout: Duration,
) -> Result<Target, DatastoreError> {
    use futures::StreamExt;
    let mut probes: futures::stream::FuturesUnordered<_> = targets
        .iter()
        .enumerate()
        .map(|(i, target)| async move { (i, probe_writable(target, timeout).await) })
        .collect();
    let mut failures: Vec<(usize, DatastoreError)> = Vec::new();
    while let Some((i, outcome)) = probes.next().await {
        match outcome {
            Ok(true) => return Ok(targets[i].clone()),
            Ok(false) => failures.push((
                i,
                DatastoreError::NoWritableHost(format!(
                    "{}: server is read-only",
                    targets[i].describe()
                )),
            )),
            Err(err) => failures.push((i, err)),
        }
    }
    if failures.len() == 1 {
        return Err(failures.remove(0).1);
    }
    failures.sort_by_key(|(i, _)| *i);
    let described: Vec<String> = failures
        .iter()
        .map(|(_, err)| match err {
            DatastoreError::NoWritableHost(text) => text.clone(),
            other => other.to_string(),
        })
        .collect();
    Err(DatastoreError::NoWritableHost(described.join("; ")))
}

/// A lazy pool bound to `target` whose every new connection re-checks that the server still
/// accepts writes, so a demoted server cannot slip back in.
pub fn lazy_pool(target: &Target, settings: &PoolSettings) -> PgPool {
    let options = target
        .options
        .clone()
        .application_name(&settings.application_name);
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .min_connections(0)
        .acquire_timeout(settings.connect_timeout)
        .max_lifetime(settings.max_lifetime)
        .idle_timeout(Duration::from_secs(60))
        // A ping per checkout would double the round trips; broken connections are found by
        // the query that uses them, and read-only errors rebuild the pool.
        .test_before_acquire(false)
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                if is_writable(conn).await? {
                    Ok(())
                } else {
                    Err(sqlx::Error::Protocol(
                        "server is read-only (in recovery or default_transaction_read_only)"
                            .to_string(),
                    ))
                }
            })
        })
        .connect_lazy_with(options)
}

/// Whether an error means the connection (and the server behind it) must not be used for
/// writes any more.
pub fn is_read_only_error(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| READ_ONLY_SQLSTATES.contains(&code.as_ref())),
        sqlx::Error::Protocol(message) => message.contains("server is read-only"),
        _ => false,
    }
}

/// Whether an error is about reaching the server rather than about the statement: a broken
/// or refused socket, a pool that could not connect in time, a connection-exception SQLSTATE
/// (class 08), or a read-only/shutdown answer. Any of them may mean the writer moved.
pub fn is_connection_error(err: &sqlx::Error) -> bool {
    let connection_class = match err {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| code.starts_with("08")),
        _ => false,
    };
    matches!(
        err,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_)
    ) || connection_class
        || is_read_only_error(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(host: &str, port: &str) -> DatabaseConnection {
        DatabaseConnection {
            host: host.to_string(),
            port: port.to_string(),
            user: "praefect".to_string(),
            dbname: "praefect_production".to_string(),
            sslmode: "disable".to_string(),
            ..Default::default()
        }
    }

    #[test]
    fn expands_host_and_port_lists_like_libpq() {
        let t = targets(&conn("db1,db2,db3", "5432")).unwrap();
        let described: Vec<_> = t.iter().map(Target::describe).collect();
        assert_eq!(described, ["db1:5432", "db2:5432", "db3:5432"]);

        let t = targets(&conn("db1, db2", "5433,5434")).unwrap();
        let described: Vec<_> = t.iter().map(Target::describe).collect();
        assert_eq!(described, ["db1:5433", "db2:5434"]);

        assert!(targets(&conn("db1,db2,db3", "1,2")).is_err());
        assert!(targets(&conn("db1", "notaport")).is_err());
    }

    #[test]
    fn host_names_are_kept_for_resolution_at_every_connection() {
        // A Consul name moves to the new leader; we must never pin its old address.
        let t = targets(&conn("master.praefect.service.consul", "5432")).unwrap();
        assert_eq!(t[0].options.get_host(), "master.praefect.service.consul");
        // And we send no startup parameter PgBouncer would refuse.
        let debug = format!("{:?}", t[0].options);
        assert!(debug.contains("extra_float_digits: None"), "{debug}");
    }

    #[test]
    fn read_only_errors_are_recognised() {
        assert!(is_read_only_error(&sqlx::Error::Protocol(
            "server is read-only (in recovery)".into()
        )));
        assert!(!is_read_only_error(&sqlx::Error::RowNotFound));
        assert!(is_connection_error(&sqlx::Error::PoolTimedOut));
    }
}
