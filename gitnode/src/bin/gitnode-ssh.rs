//! `gitnode-ssh`: lets plain `git clone`, `git fetch` and `git push` talk to any
//! Gitaly-protocol endpoint (a gitnode or a praefect), like Gitaly's gitaly-ssh.
//!
//! Use it as `GIT_SSH_COMMAND` (with `GIT_SSH_VARIANT=ssh` for protocol v2) and name the
//! repository in the environment:
//!
//! ```text
//! GITALY_ADDRESS=tcp://127.0.0.1:8075   where to connect (tcp://host:port or unix:/path)
//! GITALY_TOKEN=secret                    v2 token secret (optional)
//! GITALY_STORAGE=default                 storage (or virtual storage) name
//! GITALY_RELATIVE_PATH=group/project.git relative path of the repository
//! GITALY_PLAIN_HTTP2=1                   pushes and create: plain HTTP/2, no backchannel (to go
//!                                        through a generic proxy such as HAProxy)
//! ```
//!
//! The URL's host and path are ignored: `git clone ssh://gitaly/x dir` works.
//! `gitnode-ssh create` creates the repository named by the environment (CreateRepository
//! with `main` as default branch), for demos and tests. Fetches run
//! upload-pack over SSHUploadPackWithSidechannel (pack data on a sidechannel through the
//! backchannel); pushes run receive-pack over SSHReceivePack.

use std::process::ExitCode;
use std::time::Duration;

use praefect_wire::auth::TokenInterceptor;
use praefect_wire::backchannel::{dial_lazy, yamux_config, ClientHandler};
use praefect_wire::pktline;
use praefect_wire::proto::ssh_service_client::SshServiceClient;
use praefect_wire::proto::{
    Repository, SshReceivePackRequest, SshUploadPackWithSidechannelRequest,
};
use praefect_wire::sidechannel;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).map_err(|_| anyhow::anyhow!("{name} is not set"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let code = match run().await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("gitnode-ssh: {err:#}");
            128
        }
    };
    // Exit now rather than return: the runtime would wait on its shutdown for the thread
    // blocked reading stdin, which git keeps open until we exit (a failed call would hang).
    std::process::exit(i32::from(code))
}

/// The remote command git asks for: the last argument, e.g. `git-upload-pack 'path'`.
fn remote_service() -> anyhow::Result<String> {
    let command = std::env::args().next_back().unwrap_or_default();
    let service = command
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    match service.as_str() {
        "git-upload-pack" | "git-receive-pack" => Ok(service),
        _ => anyhow::bail!("unsupported remote command {command:?}"),
    }
}

async fn run() -> anyhow::Result<u8> {
    if std::env::args().nth(1).as_deref() == Some("create") {
        return create().await;
    }
    let service = remote_service()?;
    let address = env("GITALY_ADDRESS")?;
    let token = std::env::var("GITALY_TOKEN").unwrap_or_default();
    let repository = Repository {
        storage_name: env("GITALY_STORAGE")?,
        relative_path: env("GITALY_RELATIVE_PATH")?,
        ..Default::default()
    };
    let git_protocol = std::env::var("GIT_PROTOCOL").unwrap_or_default();
    let handler = ClientHandler::default();
    let sidechannels = handler.sidechannels.clone();
    let channel = dial_lazy(&address, yamux_config(0, 256), handler)?;
    let mut client = SshServiceClient::with_interceptor(channel, TokenInterceptor::new(&token));

    if service == "git-receive-pack" {
        if plain_http2() {
            let mut client = SshServiceClient::with_interceptor(
                plain_channel(&address)?,
                TokenInterceptor::new(&token),
            );
            return receive_pack(&mut client, repository, git_protocol).await;
        }
        return receive_pack(&mut client, repository, git_protocol).await;
    }

    let mut waiter = sidechannels.register();
    let mut request = tonic::Request::new(SshUploadPackWithSidechannelRequest {
        repository: Some(repository),
        git_config_options: Vec::new(),
        git_protocol,
    });
    request
        .metadata_mut()
        .insert(sidechannel::METADATA_KEY, waiter.id().to_string().parse()?);
    let mut call =
        tokio::spawn(async move { client.ssh_upload_pack_with_sidechannel(request).await });
    let channel = tokio::select! {
        channel = waiter.connected() => channel?,
        result = &mut call => {
            result??;
            anyhow::bail!("the server finished without opening the sidechannel");
        }
    };
    let (mut from_server, mut to_server) = tokio::io::split(channel);
    let input = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        pktline::copy_framed(&mut stdin, &mut to_server).await
    });
    let mut stdout = tokio::io::stdout();
    tokio::io::copy(&mut from_server, &mut stdout).await?;
    stdout.flush().await?;
    input.abort();
    tokio::time::timeout(Duration::from_secs(60), call).await???;
    Ok(0)
}

