//! gitnode's configuration, a TOML file in the style of Gitaly's `config.toml`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// TCP address to serve on, e.g. "127.0.0.1:8075".
    #[serde(default)]
    pub listen_addr: String,
    /// Unix socket to serve on.
    #[serde(default)]
    pub socket_path: String,
    /// TLS address to serve on; needs [tls].
    #[serde(default)]
    pub tls_listen_addr: String,
    #[serde(default)]
    pub tls: Tls,
    #[serde(default)]
    pub auth: Auth,
    #[serde(default)]
    pub git: Git,
    #[serde(default)]
    pub logging: Logging,
    /// Seconds a sidechannel may move no byte in either direction before the node ends the
    /// call and its git process (a caller that answered `ok` and went silent would otherwise
    /// hold them for as long as its connection lives).
    #[serde(default = "default_sidechannel_idle_timeout")]
    pub sidechannel_idle_timeout_seconds: u64,
    /// The storages this node serves.
    pub storage: Vec<Storage>,
}

/// One minute: longer than git's own silences (upload-pack sends keepalives every 5 s while
/// it prepares a pack), short enough not to hoard processes.
fn default_sidechannel_idle_timeout() -> u64 {
    60
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    /// The v2 token secret callers must sign with; empty disables authentication.
    #[serde(default)]
    pub token: String,
    #[serde(default)]
    pub transitioning: bool,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    #[serde(default)]
    pub certificate_path: String,
    #[serde(default)]
    pub key_path: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Git {
    /// The git binary; "git" from PATH when empty.
    #[serde(default)]
    pub bin_path: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logging {
    #[serde(default)]
    pub level: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Storage {
    pub name: String,
    pub path: PathBuf,
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        use anyhow::Context;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let config: Config =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.listen_addr.is_empty()
            && self.socket_path.is_empty()
            && self.tls_listen_addr.is_empty()
        {
            anyhow::bail!("set listen_addr, tls_listen_addr or socket_path");
        }
        if !self.tls_listen_addr.is_empty()
            && (self.tls.certificate_path.is_empty() || self.tls.key_path.is_empty())
        {
            anyhow::bail!("tls_listen_addr needs [tls] certificate_path and key_path");
        }
        if self.sidechannel_idle_timeout_seconds == 0 {
            anyhow::bail!("sidechannel_idle_timeout_seconds must be at least 1");
        }
        if self.storage.is_empty() {
            anyhow::bail!("configure at least one [[storage]]");
        }
        let mut names = std::collections::HashSet::new();
        for storage in &self.storage {
            if storage.name.is_empty() || !names.insert(storage.name.as_str()) {
                anyhow::bail!("storage names must be set and unique: {:?}", storage.name);
            }
            if !storage.path.is_absolute() {
                anyhow::bail!("storage {:?}: path must be absolute", storage.name);
            }
        }
        Ok(())
    }
}
