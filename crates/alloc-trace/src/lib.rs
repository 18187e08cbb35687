//! A counting wrapper around a global allocator, for finding where a process's memory goes.
//!
//! Built for the router's soak benchmark, whose RSS stepped up by 7–8 MB at about 11 minutes
//! of uptime: RSS alone cannot tell a live allocation (something holds the memory) from the
//! allocator keeping freed pages. [`Counting`] forwards every call unchanged to the allocator
//! it wraps (no header per block, `realloc` stays `realloc`, so the wrapped allocator's size
//! classes and page reuse are what they would be without it) and keeps:
//!
//! - the bytes currently allocated, and their highest value since the last report;
//! - the number of allocations;
//! - for each allocation of at least [`Counting::set_large`] bytes: its size and, for the first
//!   few each second, a backtrace, printed to stderr.
//!
//! [`start_reporter`] prints one line per interval to stderr. Crates that use it put it
//! behind a cargo feature, since the counters cost a few atomic operations per allocation.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::io::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How many backtraces of large allocations are printed per report interval at most.
const BACKTRACES_PER_INTERVAL: u64 = 4;

/// A global allocator that counts what passes through to `A`.
pub struct Counting<A> {
    inner: A,
    live: AtomicI64,
    window_peak: AtomicI64,
    allocations: AtomicU64,
    large_allocations: AtomicU64,
    backtraces_left: AtomicU64,
    large: AtomicUsize,
}

thread_local! {
    /// Set while this thread reports a large allocation: the backtrace and the printing
    /// allocate too (they are counted, but not reported, so that reporting cannot recurse).
    static REPORTING: Cell<bool> = const { Cell::new(false) };
}

impl<A> Counting<A> {
    /// Wraps `inner`; large allocations are reported from `usize::MAX` bytes (never) until
    /// [`Counting::set_large`] says otherwise.
    pub const fn new(inner: A) -> Self {
        Self {
            inner,
            live: AtomicI64::new(0),
            window_peak: AtomicI64::new(0),
            allocations: AtomicU64::new(0),
            large_allocations: AtomicU64::new(0),
            backtraces_left: AtomicU64::new(BACKTRACES_PER_INTERVAL),
            large: AtomicUsize::new(usize::MAX),
        }
    }

    /// From how many bytes an allocation is reported on stderr.
    pub fn set_large(&self, bytes: usize) {
        self.large.store(bytes, Ordering::Relaxed);
    }

    /// Bytes allocated and not yet freed, as the callers asked for them (not the allocator's
    /// rounded-up sizes).
    pub fn live_bytes(&self) -> i64 {
        self.live.load(Ordering::Relaxed)
    }

    fn grew(&self, by: usize) {
        let live = self.live.fetch_add(by as i64, Ordering::Relaxed) + by as i64;
        self.window_peak.fetch_max(live, Ordering::Relaxed);
    }

    fn shrank(&self, by: usize) {
        self.live.fetch_sub(by as i64, Ordering::Relaxed);
    }

    fn allocated(&self, size: usize, what: &str) {
        self.allocations.fetch_add(1, Ordering::Relaxed);
        self.grew(size);
        if size >= self.large.load(Ordering::Relaxed) {
            self.report_large(size, what);
        }
    }

    fn report_large(&self, size: usize, what: &str) {
        self.large_allocations.fetch_add(1, Ordering::Relaxed);
        let _ = REPORTING.try_with(|reporting| {
            if reporting.replace(true) {
                return;
            }
            let with_backtrace = self
                .backtraces_left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok();
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "alloc-trace: {what} of {size} bytes");
            if with_backtrace {
                let _ = writeln!(err, "{}", std::backtrace::Backtrace::force_capture());
            }
            reporting.set(false);
        });
    }

    /// The counters since the last call, for one report line; resets the window's peak and
    /// the backtrace budget.
    fn take_window(&self) -> Window {
        let live = self.live.load(Ordering::Relaxed);
        self.backtraces_left
            .store(BACKTRACES_PER_INTERVAL, Ordering::Relaxed);
        Window {
            live,
            peak: self.window_peak.swap(live, Ordering::Relaxed),
            allocations: self.allocations.swap(0, Ordering::Relaxed),
            large_allocations: self.large_allocations.swap(0, Ordering::Relaxed),
        }
    }
}

struct Window {
    live: i64,
    peak: i64,
    allocations: u64,
    large_allocations: u64,
}

// SAFETY: every method forwards its arguments unchanged to `inner`, which upholds the
// GlobalAlloc contract; the counting around it neither touches the memory nor unwinds.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = self.inner.alloc(layout);
        if !ptr.is_null() {
            self.allocated(layout.size(), "alloc");
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = self.inner.alloc_zeroed(layout);
        if !ptr.is_null() {
            self.allocated(layout.size(), "alloc_zeroed");
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.inner.dealloc(ptr, layout);
        self.shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = self.inner.realloc(ptr, layout, new_size);
        if !new.is_null() {
            self.shrank(layout.size());
            self.allocated(new_size, "realloc");
        }
        new
    }
}

/// Prints one line per `interval` to stderr from a thread of its own: seconds since this call
/// (the process's uptime when called first thing in `main`), the live bytes, their peak in the
/// interval, the allocations in the interval and how many of them were large.
pub fn start_reporter<A: GlobalAlloc + Sync>(
    counting: &'static Counting<A>,
    interval: Duration,
) -> std::io::Result<()> {
    let started = Instant::now();
    std::thread::Builder::new()
        .name("alloc-trace".into())
        .spawn(move || loop {
            std::thread::sleep(interval);
            let window = counting.take_window();
            eprintln!(
                "alloc-trace: up {} s live {:.1} MB peak {:.1} MB allocations {} large {}",
                started.elapsed().as_secs(),
                window.live as f64 / 1e6,
                window.peak as f64 / 1e6,
                window.allocations,
                window.large_allocations,
            );
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::System;

    #[test]
    fn live_bytes_follow_alloc_realloc_and_free() {
        let counting = Counting::new(System);
        let layout = Layout::from_size_align(1000, 8).unwrap();
        // SAFETY: the layout is non-zero; the block is freed with the layout it has then.
        unsafe {
            let ptr = counting.alloc(layout);
            assert_eq!(counting.live_bytes(), 1000);
            let ptr = counting.realloc(ptr, layout, 5000);
            assert_eq!(counting.live_bytes(), 5000);
            let window = counting.take_window();
            assert_eq!((window.peak, window.allocations), (5000, 2));
            counting.dealloc(ptr, Layout::from_size_align(5000, 8).unwrap());
        }
        assert_eq!(counting.live_bytes(), 0);
        assert_eq!(counting.take_window().peak, 5000);
        assert_eq!(counting.take_window().peak, 0);
    }

    #[test]
    fn large_allocations_are_counted_from_the_threshold() {
        let counting = Counting::new(System);
        counting.set_large(4096);
        let small = Layout::from_size_align(4095, 8).unwrap();
        let large = Layout::from_size_align(4096, 8).unwrap();
        // SAFETY: as above.
        unsafe {
            let a = counting.alloc(small);
            let b = counting.alloc_zeroed(large);
            counting.dealloc(a, small);
            counting.dealloc(b, large);
        }
        assert_eq!(counting.take_window().large_allocations, 1);
    }
}
