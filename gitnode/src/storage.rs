//! Storages and the repositories in them. Every path a request names is checked here: the
//! storage must exist, and the relative path must stay inside it. Nothing outside a storage
//! root is ever read or written.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use praefect_wire::proto::Repository;
use tonic::Status;

/// Directory inside every storage for gitnode's own temporary files; clients cannot name it.
pub const INTERNAL_DIR: &str = "+gitnode";

#[derive(Clone, Debug)]
pub struct Storages {
    roots: HashMap<String, PathBuf>,
}

impl Storages {
    pub fn new(storages: &[crate::config::Storage]) -> std::io::Result<Self> {
        let mut roots = HashMap::new();
        for storage in storages {
            std::fs::create_dir_all(&storage.path)?;
            std::fs::create_dir_all(storage.path.join(INTERNAL_DIR).join("tmp"))?;
            roots.insert(storage.name.clone(), storage.path.canonicalize()?);
        }
        Ok(Storages { roots })
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.roots.keys().cloned().collect();
        names.sort();
        names
    }

    /// The root directory of a storage.
    pub fn root(&self, storage: &str) -> Result<&Path, Status> {
        if storage.is_empty() {
            return Err(Status::invalid_argument("empty StorageName"));
        }
        self.roots
            .get(storage)
            .map(PathBuf::as_path)
            .ok_or_else(|| Status::invalid_argument(format!("storage not found: {storage:?}")))
    }

    /// A fresh temporary directory path inside a storage (same filesystem, so a rename into
    /// place is atomic).
    pub fn temp_path(&self, storage: &str, purpose: &str) -> Result<PathBuf, Status> {
        Ok(self
            .root(storage)?
            .join(INTERNAL_DIR)
            .join("tmp")
            .join(format!("{purpose}-{}", uuid::Uuid::new_v4().simple())))
    }

    /// The on-disk path of the repository a request names, whether or not it exists.
    pub fn repo_path(&self, repo: Option<&Repository>) -> Result<PathBuf, Status> {
        let repo = required(repo)?;
        let root = self.root(&repo.storage_name)?;
        let relative = check_relative_path(&repo.relative_path)?;
        refuse_symlinks(root, relative)?;
        Ok(root.join(relative))
    }

    /// The path of a repository that must exist.
    pub fn existing_repo(&self, repo: Option<&Repository>) -> Result<PathBuf, Status> {
        let repo = required(repo)?;
        let path = self.repo_path(Some(repo))?;
        if !is_repository(&path) {
            return Err(Status::not_found(format!(
                "repository not found: {}/{}",
                repo.storage_name, repo.relative_path
            )));
        }
        Ok(path)
    }
}

/// The repository a request names, or InvalidArgument when the request has none. Handlers
/// that need the repository's fields after [`Storages::repo_path`] take it from here first.
pub fn required(repo: Option<&Repository>) -> Result<&Repository, Status> {
    repo.ok_or_else(|| Status::invalid_argument("empty Repository"))
}

/// Refuses relative paths that are empty, absolute, contain NUL or `..`, or name gitnode's
/// internal directory.
pub fn check_relative_path(relative: &str) -> Result<&Path, Status> {
    if relative.is_empty() {
        return Err(Status::invalid_argument("empty RelativePath"));
    }
    if relative.contains('\0') {
        return Err(Status::invalid_argument("relative path contains NUL"));
    }
    let path = Path::new(relative);
    let mut depth = 0;
    for component in path.components() {
        match component {
            Component::Normal(name) => {
                if depth == 0 && name == INTERNAL_DIR {
                    return Err(Status::invalid_argument(
                        "relative path names a reserved directory",
                    ));
                }
                depth += 1;
            }
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(Status::invalid_argument(
                    "relative path escapes root directory",
                ))
            }
        }
    }
    if depth == 0 {
        return Err(Status::invalid_argument("empty RelativePath"));
    }
    Ok(path)
}

