//! Zero-downtime hand-over on SIGHUP, for service managers that restart the router by signal
//! after an upgrade (Omnibus GitLab's wrapper, a systemd `ExecReload`).
//!
//! The running router (the predecessor) starts its own binary again, with the same arguments
//! and environment, and passes it its listening sockets as inherited descriptors: the
//! successor loads the binary and the configuration anew but accepts on the very same
//! sockets, so no connection attempt is refused while the two overlap. Once the successor
//! serves it says so over a socket pair; only then does the predecessor stop accepting and
//! give its calls in flight `graceful_stop_timeout` to finish. A successor that exits, or is
//! not ready within [`READY_TIMEOUT`], is killed and the predecessor keeps serving.
//!
//! The descriptors sit at 3, 4, … in the successor: `LISTEN_FDS` says how many (systemd's
//! socket-activation variable, which `listenfd` reads), and [`FDS_ENV`] says what each one
//! is, a listener's kind and configured address, so that a successor whose configuration
//! changed binds anew instead of serving a stale address. The last descriptor is the
//! successor's end of the readiness socket pair.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use serde::{Deserialize, Serialize};

/// Names the inherited descriptors: a JSON [`Manifest`].
pub(super) const FDS_ENV: &str = "PRAEFECT_INHERITED_FDS";
/// How many descriptors were passed (read by `listenfd`).
const LISTEN_FDS: &str = "LISTEN_FDS";
/// Variables of the socket-activation protocol that must not reach the successor: a
/// `LISTEN_PID` naming another process would make `listenfd` ignore the descriptors, and a
/// `LISTEN_FDS_FIRST_FD` would move them.
const FOREIGN_ENV: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS_FIRST_FD", "LISTEN_FDNAMES"];
/// The first inherited descriptor (after stdin, stdout and stderr), as in socket activation.
const FIRST_FD: i32 = 3;
/// What a successor sends once it serves.
const READY: &[u8] = b"ready";
/// How long a successor may take to start (database, first health round, listeners) before
/// the predecessor gives up on it and kills it. Generous: the predecessor serves meanwhile.
pub(super) const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A listening socket, named by its kind and its address as configured (scheme prefix
/// removed), which is what a successor looks it up by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "address", rename_all = "lowercase")]
pub(super) enum ListenerId {
    Tcp(String),
    Tls(String),
    Unix(String),
    Prometheus(String),
}

/// What [`FDS_ENV`] holds: the listeners at `FIRST_FD..`, in order; the readiness socket
/// follows them.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Manifest {
    listeners: Vec<ListenerId>,
}

