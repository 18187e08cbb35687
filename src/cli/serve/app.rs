//! Starting and stopping the router.
//!
//! [`App::start`] runs the startup steps in their order (each may depend on the ones before:
//! the proxy needs the first health round, the listeners come last so that no call arrives
//! before the router can route it) and returns a [`RunningApp`]; [`RunningApp::shutdown`]
//! stops it. Every task is started through [`Tasks`], so that one token stops them all and
//! shutdown knows how long to wait for each.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tower::Layer;

use super::db_metrics::{db_metrics_route, DbMetrics};
use super::handover::{self, HandoverError, InheritedListeners, ListenerId, Passable};
use super::http2_server;
use super::listen::{self, bind};
use super::readiness::readiness_route;
use super::tasks::Tasks;
use crate::cleanup::RepositoriesCleanup;
use crate::config::Config;
use crate::datastore::{Datastore, ListenerSettings, PoolSettings, StorageCache};
use crate::health::HealthManager;
use crate::nodes::NodePool;
use crate::proxy::Proxy;
use crate::replication::reconciler::Reconciler;
use crate::replication::Replicator;
use crate::routing::methods::check_transactional;
use crate::routing::registry::Registry;
use crate::status::{Sources as StatusSources, StatusPage};
use crate::transactions::{RefTransactionService, Transactions};
use crate::verification::{self, NodeCluster, Verifier};
use crate::wire::auth::{AuthConfig, AuthLayer};
use crate::wire::backchannel::{incoming_until, yamux_config, ServerLimits, SessionRegistry};

/// How long startup waits for the database before giving up.
const DATABASE_STARTUP_WAIT: Duration = Duration::from_secs(30);
/// How often the change listener retries after losing its connection.
const LISTENER_RETRY: Duration = Duration::from_secs(5);

/// The router while it starts: what the startup steps build and hand to the next ones.
pub struct App {
    config: Arc<Config>,
    store: Datastore,
    nodes: Arc<NodePool>,
    health: HealthManager,
    /// The backchannel sessions the listeners accept and the proxy calls back on.
    sessions: SessionRegistry,
    /// Transactions of writes in flight; the nodes vote over the node connections.
    transactions: Transactions,
    tasks: Tasks,
    /// When the process started serving, for the status page's uptime.
    started: std::time::Instant,
}

/// A started router: its tasks, the database pool to close once they are done, and its
/// listening sockets as a SIGHUP hand-over passes them on.
pub struct RunningApp {
    tasks: Tasks,
    store: Datastore,
    listeners: Vec<Passable>,
}

impl App {
    /// Starts the router: the database (reachable, recent enough, migrated), the node
    /// connections, the health manager and its first recorded round, the background
    /// workers, then the listeners (the `inherited` ones where configured, the others bound).
    /// An error stops whatever was started so far.
    pub async fn start(
        config: Config,
        mut inherited: InheritedListeners,
    ) -> anyhow::Result<RunningApp> {
        check_transactional(Registry::global().iter()).map_err(|problems| {
            anyhow::anyhow!(
                "the RPC registry disagrees with the list of transactional RPCs: {problems}"
            )
        })?;
        let (store, postgresql_version_num) = connect_database(&config).await?;
        let config = Arc::new(config);
        let transactions = Transactions::default();
        let votes =
            tonic::service::Routes::new(RefTransactionService::server(transactions.clone()));
        let nodes = Arc::new(
            NodePool::connect(&config, Some(votes)).context("setting up node connections")?,
        );
        let tasks = Tasks::new();
        // Until the router is up, an error return cancels the workers started so far.
        let stop_on_error = tasks.stop_token().drop_guard();
        let app = App {
            health: HealthManager::new(&config, nodes.clone(), store.clone()),
            config,
            store,
            nodes,
            sessions: SessionRegistry::default(),
            transactions,
            tasks,
            started: std::time::Instant::now(),
        };
        app.start_health().await;
        let cache = app.start_cache();
        app.start_verification();
        app.start_replication()?;
        app.start_cleanup();
        let proxy = app.proxy(cache.clone());
        let mut listeners = Vec::new();
        listeners.extend(
            app.start_metrics(proxy.clone(), cache, &mut inherited)
                .await?,
        );
        listeners.extend(app.start_servers(proxy, &mut inherited).await?);
        inherited.close_unused();
        app.log_started(postgresql_version_num);
        stop_on_error.disarm();
        Ok(RunningApp {
            tasks: app.tasks,
            store: app.store,
            listeners,
        })
    }

