//! `praefect serve` (also the default without a subcommand).
//!
//! Startup: configuration loaded and valid; database reachable (bounded wait), PostgreSQL 11
//! or later, migrations up to date; node connections (lazy: a node that is down does not stop
//! the start); the health manager, whose first recorded round startup waits for; the read
//! cache's change listener; then the listeners. SIGTERM or SIGINT stops accepting, lets
//! in-flight calls finish for up to `graceful_stop_timeout`, then exits.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::config::Config;
use crate::datastore::{Datastore, ListenerSettings, PoolSettings, StorageCache};
use crate::health::HealthManager;
use crate::logging;
use crate::nodes::NodePool;
use crate::proxy::registry::Registry;
use crate::proxy::Proxy;
use crate::replication::reconciler::Reconciler;
use crate::replication::Replicator;
use crate::verification::{self, NodeCluster, Verifier};
use crate::wire::auth::{AuthConfig, AuthLayer};
use crate::wire::backchannel::{incoming, yamux_config, Listener, SessionRegistry};

/// How long startup waits for the database before giving up.
const DATABASE_STARTUP_WAIT: Duration = Duration::from_secs(30);
/// How often the change listener retries after losing its connection.
const LISTENER_RETRY: Duration = Duration::from_secs(5);

pub async fn run(config: Config) -> ExitCode {
    logging::init(&config.logging);
    match serve(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %format!("{err:#}"), "praefect failed");
            eprintln!("praefect: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Binds the configured listeners, logging each bound address.
async fn bind(config: &Config) -> anyhow::Result<Vec<Listener>> {
    let mut listeners = Vec::new();
    if !config.listen_addr.is_empty() {
        let addr = config.listen_addr.trim_start_matches("tcp://");
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        tracing::info!(address = %listener.local_addr()?, scheme = "tcp", "praefect listening");
        listeners.push(Listener::Tcp(listener));
    }
    if !config.tls_listen_addr.is_empty() {
        let tls = &config.tls;
        let key = if tls.key.is_empty() {
            crate::wire::tls::KeySource::File(std::path::Path::new(&tls.key_path))
        } else {
            crate::wire::tls::KeySource::Pem(&tls.key)
        };
        let acceptor = crate::wire::tls::acceptor(
            std::path::Path::new(&tls.certificate_path),
            key,
            tls.min_version == "TLS 1.3",
        )
        .context("loading the TLS certificate")?;
        let addr = config.tls_listen_addr.trim_start_matches("tls://");
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        tracing::info!(address = %listener.local_addr()?, scheme = "tls", "praefect listening");
        listeners.push(Listener::Tls(listener, acceptor));
    }
    if !config.socket_path.is_empty() {
        let path = config.socket_path.trim_start_matches("unix://");
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).with_context(|| format!("listening on {path}"))?;
        tracing::info!(address = %path, scheme = "unix", "praefect listening");
        listeners.push(Listener::Unix(listener));
    }
    Ok(listeners)
}

async fn serve(config: Config) -> anyhow::Result<()> {
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

    let config = Arc::new(config);
    let nodes = Arc::new(NodePool::connect(&config).context("setting up node connections")?);
    let (stop_tx, stop_rx) = watch::channel(false);
    let health = HealthManager::new(&config, nodes.clone(), store.clone());
    let health_task = tokio::spawn(health.clone().run(stop_rx.clone()));
    tracing::info!(
        praefect_name = health.praefect_name(),
        "waiting for the first health round to be recorded"
    );
    health.first_write().await;

    let virtual_storages: Vec<String> = config
        .virtual_storage
        .iter()
        .map(|vs| vs.name.clone())
        .collect();
    let cache = StorageCache::with_settings(
        store.clone(),
        &virtual_storages,
        crate::datastore::CACHE_CAPACITY,
        config.database.stale_read_window(),
    );
    let listener_task = tokio::spawn(cache.clone().listen(
        ListenerSettings {
            connection: config.direct_database(),
            retry: LISTENER_RETRY,
        },
        stop_rx.clone(),
    ));

    let verification_tasks = match Verifier::from_config(
        store.clone(),
        NodeCluster {
            nodes: nodes.clone(),
            health: health.clone(),
        },
        &config.background_verification,
    ) {
        Some(verifier) => vec![
            tokio::spawn(verifier.run(stop_rx.clone())),
            tokio::spawn(verification::run_lease_releaser(
                store.clone(),
                stop_rx.clone(),
            )),
        ],
        None => {
            tracing::info!("background verification is disabled");
            Vec::new()
        }
    };

    let replication_tasks = vec![
        tokio::spawn(
            Replicator {
                config: config.clone(),
                nodes: nodes.clone(),
                health: health.clone(),
                store: store.clone(),
            }
            .run(stop_rx.clone()),
        ),
        tokio::spawn(
            Reconciler::new(config.clone(), health.clone(), store.clone()).run(stop_rx.clone()),
        ),
    ];

    let sessions = SessionRegistry::default();
    let proxy = Arc::new(Proxy {
        registry: Registry::global(),
        config: config.clone(),
        nodes: nodes.clone(),
        health: health.clone(),
        cache,
        sessions: sessions.clone(),
    });
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let dispatch = Dispatch {
        health: health_service,
        proxy: proxy.clone(),
    };

    let auth = AuthLayer::new(AuthConfig::new(
        &config.auth.token,
        config.auth.transitioning,
    ));
    let yamux = yamux_config(
        u32::try_from(config.yamux.maximum_stream_window_size_bytes).unwrap_or(u32::MAX),
        usize::try_from(config.yamux.accept_backlog).unwrap_or(256),
    );
    let mut servers = Vec::new();
    let metrics_task = if config.prometheus_listen_addr.is_empty() {
        None
    } else {
        let addr = config.prometheus_listen_addr.trim_start_matches("tcp://");
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for Prometheus on {addr}"))?;
        tracing::info!(address = %listener.local_addr()?, scheme = "http", "prometheus listening");
        Some(tokio::spawn(crate::metrics::serve(
            listener,
            stop_rx.clone(),
            readiness_route(proxy.clone()),
        )))
    };
    for listener in bind(&config).await? {
        let server = tonic::transport::Server::builder().layer(auth.clone());
        let stream = incoming(listener, sessions.clone(), yamux);
        let mut stop = stop_rx.clone();
        servers.push(tokio::spawn(server.serve_with_incoming_shutdown(
            dispatch.clone(),
            stream,
            async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            },
        )));
    }

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
    let grace = config.graceful_stop_timeout.to_std();
    let drained = tokio::time::timeout(grace, futures::future::join_all(servers)).await;
    if drained.is_err() {
        tracing::warn!(timeout = %config.graceful_stop_timeout, "calls still running after the graceful stop timeout; cutting them");
    }
    // Running replication jobs finish, within the graceful stop timeout too: a job stuck on an
    // unresponsive node must not keep the process alive (its heartbeat stops, and another
    // router takes it over after a minute).
    let background = futures::future::join_all(replication_tasks);
    if tokio::time::timeout(grace, background).await.is_err() {
        tracing::warn!(timeout = %config.graceful_stop_timeout, "replication jobs still running after the graceful stop timeout; leaving them to other routers");
    }
    let _ = health_task.await;
    let _ = listener_task.await;
    for task in verification_tasks {
        let _ = task.await;
    }
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    store.close().await;
    tracing::info!("praefect stopped");
    Ok(())
}

