//! The `praefect` binary: everything happens in `praefect::cli`.

fn main() -> std::process::ExitCode {
    praefect::cli::run(std::env::args_os().collect())
}
