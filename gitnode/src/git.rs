//! Running git. Every command gets a clean environment (no user or system config), is killed
//! when its handle is dropped (a cancelled call stops its git), and reports failures with
//! git's own stderr.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;
use tonic::Status;

#[derive(Clone, Debug)]
pub struct Git {
    bin: PathBuf,
}

impl Git {
    pub fn new(bin: &str) -> Self {
        Git {
            bin: PathBuf::from(if bin.is_empty() { "git" } else { bin }),
        }
    }

    /// A git command with a clean environment, not yet bound to a repository.
    pub fn bare_command(&self) -> Command {
        let mut command = Command::new(&self.bin);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", "/nonexistent")
            .env("LANG", "C")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// A git command working on the repository at `git_dir`.
    pub fn command(&self, git_dir: &Path) -> Command {
        let mut command = self.bare_command();
        command.arg("--git-dir").arg(git_dir);
        command
    }

    /// Runs `git --git-dir=<git_dir> <args>` and returns its stdout.
    pub async fn run(&self, git_dir: &Path, args: &[&str]) -> Result<Vec<u8>, Status> {
        self.run_with(git_dir, args, |_| {}).await
    }

    /// Like [`Git::run`], with `setup` applied to the command before the arguments (for
    /// global options such as `-c`, and the environment).
    pub async fn run_with(
        &self,
        git_dir: &Path,
        args: &[&str],
        setup: impl FnOnce(&mut Command),
    ) -> Result<Vec<u8>, Status> {
        let mut command = self.command(git_dir);
        setup(&mut command);
        let output = command
            .args(args)
            .output()
            .await
            .map_err(|e| Status::internal(format!("running git: {e}")))?;
        if !output.status.success() {
            return Err(Status::internal(format!(
                "git {}: {}",
                args.first().unwrap_or(&""),
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(output.stdout)
    }

    /// Like [`Git::run`], but a failing command is Ok(None) (for lookups that may miss).
    pub async fn try_run(&self, git_dir: &Path, args: &[&str]) -> Result<Option<Vec<u8>>, Status> {
        let output = self
            .command(git_dir)
            .args(args)
            .output()
            .await
            .map_err(|e| Status::internal(format!("running git: {e}")))?;
        Ok(output.status.success().then_some(output.stdout))
    }

    /// `git version`, e.g. "2.47.3".
    pub async fn version(&self) -> String {
        match self.bare_command().arg("version").output().await {
            Ok(out) => String::from_utf8_lossy(&out.stdout)
                .trim()
                .trim_start_matches("git version ")
                .to_string(),
            Err(_) => String::new(),
        }
    }
}

/// Refuses revisions git could mistake for options.
pub fn check_revision(revision: &[u8]) -> Result<String, Status> {
    let text = std::str::from_utf8(revision)
        .map_err(|_| Status::invalid_argument("revision is not valid UTF-8"))?;
    if text.is_empty() {
        return Err(Status::invalid_argument("empty revision"));
    }
    if text.starts_with('-') || text.contains('\0') || text.contains(char::is_whitespace) {
        return Err(Status::invalid_argument(format!(
            "revision can't start with '-' or contain spaces: {text:?}"
        )));
    }
    Ok(text.to_string())
}
