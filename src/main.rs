//! The `praefect` binary: everything happens in `praefect::cli`.

/// mimalloc rather than glibc's malloc: every proxied call allocates and frees many small
/// buffers (headers, frames, futures) across the runtime's threads, where glibc's arenas and
/// free-list locking showed up in the router's profile.
#[cfg(not(feature = "alloc-trace"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// With the `alloc-trace` feature, the same allocator behind a counting wrapper.
#[cfg(feature = "alloc-trace")]
#[global_allocator]
static ALLOCATOR: praefect_alloc_trace::Counting<mimalloc::MiMalloc> =
    praefect_alloc_trace::Counting::new(mimalloc::MiMalloc);

fn main() -> std::process::ExitCode {
    #[cfg(feature = "alloc-trace")]
    start_alloc_trace();
    praefect::cli::run(std::env::args_os().collect())
}

/// Reports large allocations from PRAEFECT_ALLOC_TRACE_BYTES bytes (default 1 MiB) and prints
/// the live heap every PRAEFECT_ALLOC_TRACE_INTERVAL seconds (default 1).
#[cfg(feature = "alloc-trace")]
fn start_alloc_trace() {
    let number = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|value| value.parse().ok())
            .unwrap_or(default)
    };
    ALLOCATOR.set_large(number("PRAEFECT_ALLOC_TRACE_BYTES", 1 << 20) as usize);
    let interval =
        std::time::Duration::from_secs(number("PRAEFECT_ALLOC_TRACE_INTERVAL", 1).max(1));
    if let Err(error) = praefect_alloc_trace::start_reporter(&ALLOCATOR, interval) {
        eprintln!("alloc-trace: cannot start the reporter: {error}");
    }
}
