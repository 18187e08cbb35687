//! Sidechannels: a raw byte stream beside a gRPC call, for git's pack data (upload-pack), so
//! that packfiles do not pay for protobuf framing.
//!
//! The caller registers a waiter and sends `gitaly-sidechannel-id: <id>` with the call. The
//! server opens a stream back over the caller's backchannel and writes `sidechannel` and the
//! id as 8 big-endian bytes; the caller answers `ok`. Then the caller sends its data pkt-line
//! framed, ending with a flush (its half-close), and the server answers with raw bytes until it
//! closes the stream. Opening must complete within 5 seconds.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::backchannel::io::BoxIo;
use crate::backchannel::sessions::{PeerInfo, SessionRegistry};

/// What the server writes first on a sidechannel stream, before the id.
pub const SIDECHANNEL_MAGIC: &[u8; 11] = b"sidechannel";
/// The metadata key that carries the sidechannel id.
pub const METADATA_KEY: &str = "gitaly-sidechannel-id";
/// Bound on opening a sidechannel, both sides.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a sidechannel could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SidechannelError {
    #[error("no sidechannel id in the call metadata")]
    MissingId,
    #[error("invalid sidechannel id {0:?}")]
    InvalidId(String),
    #[error("the caller did not connect with a backchannel")]
    NoBackchannel,
    #[error("opening the sidechannel timed out")]
    Timeout,
    #[error("sidechannel handshake: {0}")]
    Handshake(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The caller's side: calls waiting for the server to connect their sidechannel.
#[derive(Clone, Default)]
pub struct SidechannelRegistry {
    waiters: Arc<Mutex<HashMap<u64, oneshot::Sender<BoxIo>>>>,
    next_id: Arc<AtomicU64>,
}

impl SidechannelRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<BoxIo>>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a waiter; send its id with the call.
    pub fn register(&self) -> SidechannelWaiter {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id, tx);
        SidechannelWaiter {
            id,
            rx: Some(rx),
            registry: self.clone(),
        }
    }

    /// Hands a stream the server opened for `id` to its waiter, answering `ok`. Streams for
    /// unknown ids are dropped (closed).
    pub(crate) async fn deliver(&self, id: u64, mut stream: BoxIo) {
        let Some(waiter) = self.lock().remove(&id) else {
            tracing::debug!(sidechannel_id = id, "sidechannel for an unknown id closed");
            return;
        };
        if stream.write_all(b"ok").await.is_err() || stream.flush().await.is_err() {
            return;
        }
        let _ = waiter.send(stream);
    }

    /// Waiters not yet connected (for tests and leak checks).
    pub fn pending(&self) -> usize {
        self.lock().len()
    }
}

/// One call's wait for its sidechannel; unregisters itself when dropped.
pub struct SidechannelWaiter {
    id: u64,
    rx: Option<oneshot::Receiver<BoxIo>>,
    registry: SidechannelRegistry,
}

impl SidechannelWaiter {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Waits until the server connects the sidechannel.
    pub async fn connected(&mut self) -> Result<BoxIo, SidechannelError> {
        let rx = self
            .rx
            .take()
            .ok_or(SidechannelError::Handshake("already waited".into()))?;
        rx.await
            .map_err(|_| SidechannelError::Handshake("registry dropped the waiter".into()))
    }
}

impl Drop for SidechannelWaiter {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

/// A sidechannel id as the metadata carries it: a non-negative int64 in decimal digits only
/// (no sign, no spaces), as every Gitaly client makes them. Anything else (`abc`, `-1`, a
/// value past `i64::MAX`) is refused rather than wrapped into some other caller's id.
pub fn parse_id(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<i64>().ok().map(|id| id as u64)
}

/// The sidechannel id of a call: the last value of the metadata key (a router in between
/// appends its own id to the client's).
pub fn id_from_metadata(metadata: &tonic::metadata::MetadataMap) -> Result<u64, SidechannelError> {
    let value = metadata
        .get_all(METADATA_KEY)
        .iter()
        .next_back()
        .ok_or(SidechannelError::MissingId)?;
    let text = value
        .to_str()
        .map_err(|_| SidechannelError::InvalidId(format!("{value:?}")))?;
    parse_id(text).ok_or_else(|| SidechannelError::InvalidId(text.to_string()))
}

/// The server's side: opens the sidechannel `id` to the caller of a call that arrived over
/// `peer`'s connection.
pub async fn open(
    sessions: &SessionRegistry,
    peer: &PeerInfo,
    id: u64,
) -> Result<BoxIo, SidechannelError> {
    let session = peer.backchannel_id.ok_or(SidechannelError::NoBackchannel)?;
    let handshake = async {
        let mut stream = sessions.open_held_stream(session).await?;
        stream.write_all(SIDECHANNEL_MAGIC).await?;
        stream.write_all(&id.to_be_bytes()).await?;
        stream.flush().await?;
        let mut answer = [0u8; 2];
        stream.read_exact(&mut answer).await?;
        if &answer != b"ok" {
            return Err(SidechannelError::Handshake(format!(
                "expected \"ok\", got {:?}",
                String::from_utf8_lossy(&answer)
            )));
        }
        Ok(Box::new(stream) as BoxIo)
    };
    tokio::time::timeout(OPEN_TIMEOUT, handshake)
        .await
        .map_err(|_| SidechannelError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_metadata_value_wins() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert!(matches!(
            id_from_metadata(&md),
            Err(SidechannelError::MissingId)
        ));
        md.append(METADATA_KEY, "5".parse().unwrap());
        md.append(METADATA_KEY, "17".parse().unwrap());
        assert_eq!(id_from_metadata(&md).unwrap(), 17);
        md.append(METADATA_KEY, "x".parse().unwrap());
        assert!(matches!(
            id_from_metadata(&md),
            Err(SidechannelError::InvalidId(_))
        ));
    }

    #[test]
    fn only_plain_non_negative_int64_ids_parse() {
        assert_eq!(parse_id("0"), Some(0));
        assert_eq!(parse_id("17"), Some(17));
        assert_eq!(parse_id("9223372036854775807"), Some(i64::MAX as u64));
        for bad in [
            "",
            "abc",
            "-1",
            "+1",
            " 1",
            "1 ",
            "0x10",
            "9223372036854775808",
            "99999999999999999999999",
        ] {
            assert_eq!(parse_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn dropped_waiters_unregister() {
        let registry = SidechannelRegistry::default();
        let a = registry.register();
        let b = registry.register();
        assert_ne!(a.id(), b.id());
        assert_eq!(registry.pending(), 2);
        drop(a);
        assert_eq!(registry.pending(), 1);
    }
}
