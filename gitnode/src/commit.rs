//! Turning raw commit objects into Gitaly's GitCommit message.

use praefect_wire::proto::{CommitAuthor, GitCommit, SignatureType};

/// Parses `git cat-file commit` output of commit `oid`.
pub fn parse_commit(oid: &str, raw: &[u8]) -> GitCommit {
    let split = raw
        .windows(2)
        .position(|w| w == b"\n\n")
        .map_or((raw, &b""[..]), |i| (&raw[..i], &raw[i + 2..]));
    let (headers, message) = split;
    let mut commit = GitCommit {
        id: oid.to_string(),
        ..Default::default()
    };
    for line in headers.split(|b| *b == b'\n') {
        let text = String::from_utf8_lossy(line);
        if let Some(tree) = text.strip_prefix("tree ") {
            commit.tree_id = tree.to_string();
        } else if let Some(parent) = text.strip_prefix("parent ") {
            commit.parent_ids.push(parent.to_string());
        } else if let Some(author) = line.strip_prefix(b"author ") {
            commit.author = Some(parse_signature(author));
        } else if let Some(committer) = line.strip_prefix(b"committer ") {
            commit.committer = Some(parse_signature(committer));
        } else if let Some(encoding) = text.strip_prefix("encoding ") {
            commit.encoding = encoding.to_string();
        } else if text.starts_with("gpgsig") {
            commit.signature_type = SignatureType::Pgp as i32;
        }
    }
    let subject_end = message
        .iter()
        .position(|b| *b == b'\n')
        .unwrap_or(message.len());
    commit.subject = message[..subject_end].trim_ascii_end().to_vec();
    commit.body = message.to_vec();
    commit.body_size = message.len() as i64;
    commit
}

/// `Name <email> 1700000000 +0100`.
fn parse_signature(line: &[u8]) -> CommitAuthor {
    let mut author = CommitAuthor::default();
    let (Some(open), Some(close)) = (
        line.iter().position(|b| *b == b'<'),
        line.iter().rposition(|b| *b == b'>'),
    ) else {
        author.name = line.to_vec();
        return author;
    };
    author.name = line[..open].trim_ascii_end().to_vec();
    author.email = line[open + 1..close.max(open + 1)].to_vec();
    let rest = String::from_utf8_lossy(&line[close + 1..]).to_string();
    let mut parts = rest.split_whitespace();
    if let Some(seconds) = parts.next().and_then(|s| s.parse::<i64>().ok()) {
        author.date = Some(prost_types::Timestamp { seconds, nanos: 0 });
    }
    if let Some(tz) = parts.next() {
        author.timezone = tz.as_bytes().to_vec();
    }
    author
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_commit() {
        let raw = b"tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904\nparent aaaa\nparent bbbb\nauthor Ann Author <ann@example.com> 1700000000 +0100\ncommitter Cid <cid@example.com> 1700000100 -0200\n\nSubject line\n\nBody text\n";
        let commit = parse_commit("cccc", raw);
        assert_eq!(commit.id, "cccc");
        assert_eq!(commit.tree_id, "4b825dc642cb6eb9a060e54bf8d69288fbee4904");
        assert_eq!(commit.parent_ids, ["aaaa", "bbbb"]);
        assert_eq!(commit.subject, b"Subject line");
        assert_eq!(commit.body, b"Subject line\n\nBody text\n");
        let author = commit.author.unwrap();
        assert_eq!(author.name, b"Ann Author");
        assert_eq!(author.email, b"ann@example.com");
        assert_eq!(author.date.unwrap().seconds, 1_700_000_000);
        assert_eq!(author.timezone, b"+0100");
        assert_eq!(commit.committer.unwrap().timezone, b"-0200");
    }
}