/// Why a hand-over (either side of it) or the pid file failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("{FDS_ENV} is not a valid list of inherited descriptors: {0}")]
    Manifest(#[source] serde_json::Error),
    #[error("{FDS_ENV} names {named} descriptors but {LISTEN_FDS} passes {passed}")]
    Count { named: usize, passed: usize },
    #[error("inherited descriptor {fd} is not the {what} it should be: {source}")]
    Descriptor {
        fd: i32,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("duplicating the listening sockets: {0}")]
    Duplicate(#[source] io::Error),
    #[error("creating the readiness socket pair: {0}")]
    Pair(#[source] io::Error),
    #[error("finding this process's binary: {0}")]
    Binary(#[source] io::Error),
    #[error("two inherited descriptors map to the same number")]
    Collision(#[from] command_fds::FdMappingCollision),
    #[error("starting the successor: {0}")]
    Spawn(#[source] io::Error),
    #[error("the successor exited before it was ready: {0}")]
    Exited(ExitStatus),
    #[error("waiting for the successor: {0}")]
    Wait(#[source] io::Error),
    #[error("the successor was not ready within {0:?}; it was killed")]
    Timeout(Duration),
    #[error("the successor sent {0:?} instead of its readiness")]
    Unexpected(String),
    #[error("writing the pid file {path}: {source}")]
    PidFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An inherited listening socket.
enum InheritedSocket {
    Tcp(std::net::TcpListener),
    Unix(UnixListener),
}

/// What a successor inherited from its predecessor; empty on a normal start.
#[derive(Default)]
pub struct Inheritance {
    listeners: InheritedListeners,
    predecessor: Option<Predecessor>,
}

/// The inherited listeners not yet taken by the startup, by configured address.
#[derive(Default)]
pub(super) struct InheritedListeners(HashMap<ListenerId, InheritedSocket>);

/// The predecessor's end of the readiness pair, as the successor holds it.
pub(super) struct Predecessor(UnixDatagram);

/// Takes the descriptors a predecessor passed, if this process is a successor ([`FDS_ENV`]
/// set), and clears the variables so that no process this one starts sees them. Called
/// before anything else runs (no other thread reads the environment yet, and no process,
/// such as `config_command`, is started before the descriptors are marked close-on-exec).
pub fn inherit() -> Result<Inheritance, HandoverError> {
    let Some(manifest) = std::env::var_os(FDS_ENV) else {
        return Ok(Inheritance::default());
    };
    std::env::remove_var(FDS_ENV);
    // Also removes LISTEN_FDS and LISTEN_PID.
    let mut fds = listenfd::ListenFd::from_env();
    let manifest: Manifest =
        serde_json::from_slice(manifest.as_bytes()).map_err(HandoverError::Manifest)?;
    let named = manifest.listeners.len() + 1;
    if fds.len() != named {
        return Err(HandoverError::Count {
            named,
            passed: fds.len(),
        });
    }
    let mut listeners = HashMap::new();
    for (index, id) in manifest.listeners.into_iter().enumerate() {
        let fd = fd_at(index);
        let socket = match id {
            ListenerId::Unix(_) => fds
                .take_unix_listener(index)
                .map(|l| l.map(InheritedSocket::Unix)),
            _ => fds
                .take_tcp_listener(index)
                .map(|l| l.map(InheritedSocket::Tcp)),
        };
        let what = match id {
            ListenerId::Unix(_) => "unix listener",
            _ => "tcp listener",
        };
        match socket {
            Ok(Some(socket)) => {
                listeners.insert(id, socket);
            }
            Ok(None) => {}
            Err(source) => return Err(HandoverError::Descriptor { fd, what, source }),
        }
    }
    let ready_index = named - 1;
    let predecessor = fds
        .take_unix_datagram(ready_index)
        .map_err(|source| HandoverError::Descriptor {
            fd: fd_at(ready_index),
            what: "readiness socket",
            source,
        })?
        .map(Predecessor);
    Ok(Inheritance {
        listeners: InheritedListeners(listeners),
        predecessor,
    })
}

/// The descriptor number of the `index`th inherited descriptor (for messages).
fn fd_at(index: usize) -> i32 {
    FIRST_FD.saturating_add(i32::try_from(index).unwrap_or(i32::MAX))
}

impl Inheritance {
    pub(super) fn split(self) -> (InheritedListeners, Option<Predecessor>) {
        (self.listeners, self.predecessor)
    }
}

impl InheritedListeners {
    /// The inherited TCP listener configured as `id`, if there is one.
    pub(super) fn take_tcp(&mut self, id: &ListenerId) -> Option<std::net::TcpListener> {
        match self.0.remove(id)? {
            InheritedSocket::Tcp(listener) => Some(listener),
            // A unix socket under a TCP name cannot come from a predecessor's manifest.
            InheritedSocket::Unix(_) => None,
        }
    }

    /// The inherited Unix listener configured as `id`, if there is one.
    pub(super) fn take_unix(&mut self, id: &ListenerId) -> Option<UnixListener> {
        match self.0.remove(id)? {
            InheritedSocket::Unix(listener) => Some(listener),
            InheritedSocket::Tcp(_) => None,
        }
    }

    /// Closes the inherited listeners the configuration no longer names (their addresses
    /// changed), saying so: connections to them are refused from now on.
    pub(super) fn close_unused(self) {
        for id in self.0.into_keys() {
            tracing::info!(listener = ?id, "inherited listener not in the configuration; closed");
        }
    }
}

impl Predecessor {
    /// Tells the predecessor that this process serves, so that it stops accepting.
    pub(super) fn notify_ready(self) -> io::Result<()> {
        self.0.send(READY).map(|_| ())
    }
}

/// A listening socket the router can pass on: its name and a duplicate of its descriptor,
/// kept because the listener itself is owned by the server that accepts on it.
pub(super) struct Passable {
    id: ListenerId,
    fd: OwnedFd,
}

impl Passable {
    pub(super) fn of(id: ListenerId, listener: &impl AsFd) -> io::Result<Passable> {
        Ok(Passable {
            id,
            fd: listener.as_fd().try_clone_to_owned()?,
        })
    }
}

/// Duplicates of `listeners`, for one hand-over (the command that starts the successor owns
/// the descriptors it passes).
pub(super) fn duplicate(listeners: &[Passable]) -> Result<Vec<Passable>, HandoverError> {
    listeners
        .iter()
        .map(|p| {
            Ok(Passable {
                id: p.id.clone(),
                fd: p.fd.try_clone().map_err(HandoverError::Duplicate)?,
            })
        })
        .collect()
}

/// A started successor, killed when dropped unless it became ready: a hand-over abandoned
/// (SIGTERM meanwhile, timeout) must not leave a second router behind.
struct Successor {
    child: tokio::process::Child,
    ready: bool,
}

impl Drop for Successor {
    fn drop(&mut self) {
        if !self.ready {
            let _ = self.child.start_kill();
        }
    }
}

/// Starts a successor on `listeners` and waits until it serves; its pid. On an error the
/// successor is gone (it exited or was killed) and this process should keep serving.
pub(super) async fn hand_over(listeners: Vec<Passable>) -> Result<u32, HandoverError> {
    let (ours, theirs) = UnixDatagram::pair().map_err(HandoverError::Pair)?;
    ours.set_nonblocking(true).map_err(HandoverError::Pair)?;
    let ours = tokio::net::UnixDatagram::from_std(ours).map_err(HandoverError::Pair)?;
    let mut successor = spawn(listeners, theirs)?;
    let pid = successor.child.id().unwrap_or_default();
    tracing::info!(
        successor_pid = pid,
        "successor started; waiting until it serves"
    );
    let mut buf = [0u8; 64];
    tokio::select! {
        received = ours.recv(&mut buf) => {
            let n = received.map_err(HandoverError::Wait)?;
            if &buf[..n] != READY {
                return Err(HandoverError::Unexpected(
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                ));
            }
        }
        status = successor.child.wait() => {
            let status = status.map_err(HandoverError::Wait)?;
            return Err(HandoverError::Exited(status));
        }
        () = tokio::time::sleep(READY_TIMEOUT) => return Err(HandoverError::Timeout(READY_TIMEOUT)),
    }
    successor.ready = true;
    Ok(pid)
}

/// Starts the successor: this binary with this process's arguments and environment, plus the
/// descriptors. The command is dropped once the child is started, which closes this
/// process's copies of the successor's descriptors (so that only the successor holds its end
/// of the readiness pair).
fn spawn(listeners: Vec<Passable>, ready: UnixDatagram) -> Result<Successor, HandoverError> {
    let manifest = Manifest {
        listeners: listeners.iter().map(|p| p.id.clone()).collect(),
    };
    let manifest = serde_json::to_string(&manifest).map_err(HandoverError::Manifest)?;
    let count = listeners.len() + 1;
    let mappings: Vec<FdMapping> = listeners
        .into_iter()
        .map(|p| p.fd)
        .chain(std::iter::once(OwnedFd::from(ready)))
        .zip(FIRST_FD..)
        .map(|(parent_fd, child_fd)| FdMapping {
            parent_fd,
            child_fd,
        })
        .collect();
    let mut args = std::env::args_os();
    let binary = successor_binary().map_err(HandoverError::Binary)?;
    let mut command = tokio::process::Command::new(&binary);
    if let Some(arg0) = args.next() {
        command.arg0(arg0);
    }
    command
        .args(args)
        .env(FDS_ENV, manifest)
        .env(LISTEN_FDS, count.to_string());
    for name in FOREIGN_ENV {
        command.env_remove(name);
    }
    command.fd_mappings(mappings)?;
    let child = command.spawn().map_err(HandoverError::Spawn)?;
    drop(command);
    Ok(Successor {
        child,
        ready: false,
    })
}

/// The binary to start: this process's own path, looked up anew so that an upgrade that
/// replaced the file starts the new binary.
fn successor_binary() -> io::Result<PathBuf> {
    std::env::current_exe().map(without_deleted_suffix)
}

/// Linux reports the path of a binary that was replaced (deleted while running) with
/// " (deleted)" appended; the path without it is where the new binary is.
fn without_deleted_suffix(path: PathBuf) -> PathBuf {
    let bytes = path.as_os_str().as_bytes();
    match bytes.strip_suffix(b" (deleted)") {
        Some(stripped) => PathBuf::from(OsString::from_vec(stripped.to_vec())),
        None => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_names_each_listener_by_kind_and_configured_address() {
        let manifest = Manifest {
            listeners: vec![
                ListenerId::Tcp("127.0.0.1:2305".into()),
                ListenerId::Tls("0.0.0.0:3305".into()),
                ListenerId::Unix("/var/opt/praefect.socket".into()),
                ListenerId::Prometheus("localhost:9652".into()),
            ],
        };
        let text = serde_json::to_string(&manifest).unwrap();
        assert_eq!(
            text,
            r#"{"listeners":[{"kind":"tcp","address":"127.0.0.1:2305"},{"kind":"tls","address":"0.0.0.0:3305"},{"kind":"unix","address":"/var/opt/praefect.socket"},{"kind":"prometheus","address":"localhost:9652"}]}"#
        );
        assert_eq!(serde_json::from_str::<Manifest>(&text).unwrap(), manifest);
    }

    #[test]
    fn a_replaced_binary_is_started_from_its_path() {
        assert_eq!(
            without_deleted_suffix("/opt/gitlab/embedded/bin/praefect (deleted)".into()),
            PathBuf::from("/opt/gitlab/embedded/bin/praefect")
        );
        assert_eq!(
            without_deleted_suffix("/usr/bin/praefect".into()),
            PathBuf::from("/usr/bin/praefect")
        );
    }

    #[test]
    fn a_listener_is_taken_once_and_only_under_its_own_name() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let id = ListenerId::Tcp("127.0.0.1:0".into());
        let mut inherited =
            InheritedListeners(HashMap::from([(id.clone(), InheritedSocket::Tcp(tcp))]));
        assert!(inherited
            .take_unix(&ListenerId::Unix("127.0.0.1:0".into()))
            .is_none());
        assert!(inherited
            .take_tcp(&ListenerId::Tls("127.0.0.1:0".into()))
            .is_none());
        assert!(inherited.take_tcp(&id).is_some());
        assert!(inherited.take_tcp(&id).is_none());
    }
}
