//! The `praefect` binary: everything happens in `praefect::cli`.

/// mimalloc rather than glibc's malloc: every proxied call allocates and frees many small
/// buffers (headers, frames, futures) across the runtime's threads, where glibc's arenas and
/// free-list locking showed up in the router's profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    praefect::cli::run(std::env::args_os().collect())
}