/// Refuses a relative path any existing component of which is a symbolic link. Resolving
/// the link and checking where it leads is not enough: a link to a place that does not
/// exist yet (or a link to a directory, followed by a name that does not exist yet) cannot
/// be resolved, and creating the repository would then write wherever the link points. The
/// root itself is canonical (see [`Storages::new`]), and `relative` has no `..` or root.
fn refuse_symlinks(root: &Path, relative: &Path) -> Result<(), Status> {
    let mut current = root.to_path_buf();
    for component in relative.components() {
        let Component::Normal(name) = component else {
            continue;
        };
        current.push(name);
        match std::fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(Status::invalid_argument(
                    "relative path goes through a symbolic link",
                ))
            }
            Ok(_) => {}
            // Nothing below a missing component exists either.
            Err(_) => break,
        }
    }
    Ok(())
}

/// Whether `path` holds a git repository (a bare one, as gitnode creates them).
pub fn is_repository(path: &Path) -> bool {
    path.join("HEAD").is_file() && path.join("objects").is_dir() && path.join("refs").is_dir()
}

/// The filesystem id of a storage, created once and kept in the storage.
pub fn filesystem_id(root: &Path) -> std::io::Result<String> {
    let file = root.join(".gitaly-metadata");
    if let Ok(text) = std::fs::read_to_string(&file) {
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) {
            if let Some(id) = value["gitaly_filesystem_id"].as_str() {
                return Ok(id.to_string());
            }
        }
    }
    let id = uuid::Uuid::new_v4().to_string();
    let temp = root.join(INTERNAL_DIR).join("tmp").join("metadata");
    std::fs::write(
        &temp,
        serde_json::json!({ "gitaly_filesystem_id": id }).to_string(),
    )?;
    std::fs::rename(&temp, &file)?;
    Ok(id)
}

/// Moves a directory into its final place, creating parents. Fails if the target exists.
pub fn move_into_place(from: &Path, to: &Path) -> std::io::Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if to.exists() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "target exists",
        ));
    }
    std::fs::rename(from, to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_cannot_escape() {
        for bad in [
            "",
            "..",
            "../x",
            "a/../../b",
            "/etc",
            "a/\0b",
            "+gitnode/tmp",
            ".",
        ] {
            assert!(check_relative_path(bad).is_err(), "{bad:?} accepted");
        }
        for good in [
            "a.git",
            "@hashed/ab/cd/abcd.git",
            "./a/b.git",
            "@cluster/repositories/6b/86/1",
        ] {
            assert!(check_relative_path(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn symlinks_out_of_the_storage_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let storages = Storages::new(&[crate::config::Storage {
            name: "s".into(),
            path: dir.path().to_path_buf(),
        }])
        .unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        let repo = Repository {
            storage_name: "s".into(),
            relative_path: "link".into(),
            ..Default::default()
        };
        assert!(storages.repo_path(Some(&repo)).is_err());
        // A link whose target does not exist yet, and a new name below a link to a
        // directory, cannot be resolved; they are refused all the same.
        std::os::unix::fs::symlink(outside.path().join("later"), dir.path().join("dangling"))
            .unwrap();
        std::fs::create_dir(dir.path().join("group")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("group/link")).unwrap();
        for relative in [
            "link/new.git",
            "dangling",
            "dangling/x.git",
            "group/link/x.git",
        ] {
            let repo = Repository {
                storage_name: "s".into(),
                relative_path: relative.into(),
                ..Default::default()
            };
            let err = storages.repo_path(Some(&repo)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{relative}");
        }
        let fine = Repository {
            storage_name: "s".into(),
            relative_path: "group/new/x.git".into(),
            ..Default::default()
        };
        assert!(storages.repo_path(Some(&fine)).is_ok());
        let unknown = Repository {
            storage_name: "nope".into(),
            relative_path: "a".into(),
            ..Default::default()
        };
        let err = storages.repo_path(Some(&unknown)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("storage not found"));
    }
}
