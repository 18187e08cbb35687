//! `gitaly-bench`: a closed-loop load generator for one cheap unary accessor
//! (FindDefaultBranchName) against any Gitaly-protocol endpoint (a gitnode or a router).
//! Prints calls, calls per second, p50 and p99 latency. Used by `scripts/bench`.
//!
//! Usage: gitaly-bench [--plain] [--write-ref REV1,REV2] ADDRESS TOKEN STORAGE RELATIVE_PATH
//!        CONCURRENCY SECONDS
//!
//! `--write-ref` makes the calls a cheap write instead: WriteRef of `refs/heads/bench-<worker>`
//! to REV1 and REV2 in turn (so that every call changes the reference), for the latency a
//! write's reference transaction adds (`scripts/bench-writes`).
//!
//! By default it dials with the backchannel handshake (yamux over the connection), as Praefect
//! and gitnode-ssh do. `--plain` dials plain HTTP/2 (prior knowledge, `tcp://` or `host:port`
//! only), for proxies that know nothing of the handshake, such as nginx's `grpc_pass`. Either
//! way all calls share one connection. 200 warm-up calls precede the timed SECONDS, which may
//! be 0 (warm-up only).
//!
//! `gitaly-bench --h2load-request TOKEN STORAGE RELATIVE_PATH FILE` writes the call's request
//! (one gRPC message frame) to FILE and prints an `authorization` header signed now, for
//! `h2load -d FILE -H ...`: a load generator written in C that costs the machine less per
//! call than this one (`scripts/bench`). The header stays valid for 30 s.

use std::time::{Duration, Instant};

use praefect_wire::auth::TokenInterceptor;
use praefect_wire::backchannel::{dial, yamux_config, ClientHandler};
use praefect_wire::proto::ref_service_client::RefServiceClient;
use praefect_wire::proto::repository_service_client::RepositoryServiceClient;
use praefect_wire::proto::{FindDefaultBranchNameRequest, Repository, WriteRefRequest};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

const USAGE: &str = "usage: gitaly-bench [--plain] [--write-ref REV1,REV2] ADDRESS TOKEN STORAGE RELATIVE_PATH CONCURRENCY SECONDS";

/// The call each worker repeats.
#[derive(Clone)]
enum Call {
    DefaultBranch(FindDefaultBranchNameRequest),
    /// WriteRef to these revisions in turn.
    WriteRef(Repository, [String; 2]),
}

impl Call {
    async fn run(
        &self,
        channel: &Authed,
        worker: usize,
        round: usize,
    ) -> Result<(), tonic::Status> {
        match self {
            Call::DefaultBranch(request) => {
                RefServiceClient::new(channel.clone())
                    .find_default_branch_name(request.clone())
                    .await?;
            }
            Call::WriteRef(repository, revisions) => {
                RepositoryServiceClient::new(channel.clone())
                    .write_ref(WriteRefRequest {
                        repository: Some(repository.clone()),
                        r#ref: format!("refs/heads/bench-{worker}").into_bytes(),
                        revision: revisions[round % 2].clone().into_bytes(),
                        ..Default::default()
                    })
                    .await?;
            }
        }
        Ok(())
    }
}

type Authed = tonic::service::interceptor::InterceptedService<Channel, TokenInterceptor>;

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

/// Writes FindDefaultBranchName's request as one gRPC frame (uncompressed flag, length,
/// message) and prints the authorization header.
fn write_h2load_request(args: &[String]) -> anyhow::Result<()> {
    use prost::Message;
    let [token, storage, relative_path, file] = args else {
        anyhow::bail!("usage: gitaly-bench --h2load-request TOKEN STORAGE RELATIVE_PATH FILE");
    };
    let message = FindDefaultBranchNameRequest {
        repository: Some(Repository {
            storage_name: storage.clone(),
            relative_path: relative_path.clone(),
            ..Default::default()
        }),
        head_only: false,
    }
    .encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len())?.to_be_bytes());
    frame.extend_from_slice(&message);
    std::fs::write(file, frame)?;
    println!(
        "authorization: {}",
        praefect_wire::auth::bearer(token.as_bytes())
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--h2load-request") {
        return write_h2load_request(&args[1..]);
    }
    let mut plain = false;
    let mut write_revisions = None;
    loop {
        match args.first().map(String::as_str) {
            Some("--plain" | "-plain") => {
                args.remove(0);
                plain = true;
            }
            Some("--write-ref" | "-write-ref") if args.len() > 1 => {
                let revisions = args.remove(1);
                args.remove(0);
                let (a, b) = revisions
                    .split_once(',')
                    .ok_or_else(|| anyhow::anyhow!(USAGE))?;
                write_revisions = Some([a.to_string(), b.to_string()]);
            }
            _ => break,
        }
    }
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
    let client: Authed = InterceptedService::new(channel, TokenInterceptor::new(token));
    let repository = Repository {
        storage_name: storage.clone(),
        relative_path: relative_path.clone(),
        ..Default::default()
    };
    let call = match write_revisions {
        Some(revisions) => Call::WriteRef(repository, revisions),
        None => Call::DefaultBranch(FindDefaultBranchNameRequest {
            repository: Some(repository),
            head_only: false,
        }),
    };
    // Warm up connections and caches.
    let warm_up = if matches!(call, Call::WriteRef(..)) {
        20
    } else {
        200
    };
    for round in 0..warm_up {
        call.run(&client, 0, round).await?;
    }
    let deadline = Instant::now() + duration;
    let workers = (0..concurrency).map(|worker| {
        let client = client.clone();
        let call = call.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut round = 0;
            while Instant::now() < deadline {
                let started = Instant::now();
                call.run(&client, worker, round).await?;
                latencies.push(started.elapsed());
                round += 1;
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
