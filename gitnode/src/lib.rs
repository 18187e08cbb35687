//! gitnode: a small Gitaly-protocol server over real git repositories on disk, for developing
//! and testing praefect-rs (real Gitaly cannot be built here). It speaks the same wire
//! protocol as Gitaly: v2 tokens, backchannel and sidechannel, and the RPCs the router's tests
//! and benchmarks need. Writes that carry `gitaly-reference-transaction` vote in the router's
//! reference transactions ([`transaction`], with the `gitnode-hook` binary).

pub mod commit;
pub mod config;
pub mod git;
pub mod refs;
pub mod server;
pub mod services;
pub mod storage;
pub mod transaction;

use std::path::PathBuf;

use praefect_wire::backchannel::SessionRegistry;

/// What every service shares.
#[derive(Clone)]
pub struct Node {
    pub storages: storage::Storages,
    pub git: git::Git,
    /// Backchannel sessions of connected callers, to open sidechannels to them.
    pub sessions: SessionRegistry,
    pub git_version: String,
    /// The `gitnode-ssh` helper, used as GIT_SSH_COMMAND to fetch from other nodes.
    pub ssh_helper: PathBuf,
    /// Reference transactions: the calls that vote, the hook's socket, the voter.
    pub transactions: transaction::Transactions,
    /// How long a sidechannel may be idle before its call and git process end.
    pub sidechannel_idle_timeout: std::time::Duration,
}

/// The version ServerInfo reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
