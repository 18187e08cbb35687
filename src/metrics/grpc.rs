//! The gRPC metrics of go-grpc-prometheus, by the same names and labels, so that dashboards
//! built for Praefect work: for calls the router serves, `grpc_server_started_total`,
//! `grpc_server_handled_total` (by code), `grpc_server_msg_received_total`,
//! `grpc_server_msg_sent_total` and, when `[prometheus] grpc_latency_buckets` is set,
//! `grpc_server_handling_seconds`; the same `grpc_client_*` for the router's calls to the
//! nodes (forwarded calls, health checks, replication, verification).
//!
//! The label handles of a method are looked up once and kept ([`MethodMetrics`]), so a call
//! costs atomic increments, not a hash of its labels per counter. Messages are counted from
//! the bytes as they pass ([`MessageCounter`]): the router forwards frames without decoding
//! them.

use std::sync::{Arc, LazyLock, OnceLock, RwLock};
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec};

use super::{counter, REGISTRY};

/// Which end of a call the router is: the server of a client's call, or the client of a
/// node's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    Server,
    Client,
}

/// The counter families of one side.
struct Families {
    started: IntCounterVec,
    handled: IntCounterVec,
    msg_received: IntCounterVec,
    msg_sent: IntCounterVec,
    handling: &'static OnceLock<HistogramVec>,
}

const METHOD_LABELS: &[&str] = &["grpc_type", "grpc_service", "grpc_method"];
const HANDLED_LABELS: &[&str] = &["grpc_type", "grpc_service", "grpc_method", "grpc_code"];

static SERVER_HANDLING: OnceLock<HistogramVec> = OnceLock::new();
static CLIENT_HANDLING: OnceLock<HistogramVec> = OnceLock::new();

static SERVER: LazyLock<Families> = LazyLock::new(|| Families {
    started: counter(
        "grpc_server_started_total",
        "Total number of RPCs started on the server.",
        METHOD_LABELS,
    ),
    handled: counter(
        "grpc_server_handled_total",
        "Total number of RPCs completed on the server, regardless of success or failure.",
        HANDLED_LABELS,
    ),
    msg_received: counter(
        "grpc_server_msg_received_total",
        "Total number of RPC stream messages received on the server.",
        METHOD_LABELS,
    ),
    msg_sent: counter(
        "grpc_server_msg_sent_total",
        "Total number of gRPC stream messages sent by the server.",
        METHOD_LABELS,
    ),
    handling: &SERVER_HANDLING,
});

static CLIENT: LazyLock<Families> = LazyLock::new(|| Families {
    started: counter(
        "grpc_client_started_total",
        "Total number of RPCs started on the client.",
        METHOD_LABELS,
    ),
    handled: counter(
        "grpc_client_handled_total",
        "Total number of RPCs completed by the client, regardless of success or failure.",
        HANDLED_LABELS,
    ),
    msg_received: counter(
        "grpc_client_msg_received_total",
        "Total number of RPC stream messages received by the client.",
        METHOD_LABELS,
    ),
    msg_sent: counter(
        "grpc_client_msg_sent_total",
        "Total number of gRPC stream messages sent by the client.",
        METHOD_LABELS,
    ),
    handling: &CLIENT_HANDLING,
});

/// Enables `grpc_server_handling_seconds` and `grpc_client_handling_seconds` with `buckets`
/// (none: no histograms, as Praefect). Called at start-up, before the first call: the
/// handles of methods already called keep going without the histogram.
pub fn enable_handling_histogram(buckets: &[f64]) -> prometheus::Result<()> {
    if buckets.is_empty() || SERVER_HANDLING.get().is_some() {
        return Ok(());
    }
    let histogram = |name: &str, help: &str| -> prometheus::Result<HistogramVec> {
        let histogram = HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            METHOD_LABELS,
        )?;
        REGISTRY.register(Box::new(histogram.clone()))?;
        Ok(histogram)
    };
    let _ = SERVER_HANDLING.set(histogram(
        "grpc_server_handling_seconds",
        "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
    )?);
    let _ = CLIENT_HANDLING.set(histogram(
        "grpc_client_handling_seconds",
        "Histogram of response latency (seconds) of the gRPC until it is finished by the application.",
    )?);
    Ok(())
}

