//! Real gitnode processes on loopback ports and real git, for the end-to-end tests of both
//! gitnode and the router. The binaries come from the workspace's target directory, so run
//! the tests with `cargo test --workspace` (which builds them first).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::wire::auth::TokenInterceptor;
use crate::wire::backchannel::{dial_lazy, yamux_config, ClientHandler};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const TOKEN: &str = "gitnode-test-secret";

/// A binary of the workspace, next to the running test's `deps/` directory.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("tests run from target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: build the workspace first (cargo test --workspace)",
        path.display()
    );
    path
}

pub type Authed = InterceptedService<Channel, TokenInterceptor>;

/// A running gitnode with one storage; killed when dropped.
pub struct GitNode {
    pub storage: String,
    pub address: String,
    pub tls_address: Option<String>,
    pub root: PathBuf,
    config: PathBuf,
    /// Extra environment of the process, kept across restarts.
    env: Vec<(String, String)>,
    child: Child,
    _dir: tempfile::TempDir,
}

/// A CA and a certificate for "localhost" signed by it, as PEM files in a directory.
pub struct TestCerts {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCerts {
    pub fn generate(dir: &Path) -> TestCerts {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let certs = TestCerts {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        std::fs::write(&certs.ca, ca_cert.pem()).unwrap();
        std::fs::write(&certs.cert, cert.pem()).unwrap();
        std::fs::write(&certs.key, key.serialize_pem()).unwrap();
        certs
    }
}

impl GitNode {
    pub fn start(storage: &str) -> GitNode {
        Self::start_with(storage, None)
    }

    /// Starts the node with extra environment variables (e.g. gitnode's test-only knobs
    /// `GITNODE_TEST_VOTE_SALT`, `GITNODE_TEST_HOOK_REFUSE`); [`GitNode::restart`] keeps them.
    pub fn start_with_env(storage: &str, env: &[(&str, &str)]) -> GitNode {
        Self::start_full(storage, "127.0.0.1:0", None, env, "")
    }

    /// Starts the node with `extra` top-level keys in its configuration (e.g.
    /// `sidechannel_idle_timeout_seconds = 2`); [`GitNode::restart`] keeps them.
    pub fn start_with_config(storage: &str, extra: &str) -> GitNode {
        Self::start_full(storage, "127.0.0.1:0", None, &[], extra)
    }

    /// Also listens on TLS with `certs`; `tls_address` is then "tls://localhost:PORT".
    pub fn start_with(storage: &str, certs: Option<&TestCerts>) -> GitNode {
        Self::start_full(storage, "127.0.0.1:0", certs, &[], "")
    }

    /// Listens on `listen_addr` (`IP:PORT`, port 0 for any) instead of a port of 127.0.0.1:
    /// nodes found through one DNS name share the port the name's address gives, so they
    /// listen on distinct loopback addresses (127.0.0.2, 127.0.0.3, ...) with the same port.
    pub fn start_on(storage: &str, listen_addr: &str) -> GitNode {
        Self::start_full(storage, listen_addr, None, &[], "")
    }

    fn start_full(
        storage: &str,
        listen_addr: &str,
        certs: Option<&TestCerts>,
        env: &[(&str, &str)],
        extra: &str,
    ) -> GitNode {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("storage");
        let config = dir.path().join("gitnode.toml");
        let tls = match certs {
            Some(c) => format!(
                "tls_listen_addr = \"127.0.0.1:0\"\n[tls]\ncertificate_path = \"{}\"\nkey_path = \"{}\"\n",
                c.cert.display(),
                c.key.display()
            ),
            None => String::new(),
        };
        std::fs::write(
            &config,
            format!(
                "listen_addr = \"{listen_addr}\"\n{extra}\n{tls}[auth]\ntoken = \"{TOKEN}\"\n[[storage]]\nname = \"{storage}\"\npath = \"{}\"\n",
                root.display()
            ),
        )
        .unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (child, address, tls_address) = spawn_node(&config, certs.is_some(), &env);
        GitNode {
            storage: storage.to_string(),
            address,
            tls_address,
            root: root.canonicalize().unwrap(),
            config,
            env,
            child,
            _dir: dir,
        }
    }

    /// Replaces the extra environment for the next [`GitNode::restart`].
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// Starts the node again after [`GitNode::kill`], on the same port and storage.
    pub fn restart(&mut self) {
        self.kill();
        let text = std::fs::read_to_string(&self.config).unwrap();
        let fixed = self.address.trim_start_matches("tcp://");
        let text: String = text
            .lines()
            .map(|line| {
                if line.starts_with("listen_addr = ") {
                    format!("listen_addr = \"{fixed}\"\n")
                } else {
                    format!("{line}\n")
                }
            })
            .collect();
        std::fs::write(&self.config, text).unwrap();
        let (child, address, _) = spawn_node(&self.config, false, &self.env);
        assert_eq!(address, self.address);
        self.child = child;
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

    pub fn repository(&self, relative_path: &str) -> crate::wire::proto::Repository {
        crate::wire::proto::Repository {
            storage_name: self.storage.clone(),
            relative_path: relative_path.to_string(),
            ..Default::default()
        }
    }

    /// CreateRepository with `main` as the default branch.
    pub async fn create_repository(&self, relative_path: &str) {
        crate::wire::proto::repository_service_client::RepositoryServiceClient::new(self.channel())
            .create_repository(crate::wire::proto::CreateRepositoryRequest {
                repository: Some(self.repository(relative_path)),
                default_branch: b"main".to_vec(),
                ..Default::default()
            })
            .await
            .expect("CreateRepository");
    }

    /// The node's process id (to look at its git processes in /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
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

/// Starts gitnode with `config`; returns the child and the tcp:// (and tls://) addresses it
/// logged. Port 0 in the config avoids racing for free ports.
fn spawn_node(
    config: &Path,
    with_tls: bool,
    env: &[(String, String)],
) -> (Child, String, Option<String>) {
    let mut child = Command::new(binary("gitnode"))
        .args(["-config", config.to_str().unwrap()])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting gitnode");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let field = |line: &str, name: &str| {
        let at = line.find(name)?;
        Some(
            line[at + name.len()..]
                .split_whitespace()
                .next()?
                .to_string(),
        )
    };
    let mut address = None;
    let mut tls_address = None;
    for line in lines.by_ref().map_while(Result::ok) {
        if let Some(found) = field(&line, " address=") {
            address = Some(format!("tcp://{found}"));
        }
        if let Some(found) = field(&line, "tls_address=") {
            let port = found.rsplit(':').next().unwrap().to_string();
            tls_address = Some(format!("tls://localhost:{port}"));
        }
        if address.is_some() && (!with_tls || tls_address.is_some()) {
            break;
        }
    }
    let address = address.expect("gitnode did not report its address");
    std::thread::spawn(move || for _ in lines {});
    (child, address, tls_address)
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
            binary("gitnode-ssh").display().to_string(),
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
