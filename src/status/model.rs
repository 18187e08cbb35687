//! What one status collection found: the data behind both `/` and `/status.json` (serialized
//! as is for the JSON twin, so the two cannot disagree).

use serde::Serialize;

use crate::datastore::RepositoryCounts;
use crate::logging::LoggedError;

/// The whole status.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// The one-line verdict at the top of the page.
    pub summary: Summary,
    /// When this collection was made (RFC 3339, UTC).
    pub collected_at: String,
    pub router: RouterInfo,
    pub virtual_storages: Vec<VirtualStorageStatus>,
    /// What is wrong and what to do about it, worst first.
    pub problems: Vec<Problem>,
    /// The health and queue queries that failed in this collection (empty when all
    /// answered; a failed repository count is reported with its virtual storage instead).
    pub database_errors: Vec<String>,
    /// This router's latest warnings and errors, newest first.
    pub recent_errors: Vec<LoggedError>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// True when no problem was found.
    pub ok: bool,
    pub text: String,
}

/// This router.
#[derive(Clone, Debug, Serialize)]
pub struct RouterInfo {
    /// Its name in `node_status`.
    pub name: String,
    pub version: String,
    pub uptime_seconds: u64,
    /// `host:port` of the database server accepting writes in use; None while none is known.
    pub database_writer: Option<String>,
    /// Why no writer is known, when none is.
    pub database_writer_lost: Option<String>,
    /// Whether the read cache's LISTEN connection is up (the cache is trusted only then).
    pub listen_connected: bool,
    /// How long the LISTEN connection has been down, when it is.
    pub listen_down_seconds: Option<u64>,
}

/// One virtual storage.
#[derive(Clone, Debug, Serialize)]
pub struct VirtualStorageStatus {
    pub name: String,
    pub nodes: Vec<NodeStatus>,
    /// Active routers (tried a node of this virtual storage in the last minute).
    pub active_routers: usize,
    /// How many of them must see a node healthy for the quorum to count it healthy.
    pub quorum_needed: usize,
    /// Repositories by state; None when the count failed (see `repository_counts_error`).
    pub repositories: Option<RepositoryCounts>,
    pub repository_counts_error: Option<String>,
    /// Seconds since the repository counts were taken (they are kept longer than the rest).
    pub repository_counts_age_seconds: Option<u64>,
    /// The replication queue by target.
    pub queue: Vec<QueueTarget>,
    pub verification: Verification,
}

/// One node (storage) of a virtual storage.
#[derive(Clone, Debug, Serialize)]
pub struct NodeStatus {
    pub storage: String,
    pub address: String,
    /// This router's latest health check.
    pub healthy_here: bool,
    /// In `healthy_storages`: the routers' quorum sees it healthy; None when the database
    /// could not be asked.
    pub quorum_healthy: Option<bool>,
    /// How each active router sees it (this one included).
    pub seen_by: Vec<RouterView>,
    pub disk: Option<Disk>,
    pub disk_error: Option<String>,
}

impl NodeStatus {
    /// Unhealthy by this router's check or by the quorum.
    pub fn unhealthy(&self) -> bool {
        !self.healthy_here || self.quorum_healthy == Some(false)
    }
}

/// One router's view of a node.
#[derive(Clone, Debug, Serialize)]
pub struct RouterView {
    pub praefect_name: String,
    pub healthy: bool,
    pub seen_seconds_ago: Option<f64>,
    /// Whether this is the router serving the page.
    pub this_router: bool,
}

/// A storage's disk, as the node reports it (DiskStatistics).
#[derive(Clone, Debug, Serialize)]
pub struct Disk {
    pub available_bytes: i64,
    pub used_bytes: i64,
}

impl Disk {
    /// Percentage of the disk in use.
    pub fn used_percent(&self) -> f64 {
        let total = self.available_bytes.saturating_add(self.used_bytes);
        if total <= 0 {
            return 0.0;
        }
        self.used_bytes as f64 * 100.0 / total as f64
    }
}

/// The queue of one target storage.
#[derive(Clone, Debug, Serialize)]
pub struct QueueTarget {
    pub target: String,
    /// Jobs in every state.
    pub total: i64,
    pub states: Vec<QueueState>,
    /// Age of the oldest job of any state, in seconds.
    pub oldest_seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct QueueState {
    pub state: String,
    pub count: i64,
    pub oldest_seconds: f64,
}

/// Background verification of one virtual storage.
#[derive(Clone, Debug, Serialize)]
pub struct Verification {
    /// False when `verification_interval` is 0.
    pub enabled: bool,
    pub interval_seconds: u64,
    /// Replicas verified within the interval, verified before it, never verified (from the
    /// repository counts).
    pub verified: Option<i64>,
    pub expired: Option<i64>,
    pub unverified: Option<i64>,
    /// Checks by this router since it started that found a replica missing (`invalid`) or
    /// could not tell (`error`).
    pub failing_invalid: u64,
    pub failing_errors: u64,
}

/// How bad a problem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    Warning,
}

/// Something wrong, and what to do about it.
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    pub severity: Severity,
    /// A stable name of the kind of problem (`node-unhealthy`, `unavailable-repositories`...).
    pub kind: &'static str,
    pub what: String,
    pub action: String,
}
