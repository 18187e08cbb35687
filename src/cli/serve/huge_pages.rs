//! The router's heap stays out of transparent huge pages.
//!
//! Why: mimalloc, the router's allocator, reserves its heap in 1 GiB arenas and, by default,
//! marks them `MADV_HUGEPAGE`. On a kernel whose THP mode is `madvise` (Debian's default) or
//! `always`, a page fault there, or later a pass of `khugepaged`, makes a whole 2 MiB region
//! resident even when it holds only a few KiB that are in use. The router's live heap is small
//! (1–5 MB under the benchmark's mixed load, counted with the `alloc-trace` feature), so huge
//! pages mostly held free memory: side by side under the same load, anonymous memory was
//! 14.4 MB with them and 2.8 MB without, and a 10-minute soak stepped up by 8 MB, for good,
//! when `khugepaged` first reached the router about 11 minutes after it started. CPU per call
//! was the same either way (the working set is small enough for the TLB).
//!
//! Two parts: mimalloc is built with its `no_thp` feature (Cargo.toml), so it never asks for
//! huge pages, not even for the pages it touches before `main`; and [`disable`] sets
//! `PR_SET_THP_DISABLE` for the process, which also keeps a THP mode of `always` off it (page
//! faults and `khugepaged` alike, and processes it forks, such as the successor of a SIGHUP
//! hand-over). An operator who wants the system's setting to apply sets `MIMALLOC_ALLOW_THP`
//! (mimalloc's own switch); when that variable is set at all, [`disable`] does nothing.

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
