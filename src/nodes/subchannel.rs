//! The HTTP/2 connections to one address of a node, in two lanes ([`Lane`]): calls the node
//! may answer back on (reference-transaction votes, sidechannels) go over connections that
//! each carry a backchannel session; every other call goes over plain HTTP/2 connections,
//! which spare each frame the session's task hop and framing. Per lane: one connection, and
//! a few more while every one of them carries [`STREAMS_PER_CONNECTION`] calls (see
//! [`Subchannel::ready`]).
//!
//! Calls take a clone of the connection's handle ([`Http2Conn`]) and open their stream on it
//! from their own task: no tower `Buffer` worker in between, which is where tonic's `Channel`
//! spent a task hop and a queue per call. The connection is made on demand, one
//! attempt at a time however many calls are waiting for it, and after failed attempts the
//! next one waits a growing delay, so a node that is down costs neither a connect per call
//! nor a busy loop.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::time::Instant;
use tokio_yamux::Config as YamuxConfig;

use super::http2::{Http2Conn, STREAMS_PER_CONNECTION};
use crate::wire::backchannel::{self, ClientHandler, DialTarget};

pub(crate) type Sender = Http2Conn;

/// Delay before the attempt after the first failed one; it doubles per failure up to the cap.
/// Short, because a restarted node should be used again within about a health-check round.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// Connections to one address at most: the first and up to seven more for load.
pub(crate) const MAX_CONNECTIONS: usize = 8;

/// Why a connection attempt failed, as text: it is shared by every call that waited for the
/// attempt, and replayed to the calls that come during the back-off.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ConnectFailure(pub String);

/// How connections are made; shared by all subchannels of a node.
pub(crate) struct ConnectSettings {
    pub yamux: YamuxConfig,
    pub handler: ClientHandler,
    pub timeout: Duration,
    /// Calls on a connection before another one is opened ([`STREAMS_PER_CONNECTION`];
    /// tests make it small).
    pub streams_per_connection: usize,
}

impl ConnectSettings {
    pub(crate) fn new(yamux: YamuxConfig, handler: ClientHandler, timeout: Duration) -> Self {
        ConnectSettings {
            yamux,
            handler,
            timeout,
            streams_per_connection: STREAMS_PER_CONNECTION,
        }
    }
}

/// Which connections a call needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lane {
    /// Connections with a backchannel session, over which the node can call the router
    /// (votes) and open sidechannels to it.
    Backchannel,
    /// Plain HTTP/2: for calls that neither vote nor use a sidechannel.
    Plain,
}

impl Lane {
    /// The lane a call with these headers needs: the backchannel one when it carries a
    /// reference transaction or a sidechannel (the node answers back over the session it
    /// came on), the plain one otherwise.
    pub(crate) fn for_headers(headers: &http::HeaderMap) -> Lane {
        if headers.contains_key(crate::wire::header_names::REFERENCE_TRANSACTION)
            || headers.contains_key(crate::wire::header_names::SIDECHANNEL_ID)
        {
            Lane::Backchannel
        } else {
            Lane::Plain
        }
    }

    fn index(self) -> usize {
        match self {
            Lane::Backchannel => 0,
            Lane::Plain => 1,
        }
    }
}

pub(crate) type Attempt = Shared<BoxFuture<'static, Result<Sender, ConnectFailure>>>;

enum Start {
    Ready(Sender),
    Attempt(Attempt),
    BackingOff(Instant),
}

enum Conn {
    Idle,
    Connecting(Attempt),
    Ready(Sender),
}

struct State {
    conn: Conn,
    /// Failed attempts since the last success.
    failures: u32,
    last_failure: Option<ConnectFailure>,
    /// No new attempt before this, after a failure.
    retry_at: Option<Instant>,
    /// Connections opened because the others were loaded; used alongside `conn`'s.
    extra: Vec<Sender>,
    /// An extra connection is being made.
    extra_connecting: bool,
}

pub(crate) struct Subchannel {
    target: DialTarget,
    settings: Arc<ConnectSettings>,
    /// One state per [`Lane`], by [`Lane::index`].
    lanes: [Mutex<State>; 2],
}

fn backoff(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    BACKOFF_BASE
        .saturating_mul(1u32 << exponent)
        .min(BACKOFF_CAP)
}