/// What the metrics call a call: its type and its service and method names.
#[derive(Clone, Debug)]
struct CallLabels {
    grpc_type: &'static str,
    service: String,
    method: String,
}

impl CallLabels {
    /// The labels of a call to `path` (`/package.Service/Method`); its type from the RPC
    /// registry (unary for a method it does not know).
    fn for_path(path: &str) -> CallLabels {
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("unknown", "unknown"));
        let grpc_type = match crate::routing::registry::Registry::global().lookup(path) {
            Some(m) if m.client_streaming && m.server_streaming => "bidi_stream",
            Some(m) if m.client_streaming => "client_stream",
            Some(m) if m.server_streaming => "server_stream",
            _ => "unary",
        };
        CallLabels {
            grpc_type,
            service: service.to_string(),
            method: method.to_string(),
        }
    }
}

/// The number of gRPC codes (0 OK to 16 Unauthenticated).
const CODES: usize = 17;

/// The label handles of one method on one side.
pub struct MethodMetrics {
    labels: CallLabels,
    started: IntCounter,
    /// By code, looked up the first time a call ends with it.
    handled: [OnceLock<IntCounter>; CODES],
    pub msg_received: IntCounter,
    pub msg_sent: IntCounter,
    handling: Option<Histogram>,
    families: &'static Families,
}

/// Handles of the methods the registry knows, by side and path. Only known methods are kept,
/// so a client calling made-up paths cannot grow it.
/// One map per side, keyed by path alone, so that a lookup borrows the path instead of
/// allocating a key on every call.
type Cache = RwLock<foldhash::HashMap<Box<str>, Arc<MethodMetrics>>>;
static SERVER_CACHE: LazyLock<Cache> = LazyLock::new(Cache::default);
static CLIENT_CACHE: LazyLock<Cache> = LazyLock::new(Cache::default);

impl MethodMetrics {
    /// The handles for calls to `path` on `side`.
    pub fn for_path(side: Side, path: &str) -> Arc<MethodMetrics> {
        let cache_of_side: &Cache = match side {
            Side::Server => &SERVER_CACHE,
            Side::Client => &CLIENT_CACHE,
        };
        let cache = cache_of_side.read().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = cache.get(path) {
            return found.clone();
        }
        drop(cache);
        let metrics = Arc::new(MethodMetrics::new(side, path));
        if crate::routing::registry::Registry::global()
            .lookup(path)
            .is_some()
        {
            let mut cache = cache_of_side.write().unwrap_or_else(|p| p.into_inner());
            cache
                .entry(Box::from(path))
                .or_insert_with(|| metrics.clone());
        }
        metrics
    }

    fn new(side: Side, path: &str) -> MethodMetrics {
        let families: &'static Families = match side {
            Side::Server => &SERVER,
            Side::Client => &CLIENT,
        };
        let labels = CallLabels::for_path(path);
        let values = [labels.grpc_type, &labels.service, &labels.method];
        MethodMetrics {
            started: families.started.with_label_values(&values),
            handled: Default::default(),
            msg_received: families.msg_received.with_label_values(&values),
            msg_sent: families.msg_sent.with_label_values(&values),
            handling: families
                .handling
                .get()
                .map(|histogram| histogram.with_label_values(&values)),
            labels,
            families,
        }
    }

    /// The service name (`gitaly.RepositoryService`).
    pub fn service(&self) -> &str {
        &self.labels.service
    }

    /// Counts a call starting; the returned handle counts its end.
    pub fn start(self: &Arc<Self>) -> CallTimer {
        self.started.inc();
        CallTimer {
            metrics: self.clone(),
            started: Instant::now(),
        }
    }

    fn handled(&self, code: tonic::Code) -> &IntCounter {
        let index = (code as usize).min(CODES - 1);
        self.handled[index].get_or_init(|| {
            let labels = &self.labels;
            self.families.handled.with_label_values(&[
                labels.grpc_type,
                &labels.service,
                &labels.method,
                code_name(code),
            ])
        })
    }
}

