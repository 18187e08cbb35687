//! `gitaly-bench`: a closed-loop load generator for one cheap unary accessor
//! (FindDefaultBranchName) against any Gitaly-protocol endpoint (a gitnode or a router).
//! Prints calls, calls per second, p50 and p99 latency. Used by `scripts/bench`.
//!
//! Usage: gitaly-bench [--plain] ADDRESS TOKEN STORAGE RELATIVE_PATH CONCURRENCY SECONDS
//!
//! By default it dials with the backchannel handshake (yamux over the connection), as Praefect
//! and gitnode-ssh do. `--plain` dials plain HTTP/2 (prior knowledge, `tcp://` or `host:port`
//! only), for proxies that know nothing of the handshake, such as nginx's `grpc_pass`. Either
//! way all calls share one connection. 200 warm-up calls precede the timed SECONDS, which may
//! be 0 (warm-up only).

use std::time::{Duration, Instant};

use praefect_wire::auth::TokenInterceptor;
use praefect_wire::backchannel::{dial, yamux_config, ClientHandler};
use praefect_wire::proto::ref_service_client::RefServiceClient;
use praefect_wire::proto::{FindDefaultBranchNameRequest, Repository};
use tonic::transport::{Channel, Endpoint};

const USAGE: &str =
    "usage: gitaly-bench [--plain] ADDRESS TOKEN STORAGE RELATIVE_PATH CONCURRENCY SECONDS";

/// One plain HTTP/2 connection to `address` (`tcp://host:port` or `host:port`).
async fn dial_plain(address: &str, timeout: Duration) -> anyhow::Result<Channel> {
    let target = address.strip_prefix("tcp://").unwrap_or(address);
    anyhow::ensure!(
        !target.contains("://") && !target.starts_with("unix:"),
        "--plain dials tcp addresses only, not {address}"
    );
    let channel = Endpoint::from_shared(format!("http://{target}"))?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .connect()
        .await?;
    Ok(channel)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let plain = match args.first().map(String::as_str) {
        Some("--plain" | "-plain") => {
            args.remove(0);
            true
        }
        _ => false,
    };
    let [address, token, storage, relative_path, concurrency, seconds] = args.as_slice() else {
        anyhow::bail!(USAGE);
    };
    let concurrency: usize = concurrency.parse()?;
    let duration = Duration::from_secs_f64(seconds.parse()?);
    let timeout = Duration::from_secs(10);
    let channel = if plain {
        dial_plain(address, timeout).await?
    } else {
        dial(
            address,
            yamux_config(0, 256),
            ClientHandler::default(),
            timeout,
        )
        .await?
    };
    let client = RefServiceClient::with_interceptor(channel, TokenInterceptor::new(token));
    let request = FindDefaultBranchNameRequest {
        repository: Some(Repository {
            storage_name: storage.clone(),
            relative_path: relative_path.clone(),
            ..Default::default()
        }),
        head_only: false,
    };
    // Warm up connections and caches.
    for _ in 0..200 {
        client
            .clone()
            .find_default_branch_name(request.clone())
            .await?;
    }
    let deadline = Instant::now() + duration;
    let workers = (0..concurrency).map(|_| {
        let mut client = client.clone();
        let request = request.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let started = Instant::now();
                client.find_default_branch_name(request.clone()).await?;
                latencies.push(started.elapsed());
            }
            Ok::<_, tonic::Status>(latencies)
        })
    });
    let started = Instant::now();
    let mut latencies = Vec::new();
    for worker in futures::future::join_all(workers).await {
        latencies.extend(worker??);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    println!(
        "calls={} rps={:.0} p50_us={:.0} p99_us={:.0}",
        latencies.len(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        percentile(0.50),
        percentile(0.99)
    );
    Ok(())
}
