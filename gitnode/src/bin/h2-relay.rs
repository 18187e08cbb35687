//! `h2-relay LISTEN NODE`: the least an HTTP/2 proxy built on the `h2` crate can do per call,
//! as a yardstick for `scripts/bench`. It accepts plain HTTP/2 on `LISTEN` and passes every
//! stream unchanged to one connection to `NODE`: headers, data and trailers, each way. No
//! authentication, routing, rewriting, metrics or logging; one thread.
//!
//! The router does all of that on top of the same `h2` crate, so the relay's CPU per call is
//! the floor of what the router could reach on that library.
//! Not for production: it trusts both sides and buffers without limit.

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use tokio::net::{TcpListener, TcpStream};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, node] = args.as_slice() else {
        anyhow::bail!("usage: h2-relay LISTEN_ADDR NODE_ADDR");
    };
    let listener = TcpListener::bind(listen).await?;
    let upstream = TcpStream::connect(node).await?;
    upstream.set_nodelay(true)?;
    let (to_node, connection) = h2::client::handshake(upstream).await?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            eprintln!("h2-relay: node connection: {err}");
        }
    });
    loop {
        let (socket, _) = listener.accept().await?;
        socket.set_nodelay(true)?;
        let to_node = to_node.clone();
        tokio::spawn(async move {
            if let Err(err) = serve(socket, to_node).await {
                eprintln!("h2-relay: client connection: {err}");
            }
        });
    }
}

/// Serves one client connection, a task per stream (as hyper does).
async fn serve(socket: TcpStream, to_node: h2::client::SendRequest<Bytes>) -> anyhow::Result<()> {
    let mut connection = h2::server::handshake(socket).await?;
    while let Some(stream) = connection.accept().await {
        let (request, respond) = stream?;
        let to_node = to_node.clone();
        tokio::spawn(async move {
            if let Err(err) = relay(request, respond, to_node).await {
                eprintln!("h2-relay: stream: {err}");
            }
        });
    }
    Ok(())
}

/// Passes one stream to the node and its answer back, both directions at once (a streaming
/// call's answer can begin before its request ends: a push waits for the advertisement).
async fn relay(
    request: http::Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    to_node: h2::client::SendRequest<Bytes>,
) -> anyhow::Result<()> {
    let (parts, body) = request.into_parts();
    let mut to_node = to_node.ready().await?;
    let (answer, upload) = to_node.send_request(http::Request::from_parts(parts, ()), false)?;
    let download = async {
        let (parts, body) = answer.await?.into_parts();
        let download = respond.send_response(http::Response::from_parts(parts, ()), false)?;
        copy(body, download).await
    };
    tokio::try_join!(copy(body, upload), download)?;
    Ok(())
}

/// Copies a body's data frames and trailers (or its end) to `to`. The end goes on the last
/// data frame, as gRPC clients send it: h2 servers close a connection that sends many empty
/// data frames (a flood defence).
async fn copy(mut from: RecvStream, mut to: SendStream<Bytes>) -> anyhow::Result<()> {
    while let Some(data) = from.data().await {
        let data = data?;
        let _ = from.flow_control().release_capacity(data.len());
        let end = from.is_end_stream();
        to.send_data(data, end)?;
        if end {
            return Ok(());
        }
    }
    match from.trailers().await? {
        Some(trailers) => to.send_trailers(trailers)?,
        None => to.send_data(Bytes::new(), true)?,
    }
    Ok(())
}