impl Subchannel {
    pub(crate) fn new(target: DialTarget, settings: Arc<ConnectSettings>) -> Self {
        let state = || {
            Mutex::new(State {
                conn: Conn::Idle,
                failures: 0,
                last_failure: None,
                retry_at: None,
                extra: Vec::new(),
                extra_connecting: false,
            })
        };
        Subchannel {
            target,
            settings,
            lanes: [state(), state()],
        }
    }

    pub(crate) fn target(&self) -> &DialTarget {
        &self.target
    }

    fn lock(&self, lane: Lane) -> MutexGuard<'_, State> {
        self.lanes[lane.index()]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The least loaded connection's sender if one is up; closed connections are forgotten
    /// here, so the next [`Subchannel::connect`] makes a new one.
    ///
    /// When even the least loaded one carries `streams_per_connection` calls, another
    /// connection is opened in the background (up to [`MAX_CONNECTIONS`]) and this call goes
    /// on the least loaded one meanwhile. Separate connections have separate flow-control
    /// windows, so however many calls on one connection have clients that stopped reading,
    /// the calls on the others flow; and no connection gets more calls than its window can
    /// hold unread (see `http2::CONNECTION_WINDOW`) while another could be opened.
    pub(crate) fn ready(self: &Arc<Self>, lane: Lane) -> Option<Sender> {
        let mut state = self.lock(lane);
        state.extra.retain(|sender| !sender.is_closed());
        if matches!(&state.conn, Conn::Ready(sender) if sender.is_closed()) {
            state.conn = match state.extra.pop() {
                Some(sender) => Conn::Ready(sender),
                None => Conn::Idle,
            };
        }
        let Conn::Ready(first) = &state.conn else {
            return None;
        };
        let best = std::iter::once(first)
            .chain(state.extra.iter())
            .min_by_key(|sender| sender.active_calls())
            .cloned()?;
        let connections = 1 + state.extra.len();
        if best.active_calls() >= self.settings.streams_per_connection
            && !state.extra_connecting
            && connections < MAX_CONNECTIONS
        {
            state.extra_connecting = true;
            self.spawn_extra(lane);
        }
        Some(best)
    }

    /// Opens one more connection in the background; a failure is only logged (the ones
    /// there still serve, and the next loaded call tries again).
    fn spawn_extra(self: &Arc<Self>, lane: Lane) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let timeout = this.settings.timeout;
            let result =
                tokio::time::timeout(timeout, establish(&this.target, &this.settings, lane)).await;
            let mut state = this.lock(lane);
            state.extra_connecting = false;
            match result {
                Ok(Ok(sender)) => {
                    tracing::debug!(target = %this.target, connections = state.extra.len() + 2, "opened another connection to a loaded node");
                    state.extra.push(sender);
                }
                Ok(Err(failure)) => {
                    tracing::debug!(error = %failure, "another connection to a loaded node failed");
                }
                Err(_) => {
                    tracing::debug!(target = %this.target, "another connection to a loaded node timed out");
                }
            }
        });
    }

    /// Whether a call in `lane` could use this subchannel now without connecting.
    pub(crate) fn is_ready(&self, lane: Lane) -> bool {
        matches!(&self.lock(lane).conn, Conn::Ready(sender) if !sender.is_closed())
    }

    /// A future for a usable sender: the live connection, the attempt in progress, or a new
    /// attempt. During the back-off after a failure, the failure itself, at once.
    pub(crate) fn connect(self: &Arc<Self>, lane: Lane) -> Result<Attempt, ConnectFailure> {
        match self.start(lane) {
            Start::Ready(sender) => Ok(futures::future::ready(Ok(sender)).boxed().shared()),
            Start::Attempt(attempt) => Ok(attempt),
            Start::BackingOff(retry_at) => {
                let state = self.lock(lane);
                let failure = state.last_failure.as_ref().map_or("", |f| f.0.as_str());
                Err(ConnectFailure(format!(
                    "{failure} (next attempt in {} ms)",
                    retry_at
                        .saturating_duration_since(Instant::now())
                        .as_millis()
                        .max(1)
                )))
            }
        }
    }

    /// Starts a connection attempt in the background if there is no connection, none under
    /// way and no back-off: how an address that is not in use gets back into the rotation.
    pub(crate) fn kick(self: &Arc<Self>, lane: Lane) {
        let _ = self.start(lane);
    }

    fn start(self: &Arc<Self>, lane: Lane) -> Start {
        if let Some(sender) = self.ready(lane) {
            return Start::Ready(sender);
        }
        let mut state = self.lock(lane);
        match &state.conn {
            Conn::Ready(sender) if !sender.is_closed() => return Start::Ready(sender.clone()),
            Conn::Connecting(attempt) => return Start::Attempt(attempt.clone()),
            Conn::Ready(_) | Conn::Idle => {}
        }
        if let Some(retry_at) = state.retry_at {
            if Instant::now() < retry_at {
                return Start::BackingOff(retry_at);
            }
        }
        // The attempt runs in its own task: a caller that gives up does not cancel it for
        // the others, and its outcome is recorded even if nobody waits any more.
        let this = Arc::clone(self);
        let task = tokio::spawn(async move {
            let timeout = this.settings.timeout;
            let attempt = establish(&this.target, &this.settings, lane);
            let result = match tokio::time::timeout(timeout, attempt).await {
                Ok(result) => result,
                Err(_) => Err(ConnectFailure(format!(
                    "{}: no connection within {timeout:?}",
                    this.target
                ))),
            };
            this.finish(lane, &result);
            result
        });
        let attempt = task
            .map(|joined| {
                joined.unwrap_or_else(|e| Err(ConnectFailure(format!("connection attempt: {e}"))))
            })
            .boxed()
            .shared();
        state.conn = Conn::Connecting(attempt.clone());
        Start::Attempt(attempt)
    }

    fn finish(&self, lane: Lane, result: &Result<Sender, ConnectFailure>) {
        let mut state = self.lock(lane);
        match result {
            Ok(sender) => {
                state.conn = Conn::Ready(sender.clone());
                state.failures = 0;
                state.last_failure = None;
                state.retry_at = None;
            }
            Err(failure) => {
                state.conn = Conn::Idle;
                state.failures = state.failures.saturating_add(1);
                state.retry_at = Some(Instant::now() + backoff(state.failures));
                state.last_failure = Some(failure.clone());
            }
        }
    }
}

