//! Transparent huge pages off for the router's process, unless the operator asks for them.
//!
//! Why: mimalloc, the router's allocator, reserves its heap in 1 GiB arenas and marks them
//! `MADV_HUGEPAGE`. On a kernel whose THP mode is `madvise` (Debian's default) or `always`,
//! a page fault there, or later a pass of `khugepaged`, makes a whole 2 MiB region resident
//! even when it holds only a few KiB that are in use. The router's live heap is small (1–5 MB
//! under the benchmark's mixed load, counted with the `alloc-trace` feature), so huge pages
//! mostly hold empty memory: side by side under the same load, anonymous memory was 14.4 MB
//! with them and 2.8 MB without, and a 10-minute soak stepped up by 8 MB, for good, when
//! `khugepaged` first reached the router about 11 minutes after it started. CPU per call was
//! the same either way (the working set is small enough for the TLB).
//!
//! `PR_SET_THP_DISABLE` applies to the whole process from then on (page faults and
//! `khugepaged` alike) and to processes it forks, such as the successor of a SIGHUP
//! hand-over. An operator who wants huge pages sets `MIMALLOC_ALLOW_THP=1`, mimalloc's own
//! switch; when that variable is set at all, the decision is left to mimalloc.

use std::sync::OnceLock;

/// The environment variable through which mimalloc (and the operator) decide instead.
pub const ALLOCATOR_SWITCH: &str = "MIMALLOC_ALLOW_THP";

/// What [`disable`] did, for the startup log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HugePages {
    /// Disabled for this process.
    Disabled,
    /// Left to mimalloc: [`ALLOCATOR_SWITCH`] is set.
    LeftToAllocator,
    /// The kernel refused (before Linux 3.15); huge pages stay as the system sets them.
    NotDisabled(String),
}

static OUTCOME: OnceLock<HugePages> = OnceLock::new();

/// Disables transparent huge pages for this process (see the module's doc). Called as early
/// as possible, before the heap grows: pages made huge before the call stay huge.
pub fn disable() {
    let outcome = if std::env::var_os(ALLOCATOR_SWITCH).is_some() {
        HugePages::LeftToAllocator
    } else {
        match nix::sys::prctl::set_thp_disable(true) {
            Ok(()) => HugePages::Disabled,
            Err(errno) => HugePages::NotDisabled(errno.desc().to_owned()),
        }
    };
    let _ = OUTCOME.set(outcome);
}

/// Logs what [`disable`] did, once logging is set up.
pub fn log_outcome() {
    match OUTCOME.get() {
        Some(HugePages::Disabled) | None => {}
        Some(HugePages::LeftToAllocator) => tracing::info!(
            switch = ALLOCATOR_SWITCH,
            "transparent huge pages left to the allocator's setting"
        ),
        Some(HugePages::NotDisabled(why)) => tracing::warn!(
            error = %why,
            "cannot disable transparent huge pages for this process; its resident memory may be larger"
        ),
    }
}
