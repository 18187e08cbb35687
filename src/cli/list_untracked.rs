//! `praefect -config FILE list-untracked-repositories [-older-than 6h] [-delimiter "\n"]`:
//! lists the repositories on the nodes' disks that the database has no record of, as JSON
//! objects (`{"relative_path":..,"storage":..,"virtual_storage":..}`, the relative path being
//! the replica path on disk), each followed by the delimiter. It asks each node directly
//! (InternalGitaly/WalkRepos: the router would answer from the database) for each of its
//! storages, and the database [`BATCH`] paths at a time. Repositories modified within
//! -older-than are left out: they may be being created right now.

use std::io::Write;
use std::time::Duration;

use super::error::CliError;
use crate::cleanup::walker::Walk;
use crate::config::Config;
use crate::nodes::NodePool;

/// One line of output, its keys in this order.
#[derive(serde::Serialize)]
struct Untracked<'a> {
    relative_path: &'a str,
    storage: &'a str,
    virtual_storage: &'a str,
}

/// Replica paths per database check.
const BATCH: usize = 16;

/// The delimiter as typed: `\n`, `\t`, `\0` and `\\` stand for the characters, so that
/// `-delimiter '\n'` works in a shell that passes the backslash through.
pub fn unescape(delimiter: &str) -> String {
    let mut out = String::new();
    let mut chars = delimiter.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('0') => out.push('\0'),
            Some('\\') => out.push('\\'),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

pub async fn run(config: &Config, older_than: Duration, delimiter: &str) -> Result<(), CliError> {
    let delimiter = unescape(delimiter);
    let store = super::sql::open(config).await?;
    let nodes = NodePool::connect(config, None)
        .map_err(|err| CliError::Dial(format!("setting up node connections: {err}")))?;
    let mut header_printed = false;
    let mut failure = None;
    for (node, channel) in nodes.iter() {
        let walk = Walk {
            store: &store,
            channel: channel.clone(),
            virtual_storage: &node.virtual_storage,
            storage: &node.storage,
            batch: BATCH,
            older_than,
        };
        let outcome = walk
            .untracked(|paths| {
                let mut out = std::io::stdout().lock();
                if !header_printed {
                    let _ = writeln!(
                        out,
                        "The following repositories were found on disk, but missing from the tracking database:"
                    );
                    header_printed = true;
                }
                for path in paths {
                    let entry = Untracked {
                        relative_path: &path,
                        storage: &node.storage,
                        virtual_storage: &node.virtual_storage,
                    };
                    if let Ok(json) = serde_json::to_string(&entry) {
                        let _ = write!(out, "{json}{delimiter}");
                    }
                }
                let _ = out.flush();
            })
            .await;
        if let Err(err) = outcome {
            eprintln!(
                "praefect list-untracked-repositories: {}: {err}",
                node.address
            );
            failure = Some(err.to_string());
        }
    }
    store.close().await;
    match failure {
        Some(err) => Err(CliError::Failed(format!(
            "some storages could not be walked, the last error: {err}"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_in_the_delimiter() {
        assert_eq!(unescape("\\n"), "\n");
        assert_eq!(unescape(",\\t;"), ",\t;");
        assert_eq!(unescape("\n"), "\n");
        assert_eq!(unescape("a\\\\b\\x\\"), "a\\b\\x\\");
    }
}