/// Whether `GITALY_PLAIN_HTTP2` asks for plain HTTP/2 (pushes and `create` only).
fn plain_http2() -> bool {
    std::env::var_os("GITALY_PLAIN_HTTP2").is_some_and(|v| !v.is_empty() && v != "0")
}

/// A plain HTTP/2 channel to a `tcp://host:port` address: no backchannel, so no sidechannels
/// (enough for a push, which needs none).
fn plain_channel(address: &str) -> anyhow::Result<tonic::transport::Channel> {
    let Some(host_port) = address.strip_prefix("tcp://") else {
        anyhow::bail!("GITALY_PLAIN_HTTP2 needs a tcp:// address, not {address:?}");
    };
    Ok(tonic::transport::Endpoint::from_shared(format!("http://{host_port}"))?.connect_lazy())
}

/// `gitnode-ssh create`: CreateRepository for the repository in the environment.
async fn create() -> anyhow::Result<u8> {
    use praefect_wire::proto::repository_service_client::RepositoryServiceClient;
    use praefect_wire::proto::CreateRepositoryRequest;
    let address = env("GITALY_ADDRESS")?;
    let channel = if plain_http2() {
        plain_channel(&address)?
    } else {
        dial_lazy(&address, yamux_config(0, 256), ClientHandler::default())?
    };
    let token = std::env::var("GITALY_TOKEN").unwrap_or_default();
    let mut client =
        RepositoryServiceClient::with_interceptor(channel, TokenInterceptor::new(&token));
    let request = CreateRepositoryRequest {
        repository: Some(Repository {
            storage_name: env("GITALY_STORAGE")?,
            relative_path: env("GITALY_RELATIVE_PATH")?,
            ..Default::default()
        }),
        default_branch: b"main".to_vec(),
        ..Default::default()
    };
    match client.create_repository(request).await {
        Ok(_) => Ok(0),
        Err(status) if status.code() == tonic::Code::AlreadyExists => {
            eprintln!("gitnode-ssh: the repository exists already");
            Ok(0)
        }
        Err(status) => anyhow::bail!("CreateRepository: {}", status.message()),
    }
}

async fn receive_pack<T>(
    client: &mut SshServiceClient<T>,
    repository: Repository,
    git_protocol: String,
) -> anyhow::Result<u8>
where
    T: tonic::client::GrpcService<tonic::body::Body> + Send,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
    T::Future: Send,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(SshReceivePackRequest {
        repository: Some(repository),
        git_protocol,
        ..Default::default()
    })
    .await?;
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let message = SshReceivePackRequest {
                        stdin: buf[..n].to_vec(),
                        ..Default::default()
                    };
                    if tx.send(message).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut responses = client
        .ssh_receive_pack(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut exit = 0u8;
    while let Some(message) = responses.message().await? {
        stdout.write_all(&message.stdout).await?;
        stdout.flush().await?;
        stderr.write_all(&message.stderr).await?;
        if let Some(status) = message.exit_status {
            exit = u8::try_from(status.value).unwrap_or(1);
        }
    }
    Ok(exit)
}
