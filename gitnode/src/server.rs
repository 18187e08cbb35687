//! Assembles gitnode's gRPC server: auth layer, health, services, listeners (TCP and Unix),
//! each accepting backchannel and plain clients alike.

use std::sync::Arc;

use praefect_wire::auth::{AuthConfig, AuthLayer};
use praefect_wire::backchannel::{
    incoming_until, yamux_config, Listener, ServerLimits, SessionRegistry,
};
use praefect_wire::proto::commit_service_server::CommitServiceServer;
use praefect_wire::proto::internal_gitaly_server::InternalGitalyServer;
use praefect_wire::proto::ref_service_server::RefServiceServer;
use praefect_wire::proto::repository_service_server::RepositoryServiceServer;
use praefect_wire::proto::server_service_server::ServerServiceServer;
use praefect_wire::proto::smart_http_service_server::SmartHttpServiceServer;
use praefect_wire::proto::ssh_service_server::SshServiceServer;
use tokio::net::{TcpListener, UnixListener};

use crate::config::Config;
use crate::git::Git;
use crate::services::Services;
use crate::storage::{Storages, INTERNAL_DIR};
use crate::transaction::{TestKnobs, Transactions};
use crate::Node;

/// Builds the node state from the configuration.
pub async fn node(config: &Config) -> anyhow::Result<Node> {
    let git = Git::new(&config.git.bin_path);
    let git_version = git.version().await;
    if git_version.is_empty() {
        anyhow::bail!("cannot run git ({:?})", config.git.bin_path);
    }
    let exe = std::env::current_exe()?;
    let bin_dir = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("cannot locate gitnode's directory"))?;
    let storages = Storages::new(&config.storage)?;
    let first = config
        .storage
        .first()
        .ok_or_else(|| anyhow::anyhow!("no storage configured"))?;
    let sessions = SessionRegistry::default();
    // The hooks and their socket live in the first storage's internal directory.
    let transactions = Transactions::start(
        sessions.clone(),
        &storages.root(&first.name)?.join(INTERNAL_DIR),
        &bin_dir.join("gitnode-hook"),
        TestKnobs::from_env(),
    );
    Ok(Node {
        storages,
        git,
        sessions,
        git_version,
        ssh_helper: bin_dir.join("gitnode-ssh"),
        transactions,
        sidechannel_idle_timeout: std::time::Duration::from_secs(
            config.sidechannel_idle_timeout_seconds,
        ),
    })
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let node = Arc::new(node(&config).await?);
    let services = Services(node.clone());
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let auth = AuthLayer::new(AuthConfig::new(
        &config.auth.token,
        config.auth.transitioning,
    ));

    let mut listeners = Vec::new();
    if !config.listen_addr.is_empty() {
        let addr = config.listen_addr.trim_start_matches("tcp://");
        let listener = TcpListener::bind(addr).await?;
        tracing::info!(address = %listener.local_addr()?, "gitnode listening");
        listeners.push(Listener::Tcp(listener));
    }
    if !config.tls_listen_addr.is_empty() {
        let acceptor = praefect_wire::tls::acceptor(
            std::path::Path::new(&config.tls.certificate_path),
            praefect_wire::tls::KeySource::File(std::path::Path::new(&config.tls.key_path)),
            false,
        )?;
        let addr = config.tls_listen_addr.trim_start_matches("tls://");
        let listener = TcpListener::bind(addr).await?;
        tracing::info!(tls_address = %listener.local_addr()?, "gitnode listening");
        listeners.push(Listener::Tls(listener, acceptor));
    }
    if !config.socket_path.is_empty() {
        let _ = std::fs::remove_file(&config.socket_path);
        listeners.push(Listener::Unix(UnixListener::bind(&config.socket_path)?));
        tracing::info!(socket = %config.socket_path, "gitnode listening");
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut servers = Vec::new();
    // The same limits as the router's defaults, shared by every listener.
    let limits = ServerLimits::default();
    for listener in listeners {
        let router = limits
            .server()
            .layer(auth.clone())
            .add_service(health_service.clone())
            .add_service(ServerServiceServer::new(services.clone()))
            .add_service(RepositoryServiceServer::new(services.clone()))
            .add_service(RefServiceServer::new(services.clone()))
            .add_service(CommitServiceServer::new(services.clone()))
            .add_service(SshServiceServer::new(services.clone()))
            .add_service(SmartHttpServiceServer::new(services.clone()))
            .add_service(InternalGitalyServer::new(services.clone()));
        // Dropped (accepting stops) when the server stops.
        let stream = incoming_until(
            listener,
            node.sessions.clone(),
            yamux_config(0, 256),
            None,
            limits.clone(),
            std::future::pending(),
        );
        let mut stop = stop_rx.clone();
        servers.push(tokio::spawn(router.serve_with_incoming_shutdown(
            stream,
            async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            },
        )));
    }
    let mut result = Ok(());
    for server in servers {
        let served = match server.await {
            Ok(served) => served.map_err(anyhow::Error::from),
            Err(err) => Err(anyhow::Error::from(err)),
        };
        if result.is_ok() {
            result = served;
        }
    }
    node.transactions.shutdown();
    result
}
