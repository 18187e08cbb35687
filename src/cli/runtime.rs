//! The async runtime every subcommand runs on: one thread when the process may use one CPU,
//! tokio's multi-threaded scheduler (a worker per CPU) otherwise.
//!
//! Why: on one CPU the multi-threaded scheduler has nothing to spread work over, but still
//! pays for it on every wake-up (atomic queues, a worker thread apart from the main thread that
//! runs startup and the signal loop). Measured with the router pinned to one CPU, side by side
//! with the same build on the multi-threaded scheduler (`scripts/bench`'s unary call): 1.5%
//! fewer instructions per call at 1 call in flight and 4.6% fewer at 64 (callgrind), and 3–4%
//! less CPU time per call (medians of 5 alternating rounds). A router deployed on one vCPU, or
//! pinned there as the benchmark pins it, gets that for free; on more CPUs nothing changes.
//!
//! "The CPUs it may use" is [`std::thread::available_parallelism`]: the process's CPU affinity
//! (`taskset`, systemd's `CPUAffinity=`) and a cgroup CPU quota below two CPUs count. An operator
//! who sets `TOKIO_WORKER_THREADS` (tokio's own switch for the worker count) gets the
//! multi-threaded scheduler with that many workers whatever the CPUs.
//!
//! Nothing in the router blocks its async threads (blocking work goes to `spawn_blocking`,
//! which both flavours run on a separate pool) or uses `block_in_place`, which only the
//! multi-threaded scheduler allows; the end-to-end test
//! `the_router_on_one_cpu_runs_on_one_thread_and_serves_calls_clones_and_pushes` runs a whole
//! router this way.

use std::sync::OnceLock;

use tokio::runtime::{Builder, Runtime};

/// tokio's environment variable for the multi-threaded scheduler's worker count.
pub const WORKER_THREADS_SWITCH: &str = "TOKIO_WORKER_THREADS";

/// Which scheduler [`build`] chose, and why, for the startup log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    /// One thread: the process may use one CPU.
    CurrentThread,
    /// tokio's multi-threaded scheduler; `cpus` is what the process may use.
    MultiThread { cpus: usize },
    /// The multi-threaded scheduler because [`WORKER_THREADS_SWITCH`] is set.
    MultiThreadByOperator,
}

impl Flavour {
    /// The choice for a process that may use `cpus` CPUs, `switch_set` when the operator set
    /// [`WORKER_THREADS_SWITCH`].
    pub fn choose(cpus: usize, switch_set: bool) -> Flavour {
        if switch_set {
            Flavour::MultiThreadByOperator
        } else if cpus <= 1 {
            Flavour::CurrentThread
        } else {
            Flavour::MultiThread { cpus }
        }
    }

    /// tokio's name for the flavour, as the startup log gives it.
    pub fn name(self) -> &'static str {
        match self {
            Flavour::CurrentThread => "current_thread",
            Flavour::MultiThread { .. } | Flavour::MultiThreadByOperator => "multi_thread",
        }
    }
}

static CHOSEN: OnceLock<Flavour> = OnceLock::new();

/// Builds the runtime for the CPUs this process may use (see the module's doc).
pub fn build() -> std::io::Result<Runtime> {
    // An error means the count is unknown (no /proc, say): the multi-threaded scheduler then,
    // as before this choice existed.
    let cpus = std::thread::available_parallelism().map_or(2, usize::from);
    let flavour = Flavour::choose(cpus, std::env::var_os(WORKER_THREADS_SWITCH).is_some());
    let _ = CHOSEN.set(flavour);
    let mut builder = match flavour {
        Flavour::CurrentThread => Builder::new_current_thread(),
        Flavour::MultiThread { .. } | Flavour::MultiThreadByOperator => Builder::new_multi_thread(),
    };
    builder.enable_all().build()
}

/// Logs the choice [`build`] made, once logging is set up.
pub fn log_choice() {
    match CHOSEN.get() {
        None => {}
        Some(flavour @ Flavour::CurrentThread) => tracing::info!(
            flavour = flavour.name(),
            cpus = 1,
            "async runtime on one thread: this process may use one CPU"
        ),
        Some(flavour @ Flavour::MultiThread { cpus }) => tracing::info!(
            flavour = flavour.name(),
            cpus,
            "async runtime with a worker per CPU"
        ),
        Some(flavour @ Flavour::MultiThreadByOperator) => tracing::info!(
            flavour = flavour.name(),
            switch = WORKER_THREADS_SWITCH,
            "async runtime with the worker count the environment sets"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::Flavour;

    #[test]
    fn one_cpu_gets_one_thread_unless_the_operator_sets_the_worker_count() {
        assert_eq!(Flavour::choose(1, false), Flavour::CurrentThread);
        assert_eq!(Flavour::choose(2, false), Flavour::MultiThread { cpus: 2 });
        assert_eq!(
            Flavour::choose(64, false),
            Flavour::MultiThread { cpus: 64 }
        );
        assert_eq!(Flavour::choose(1, true), Flavour::MultiThreadByOperator);
        assert_eq!(Flavour::choose(8, true), Flavour::MultiThreadByOperator);
    }
}
