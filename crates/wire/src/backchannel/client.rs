//! The client's side of a session: the handshake, and the streams the server opens back to
//! the client (sidechannels for calls waiting on one, or gRPC calls to the client's own
//! services).

use std::io;

use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_yamux::{Config as YamuxConfig, Control, Session, StreamHandle};

use super::coalesce::{next_stream, Coalesced};
use super::io::{sniff, BoxIo, BACKCHANNEL_MAGIC, SNIFF_TIMEOUT};
use super::measured::Measured;
use super::readahead::ReadAhead;
use super::yamux::{grpc_stream, GrpcStream};
use crate::sidechannel::{SidechannelRegistry, SIDECHANNEL_MAGIC};

/// What a backchannel client offers the server on streams the server opens.
#[derive(Clone, Default)]
pub struct ClientHandler {
    /// Waiting sidechannels of calls in flight.
    pub sidechannels: SidechannelRegistry,
    /// gRPC services the server may call back (Praefect's RefTransaction); none by default.
    pub routes: Option<tonic::service::Routes>,
}

/// A client's backchannel session: the stream that carries our HTTP/2 connection, and the
/// session's control. Closing the control ends the session, and with it the connection and
/// every stream the server opened on it; the session otherwise lives as long as the socket.
pub struct ClientSession {
    pub stream: GrpcStream,
    pub control: Control,
}

/// Starts a backchannel client session on a connected `io`: sends the magic, runs the yamux
/// client (streams the server opens go to `handler`) and opens the stream for our HTTP/2.
pub async fn start_client_session(
    mut io: BoxIo,
    yamux: YamuxConfig,
    handler: ClientHandler,
) -> io::Result<ClientSession> {
    io.write_all(BACKCHANNEL_MAGIC).await?;
    io.flush().await?;
    // The frames of one poll of the session go out in one write, as on the server.
    let (io, writer) = Coalesced::new(ReadAhead::new(Measured::new(io)));
    let mut session = Session::new_client(io, yamux);
    let mut control = session.control();
    tokio::spawn(async move {
        while let Some(Ok(stream)) = next_stream(&mut session, &writer).await {
            tokio::spawn(handle_inbound(stream, handler.clone()));
        }
    });
    let stream = control
        .open_stream()
        .await
        .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, format!("opening stream: {e:?}")))?;
    Ok(ClientSession {
        stream: grpc_stream(stream),
        control,
    })
}

/// A stream the server opened to us: a sidechannel, or a gRPC connection to our services.
async fn handle_inbound(stream: StreamHandle, handler: ClientHandler) {
    let sniffed = tokio::time::timeout(SNIFF_TIMEOUT, sniff(stream, SIDECHANNEL_MAGIC)).await;
    let Ok(Ok((is_sidechannel, mut stream))) = sniffed else {
        return;
    };
    if is_sidechannel {
        let mut id = [0u8; 8];
        if stream.read_exact(&mut id).await.is_err() {
            return;
        }
        handler
            .sidechannels
            .deliver(u64::from_be_bytes(id), Box::new(stream))
            .await;
        return;
    }
    let Some(routes) = handler.routes else {
        return;
    };
    let service = hyper_util::service::TowerToHyperService::new(routes);
    let result = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(err) = result {
        tracing::debug!(error = %err, "backchannel gRPC connection ended");
    }
}