    /// Starts the health manager and waits until its first round is recorded: until then
    /// no primary can be elected with this router's view.
    async fn start_health(&self) {
        self.tasks
            .spawn_worker(self.health.clone().run(self.tasks.stop_token()));
        tracing::info!(
            praefect_name = self.health.praefect_name(),
            "waiting for the first health round to be recorded"
        );
        self.health.first_write().await;
    }

    /// The read cache, with its change listener started.
    fn start_cache(&self) -> Arc<StorageCache> {
        let cache = StorageCache::with_settings(
            self.store.clone(),
            &self.virtual_storages(),
            crate::datastore::CACHE_BYTES,
            self.config.database.stale_read_window(),
        );
        self.tasks.spawn_worker(cache.clone().listen(
            ListenerSettings {
                connection: self.config.direct_database(),
                retry: LISTENER_RETRY,
            },
            self.tasks.stop_token(),
        ));
        cache
    }

    /// The background verifier and its lease releaser, unless verification is disabled.
    fn start_verification(&self) {
        let cluster = NodeCluster {
            nodes: self.nodes.clone(),
            health: self.health.clone(),
        };
        let settings = &self.config.background_verification;
        match Verifier::from_config(self.store.clone(), cluster, settings) {
            Some(verifier) => {
                self.tasks
                    .spawn_worker(verifier.run(self.tasks.stop_token()));
                self.tasks.spawn_worker(verification::run_lease_releaser(
                    self.store.clone(),
                    self.tasks.stop_token(),
                ));
            }
            None => tracing::info!("background verification is disabled"),
        }
    }

    /// The replicator and the reconciler.
    fn start_replication(&self) -> anyhow::Result<()> {
        let replicator = Replicator {
            config: self.config.clone(),
            nodes: self.nodes.clone(),
            health: self.health.clone(),
            store: self.store.clone(),
        };
        self.tasks
            .spawn_replication(replicator.run(self.tasks.stop_token()));
        let reconciler =
            Reconciler::new(self.config.clone(), self.health.clone(), self.store.clone())
                .context("reconciliation.histogram_buckets")?;
        self.tasks
            .spawn_replication(reconciler.run(self.tasks.stop_token()));
        Ok(())
    }

    /// The repositories cleanup (it logs that it is disabled when it is).
    fn start_cleanup(&self) {
        let cleanup = RepositoriesCleanup {
            config: self.config.clone(),
            nodes: self.nodes.clone(),
            store: self.store.clone(),
        };
        self.tasks
            .spawn_worker(cleanup.run(self.tasks.stop_token()));
    }

    fn proxy(&self, cache: Arc<StorageCache>) -> Arc<Proxy> {
        Arc::new(Proxy::new(
            self.config.clone(),
            self.nodes.clone(),
            self.health.clone(),
            cache,
            self.sessions.clone(),
            self.transactions.clone(),
            self.tasks.bridges(),
        ))
    }

    /// The Prometheus listener (`/metrics`, `/db_metrics`, `/readiness` and the status
    /// pages), when configured.
    async fn start_metrics(
        &self,
        proxy: Arc<Proxy>,
        cache: Arc<StorageCache>,
        inherited: &mut InheritedListeners,
    ) -> anyhow::Result<Option<Passable>> {
        if self.config.prometheus_listen_addr.is_empty() {
            return Ok(None);
        }
        let addr = self
            .config
            .prometheus_listen_addr
            .trim_start_matches("tcp://");
        let id = ListenerId::Prometheus(addr.to_string());
        let (listener, passable) = listen::tcp(inherited, id, addr, "http", "prometheus listening")
            .await
            .context("the Prometheus listener")?;
        crate::metrics::server::install(crate::cli::VERSION);
        crate::metrics::grpc::enable_handling_histogram(
            &self.config.prometheus.grpc_latency_buckets,
        )
        .context("grpc_latency_buckets")?;
        let db_metrics = DbMetrics::new(&self.config, self.store.clone());
        let status_page = StatusPage::new(StatusSources {
            config: self.config.clone(),
            store: self.store.clone(),
            health: self.health.clone(),
            nodes: self.nodes.clone(),
            cache,
            version: crate::cli::VERSION.to_string(),
            started: self.started,
        });
        let routes = readiness_route(proxy)
            .merge(db_metrics_route(db_metrics.clone()))
            .merge(crate::status::routes(status_page));
        let on_metrics =
            (!self.config.prometheus_exclude_database_from_default_metrics).then(|| {
                let extra: crate::metrics::ScrapeExtra = Arc::new(move || {
                    let db_metrics = db_metrics.clone();
                    Box::pin(async move { db_metrics.render().await })
                });
                extra
            });
        self.tasks.spawn_worker(crate::metrics::serve(
            listener,
            self.tasks.stop_token(),
            routes,
            on_metrics,
        ));
        Ok(Some(passable))
    }

