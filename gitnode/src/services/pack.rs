//! Running `git upload-pack` and `git receive-pack` for the SSH and smart HTTP services.

use std::path::Path;
use std::process::Stdio;

use praefect_wire::backchannel::PeerInfo;
use praefect_wire::idle::Activity;
use praefect_wire::{pktline, sidechannel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tonic::metadata::MetadataMap;
use tonic::Status;

use super::Services;
use crate::transaction::Transaction;

/// Which git service to run, and how.
#[derive(Clone, Copy, Debug)]
pub enum Pack {
    UploadPack,
    ReceivePack,
}

impl Pack {
    fn name(self) -> &'static str {
        match self {
            Pack::UploadPack => "upload-pack",
            Pack::ReceivePack => "receive-pack",
        }
    }
}

/// Options common to the pack RPCs.
pub struct PackOptions<'a> {
    pub stateless: bool,
    pub advertise_refs: bool,
    pub git_protocol: &'a str,
    pub config: &'a [String],
    /// The call's reference transaction: receive-pack votes through the hook.
    pub transaction: Option<&'a Transaction>,
}

/// The `git_config_options` keys a client may set on the pack RPCs, lower-cased (git
/// compares section and key names case-insensitively): what GitLab sends for partial clones
/// and fetches by object id or ref, and receive's input limit. Any other key is refused:
/// many run a command (`uploadpack.packObjectsHook`, `core.sshCommand`, `core.fsmonitor`,
/// `core.hooksPath`, `protocol.*.allow` with ext::) or read files on the node, and the router
/// forwards the field unchanged, so the node is the one place to stop them.
pub const ALLOWED_CONFIG_KEYS: &[&str] = &[
    "uploadpack.allowfilter",
    "uploadpack.allowanysha1inwant",
    "uploadpack.allowtipsha1inwant",
    "uploadpack.allowreachablesha1inwant",
    "uploadpack.allowrefinwant",
    "uploadpack.allowsidebandall",
    "receive.maxinputsize",
];

/// Checks one `key=value` entry of `git_config_options` against [`ALLOWED_CONFIG_KEYS`]. The
/// value must be one line without NUL; the message names the key only.
pub fn check_config_option(entry: &str) -> Result<(), Status> {
    let Some((key, value)) = entry.split_once('=') else {
        return Err(Status::invalid_argument(
            "invalid git config option: want key=value",
        ));
    };
    let key = key.to_ascii_lowercase();
    if !ALLOWED_CONFIG_KEYS.contains(&key.as_str()) {
        return Err(Status::invalid_argument(format!(
            "git config option not allowed: {key:?}"
        )));
    }
    if value.contains(['\0', '\n', '\r']) {
        return Err(Status::invalid_argument(format!(
            "invalid value for git config option {key:?}"
        )));
    }
    Ok(())
}

impl Services {
    /// Builds the git command for a pack service on repository `path`.
    pub fn pack_command(
        &self,
        pack: Pack,
        path: &Path,
        options: &PackOptions<'_>,
    ) -> Result<Command, Status> {
        let mut command = self.0.git.bare_command();
        for entry in options.config {
            check_config_option(entry)?;
            command.arg("-c").arg(entry);
        }
        // After the caller's options, so that they cannot override the hooks path.
        if let Some(tx) = options.transaction {
            tx.configure(&mut command);
        }
        command.arg(pack.name());
        if options.stateless {
            command.arg("--stateless-rpc");
        }
        if options.advertise_refs {
            command.arg("--advertise-refs");
        }
        command.arg(path);
        if options.git_protocol == "version=2" {
            command.env("GIT_PROTOCOL", "version=2");
        }
        Ok(command)
    }

    /// Runs upload-pack with its input and output on the caller's sidechannel. A sidechannel
    /// that moves no byte either way for the node's idle timeout ends the call and kills
    /// upload-pack (DeadlineExceeded).
    pub async fn upload_pack_over_sidechannel(
        &self,
        metadata: &MetadataMap,
        peer: Option<&PeerInfo>,
        path: &Path,
        options: &PackOptions<'_>,
    ) -> Result<(), Status> {
        let id = sidechannel::id_from_metadata(metadata)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let peer = peer.cloned().unwrap_or_default();
        let channel = sidechannel::open(&self.0.sessions, &peer, id)
            .await
            .map_err(|e| Status::unavailable(format!("opening sidechannel: {e}")))?;
        let activity = Activity::new();
        let (mut from_client, mut to_client) = tokio::io::split(activity.watch(channel));
        let mut child = spawn(self.pack_command(Pack::UploadPack, path, options)?, true)?;
        let mut stdin = take_pipe(&mut child.stdin, "stdin")?;
        let mut stdout = take_pipe(&mut child.stdout, "stdout")?;
        let stderr = collect_stderr(&mut child);
        let (input_done, mut input_result) = tokio::sync::oneshot::channel();
        let input = tokio::spawn(async move {
            let copied = pktline::copy_unframed(&mut from_client, &mut stdin).await;
            drop(stdin);
            let _ = input_done.send(copied);
            // Keep reading after the caller's flush: the yamux stream only learns that the
            // caller opened its receive window on its read path, so a stream nobody reads
            // stalls its writer once a window's worth of pack data is in flight.
            let _ = tokio::io::copy(&mut from_client, &mut tokio::io::sink()).await;
        });
        let copy_output = async {
            let copied = tokio::io::copy(&mut stdout, &mut to_client).await;
            let _ = to_client.shutdown().await;
            copied
        };
        let idle_timeout = self.0.sidechannel_idle_timeout;
        let output = tokio::select! {
            copied = copy_output => Some(copied),
            () = activity.idle(idle_timeout) => None,
        };
        // upload-pack may be blocked writing to a pipe nobody reads any more: close it so
        // that it ends (with EPIPE) instead of waiting for ever.
        drop(stdout);
        let Some(output) = output else {
            input.abort();
            let _ = child.kill().await;
            tracing::info!(?idle_timeout, "sidechannel idle: upload-pack stopped");
            return Err(Status::deadline_exceeded(format!(
                "sidechannel idle for {}s: no data moved either way",
                idle_timeout.as_secs()
            )));
        };
        let status = child
            .wait()
            .await
            .map_err(|e| Status::internal(format!("waiting for upload-pack: {e}")))?;
        // The input task drains until the caller closes the stream; stop it.
        input.abort();
        let stderr = stderr.await.unwrap_or_default();
        output.map_err(|e| Status::unavailable(format!("writing to the sidechannel: {e}")))?;
        if !status.success() {
            // A caller that went away mid-request is the likely cause; say so.
            if let Ok(Err(err)) = input_result.try_recv() {
                return Err(Status::cancelled(format!(
                    "reading from the sidechannel: {err}"
                )));
            }
            return Err(Status::internal(format!(
                "upload-pack: {} {}",
                status,
                String::from_utf8_lossy(&stderr).trim()
            )));
        }
        // upload-pack finished and its whole answer was sent: how the caller's side of the
        // stream ends after that (a reset, no flush) does not matter.
        Ok(())
    }
}

