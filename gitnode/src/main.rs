//! `gitnode -config FILE`: serves the configured storages until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use tokio::signal::unix::{signal, SignalKind};

fn usage() -> ExitCode {
    eprintln!("usage: gitnode -config FILE");
    ExitCode::from(2)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config_path = match args.as_slice() {
        [flag, path] if flag == "-config" || flag == "--config" => PathBuf::from(path),
        _ => return usage(),
    };
    let config = match gitnode::config::Config::load(&config_path) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("gitnode: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let level = if config.logging.level.is_empty() {
        "info"
    } else {
        &config.logging.level
    };
    let _ = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new(format!(
            "{level},h2=warn,hyper=warn"
        )))
        .try_init();
    let shutdown = async {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::info!("gitnode shutting down");
    };
    match gitnode::server::serve(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("gitnode: {err:#}");
            ExitCode::FAILURE
        }
    }
}
