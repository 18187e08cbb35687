//! The HTTP readiness route served beside the metrics.

use std::sync::Arc;

use crate::proxy::Proxy;

/// HTTP `/readiness`: 200 when every readiness check passes, 503 with the failed checks
/// otherwise (JSON either way). See `health::readiness` for what to point a load balancer at.
pub(super) fn readiness_route(proxy: Arc<Proxy>) -> axum::Router {
    axum::Router::new().route(
        "/readiness",
        axum::routing::get(move || {
            let failed = proxy.failed_readiness_checks();
            async move {
                let status = if failed.is_empty() {
                    http::StatusCode::OK
                } else {
                    http::StatusCode::SERVICE_UNAVAILABLE
                };
                let report = crate::health::readiness::ReadinessReport {
                    ready: failed.is_empty(),
                    failed_checks: failed,
                };
                (
                    status,
                    [(http::header::CONTENT_TYPE, "application/json")],
                    serde_json::to_string(&report).unwrap_or_default(),
                )
            }
        }),
    )
}
