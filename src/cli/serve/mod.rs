//! `praefect serve` (also the default without a subcommand).
//!
//! Startup: configuration loaded and valid; database reachable (bounded wait), PostgreSQL 11
//! or later, migrations up to date; node connections (lazy: a node that is down does not stop
//! the start); the health manager, whose first recorded round startup waits for; the read
//! cache's change listener; then the listeners. SIGTERM or SIGINT stops accepting, lets
//! in-flight calls finish for up to `graceful_stop_timeout`, then exits.
//!
//! [`app`] starts and stops the router, [`tasks`] groups its tasks for shutdown, and this
//! module is the entry point: signals in, exit code out. The service the listeners serve is
//! `proxy::router_service`; [`readiness`] is the HTTP readiness route.

mod app;
mod db_metrics;
mod listen;
mod readiness;
mod tasks;

use std::process::ExitCode;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::{self, Config};
use crate::logging;

use app::App;

pub async fn run(config: Config) -> ExitCode {
    logging::init(&config.logging);
    warn_ignored_keys(&config);
    match serve(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %format!("{err:#}"), "praefect failed");
            eprintln!("praefect: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// One warning per key that is set but changes nothing here (`config::ignored_keys`), so an
/// operator coming from Go Praefect learns at once which of their settings have no effect.
fn warn_ignored_keys(config: &Config) {
    for ignored in config::ignored_keys(config) {
        tracing::warn!(
            key = ignored.key,
            reason = ignored.reason,
            "ignoring configuration key {}",
            ignored.key
        );
    }
}

/// Starts the router and runs it until SIGTERM or SIGINT. The handlers are installed before
/// anything starts, so that a signal during startup stops the router once it is up instead
/// of killing it halfway.
async fn serve(config: Config) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let grace = config.graceful_stop_timeout.to_std();
    let app = App::start(config).await?;
    tokio::select! {
        _ = terminate.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
        _ = interrupt.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
    }
    app.shutdown(grace).await;
    Ok(())
}
