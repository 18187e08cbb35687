//! The gRPC metrics of go-grpc-prometheus, by the same names and labels, so that dashboards
//! built for Praefect work: for calls the router serves, `grpc_server_started_total`,
//! `grpc_server_handled_total` (by code) and, when `[prometheus] grpc_latency_buckets` is
//! set, `grpc_server_handling_seconds`; the same `grpc_client_*` for the router's calls to
//! the nodes (forwarded calls, health checks, replication, verification).

use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec};

use super::{counter, REGISTRY};

static STARTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "grpc_server_started_total",
        "Total number of RPCs started on the server.",
        &["grpc_type", "grpc_service", "grpc_method"],
    )
});

static HANDLED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "grpc_server_handled_total",
        "Total number of RPCs completed on the server, regardless of success or failure.",
        &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
    )
});

static HANDLING: OnceLock<HistogramVec> = OnceLock::new();

static CLIENT_STARTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "grpc_client_started_total",
        "Total number of RPCs started on the client.",
        &["grpc_type", "grpc_service", "grpc_method"],
    )
});

static CLIENT_HANDLED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "grpc_client_handled_total",
        "Total number of RPCs completed by the client, regardless of success or failure.",
        &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
    )
});

static CLIENT_HANDLING: OnceLock<HistogramVec> = OnceLock::new();

/// Enables `grpc_server_handling_seconds` and `grpc_client_handling_seconds` with `buckets`
/// (none: no histograms, as Praefect).
pub fn enable_handling_histogram(buckets: &[f64]) -> prometheus::Result<()> {
    if buckets.is_empty() || HANDLING.get().is_some() {
        return Ok(());
    }
    let histogram = |name: &str, help: &str| -> prometheus::Result<HistogramVec> {
        let histogram = HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            &["grpc_type", "grpc_service", "grpc_method"],
        )?;
        REGISTRY.register(Box::new(histogram.clone()))?;
        Ok(histogram)
    };
    let _ = HANDLING.set(histogram(
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
pub struct CallLabels {
    pub grpc_type: &'static str,
    pub service: String,
    pub method: String,
}

impl CallLabels {
    /// The labels of a call to `path` (`/package.Service/Method`); its type from the RPC
    /// registry (unary for a method it does not know).
    pub fn for_path(path: &str) -> CallLabels {
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

/// A call the router makes to a node, counted when it starts and when it ends.
pub struct ClientCall {
    labels: CallLabels,
    started: std::time::Instant,
}

impl ClientCall {
    pub fn start(path: &str) -> ClientCall {
        let labels = CallLabels::for_path(path);
        CLIENT_STARTED
            .with_label_values(&[labels.grpc_type, &labels.service, &labels.method])
            .inc();
        ClientCall {
            labels,
            started: std::time::Instant::now(),
        }
    }

    pub fn done(self, code: tonic::Code) {
        let labels = &self.labels;
        CLIENT_HANDLED
            .with_label_values(&[
                labels.grpc_type,
                &labels.service,
                &labels.method,
                code_name(code),
            ])
            .inc();
        if let Some(histogram) = CLIENT_HANDLING.get() {
            histogram
                .with_label_values(&[labels.grpc_type, &labels.service, &labels.method])
                .observe(self.started.elapsed().as_secs_f64());
        }
    }
}

pub fn started(call: &CallLabels) {
    STARTED
        .with_label_values(&[call.grpc_type, &call.service, &call.method])
        .inc();
}

pub fn handled(call: &CallLabels, code: tonic::Code, elapsed: Duration) {
    HANDLED
        .with_label_values(&[call.grpc_type, &call.service, &call.method, code_name(code)])
        .inc();
    if let Some(histogram) = HANDLING.get() {
        histogram
            .with_label_values(&[call.grpc_type, &call.service, &call.method])
            .observe(elapsed.as_secs_f64());
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
