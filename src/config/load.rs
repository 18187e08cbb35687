//! Reading a configuration: TOML text over defaults, unknown keys collected, `config_command`
//! output merged on top, `token_file` read, then validation.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::de::{self, Deserializer, Visitor};

use super::keys;
use super::validate::{validate, ValidationError};
use super::{Config, GoDuration};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax errors and values of the wrong type.
    #[error("{}", .0.message)]
    Syntax(ValidationError),
    #[error("config_command: {0}")]
    ConfigCommand(String),
    /// Every unknown key and every validation failure, all at once.
    #[error("invalid configuration: {}", summarize(.0))]
    Invalid(Vec<ValidationError>),
}

impl ConfigError {
    /// The errors in the machine-readable form of `configuration validate`, or None when the
    /// failure is not about the content of the configuration (exit code 1 then).
    pub fn validation_errors(&self) -> Option<Vec<ValidationError>> {
        match self {
            ConfigError::Syntax(err) => Some(vec![err.clone()]),
            ConfigError::Invalid(errs) => Some(errs.clone()),
            _ => None,
        }
    }
}

fn summarize(errors: &[ValidationError]) -> String {
    errors
        .iter()
        .map(ValidationError::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Loads, completes and validates the configuration file at `path`.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    load_str(&text)
}

/// Loads, completes and validates configuration text (what `configuration validate` reads
/// from stdin).
pub fn load_str(text: &str) -> Result<Config, ConfigError> {
    let (mut config, mut errors) = parse_str(text)?;
    if !config.config_command.is_empty() {
        let (merged, unknown) = apply_config_command(&config)?;
        config = merged;
        errors.extend(unknown);
    }
    apply_go_defaults(&mut config);
    // Validate before reading token_file, so that setting both token and token_file is seen.
    errors.extend(validate(&config));
    if !config.auth.token_file.is_empty() && config.auth.token.is_empty() {
        match read_token_file(Path::new(&config.auth.token_file)) {
            Ok(token) => config.auth.token = token,
            Err(message) => errors.push(ValidationError::new(&["auth", "token_file"], message)),
        }
    }
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid(errors))
    }
}

/// What Go Praefect does after decoding, before validating: the legacy `failover_enabled`
/// turns failover on, and a zero `graceful_stop_timeout`, `bootstrap_interval` or
/// `monitor_interval` means "unset" and takes the default (so `graceful_stop_timeout = "0"`
/// waits a minute, as it does there, rather than cutting calls at once).
fn apply_go_defaults(config: &mut Config) {
    let defaults = Config::default();
    if config.failover_enabled {
        config.failover.enabled = true;
    }
    if config.graceful_stop_timeout == GoDuration::ZERO {
        config.graceful_stop_timeout = defaults.graceful_stop_timeout;
    }
    if config.failover.bootstrap_interval == GoDuration::ZERO {
        config.failover.bootstrap_interval = defaults.failover.bootstrap_interval;
    }
    if config.failover.monitor_interval == GoDuration::ZERO {
        config.failover.monitor_interval = defaults.failover.monitor_interval;
    }
}

/// Parses TOML text over the defaults. Returns the configuration and one error per unknown
/// key; syntax and type errors stop parsing and come back as [`ConfigError::Syntax`].
pub fn parse_str(text: &str) -> Result<(Config, Vec<ValidationError>), ConfigError> {
    let mut unknown = Vec::new();
    let deserializer = toml::Deserializer::new(text);
    let mut on_unknown = |path: serde_ignored::Path<'_>| unknown.push(unknown_key_error(&path));
    let tracked = serde_ignored::Deserializer::new(deserializer, &mut on_unknown);
    match serde_path_to_error::deserialize::<_, Config>(tracked) {
        Ok(config) => Ok((config, unknown)),
        Err(err) => {
            let key = path_segments(err.path());
            let inner = err.into_inner();
            let message = match inner.span() {
                Some(span) => {
                    let (line, column) = line_and_column(text, span.start);
                    format!("line {line} column {column}: {}", inner.message().trim())
                }
                None => inner.message().trim().to_string(),
            };
            Err(ConfigError::Syntax(ValidationError { key, message }))
        }
    }
}

