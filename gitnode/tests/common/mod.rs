//! Harness for gitnode's end-to-end tests: real gitnode processes on loopback ports, real git.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use praefect::wire::auth::TokenInterceptor;
use praefect::wire::backchannel::{dial_lazy, yamux_config, ClientHandler};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const TOKEN: &str = "gitnode-test-secret";

pub type Authed = InterceptedService<Channel, TokenInterceptor>;

/// A running gitnode with one storage; killed when dropped.
pub struct GitNode {
    pub storage: String,
    pub address: String,
    pub root: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl GitNode {
    pub fn start(storage: &str) -> GitNode {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("storage");
        let config = dir.path().join("gitnode.toml");
        std::fs::write(
            &config,
            format!(
                "listen_addr = \"127.0.0.1:0\"\n[auth]\ntoken = \"{TOKEN}\"\n[[storage]]\nname = \"{storage}\"\npath = \"{}\"\n",
                root.display()
            ),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_gitnode"))
            .args(["-config", config.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting gitnode");
        // The node logs the address it bound; port 0 avoids racing for free ports.
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let address = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|line| {
                let at = line.find("address=")?;
                Some(line[at + 8..].split_whitespace().next()?.to_string())
            })
            .expect("gitnode did not report its address");
        std::thread::spawn(move || for _ in lines {});
        GitNode {
            storage: storage.to_string(),
            address: format!("tcp://{address}"),
            root: root.canonicalize().unwrap(),
            child,
            _dir: dir,
        }
    }

    /// A client channel with the backchannel handshake and the node's token.
    pub fn channel(&self) -> Authed {
        let channel = dial_lazy(
            &self.address,
            yamux_config(0, 256),
            ClientHandler::default(),
        )
        .unwrap();
        InterceptedService::new(channel, TokenInterceptor::new(TOKEN))
    }

    /// A plain gRPC channel (no backchannel) without a token.
    pub async fn plain_channel(&self) -> Channel {
        let uri = self.address.replace("tcp://", "http://");
        tonic::transport::Endpoint::from_shared(uri)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub fn repository(&self, relative_path: &str) -> praefect::wire::proto::Repository {
        praefect::wire::proto::Repository {
            storage_name: self.storage.clone(),
            relative_path: relative_path.to_string(),
            ..Default::default()
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GitNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs git in `dir`, panicking with its stderr on failure; returns stdout.
pub fn git(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let output = Command::new("git")
        .current_dir(dir)
        .args(args)
        .envs(env.iter().copied())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Test Author")
        .env("GIT_AUTHOR_EMAIL", "author@example.com")
        .env("GIT_COMMITTER_NAME", "Test Committer")
        .env("GIT_COMMITTER_EMAIL", "committer@example.com")
        .output()
        .expect("running git");
    assert!(
        output.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Environment that makes git reach `repository` on `address` through gitnode-ssh.
pub fn ssh_env(address: &str, storage: &str, relative_path: &str) -> Vec<(String, String)> {
    vec![
        (
            "GIT_SSH_COMMAND".into(),
            env!("CARGO_BIN_EXE_gitnode-ssh").into(),
        ),
        ("GIT_SSH_VARIANT".into(), "ssh".into()),
        ("GITALY_ADDRESS".into(), address.into()),
        ("GITALY_TOKEN".into(), TOKEN.into()),
        ("GITALY_STORAGE".into(), storage.into()),
        ("GITALY_RELATIVE_PATH".into(), relative_path.into()),
    ]
}

pub fn as_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Incompressible but reproducible bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

pub const WAIT: Duration = Duration::from_secs(30);