impl Services {
    /// Starts receive-pack on `path` and feeds it `first` and then the data of every further
    /// request message, closing its input when the client half-closes or goes away.
    pub fn start_receive_pack<M: Send + 'static>(
        &self,
        path: &Path,
        options: &PackOptions<'_>,
        first: Vec<u8>,
        mut rest: tonic::Streaming<M>,
        data: fn(M) -> Vec<u8>,
    ) -> Result<Child, Status> {
        let mut child = spawn(self.pack_command(Pack::ReceivePack, path, options)?, true)?;
        let mut stdin = take_pipe(&mut child.stdin, "stdin")?;
        tokio::spawn(async move {
            if stdin.write_all(&first).await.is_err() {
                return;
            }
            while let Ok(Some(message)) = rest.message().await {
                if stdin.write_all(&data(message)).await.is_err() {
                    return;
                }
            }
        });
        Ok(child)
    }
}

/// Waits for `child` and, if it failed, sends an error with its stderr on `tx` (or, if a
/// vote of `transaction` made it fail, the vote's error).
pub async fn report_failure<T>(
    mut child: Child,
    stderr: tokio::task::JoinHandle<Vec<u8>>,
    tx: &tokio::sync::mpsc::Sender<Result<T, Status>>,
    what: &str,
    transaction: Option<&Transaction>,
) {
    match child.wait().await {
        Ok(status) if status.success() => {}
        other => {
            let stderr = stderr.await.unwrap_or_default();
            let status = Status::internal(format!(
                "{what}: {other:?} {}",
                String::from_utf8_lossy(&stderr).trim()
            ));
            let status = match transaction {
                Some(transaction) => transaction.explain(status),
                None => status,
            };
            let _ = tx.send(Err(status)).await;
        }
    }
}

/// Spawns `command` with piped stdout and stderr (and stdin when asked).
pub fn spawn(mut command: Command, with_stdin: bool) -> Result<Child, Status> {
    if with_stdin {
        command.stdin(Stdio::piped());
    }
    command
        .spawn()
        .map_err(|e| Status::internal(format!("starting git: {e}")))
}

/// Takes one of a child's pipes (`child.stdin`, `.stdout`, `.stderr`). Every command here is
/// started with the pipes it reads or writes, so this only fails if a command was built
/// without one: that is an Internal error of the request, not a panic of the node.
pub fn take_pipe<T>(pipe: &mut Option<T>, name: &str) -> Result<T, Status> {
    pipe.take()
        .ok_or_else(|| Status::internal(format!("git's {name} is not piped")))
}

/// Collects a child's stderr in the background (bounded to 64 KiB).
pub fn collect_stderr(child: &mut Child) -> tokio::task::JoinHandle<Vec<u8>> {
    let stderr = child.stderr.take();
    tokio::spawn(async move {
        let mut out = Vec::new();
        if let Some(stderr) = stderr {
            let _ = stderr.take(64 * 1024).read_to_end(&mut out).await;
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_harmless_config_keys_pass() {
        for good in [
            "uploadpack.allowFilter=true",
            "uploadpack.allowAnySHA1InWant=true",
            "UPLOADPACK.ALLOWREFINWANT=1",
            "receive.maxInputSize=1000000",
            "uploadpack.allowfilter=",
        ] {
            assert!(check_config_option(good).is_ok(), "{good}");
        }
        for bad in [
            "uploadpack.packObjectsHook=touch /tmp/x",
            "core.sshCommand=sh -c id",
            "core.hooksPath=/tmp",
            "protocol.ext.allow=always",
            "-c",
            "uploadpack.allowFilter",
            "uploadpack.allowFilter=true\ncore.hooksPath=/tmp",
            "uploadpack.allowFilter=a\0b",
        ] {
            let err = check_config_option(bad).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
            assert!(!err.message().contains("/tmp"), "{}", err.message());
        }
    }
}
