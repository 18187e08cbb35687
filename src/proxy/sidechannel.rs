//! Proxying a sidechannel: the client asked its node for a sidechannel (metadata
//! `gitaly-sidechannel-id`), but the node sees the router, not the client. So the router
//! registers its own waiter and appends its id to the metadata (nodes use the last value);
//! when the node connects back, the router opens a sidechannel to the client under the
//! client's id and copies between them: client to node packet by packet up to the client's
//! flush, node to client as raw bytes until the node closes.
//!
//! A sidechannel on which no byte moves in either direction for `[proxy]
//! sidechannel_idle_timeout` is closed on both sides: a client that answers `ok` and then
//! neither writes nor reads must not hold the bridge's tasks, and through the node's side the
//! node's git process, for as long as its connection lives.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::task::TaskTracker;

use super::error::Malformed;
use crate::wire::backchannel::{BoxIo, PeerInfo, SessionRegistry};
use crate::wire::idle::Activity;
use crate::wire::pktline::{self, Packet};
use crate::wire::sidechannel::{self, SidechannelWaiter};

/// How long the node may take to connect its sidechannel after the call was forwarded.
const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects the node's sidechannel (when it arrives) to the client's, in the background, on
/// `bridges` (which a graceful stop waits for).
pub fn spawn_bridge(
    bridges: &TaskTracker,
    mut waiter: SidechannelWaiter,
    sessions: SessionRegistry,
    client: PeerInfo,
    client_id: u64,
    idle_timeout: Duration,
) {
    bridges.spawn(async move {
        let node = match tokio::time::timeout(NODE_CONNECT_TIMEOUT, waiter.connected()).await {
            Ok(Ok(node)) => node,
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "node sidechannel never connected");
                return;
            }
            Err(_) => return, // the call ended without a sidechannel (e.g. an error)
        };
        let client = match sidechannel::open(&sessions, &client, client_id).await {
            Ok(client) => client,
            Err(err) => {
                tracing::info!(error = %err, "opening the client's sidechannel failed");
                return;
            }
        };
        bridge(client, node, idle_timeout).await;
    });
}

/// How long the client side may stay open after the node finished its answer.
const LINGER: Duration = Duration::from_secs(30);
/// The buffer of a sidechannel's node-to-client copy: what one read of the node's stream may
/// take and one write to the client's stream hands on. `tokio::io::copy`'s 8 KiB made a
/// 130 MB pack sixteen thousand read/write pairs (each a yamux frame and a wake-up of the
/// client's session); this is the per-clone memory it costs, and all of it.
const BRIDGE_BUFFER: usize = 128 * 1024;

async fn bridge(client: BoxIo, node: BoxIo, idle_timeout: Duration) {
    let activity = Activity::new();
    let (client_read, client_write) = tokio::io::split(activity.watch(client));
    let (node_read, node_write) = tokio::io::split(activity.watch(node));
    let mut upstream = tokio::spawn(client_to_node(client_read, node_write));
    let transfer = async {
        node_to_client(node_read, client_write).await;
        // The answer is complete and the client's stream half-closed. The client closes its
        // side when it is done; until then keep reading it (an interactive SSH fetch never
        // sends the flush), but not for ever.
        let _ = tokio::time::timeout(LINGER, &mut upstream).await;
    };
    tokio::select! {
        () = transfer => {}
        () = activity.idle(idle_timeout) => {
            // Dropping both streams closes them: the node sees its caller gone and ends its
            // git process, the client sees the end of its answer.
            tracing::info!(
                idle_timeout = ?idle_timeout,
                "sidechannel closed: no data moved either way"
            );
        }
    }
    upstream.abort();
}

/// Client packets to the node until the client's flush; then keep reading the client so its
/// window updates (which travel on the read path) reach our writer.
async fn client_to_node<R, W>(mut client: R, mut node: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        match pktline::read_packet(&mut client).await {
            Ok(Some(Packet::Data(data))) => {
                if pktline::write_data(&mut node, &data).await.is_err() {
                    return;
                }
            }
            Ok(Some(Packet::Flush)) => {
                let _ = node.write_all(pktline::FLUSH).await;
                let _ = node.flush().await;
                break;
            }
            Ok(None) | Err(_) => return,
        }
    }
    let _ = tokio::io::copy(&mut client, &mut tokio::io::sink()).await;
}

/// The node's answer to the client as raw bytes, then close the client's stream.
async fn node_to_client<R, W>(mut node: R, mut client: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut node = tokio::io::BufReader::with_capacity(BRIDGE_BUFFER, &mut node);
    let _ = tokio::io::copy_buf(&mut node, &mut client).await;
    let _ = client.shutdown().await;
}

/// The client's sidechannel id, if the call uses one. The client owns one sidechannel per
/// call: a repeated key is refused (on a node the last value wins, which is how the router's
/// appended id takes over; a client has no business sending two), as is a value that is not
/// a plain non-negative int64.
pub fn client_id(headers: &http::HeaderMap) -> Result<Option<u64>, Malformed> {
    let mut values = headers
        .get_all(crate::wire::header_names::SIDECHANNEL_ID)
        .iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Malformed::SidechannelId);
    }
    value
        .to_str()
        .ok()
        .and_then(sidechannel::parse_id)
        .map(Some)
        .ok_or(Malformed::SidechannelId)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        for value in values {
            headers.append(
                sidechannel::METADATA_KEY,
                http::HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    #[test]
    fn client_ids_are_plain_single_int64s() {
        assert_eq!(client_id(&headers(&[])).unwrap(), None);
        assert_eq!(client_id(&headers(&["42"])).unwrap(), Some(42));
        for bad in [
            &["abc"][..],
            &["-1"],
            &["9223372036854775808"],
            &["18446744073709551616"],
            &["1", "2"],
            &["1", "1"],
        ] {
            assert!(
                matches!(client_id(&headers(bad)), Err(Malformed::SidechannelId)),
                "{bad:?}"
            );
        }
    }
}