/// HTTP `/readiness`: 200 when every readiness check passes, 503 with the failed checks
/// otherwise (JSON either way). See `health::readiness` for what to point a load balancer at.
fn readiness_route(proxy: Arc<Proxy>) -> axum::Router {
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

/// The gRPC health service's calls; everything else goes to the proxy.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// The router's service: gRPC health checks to `health`, every other call to the proxy,
/// without a routing table in between (the proxy looks methods up itself).
#[derive(Clone)]
struct Dispatch<H> {
    health: H,
    proxy: Arc<Proxy>,
}

type ProxyFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, Infallible>> + Send>>;

impl<H> tower::Service<http::Request<tonic::body::Body>> for Dispatch<H>
where
    H: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    H::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = futures::future::Either<H::Future, ProxyFuture>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        // The health service is always ready, and the proxy has no queue of its own.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let health = request
            .uri()
            .path()
            .strip_prefix(HEALTH_PREFIX)
            .is_some_and(|method| !method.is_empty());
        if health {
            // A clone that is ready, as tower wants (generated services always are).
            let mut service = self.health.clone();
            return futures::future::Either::Left(service.call(request));
        }
        let proxy = self.proxy.clone();
        futures::future::Either::Right(Box::pin(async move { Ok(proxy.handle(request).await) }))
    }
}
