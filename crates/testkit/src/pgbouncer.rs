//! A real PgBouncer in front of the test PostgreSQL server, as the seed deployment puts it
//! between Praefect and PostgreSQL: one database in `pool_mode = transaction` for `[database]`
//! and one in `pool_mode = session` for `[database.session_pooled]` (LISTEN).
//!
//! The transaction pool is deliberately tiny (2 server connections for any number of client
//! connections), so that consecutive transactions of one client land on different server
//! connections: anything that assumes session state (a named prepared statement, a session
//! setting, a LISTEN) breaks at once instead of by luck. No `ignore_startup_parameters`: the
//! router must send only startup parameters PgBouncer tracks. PgBouncer 1.18 (Debian 12)
//! keeps no prepared statements across server connections, which is what
//! `max_prepared_statements = 0` means in later versions.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::pg::{free_port, server_identity, Conn};
use crate::wait::wait_until_blocking;

/// The PgBouncer database names.
pub const TRANSACTION_DB: &str = "praefect_tx";
pub const SESSION_DB: &str = "praefect_session";

pub fn available() -> bool {
    binary().is_some()
}

fn binary() -> Option<PathBuf> {
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// A running PgBouncer; stopped and removed when dropped.
pub struct PgBouncer {
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

impl PgBouncer {
    /// PgBouncer on a free port for database `dbname` of the server at `backend_port`.
    pub fn start(backend_port: u16, dbname: &str, user: &str) -> PgBouncer {
        let identity = server_identity();
        let dir = std::env::temp_dir().join(format!(
            "praefect-pgbouncer-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        if let Some((uid, gid)) = identity {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        }
        let port = free_port();
        std::fs::write(dir.join("userlist.txt"), format!("\"{user}\" \"\"\n")).unwrap();
        let config = format!(
            "[databases]\n\
             {TRANSACTION_DB} = host=127.0.0.1 port={backend_port} dbname={dbname} pool_mode=transaction pool_size=2\n\
             {SESSION_DB} = host=127.0.0.1 port={backend_port} dbname={dbname} pool_mode=session pool_size=20\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {dir}/userlist.txt\n\
             pool_mode = transaction\n\
             max_client_conn = 500\n\
             default_pool_size = 2\n\
             reserve_pool_size = 0\n\
             server_reset_query = DISCARD ALL\n\
             logfile = {dir}/pgbouncer.log\n\
             pidfile = {dir}/pgbouncer.pid\n",
            dir = dir.display()
        );
        let ini = dir.join("pgbouncer.ini");
        std::fs::write(&ini, config).unwrap();
        if let Some((uid, gid)) = identity {
            for file in ["userlist.txt", "pgbouncer.ini"] {
                std::os::unix::fs::chown(dir.join(file), Some(uid), Some(gid)).unwrap();
            }
        }
        let mut command = Command::new(binary().expect("pgbouncer is installed"));
        if let Some((uid, gid)) = identity {
            command.uid(uid).gid(gid);
        }
        // Not our own working directory: the checkout may be closed to that user.
        let child = command
            .current_dir(&dir)
            .arg(&ini)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("starting pgbouncer");
        let bouncer = PgBouncer { port, dir, child };
        wait_until_blocking(Duration::from_secs(20), "pgbouncer listens", || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .map_err(|err| format!("{err}; pgbouncer's log: {}", bouncer.log()))
        });
        bouncer
    }

    /// The settings of PgBouncer database `alias`.
    pub fn connection(&self, alias: &str, user: &str) -> Conn {
        Conn {
            host: "127.0.0.1".into(),
            port: self.port.to_string(),
            user: user.into(),
            dbname: alias.into(),
            ..Default::default()
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
