//! The pid file a service manager follows the router by (`GITALY_PID_FILE`): Omnibus GitLab's
//! wrapper, or systemd's `PIDFile=`, learn from it which process to signal and watch, which
//! changes with every SIGHUP hand-over.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::handover::HandoverError;

/// The variable naming the pid file (the name Gitaly and Praefect use).
pub(super) const PID_FILE_ENV: &str = "GITALY_PID_FILE";

/// The pid file named by [`PID_FILE_ENV`], if set and not empty.
pub(super) fn configured() -> Option<PathBuf> {
    std::env::var_os(PID_FILE_ENV)
        .filter(|path| !path.is_empty())
        .map(PathBuf::from)
}

/// Writes `pid` to `path`: written beside it then renamed over it, so that a reader never
/// sees it empty or half written. Just the digits, no newline: readers parse the whole file
/// as a number.
pub(super) fn write(path: &Path, pid: u32) -> Result<(), HandoverError> {
    let error = |source| HandoverError::PidFile {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .unwrap_or(path.as_os_str())
        .to_string_lossy();
    let temporary = path.with_file_name(format!(".{name}.{pid}.tmp"));
    let written = std::fs::File::create(&temporary)
        .and_then(|mut file| {
            file.write_all(pid.to_string().as_bytes())?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&temporary, path));
    if let Err(source) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(error(source));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_replaces_the_file_and_leaves_nothing_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("praefect.pid");
        std::fs::write(&path, "123456789").unwrap();
        write(&path, 42).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "42");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["praefect.pid"]);
    }

    #[test]
    fn a_pid_file_that_cannot_be_written_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("praefect.pid");
        let err = write(&path, 42).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
}
