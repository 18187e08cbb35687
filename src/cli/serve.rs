//! `praefect serve` (also the default without a subcommand).
//!
//! In this version serving means: configuration loaded and valid, database reachable,
//! PostgreSQL 11 or later, migrations up to date, node health probed every second and recorded
//! in `node_status` (startup waits for the first recorded round); then the process stays up
//! until SIGTERM or SIGINT. The gRPC listeners arrive with the router core.

use std::process::ExitCode;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::datastore::{Datastore, PoolSettings};
use crate::health::HealthManager;
use crate::logging;

/// How long startup waits for the database before giving up.
const DATABASE_STARTUP_WAIT: Duration = Duration::from_secs(30);

pub async fn run(config: Config) -> ExitCode {
    logging::init(&config.logging);
    match serve(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %format!("{err:#}"), "praefect failed to start");
            eprintln!("praefect: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;

    let store = Datastore::connect_with_retry(
        &config.database.connection(),
        PoolSettings::default(),
        DATABASE_STARTUP_WAIT,
    )
    .await
    .context("connecting to the database")?;
    let version = store
        .check_server()
        .await
        .context("checking the database server")?;
    store
        .check_migrations_up_to_date()
        .await
        .context("checking the database schema")?;

    let health =
        HealthManager::new(&config, store.clone()).context("setting up node connections")?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let health_task = tokio::spawn(health.clone().run(stop_rx.clone()));
    tracing::info!(
        praefect_name = health.praefect_name(),
        "waiting for the first health round to be recorded"
    );
    health.first_write().await;

    let virtual_storages: Vec<&str> = config
        .virtual_storage
        .iter()
        .map(|vs| vs.name.as_str())
        .collect();
    tracing::info!(
        version = super::VERSION,
        listen_addr = %config.listen_addr,
        tls_listen_addr = %config.tls_listen_addr,
        socket_path = %config.socket_path,
        virtual_storages = ?virtual_storages,
        election_strategy = config.effective_election_strategy(),
        postgresql_version_num = version,
        praefect_name = health.praefect_name(),
        "praefect started"
    );

    tokio::select! {
        _ = terminate.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
        _ = interrupt.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
    }
    let _ = stop_tx.send(true);
    let _ = health_task.await;
    store.close().await;
    tracing::info!("praefect stopped");
    Ok(())
}