    /// Binds (or inherits) the gRPC listeners and serves, behind authentication, the gRPC
    /// health service (serving) and the proxy on each.
    async fn start_servers(
        &self,
        proxy: Arc<Proxy>,
        inherited: &mut InheritedListeners,
    ) -> anyhow::Result<Vec<Passable>> {
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        if self.config.auth.token.is_empty() {
            // Allowed (Praefect allows it), but rarely meant outside a test set-up.
            tracing::warn!(
                "authentication disabled: [auth] token is empty, any client that reaches a listener can call the router"
            );
        }
        let auth = AuthLayer::new(
            AuthConfig::new(&self.config.auth.token, self.config.auth.transitioning)
                .observed_by(crate::metrics::server::auth_observer()),
        );
        // Authentication first: a call without a valid token reaches nothing else.
        let service = auth.layer(crate::proxy::router_service(proxy, health_service));
        let yamux = yamux_config(
            u32::try_from(self.config.yamux.maximum_stream_window_size_bytes).unwrap_or(u32::MAX),
            usize::try_from(self.config.yamux.accept_backlog).unwrap_or(256),
        );
        // One set of limits for every listener: the connection cap counts them all.
        let limits = ServerLimits::new(self.config.connections.limit_settings());
        let mut passables = Vec::new();
        for (listener, passable) in bind(&self.config, inherited).await? {
            passables.push(passable);
            // The stop ends the stream once the connections accepted before it are handed
            // over, and the stream's end stops the server gracefully: a connection accepted
            // just before the stop is served rather than closed in its handshake.
            let stream = incoming_until(
                listener,
                self.sessions.clone(),
                yamux,
                Some(crate::metrics::server::accept_observer()),
                limits.clone(),
                self.tasks.stop_token().cancelled_owned(),
            );
            self.tasks
                .spawn_server(http2_server::serve(stream, service.clone(), limits.clone()));
        }
        Ok(passables)
    }

    fn log_started(&self, postgresql_version_num: i64) {
        let config = &self.config;
        tracing::info!(
            version = crate::cli::VERSION,
            listen_addr = %config.listen_addr,
            tls_listen_addr = %config.tls_listen_addr,
            socket_path = %config.socket_path,
            virtual_storages = ?self.virtual_storages(),
            election_strategy = crate::config::ELECTION_STRATEGY_PER_REPOSITORY,
            postgresql_version_num,
            praefect_name = self.health.praefect_name(),
            "praefect started"
        );
    }

    fn virtual_storages(&self) -> Vec<String> {
        self.config
            .virtual_storage
            .iter()
            .map(|vs| vs.name.clone())
            .collect()
    }
}

/// Connects to the database (waiting up to [`DATABASE_STARTUP_WAIT`] for it) and checks the
/// server and the schema; the server's `server_version_num`.
async fn connect_database(config: &Config) -> anyhow::Result<(Datastore, i64)> {
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
    let pending = store
        .schema_for_serving()
        .await
        .context("checking the database schema")?;
    if pending > 0 {
        tracing::warn!(
            pending,
            "the database has migrations this version needs that are not applied: run `praefect -config FILE sql-migrate`; serving meanwhile, calls that need them fail"
        );
    }
    Ok((store, version))
}

impl RunningApp {
    /// Copies of the listening sockets for a hand-over to a successor.
    pub fn listeners_to_pass(&self) -> Result<Vec<Passable>, HandoverError> {
        handover::duplicate(&self.listeners)
    }

    /// Stops the router: the listeners stop accepting and in-flight calls get `grace`;
    /// running replication jobs get `grace` too; the other workers stop; the database pool
    /// is closed.
    pub async fn shutdown(self, grace: Duration) {
        // The copies kept for a hand-over would keep the sockets open, so that connection
        // attempts would wait in the backlog instead of being refused while calls finish.
        drop(self.listeners);
        self.tasks.stop(grace).await;
        self.store.close().await;
        tracing::info!("praefect stopped");
    }
}