/// Connects and starts HTTP/2: on the socket for the plain lane, on the first stream of a
/// backchannel session for the other.
async fn establish(
    target: &DialTarget,
    settings: &ConnectSettings,
    lane: Lane,
) -> Result<Sender, ConnectFailure> {
    let failed =
        |what: &str, err: &dyn std::fmt::Display| ConnectFailure(format!("{target}: {what}{err}"));
    let io = backchannel::connect_target(target)
        .await
        .map_err(|e| failed("", &e))?;
    if lane == Lane::Plain {
        return Http2Conn::start(io, None, target.to_string())
            .await
            .map_err(|e| failed("HTTP/2 handshake: ", &e));
    }
    let session = backchannel::start_client_session(io, settings.yamux, settings.handler.clone())
        .await
        .map_err(|e| failed("backchannel: ", &e))?;
    Http2Conn::start(session.stream, Some(session.control), target.to_string())
        .await
        .map_err(|e| failed("HTTP/2 handshake: ", &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(6), BACKOFF_CAP);
        assert_eq!(backoff(u32::MAX), BACKOFF_CAP);
    }

    fn refused_target() -> DialTarget {
        // A port nobody listens on: bind, note it, and close.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        DialTarget::Resolved {
            addr,
            tls_server_name: None,
        }
    }

    #[tokio::test]
    async fn failed_attempts_are_shared_and_then_back_off() {
        let settings = Arc::new(ConnectSettings::new(
            backchannel::yamux_config(0, 256),
            ClientHandler::default(),
            Duration::from_secs(5),
        ));
        let sub = Arc::new(Subchannel::new(refused_target(), settings));
        let first = sub.connect(Lane::Plain).unwrap();
        let second = sub.connect(Lane::Plain).unwrap();
        let (a, b) = futures::join!(first, second);
        assert!(a.is_err() && b.is_err());
        // Within the back-off, no new attempt: the failure comes back at once.
        let Err(during) = sub.connect(Lane::Plain) else {
            panic!("a new attempt during the back-off");
        };
        assert!(during.0.contains("next attempt"), "{during}");
        assert!(
            sub.connect(Lane::Backchannel).is_ok(),
            "the other lane has its own back-off"
        );
        tokio::time::sleep(backoff(1) + Duration::from_millis(20)).await;
        assert!(
            sub.connect(Lane::Plain).is_ok(),
            "a new attempt after the back-off"
        );
        assert!(!sub.is_ready(Lane::Plain));
    }
}