/// One call in flight, counted as handled (with its duration) when it ends.
pub struct CallTimer {
    metrics: Arc<MethodMetrics>,
    started: Instant,
}

impl CallTimer {
    pub fn metrics(&self) -> &Arc<MethodMetrics> {
        &self.metrics
    }

    /// Counts the end of the call with `code`; returns how long it took.
    pub fn done(self, code: tonic::Code) -> Duration {
        let elapsed = self.started.elapsed();
        self.metrics.handled(code).inc();
        if let Some(histogram) = &self.metrics.handling {
            histogram.observe(elapsed.as_secs_f64());
        }
        elapsed
    }
}

/// Counts the gRPC messages that complete in a byte stream, however it is split into
/// chunks: each message is a 1-byte flag, a 4-byte big-endian length and that many bytes.
#[derive(Debug, Default)]
pub struct MessageCounter {
    /// Header bytes of the next message read so far.
    header: [u8; 5],
    header_read: usize,
    /// Bytes of the current message still to come (0: reading a header).
    remaining: u64,
}

impl MessageCounter {
    /// Feeds the next chunk; returns how many messages it completed.
    pub fn feed(&mut self, mut chunk: &[u8]) -> u64 {
        let mut completed = 0;
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let take = chunk
                    .len()
                    .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                self.remaining -= take as u64;
                chunk = &chunk[take..];
                if self.remaining == 0 {
                    completed += 1;
                }
                continue;
            }
            let take = (5 - self.header_read).min(chunk.len());
            self.header[self.header_read..self.header_read + take].copy_from_slice(&chunk[..take]);
            self.header_read += take;
            chunk = &chunk[take..];
            if self.header_read == 5 {
                self.header_read = 0;
                let [_, a, b, c, d] = self.header;
                self.remaining = u64::from(u32::from_be_bytes([a, b, c, d]));
                if self.remaining == 0 {
                    completed += 1;
                }
            }
        }
        completed
    }

    /// Feeds `chunk` and adds the messages it completed to `counter`.
    pub fn count(&mut self, chunk: &[u8], counter: &IntCounter) {
        let completed = self.feed(chunk);
        if completed > 0 {
            counter.inc_by(completed);
        }
    }
}

/// The code's name as grpc-go prints it (`OK`, `NotFound`, ...).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: usize) -> Vec<u8> {
        let mut framed = vec![0];
        framed.extend_from_slice(&(len as u32).to_be_bytes());
        framed.extend(std::iter::repeat_n(7u8, len));
        framed
    }

    #[test]
    fn messages_are_counted_however_the_stream_is_split() {
        let mut stream = Vec::new();
        for len in [0, 1, 4, 5, 300, 0, 70_000] {
            stream.extend(message(len));
        }
        for chunk_size in [1, 2, 3, 5, 6, 64, 1000, stream.len()] {
            let mut counter = MessageCounter::default();
            let counted: u64 = stream.chunks(chunk_size).map(|c| counter.feed(c)).sum();
            assert_eq!(counted, 7, "chunks of {chunk_size}");
        }
    }

    #[test]
    fn an_unfinished_message_is_not_counted() {
        let mut counter = MessageCounter::default();
        let framed = message(10);
        assert_eq!(counter.feed(&framed[..14]), 0);
        assert_eq!(counter.feed(&framed[14..]), 1);
        assert_eq!(counter.feed(&message(3)[..4]), 0);
    }

    #[test]
    fn handles_are_kept_for_known_methods_only() {
        let known = "/gitaly.RefService/FindDefaultBranchName";
        let a = MethodMetrics::for_path(Side::Server, known);
        let b = MethodMetrics::for_path(Side::Server, known);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(
            &a,
            &MethodMetrics::for_path(Side::Client, known)
        ));
        let made_up = "/gitaly.RefService/NoSuchMethod";
        let c = MethodMetrics::for_path(Side::Server, made_up);
        let d = MethodMetrics::for_path(Side::Server, made_up);
        assert!(!Arc::ptr_eq(&c, &d));
        assert_eq!(c.labels.grpc_type, "unary");
        assert_eq!(a.service(), "gitaly.RefService");
    }
}
