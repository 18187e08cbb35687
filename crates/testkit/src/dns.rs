//! A DNS server on loopback for tests of service discovery (`dns://SERVER/NAME:PORT` node
//! addresses): it knows one name, answers A and AAAA queries for it from a list the test
//! changes while it runs (as Consul's catalog changes), and says NXDOMAIN for other names.
//!
//! Hand-written on purpose: a few dozen lines of the wire format (RFC 1035 §4) cover what a
//! resolver asks, and the test controls what a real server would not let it, such as
//! truncating every UDP answer so that the resolver must ask again over TCP. Answers carry a
//! TTL of 0, as Consul's do by default, so no cache may keep them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::{JoinHandle, JoinSet};

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const NXDOMAIN: u8 = 3;

/// A running server on 127.0.0.1, UDP and TCP on the same port; stopped when dropped.
pub struct DnsServer {
    /// Where it listens, for `dns://{addr}/NAME:PORT`.
    pub addr: SocketAddr,
    state: Arc<State>,
    tasks: Vec<JoinHandle<()>>,
}

struct State {
    /// The name answered for, lower case, without the final dot.
    name: String,
    addresses: Mutex<Vec<IpAddr>>,
    truncate_udp: AtomicBool,
    udp_queries: AtomicUsize,
    tcp_queries: AtomicUsize,
}

impl DnsServer {
    /// Starts a server that resolves `name` to `addresses`. Needs a Tokio runtime.
    pub async fn start(name: &str, addresses: &[IpAddr]) -> DnsServer {
        let state = Arc::new(State {
            name: name.trim_end_matches('.').to_ascii_lowercase(),
            addresses: Mutex::new(addresses.to_vec()),
            truncate_udp: AtomicBool::new(false),
            udp_queries: AtomicUsize::new(0),
            tcp_queries: AtomicUsize::new(0),
        });
        // The UDP port picked by the OS may be taken for TCP: try a few.
        for _ in 0..20 {
            let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
            let addr = udp.local_addr().unwrap();
            let Ok(tcp) = TcpListener::bind(addr).await else {
                continue;
            };
            let tasks = vec![
                tokio::spawn(serve_udp(udp, state.clone())),
                tokio::spawn(serve_tcp(tcp, state.clone())),
            ];
            return DnsServer { addr, state, tasks };
        }
        panic!("no loopback port free for both UDP and TCP");
    }

    /// What the name resolves to from now on.
    pub fn set(&self, addresses: &[IpAddr]) {
        *self.state.addresses.lock().unwrap() = addresses.to_vec();
    }

    /// Whether UDP answers come back truncated (no records, TC set), as an answer too big
    /// for a datagram does; the full answer is then only had over TCP.
    pub fn truncate_udp(&self, on: bool) {
        self.state.truncate_udp.store(on, Ordering::SeqCst);
    }

    /// How many queries came over UDP and over TCP so far.
    pub fn queries(&self) -> (usize, usize) {
        (
            self.state.udp_queries.load(Ordering::SeqCst),
            self.state.tcp_queries.load(Ordering::SeqCst),
        )
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn serve_udp(socket: UdpSocket, state: Arc<State>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        state.udp_queries.fetch_add(1, Ordering::SeqCst);
        let truncate = state.truncate_udp.load(Ordering::SeqCst);
        if let Some(reply) = answer(&state, &buf[..n], truncate) {
            let _ = socket.send_to(&reply, peer).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, state: Arc<State>) {
    // Connections end with the listener's task (aborting it drops the set).
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        connections.spawn(serve_connection(stream, state.clone()));
    }
}

/// DNS over TCP: each message is preceded by its length in two bytes (RFC 1035 §4.2.2).
async fn serve_connection(mut stream: TcpStream, state: Arc<State>) {
    loop {
        let Ok(len) = stream.read_u16().await else {
            return;
        };
        let mut query = vec![0u8; usize::from(len)];
        if stream.read_exact(&mut query).await.is_err() {
            return;
        }
        state.tcp_queries.fetch_add(1, Ordering::SeqCst);
        let Some(reply) = answer(&state, &query, false) else {
            return;
        };
        let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&reply);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

/// The reply to one query; `None` for what is not a query of one question (dropped, as a
/// server may).
fn answer(state: &State, query: &[u8], truncate: bool) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 || query[4..6] != [0, 1] {
        return None;
    }
    // The question: labels up to the root label, then type and class.
    let mut at = 12;
    let mut labels: Vec<String> = Vec::new();
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len & 0xC0 != 0 {
            return None;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question = query.get(12..at + 4)?;
    let known = labels.join(".") == state.name;

    let records: Vec<Vec<u8>> = if !known || truncate {
        Vec::new()
    } else {
        let addresses = state.addresses.lock().unwrap().clone();
        addresses
            .iter()
            .filter_map(|ip| match (ip, qtype) {
                (IpAddr::V4(v4), TYPE_A) => Some(v4.octets().to_vec()),
                (IpAddr::V6(v6), TYPE_AAAA) => Some(v6.octets().to_vec()),
                _ => None,
            })
            .collect()
    };

    let mut reply = Vec::with_capacity(512);
    reply.extend_from_slice(&query[0..2]);
    // QR, the query's opcode and RD, AA; TC when truncating. RA, and the response code.
    let mut flags = 0x80 | (query[2] & 0x79) | 0x04;
    if truncate {
        flags |= 0x02;
    }
    reply.push(flags);
    reply.push(0x80 | if known { 0 } else { NXDOMAIN });
    reply.extend_from_slice(&[0, 1]);
    reply.extend_from_slice(&(records.len() as u16).to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]);
    reply.extend_from_slice(question);
    for rdata in records {
        // The name as a pointer to the question's (offset 12), the query's type, class IN,
        // TTL 0.
        reply.extend_from_slice(&[0xC0, 12]);
        reply.extend_from_slice(&qtype.to_be_bytes());
        reply.extend_from_slice(&[0, 1, 0, 0, 0, 0]);
        reply.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        reply.extend_from_slice(&rdata);
    }
    Some(reply)
}
