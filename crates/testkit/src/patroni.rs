//! A real three-member Patroni cluster (PostgreSQL managed by Patroni, with a single etcd as
//! its DCS) on loopback, for the database high-availability tests: what operators run under
//! Praefect, not a simulation.
//!
//! Needs the Debian packages `patroni` and `etcd-server` (`.ci/run` installs them) and the
//! PostgreSQL server binaries. When run as root, etcd and Patroni run as the unprivileged
//! `postgres` user (PostgreSQL refuses root), with their files under the system temp dir.
//!
//! Timings are tight (`ttl` 10 s, `loop_wait` 1 s, `retry_timeout` 3 s) so that a failover
//! after the leader dies takes about 10 s rather than Patroni's default 30 s.
//!
//! `synchronous_mode` is on: a commit is acknowledged only once a standby has it, and Patroni
//! promotes only that standby. With asynchronous replication a failover may lose the last
//! commits the leader acknowledged, and no client of the database (the router included) can
//! keep an acknowledged write then; operators who need no loss run it this way.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::pg::{find_pg_binary, free_port, server_identity, Conn};
use crate::wait::wait_until_blocking;

pub const PASSWORD: &str = "postgres";
const MEMBERS: usize = 3;

/// Whether the binaries the cluster needs are installed.
pub fn available() -> bool {
    ["patroni", "patronictl", "etcd"]
        .iter()
        .all(|name| which(name).is_some())
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// A running cluster; everything is stopped and removed when dropped.
pub struct Patroni {
    pub dir: PathBuf,
    pub pg_ports: Vec<u16>,
    pub rest_ports: Vec<u16>,
    etcd_port: u16,
    etcd: Child,
    members: Vec<Option<Child>>,
    identity: Option<(u32, u32)>,
}

impl Patroni {
    /// Starts etcd and three members, waits for a leader and two streaming replicas.
    pub fn start() -> Patroni {
        let identity = server_identity();
        let dir = std::env::temp_dir().join(format!(
            "praefect-patroni-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        chown(&dir, identity);
        let etcd_port = free_port();
        let etcd_peer_port = free_port();
        let pg_ports: Vec<u16> = (0..MEMBERS).map(|_| free_port()).collect();
        let rest_ports: Vec<u16> = (0..MEMBERS).map(|_| free_port()).collect();
        let etcd = spawn_logged(
            Command::new("etcd")
                .args(["--name", "e1", "--data-dir"])
                .arg(dir.join("etcd"))
                .arg("--listen-client-urls")
                .arg(format!("http://127.0.0.1:{etcd_port}"))
                .arg("--advertise-client-urls")
                .arg(format!("http://127.0.0.1:{etcd_port}"))
                .arg("--listen-peer-urls")
                .arg(format!("http://127.0.0.1:{etcd_peer_port}"))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://127.0.0.1:{etcd_peer_port}"))
                .arg("--initial-cluster")
                .arg(format!("e1=http://127.0.0.1:{etcd_peer_port}")),
            &dir.join("etcd.log"),
            identity,
        );
        let mut cluster = Patroni {
            dir,
            pg_ports,
            rest_ports,
            etcd_port,
            etcd,
            members: (0..MEMBERS).map(|_| None).collect(),
            identity,
        };
        wait_until_blocking(Duration::from_secs(20), "etcd answers", || {
            http_get(cluster.etcd_port, "/health").is_some_and(|(_, body)| body.contains("true"))
        });
        for member in 0..MEMBERS {
            cluster.write_member_config(member);
        }
        // The first member bootstraps alone, so the others clone it instead of racing initdb.
        cluster.start_member(0);
        wait_until_blocking(Duration::from_secs(60), "pg1 leads", || {
            cluster.role(0) == Role::Leader
        });
        cluster.start_member(1);
        cluster.start_member(2);
        wait_until_blocking(
            Duration::from_secs(120),
            "two replicas stream, one of them synchronous",
            || {
                cluster.role(1) == Role::Replica
                    && cluster.role(2) == Role::Replica
                    && cluster.streaming_replicas() == 2
                    && (1..MEMBERS).any(|m| cluster.is_sync_standby(m))
            },
        );
        cluster
    }

    fn member_name(member: usize) -> String {
        format!("pg{}", member + 1)
    }

    fn write_member_config(&self, member: usize) {
        let name = Self::member_name(member);
        let data = self.dir.join(&name);
        let pg_bin = find_pg_binary("postgres");
        let bin_dir = pg_bin.parent().unwrap();
        let text = format!(
            r#"scope: praefect-test
namespace: /service/
name: {name}
log:
  level: INFO
restapi:
  listen: 127.0.0.1:{rest}
  connect_address: 127.0.0.1:{rest}
etcd3:
  hosts: 127.0.0.1:{etcd}
bootstrap:
  dcs:
    ttl: 10
    loop_wait: 1
    retry_timeout: 3
    maximum_lag_on_failover: 1048576
    synchronous_mode: true
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_level: replica
        hot_standby: "on"
        max_wal_senders: 10
        max_replication_slots: 10
        wal_log_hints: "on"
        max_connections: 200
        shared_buffers: 32MB
        fsync: "off"
  initdb:
    - encoding: UTF8
    - locale: C
    - auth: trust
  pg_hba:
    - local all all trust
    - host replication replicator 127.0.0.1/32 trust
    - host all all 127.0.0.1/32 md5
postgresql:
  listen: 127.0.0.1:{pg}
  connect_address: 127.0.0.1:{pg}
  data_dir: {data}/data
  bin_dir: {bin_dir}
  pgpass: {data}/pgpass
  authentication:
    superuser: {{username: postgres, password: {PASSWORD}}}
    replication: {{username: replicator, password: replicator}}
    rewind: {{username: rewinder, password: rewinder}}
  parameters:
    unix_socket_directories: '{data}'
tags: {{nofailover: false, noloadbalance: false, clonefrom: false, nosync: false}}
"#,
            rest = self.rest_ports[member],
            etcd = self.etcd_port,
            pg = self.pg_ports[member],
            data = data.display(),
            bin_dir = bin_dir.display(),
        );
        let path = self.dir.join(format!("{name}.yml"));
        std::fs::write(&path, text).unwrap();
        chown(&path, self.identity);
    }

    /// Starts (or restarts) one member's Patroni.
    pub fn start_member(&mut self, member: usize) {
        let name = Self::member_name(member);
        let data = self.dir.join(&name);
        std::fs::create_dir_all(&data).unwrap();
        std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        chown(&data, self.identity);
        let child = spawn_logged(
            Command::new("patroni").arg(self.dir.join(format!("{name}.yml"))),
            &self.dir.join(format!("{name}.log")),
            self.identity,
        );
        self.members[member] = Some(child);
    }

    /// The role a member's REST API reports.
    pub fn role(&self, member: usize) -> Role {
        let port = self.rest_ports[member];
        if http_get(port, "/primary").is_some_and(|(code, _)| code == 200) {
            Role::Leader
        } else if http_get(port, "/replica").is_some_and(|(code, _)| code == 200) {
            Role::Replica
        } else {
            Role::Down
        }
    }

    /// Whether a member is the synchronous standby (REST `/sync`).
    pub fn is_sync_standby(&self, member: usize) -> bool {
        http_get(self.rest_ports[member], "/sync").is_some_and(|(code, _)| code == 200)
    }

    pub fn leader(&self) -> Option<usize> {
        (0..MEMBERS).find(|&m| self.role(m) == Role::Leader)
    }

    /// Walsenders in state 'streaming' on the leader.
    fn streaming_replicas(&self) -> usize {
        let Some(leader) = self.leader() else {
            return 0;
        };
        self.psql(
            leader,
            "postgres",
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
        )
        .trim()
        .parse()
        .unwrap_or(0)
    }

    /// Runs one statement with psql on a member; its unaligned output ("" on failure).
    pub fn psql(&self, member: usize, dbname: &str, sql: &str) -> String {
        let output = Command::new(find_pg_binary("psql"))
            .args(["-X", "-q", "-At", "-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(self.pg_ports[member].to_string())
            .args(["-d", dbname, "-c", sql])
            .env("PGPASSWORD", PASSWORD)
            .env("PGCONNECT_TIMEOUT", "3")
            .stdin(Stdio::null())
            .output();
        match output {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
            _ => String::new(),
        }
    }

    /// The libpq-style multi-host settings of database `dbname`, as an operator writes them
    /// into `[database]`.
    pub fn connection(&self, dbname: &str) -> Conn {
        Conn {
            host: ["127.0.0.1"; MEMBERS].join(","),
            port: self
                .pg_ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(","),
            user: "postgres".into(),
            password: PASSWORD.into(),
            dbname: dbname.into(),
        }
    }

    /// A planned switchover to another member (a streaming replica); returns (old, new).
    /// Retries while Patroni refuses because the candidate is not ready yet.
    pub fn switchover(&self) -> (usize, usize) {
        wait_until_blocking(
            Duration::from_secs(60),
            "patronictl switchover succeeds",
            || {
                let leader = self.leader().expect("a leader before the switchover");
                // In synchronous mode only the synchronous standby may take over.
                let candidate = (0..MEMBERS)
                    .find(|&m| m != leader && self.is_sync_standby(m))
                    .expect("a synchronous standby to switch over to");
                let output = Command::new("patronictl")
                    .arg("-c")
                    .arg(self.dir.join(format!("{}.yml", Self::member_name(leader))))
                    .args(["switchover", "--leader"])
                    .arg(Self::member_name(leader))
                    .arg("--candidate")
                    .arg(Self::member_name(candidate))
                    .args(["--force", "praefect-test"])
                    .stdin(Stdio::null())
                    .output()
                    .unwrap();
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
                if output.status.success() && !text.contains("failed") && !text.contains("Error") {
                    Ok((leader, candidate))
                } else {
                    Err(text)
                }
            },
        )
    }

    /// SIGKILLs the leader's Patroni and postmaster; returns the member.
    pub fn kill_leader(&mut self) -> usize {
        let leader = self.leader().expect("a leader to kill");
        let postmaster = self.postmaster_pid(leader);
        if let Some(mut child) = self.members[leader].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(pid) = postmaster {
            kill(pid, "-KILL");
        }
        leader
    }

    fn postmaster_pid(&self, member: usize) -> Option<u32> {
        let file = self
            .dir
            .join(Self::member_name(member))
            .join("data/postmaster.pid");
        std::fs::read_to_string(file)
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// The members' Patroni logs, for failure messages.
    pub fn logs_tail(&self) -> String {
        let mut text = String::new();
        for member in 0..MEMBERS {
            let name = Self::member_name(member);
            let log =
                std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            text.push_str(&format!("--- {name}\n"));
            for line in tail.into_iter().rev() {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }
}

impl Drop for Patroni {
    fn drop(&mut self) {
        for child in self.members.iter_mut().flatten() {
            kill(child.id(), "-TERM");
        }
        // A grace period, not a check (so not `wait_until_blocking`): this runs in `Drop`,
        // and a member that ignores SIGTERM is killed below, never a panic.
        let deadline = Instant::now() + Duration::from_secs(15);
        for child in self.members.iter_mut().flatten() {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for member in 0..MEMBERS {
            if let Some(pid) = self.postmaster_pid(member) {
                kill(pid, "-KILL");
            }
        }
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
        if std::env::var_os("KEEP_PATRONI").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Leader,
    Replica,
    Down,
}

fn chown(path: &Path, identity: Option<(u32, u32)>) {
    if let Some((uid, gid)) = identity {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    }
}

fn spawn_logged(command: &mut Command, log: &Path, identity: Option<(u32, u32)>) -> Child {
    let file = std::fs::File::create(log).unwrap();
    chown(log, identity);
    if let Some((uid, gid)) = identity {
        command.uid(uid).gid(gid);
    }
    // Our own working directory (the checkout) may be closed to the unprivileged user, and
    // initdb, which Patroni runs, fails when it cannot read its working directory.
    command
        .current_dir(log.parent().unwrap())
        .env("HOME", log.parent().unwrap())
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {command:?}: {e}"))
}

fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// GET on loopback with a 2 s bound: (status code, body), None when nobody answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}
