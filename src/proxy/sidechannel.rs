//! Proxying a sidechannel: the client asked its node for a sidechannel (metadata
//! `gitaly-sidechannel-id`), but the node sees the router, not the client. So the router
//! registers its own waiter and appends its id to the metadata (nodes use the last value);
//! when the node connects back, the router opens a sidechannel to the client under the
//! client's id and copies between them: client to node packet by packet up to the client's
//! flush, node to client as raw bytes until the node closes.

use std::time::Duration;

use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_util::task::TaskTracker;

use super::error::Malformed;
use crate::wire::backchannel::{BoxIo, PeerInfo, SessionRegistry};
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
        bridge(client, node).await;
    });
}

/// How long the client side may stay open after the node finished its answer.
const LINGER: Duration = Duration::from_secs(30);

async fn bridge(client: BoxIo, node: BoxIo) {
    let (client_read, client_write) = tokio::io::split(client);
    let (node_read, node_write) = tokio::io::split(node);
    let mut upstream = tokio::spawn(client_to_node(client_read, node_write));
    node_to_client(node_read, client_write).await;
    // The answer is complete and the client's stream half-closed. The client closes its side
    // when it is done; until then keep reading it (an interactive SSH fetch never sends the
    // flush), but not for ever.
    if tokio::time::timeout(LINGER, &mut upstream).await.is_err() {
        upstream.abort();
    }
}

/// Client packets to the node until the client's flush; then keep reading the client so its
/// window updates (which travel on the read path) reach our writer.
async fn client_to_node(mut client: ReadHalf<BoxIo>, mut node: WriteHalf<BoxIo>) {
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
async fn node_to_client(mut node: ReadHalf<BoxIo>, mut client: WriteHalf<BoxIo>) {
    let _ = tokio::io::copy(&mut node, &mut client).await;
    let _ = client.shutdown().await;
}

/// The client's sidechannel id, if the call uses one (the last value wins, as on nodes).
pub fn client_id(headers: &http::HeaderMap) -> Result<Option<u64>, Malformed> {
    let Some(value) = headers
        .get_all(sidechannel::METADATA_KEY)
        .iter()
        .next_back()
    else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .map(|id| Some(id as u64))
        .ok_or(Malformed::SidechannelId)
}
