//! Reading references straight from a repository's files (loose refs, `packed-refs`, `HEAD`),
//! so that the cheapest calls (FindDefaultBranchName, RefExists) start no git process.

use std::path::Path;

use tonic::Status;

/// The ref `HEAD` points to, e.g. `refs/heads/main`; None if HEAD is detached or unreadable.
pub fn head_target(repo: &Path) -> Option<String> {
    let text = std::fs::read_to_string(repo.join("HEAD")).ok()?;
    text.trim().strip_prefix("ref: ").map(str::to_string)
}

/// Checks a fully qualified ref name before it is used as a path.
pub fn check_ref_name(name: &[u8]) -> Result<&str, Status> {
    let text =
        std::str::from_utf8(name).map_err(|_| Status::invalid_argument("invalid refname"))?;
    let valid = text.starts_with("refs/")
        && !text.contains("..")
        && !text.contains('\0')
        && !text.ends_with('/')
        && !text.contains("//")
        && !text.ends_with(".lock");
    if !valid {
        return Err(Status::invalid_argument("invalid refname"));
    }
    Ok(text)
}

/// Every ref name and target in `packed-refs` (peeled lines skipped).
fn packed_refs(repo: &Path) -> Vec<(String, String)> {
    let Ok(text) = std::fs::read_to_string(repo.join("packed-refs")) else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('^'))
        .filter_map(|l| {
            let (oid, name) = l.split_once(' ')?;
            Some((name.to_string(), oid.to_string()))
        })
        .collect()
}

/// Whether a fully qualified ref exists, as a loose ref or in `packed-refs`.
pub fn ref_exists(repo: &Path, name: &str) -> bool {
    let loose = repo.join(name);
    if loose.is_file() {
        return true;
    }
    packed_refs(repo).iter().any(|(n, _)| n == name)
}

/// All branch names (`refs/heads/...`), sorted.
pub fn branches(repo: &Path) -> Vec<String> {
    let mut names: Vec<String> = packed_refs(repo)
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.starts_with("refs/heads/"))
        .collect();
    let heads = repo.join("refs").join("heads");
    let mut stack = vec![heads.clone()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(rest) = path.strip_prefix(repo) {
                let name = rest.to_string_lossy().to_string();
                if !name.ends_with(".lock") {
                    names.push(name);
                }
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// The default branch as Gitaly picks it: HEAD's target if it exists (or always, with
/// `head_only`); otherwise the only branch, else `main`, else `master`, else the first.
pub fn default_branch(repo: &Path, head_only: bool) -> Option<String> {
    let head = head_target(repo);
    if head_only {
        return head;
    }
    let all = branches(repo);
    if let Some(head) = &head {
        if all.contains(head) {
            return Some(head.clone());
        }
    }
    if all.len() == 1 {
        return all.into_iter().next();
    }
    for preferred in ["refs/heads/main", "refs/heads/master"] {
        if all.iter().any(|b| b == preferred) {
            return Some(preferred.to_string());
        }
    }
    all.into_iter().next()
}
