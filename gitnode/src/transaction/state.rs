//! What gitnode votes on for changes that no ref transaction of git covers (a repository
//! created or replicated as a whole): a canonical description of the repository's state,
//! its object format, where HEAD points, and every ref with its object, sorted by name. Nodes
//! that end up with the same repository vote the same hash.

use std::collections::BTreeMap;
use std::path::Path;

use sha1::{Digest, Sha1};
use tonic::Status;

use crate::git::Git;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepositoryState {
    /// `sha1` or `sha256`.
    pub object_format: String,
    /// HEAD's target (`refs/heads/main`), or its content when it is not a symbolic ref.
    pub head: String,
    /// Ref name → object id.
    pub refs: BTreeMap<String, String>,
}

impl RepositoryState {
    /// Reads the state of the repository at `repo`.
    pub async fn read(git: &Git, repo: &Path) -> Result<RepositoryState, Status> {
        let format = git
            .run(repo, &["rev-parse", "--show-object-format"])
            .await?;
        let listing = git
            .run(repo, &["for-each-ref", "--format=%(objectname) %(refname)"])
            .await?;
        let head = match crate::refs::head_target(repo) {
            Some(target) => target,
            None => tokio::fs::read_to_string(repo.join("HEAD"))
                .await
                .map_err(|e| Status::internal(format!("reading HEAD: {e}")))?
                .trim()
                .to_string(),
        };
        Ok(RepositoryState {
            object_format: String::from_utf8_lossy(&format).trim().to_string(),
            head,
            refs: parse_listing(&listing),
        })
    }

    /// The description voted on: `object-format <f>\nHEAD <head>\n` then `<oid> <ref>\n` per
    /// ref, in name order.
    pub fn describe(&self) -> Vec<u8> {
        let mut text = format!("object-format {}\nHEAD {}\n", self.object_format, self.head);
        for (name, oid) in &self.refs {
            text.push_str(oid);
            text.push(' ');
            text.push_str(name);
            text.push('\n');
        }
        text.into_bytes()
    }

    pub fn hash(&self) -> [u8; 20] {
        Sha1::digest(self.describe()).into()
    }
}

/// `<oid> <ref>` lines into a map.
pub fn parse_listing(listing: &[u8]) -> BTreeMap<String, String> {
    String::from_utf8_lossy(listing)
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(oid, name)| (name.to_string(), oid.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_description_is_canonical() {
        let listing = b"bbb refs/heads/b\naaa refs/heads/a\n";
        let state = RepositoryState {
            object_format: "sha1".into(),
            head: "refs/heads/main".into(),
            refs: parse_listing(listing),
        };
        assert_eq!(
            String::from_utf8(state.describe()).unwrap(),
            "object-format sha1\nHEAD refs/heads/main\naaa refs/heads/a\nbbb refs/heads/b\n"
        );
        let mut other = state.clone();
        other.head = "refs/heads/master".into();
        assert_ne!(state.hash(), other.hash());
        let mut moved = state.clone();
        moved.refs.insert("refs/heads/a".into(), "ccc".into());
        assert_ne!(state.hash(), moved.hash());
    }
}
