//! `praefect serve` (also the default without a subcommand).
//!
//! Startup: configuration loaded and valid; database reachable (bounded wait), PostgreSQL 11
//! or later, migrations up to date; node connections (lazy: a node that is down does not stop
//! the start); the health manager, whose first recorded round startup waits for; the read
//! cache's change listener; then the listeners; then the pid file (`GITALY_PID_FILE`), when
//! one is named. SIGTERM or SIGINT stops accepting, lets in-flight calls finish for up to
//! `graceful_stop_timeout`, then exits. SIGHUP hands the listeners over to a new process of
//! the (possibly upgraded) binary and stops the same way once that one serves ([`handover`]).
//!
//! [`app`] starts and stops the router, [`tasks`] groups its tasks for shutdown, and this
//! module is the entry point: signals in, exit code out. The service the listeners serve is
//! `proxy::router_service`; [`readiness`] is the HTTP readiness route.

mod app;
mod db_metrics;
mod handover;
mod http2_server;
pub mod huge_pages;
mod listen;
mod pid_file;
mod readiness;
mod tasks;

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::{self, Config};
use crate::logging;

use app::{App, RunningApp};
pub use handover::{inherit, HandoverError, Inheritance};

pub async fn run(config: Config, inheritance: Result<Inheritance, HandoverError>) -> ExitCode {
    logging::init(&config.logging);
    super::runtime::log_choice();
    huge_pages::log_outcome();
    warn_ignored_keys(&config);
    let outcome = match inheritance {
        Ok(inheritance) => serve(config, inheritance).await,
        Err(err) => Err(anyhow::Error::new(err).context("taking over from the predecessor")),
    };
    match outcome {
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

/// A hand-over in progress: resolves to the successor's pid once it serves.
type PendingHandover = Pin<Box<dyn Future<Output = Result<u32, HandoverError>> + Send>>;

/// Starts the router and runs it until SIGTERM or SIGINT, or until a successor started on
/// SIGHUP serves. The handlers are installed before anything starts, so that a signal during
/// startup acts once the router is up instead of killing it halfway.
async fn serve(config: Config, inheritance: Inheritance) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let grace = config.graceful_stop_timeout.to_std();
    let (inherited, predecessor) = inheritance.split();
    let app = App::start(config, inherited).await?;
    // Only once this process serves: a wrapper that follows the pid file, and a predecessor
    // waiting to stop, must not give up on the old process before the new one accepts.
    if let Some(path) = pid_file::configured() {
        if let Err(err) = pid_file::write(&path, std::process::id()) {
            app.shutdown(grace).await;
            return Err(err.into());
        }
    }
    if let Some(predecessor) = predecessor {
        match predecessor.notify_ready() {
            Ok(()) => tracing::info!("told the predecessor that this process serves"),
            // It is gone (killed, or it gave up waiting): this process serves alone.
            Err(err) => {
                tracing::warn!(error = %err, "could not tell the predecessor that this process serves")
            }
        }
    }
    let mut pending: Option<PendingHandover> = None;
    loop {
        tokio::select! {
            _ = terminate.recv() => {
                tracing::info!(signal = "SIGTERM", "shutting down");
                break;
            }
            _ = interrupt.recv() => {
                tracing::info!(signal = "SIGINT", "shutting down");
                break;
            }
            _ = hangup.recv() => {
                if pending.is_some() {
                    tracing::warn!(signal = "SIGHUP", "a hand-over is already in progress; ignored");
                } else {
                    pending = start_handover(&app);
                }
            }
            outcome = handover_outcome(&mut pending) => {
                pending = None;
                match outcome {
                    Ok(pid) => {
                        tracing::info!(successor_pid = pid, "the successor serves; shutting down");
                        break;
                    }
                    Err(err) => tracing::error!(error = %format!("{:#}", anyhow::Error::new(err)), "hand-over failed; still serving"),
                }
            }
        }
    }
    if pending.take().is_some() {
        tracing::warn!("hand-over abandoned: the successor was killed");
    }
    app.shutdown(grace).await;
    Ok(())
}

/// Starts a hand-over to a successor on SIGHUP.
fn start_handover(app: &RunningApp) -> Option<PendingHandover> {
    match app.listeners_to_pass() {
        Ok(listeners) => {
            tracing::info!(
                signal = "SIGHUP",
                "handing the listeners over to a new process"
            );
            Some(Box::pin(handover::hand_over(listeners)))
        }
        Err(err) => {
            tracing::error!(error = %err, "hand-over failed; still serving");
            None
        }
    }
}

/// The outcome of the hand-over in progress; never, when there is none.
async fn handover_outcome(pending: &mut Option<PendingHandover>) -> Result<u32, HandoverError> {
    match pending {
        Some(handover) => handover.await,
        None => std::future::pending().await,
    }
}