/// The error for a key no field takes, with a hint when one fits (see [`keys::suggestion`]):
/// `unknown configuration key "listen_adr", did you mean "listen_addr"?`.
fn unknown_key_error(path: &serde_ignored::Path<'_>) -> ValidationError {
    let key = ignored_segments(path);
    let mut message = format!("unknown configuration key {:?}", key.join("."));
    if let Some(hint) = keys::suggestion(&key) {
        message.push_str(", ");
        message.push_str(&hint);
    }
    ValidationError { message, key }
}

fn ignored_segments(path: &serde_ignored::Path<'_>) -> Vec<String> {
    use serde_ignored::Path as P;
    match path {
        P::Root => Vec::new(),
        P::Seq { parent, index } => {
            let mut segments = ignored_segments(parent);
            segments.push(format!("[{index}]"));
            segments
        }
        P::Map { parent, key } => {
            let mut segments = ignored_segments(parent);
            segments.push(key.clone());
            segments
        }
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            ignored_segments(parent)
        }
    }
}

fn path_segments(path: &serde_path_to_error::Path) -> Vec<String> {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|segment| match segment {
            Segment::Seq { index } => Some(format!("[{index}]")),
            Segment::Map { key } => Some(key.clone()),
            Segment::Enum { variant } => Some(variant.clone()),
            Segment::Unknown => None,
        })
        .collect()
}

/// 1-based line and column of a byte offset.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Runs `config_command` and decodes its JSON stdout on top of the configuration.
fn apply_config_command(config: &Config) -> Result<(Config, Vec<ValidationError>), ConfigError> {
    let output = Command::new(&config.config_command)
        .output()
        .map_err(|err| {
            ConfigError::ConfigCommand(format!("running {:?}: {err}", config.config_command))
        })?;
    if !output.status.success() {
        return Err(ConfigError::ConfigCommand(format!(
            "{:?} exited with {}: {}",
            config.config_command,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let overlay: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|err| ConfigError::ConfigCommand(format!("decoding the output as JSON: {err}")))?;
    let mut base = serde_json::to_value(config)
        .map_err(|err| ConfigError::ConfigCommand(format!("encoding the configuration: {err}")))?;
    merge_json(&mut base, overlay);
    let mut unknown = Vec::new();
    let mut on_unknown = |path: serde_ignored::Path<'_>| unknown.push(unknown_key_error(&path));
    let tracked = serde_ignored::Deserializer::new(base, &mut on_unknown);
    let merged: Config = serde_path_to_error::deserialize(tracked).map_err(|err| {
        ConfigError::Syntax(ValidationError {
            key: path_segments(err.path()),
            message: format!("config_command output: {}", err.into_inner()),
        })
    })?;
    Ok((merged, unknown))
}

/// Objects merge key by key; anything else in the overlay replaces the base value.
fn merge_json(base: &mut serde_json::Value, overlay: serde_json::Value) {
    match (base, overlay) {
        (serde_json::Value::Object(base), serde_json::Value::Object(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(&key) {
                    Some(existing) => merge_json(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, overlay) => *base = overlay,
    }
}

/// Reads `auth.token_file`: whitespace-trimmed, and only from a file that others cannot read.
fn read_token_file(path: &Path) -> Result<String, String> {
    let metadata =
        fs::metadata(path).map_err(|err| format!("reading {}: {err}", path.display()))?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode != 0o600 && mode != 0o400 {
        return Err(format!(
            "{} has mode {mode:04o}; it must be 0600 or 0400",
            path.display()
        ));
    }
    let token =
        fs::read_to_string(path).map_err(|err| format!("reading {}: {err}", path.display()))?;
    Ok(token.trim().to_string())
}

/// `port` is an integer in Praefect's files; a comma-separated string is accepted too, for
/// several hosts.
pub(crate) fn port_from_int_or_string<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<String, D::Error> {
    struct PortVisitor;
    impl Visitor<'_> for PortVisitor {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a port number or a comma-separated list of port numbers")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            if v == 0 {
                Ok(String::new())
            } else {
                Ok(v.to_string())
            }
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            self.visit_i64(v as i64)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_unit<E: de::Error>(self) -> Result<String, E> {
            Ok(String::new())
        }
    }
    deserializer.deserialize_any(PortVisitor)
}
