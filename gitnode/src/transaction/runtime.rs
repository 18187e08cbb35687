//! gitnode's private runtime directory: the hooks directory that transactional git commands
//! use as `core.hooksPath` (holding only `reference-transaction`, a symlink to
//! `gitnode-hook`), and the Unix socket the hook votes through. Private (mode 0700): the
//! socket accepts votes for any call whose token it is given.
//!
//! It lives in the first storage's internal directory (`+gitnode/run-<pid>`), so a node
//! killed without cleaning up leaves it where the next start finds and removes it; if that
//! path is too long for a Unix socket, in the system's temporary directory instead.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// The longest socket path we use (the kernel's limit is 107 bytes).
const MAX_SOCKET_PATH: usize = 100;
const PREFIX: &str = "run-";

/// The runtime directory; removed (best effort) when dropped.
#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
    hooks: PathBuf,
    socket: PathBuf,
}

impl RuntimeDir {
    /// Creates the directory under `base` (or the temporary directory), with the hook
    /// linked to `hook_binary`.
    pub fn create(base: &Path, hook_binary: &Path) -> std::io::Result<RuntimeDir> {
        remove_stale(base);
        let name = format!("{PREFIX}{}", std::process::id());
        let mut path = base.join(&name);
        if path.join("hook.sock").as_os_str().len() > MAX_SOCKET_PATH {
            path = std::env::temp_dir()
                .join(format!("gitnode-{name}-{}", uuid::Uuid::new_v4().simple()));
        }
        // A directory of our pid is a dead process's (pids are reused).
        let _ = std::fs::remove_dir_all(&path);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)?;
        let dir = RuntimeDir {
            hooks: path.join("hooks"),
            socket: path.join("hook.sock"),
            path,
        };
        std::fs::create_dir(&dir.hooks)?;
        std::os::unix::fs::symlink(hook_binary, dir.hooks.join("reference-transaction"))?;
        Ok(dir)
    }

    /// The directory for `core.hooksPath`.
    pub fn hooks(&self) -> &Path {
        &self.hooks
    }

    /// The hook socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl RuntimeDir {
    /// Removes the directory (best effort; again when dropped).
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Removes the runtime directories under `base` of processes that no longer run. Only where
/// `/proc` tells which processes run; elsewhere they stay.
fn remove_stale(base: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_the_hook_link_and_cleans_up() {
        let base = tempfile::tempdir().unwrap();
        // A dead process's directory (pid beyond any pid_max) goes; others stay.
        std::fs::create_dir(base.path().join("run-999999999")).unwrap();
        std::fs::create_dir(base.path().join("tmp")).unwrap();
        let dir = RuntimeDir::create(base.path(), Path::new("/bin/true")).unwrap();
        assert!(!base.path().join("run-999999999").exists());
        assert!(base.path().join("tmp").exists());
        let link = dir.hooks().join("reference-transaction");
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("/bin/true"));
        assert!(dir.socket().starts_with(base.path()));
        let path = dir.path.clone();
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn long_bases_fall_back_to_the_temporary_directory() {
        let base = tempfile::tempdir().unwrap();
        let long = base.path().join("x".repeat(120));
        std::fs::create_dir(&long).unwrap();
        let dir = RuntimeDir::create(&long, Path::new("/bin/true")).unwrap();
        assert!(dir.socket().as_os_str().len() <= MAX_SOCKET_PATH);
        assert!(dir.socket().starts_with(std::env::temp_dir()));
    }
}
