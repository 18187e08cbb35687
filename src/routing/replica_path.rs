//! Where a repository lives on the Gitaly nodes. Praefect stores repositories under paths
//! derived from their id, not from the client's relative path, so that a rename or a
//! re-creation never collides with leftovers on disk.

use sha2::{Digest, Sha256};

/// The two levels of fan-out directories: the first two bytes of SHA-256 of the decimal id.
fn fan_out(repository_id: i64) -> (String, String) {
    let digest = Sha256::digest(repository_id.to_string().as_bytes());
    (hex::encode(&digest[..1]), hex::encode(&digest[1..2]))
}

/// `@cluster/repositories/<h0>/<h1>/<id>`.
pub fn replica_path(repository_id: i64) -> String {
    let (h0, h1) = fan_out(repository_id);
    format!("@cluster/repositories/{h0}/{h1}/{repository_id}")
}

/// `@cluster/pools/<h0>/<h1>/<id>`, for object pools created through the router.
pub fn pool_replica_path(repository_id: i64) -> String {
    let (h0, h1) = fan_out(repository_id);
    format!("@cluster/pools/{h0}/{h1}/{repository_id}")
}

/// The repository id of a pool replica path the router made (`@cluster/pools/xx/yy/<id>`).
pub fn pool_repository_id(path: &str) -> Option<i64> {
    let id: i64 = path
        .strip_prefix("@cluster/pools/")?
        .rsplit('/')
        .next()?
        .parse()
        .ok()?;
    (pool_replica_path(id) == path).then_some(id)
}

/// Whether `path` is a pool path as Rails creates them: `@pools/xx/yy/<64 hex>.git`, where xx
/// and yy are the hash's first two bytes.
pub fn is_rails_pool_path(path: &str) -> bool {
    let Some(rest) = path
        .strip_prefix("@pools/")
        .and_then(|p| p.strip_suffix(".git"))
    else {
        return false;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let [first, second, hash] = parts.as_slice() else {
        return false;
    };
    hash.len() == 64
        && hash
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        && hash.starts_with(first)
        && first.len() == 2
        && second.len() == 2
        && hash[2..].starts_with(second)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_praefects_layout() {
        assert_eq!(replica_path(1), "@cluster/repositories/6b/86/1");
        assert_eq!(pool_replica_path(1), "@cluster/pools/6b/86/1");
        // sha256("2") = d4735e3a...
        assert_eq!(replica_path(2), "@cluster/repositories/d4/73/2");
    }

    #[test]
    fn rails_pool_paths_are_recognised() {
        let hash = format!("ab12{}", "0".repeat(60));
        assert!(is_rails_pool_path(&format!("@pools/ab/12/{hash}.git")));
        for bad in [
            format!("@pools/ab/13/{hash}.git"),
            format!("@pools/ab/12/{hash}"),
            format!("@hashed/ab/12/{hash}.git"),
            "@pools/ab/12/ab12.git".to_string(),
            format!("@pools/ab/12/{}.git", hash.to_uppercase()),
            format!("@pools/ab/12/../{hash}.git"),
        ] {
            assert!(!is_rails_pool_path(&bad), "{bad}");
        }
    }

    #[test]
    fn pool_ids_come_back_from_pool_paths_only() {
        assert_eq!(pool_repository_id(&pool_replica_path(42)), Some(42));
        assert_eq!(pool_repository_id(&replica_path(42)), None);
        assert_eq!(
            pool_repository_id("@cluster/pools/00/00/42"),
            None,
            "wrong fan-out"
        );
        assert_eq!(pool_repository_id("@cluster/pools/x"), None);
        assert_eq!(pool_repository_id("@pools/ab/cd/abcd.git"), None);
    }
}
