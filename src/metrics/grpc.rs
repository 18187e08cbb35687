//! The gRPC server metrics of go-grpc-prometheus, by the same names and labels, so that
//! dashboards built for Praefect work: `grpc_server_started_total`,
//! `grpc_server_handled_total` (by code) and, when `[prometheus] grpc_latency_buckets` is
//! set, `grpc_server_handling_seconds`.

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

/// Enables `grpc_server_handling_seconds` with `buckets` (none: no histogram, as Praefect).
pub fn enable_handling_histogram(buckets: &[f64]) -> prometheus::Result<()> {
    if buckets.is_empty() || HANDLING.get().is_some() {
        return Ok(());
    }
    let histogram = HistogramVec::new(
        HistogramOpts::new(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
        )
        .buckets(buckets.to_vec()),
        &["grpc_type", "grpc_service", "grpc_method"],
    )?;
    REGISTRY.register(Box::new(histogram.clone()))?;
    let _ = HANDLING.set(histogram);
    Ok(())
}

/// What the metrics call a call: its type and its service and method names.
#[derive(Clone, Debug)]
pub struct CallLabels {
    pub grpc_type: &'static str,
    pub service: String,
    pub method: String,
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
