//! Reading and rewriting the repository (or storage) fields of a request message without
//! decoding the message: the router only knows each RPC's field-number path (from the
//! registry), walks the protobuf wire format along it, and splices in new bytes, adjusting the
//! length prefixes on the way back up. Every other byte is copied unchanged, so fields the
//! router does not know about (newer protocol versions) survive the rewrite.

use std::ops::Range;

/// Repository fields (shared.proto): storage_name = 2, relative_path = 3.
const STORAGE_NAME: u32 = 2;
const RELATIVE_PATH: u32 = 3;

const WIRE_VARINT: u8 = 0;
const WIRE_I64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_I32: u8 = 5;

/// Why a message could not be read or rewritten.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    #[error("malformed protobuf message")]
    Malformed,
    #[error("repository field not found")]
    NotFound,
    #[error("field is ambiguous")]
    Ambiguous,
    #[error("field is not a string or message")]
    WrongType,
}

/// The location of one field in a message.
struct Field {
    /// From the first byte of the tag to the end of the payload.
    whole: Range<usize>,
    payload: Range<usize>,
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, RewriteError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*pos).ok_or(RewriteError::Malformed)?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(RewriteError::Malformed)
}

fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Every field of a message, in order, as (number, wire type, location); an error ends it.
/// An iterator, not a list: a message of millions of tiny fields (a 4 MiB first message of
/// two-byte fields has two million) must cost no memory to walk, where a list of locations
/// would take dozens of bytes per field.
fn fields(msg: &[u8]) -> Fields<'_> {
    Fields {
        msg,
        pos: 0,
        failed: false,
    }
}

struct Fields<'a> {
    msg: &'a [u8],
    pos: usize,
    failed: bool,
}

impl Fields<'_> {
    fn next_field(&mut self) -> Result<(u32, u8, Field), RewriteError> {
        let (msg, mut pos) = (self.msg, self.pos);
        let start = pos;
        let tag = read_varint(msg, &mut pos)?;
        let number = u32::try_from(tag >> 3).map_err(|_| RewriteError::Malformed)?;
        let wire = (tag & 7) as u8;
        if number == 0 {
            return Err(RewriteError::Malformed);
        }
        let payload_start;
        match wire {
            WIRE_VARINT => {
                payload_start = pos;
                read_varint(msg, &mut pos)?;
            }
            WIRE_I64 => {
                payload_start = pos;
                pos += 8;
            }
            WIRE_I32 => {
                payload_start = pos;
                pos += 4;
            }
            WIRE_LEN => {
                let len = usize::try_from(read_varint(msg, &mut pos)?)
                    .map_err(|_| RewriteError::Malformed)?;
                payload_start = pos;
                pos = pos.checked_add(len).ok_or(RewriteError::Malformed)?;
            }
            _ => return Err(RewriteError::Malformed),
        }
        if pos > msg.len() {
            return Err(RewriteError::Malformed);
        }
        self.pos = pos;
        Ok((
            number,
            wire,
            Field {
                whole: start..pos,
                payload: payload_start..pos,
            },
        ))
    }
}

impl Iterator for Fields<'_> {
    type Item = Result<(u32, u8, Field), RewriteError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.msg.len() {
            return None;
        }
        let field = self.next_field();
        self.failed = field.is_err();
        Some(field)
    }
}

/// The single length-delimited occurrence of `number`, if any. A malformed message is
/// reported as such even when the field is also of the wrong type or repeated.
fn find_unique(msg: &[u8], number: u32) -> Result<Option<Field>, RewriteError> {
    let mut found = None;
    let mut wrong = None;
    for field in fields(msg) {
        let (n, wire, field) = field?;
        if n != number || wrong.is_some() {
            continue;
        }
        if wire != WIRE_LEN {
            wrong = Some(RewriteError::WrongType);
        } else if found.is_some() {
            wrong = Some(RewriteError::Ambiguous);
        } else {
            found = Some(field);
        }
    }
    match wrong {
        Some(err) => Err(err),
        None => Ok(found),
    }
}

/// The bytes of the (sub)message at `path`.
pub fn read_at<'a>(msg: &'a [u8], path: &[u32]) -> Result<&'a [u8], RewriteError> {
    let mut current = msg;
    for number in path {
        let field = find_unique(current, *number)?.ok_or(RewriteError::NotFound)?;
        current = &current[field.payload];
    }
    Ok(current)
}

/// Turns the bytes of a (sub)message into its replacement.
pub type Replacer<'a> = dyn FnMut(&[u8]) -> Result<Vec<u8>, RewriteError> + 'a;

/// Replaces the payload at `path` with what `f` makes of it, fixing lengths on the way up.
pub fn replace_at(msg: &[u8], path: &[u32], f: &mut Replacer<'_>) -> Result<Vec<u8>, RewriteError> {
    let Some((number, rest)) = path.split_first() else {
        return f(msg);
    };
    let field = find_unique(msg, *number)?.ok_or(RewriteError::NotFound)?;
    let inner = replace_at(&msg[field.payload.clone()], rest, f)?;
    let mut out = Vec::with_capacity(msg.len() + inner.len() + 8);
    out.extend_from_slice(&msg[..field.whole.start]);
    write_varint(&mut out, (u64::from(*number) << 3) | u64::from(WIRE_LEN));
    write_varint(&mut out, inner.len() as u64);
    out.extend_from_slice(&inner);
    out.extend_from_slice(&msg[field.whole.end..]);
    Ok(out)
}

pub use crate::routing::RepositoryRef;

fn string_field(msg: &[u8], number: u32) -> Result<String, RewriteError> {
    match find_unique(msg, number)? {
        None => Ok(String::new()),
        Some(field) => {
            String::from_utf8(msg[field.payload].to_vec()).map_err(|_| RewriteError::Malformed)
        }
    }
}

/// Reads the storage name and relative path of the repository at `path`.
/// The repository at `path`, or None when the field is absent. Anything else that is wrong
/// with it (ambiguous, not a message, malformed) is an error: a repository the router cannot
/// read must not be forwarded unrewritten.
pub fn read_optional_repository(
    msg: &[u8],
    path: &[u32],
) -> Result<Option<RepositoryRef>, RewriteError> {
    match read_repository(msg, path) {
        Ok(repo) => Ok(Some(repo)),
        Err(RewriteError::NotFound) => Ok(None),
        Err(err) => Err(err),
    }
}

pub fn read_repository(msg: &[u8], path: &[u32]) -> Result<RepositoryRef, RewriteError> {
    let repo = read_at(msg, path)?;
    Ok(RepositoryRef {
        storage_name: string_field(repo, STORAGE_NAME)?,
        relative_path: string_field(repo, RELATIVE_PATH)?,
    })
}

/// Rewrites the repository at `path` to `storage_name` and `relative_path`; every other field of
/// it (gl_repository, object directories, ...) and of the message stays as it was.
pub fn rewrite_repository(
    msg: &[u8],
    path: &[u32],
    storage_name: &str,
    relative_path: &str,
) -> Result<Vec<u8>, RewriteError> {
    replace_at(msg, path, &mut |repo| {
        let mut out = Vec::with_capacity(repo.len() + storage_name.len() + relative_path.len());
        for field in fields(repo) {
            let (number, _, field) = field?;
            if number != STORAGE_NAME && number != RELATIVE_PATH {
                out.extend_from_slice(&repo[field.whole]);
            }
        }
        for (number, value) in [(STORAGE_NAME, storage_name), (RELATIVE_PATH, relative_path)] {
            write_varint(&mut out, (u64::from(number) << 3) | u64::from(WIRE_LEN));
            write_varint(&mut out, value.len() as u64);
            out.extend_from_slice(value.as_bytes());
        }
        Ok(out)
    })
}

/// Reads the string field at `path` (the storage name of storage-scoped RPCs).
pub fn read_string(msg: &[u8], path: &[u32]) -> Result<String, RewriteError> {
    let (last, parents) = path.split_last().ok_or(RewriteError::NotFound)?;
    string_field(read_at(msg, parents)?, *last)
}

/// Rewrites the string field at `path`.
pub fn rewrite_string(msg: &[u8], path: &[u32], value: &str) -> Result<Vec<u8>, RewriteError> {
    replace_at(msg, path, &mut |_| Ok(value.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::registry::{Registry, Scope};
    use crate::wire::proto::{
        LinkRepositoryToObjectPoolRequest, ObjectPool, Repository, RepositoryExistsRequest,
    };
    use prost::Message;

    fn repo(storage: &str, path: &str) -> Repository {
        Repository {
            storage_name: storage.into(),
            relative_path: path.into(),
            gl_repository: "project-1".into(),
            gl_project_path: "group/project".into(),
            ..Default::default()
        }
    }

    #[test]
    fn rewrites_the_repository_and_keeps_everything_else() {
        let request = RepositoryExistsRequest {
            repository: Some(repo("default", "@hashed/ab/cd/x.git")),
        };
        let bytes = request.encode_to_vec();
        assert_eq!(
            read_repository(&bytes, &[1]).unwrap(),
            RepositoryRef {
                storage_name: "default".into(),
                relative_path: "@hashed/ab/cd/x.git".into()
            }
        );
        let rewritten =
            rewrite_repository(&bytes, &[1], "gitaly-2", "@cluster/repositories/6b/86/1").unwrap();
        let decoded = RepositoryExistsRequest::decode(&rewritten[..]).unwrap();
        let r = decoded.repository.unwrap();
        assert_eq!(r.storage_name, "gitaly-2");
        assert_eq!(r.relative_path, "@cluster/repositories/6b/86/1");
        assert_eq!(r.gl_repository, "project-1");
        assert_eq!(r.gl_project_path, "group/project");
    }

    #[test]
    fn nested_paths_through_object_pools() {
        let request = LinkRepositoryToObjectPoolRequest {
            object_pool: Some(ObjectPool {
                repository: Some(repo("default", "@pools/aa/bb/pool.git")),
            }),
            repository: Some(repo("default", "project.git")),
        };
        let bytes = request.encode_to_vec();
        let step1 =
            rewrite_repository(&bytes, &[2], "g1", "@cluster/repositories/6b/86/1").unwrap();
        let step2 = rewrite_repository(&step1, &[1, 1], "g1", "@cluster/pools/d4/73/2").unwrap();
        let decoded = LinkRepositoryToObjectPoolRequest::decode(&step2[..]).unwrap();
        assert_eq!(
            decoded.repository.unwrap().relative_path,
            "@cluster/repositories/6b/86/1"
        );
        let pool = decoded.object_pool.unwrap().repository.unwrap();
        assert_eq!(
            (pool.storage_name.as_str(), pool.relative_path.as_str()),
            ("g1", "@cluster/pools/d4/73/2")
        );
    }

    #[test]
    fn missing_duplicate_and_malformed_fields_are_errors() {
        let empty = RepositoryExistsRequest { repository: None }.encode_to_vec();
        assert_eq!(read_repository(&empty, &[1]), Err(RewriteError::NotFound));
        let one = RepositoryExistsRequest {
            repository: Some(repo("a", "b")),
        }
        .encode_to_vec();
        let twice = [one.clone(), one.clone()].concat();
        assert_eq!(read_repository(&twice, &[1]), Err(RewriteError::Ambiguous));
        assert_eq!(
            read_repository(&[0xff, 0xff], &[1]),
            Err(RewriteError::Malformed)
        );
        assert_eq!(
            read_repository(&[0x0a, 0x05, 0x01], &[1]),
            Err(RewriteError::Malformed)
        );
        assert_eq!(
            read_repository(&[0x08, 0x01], &[1]),
            Err(RewriteError::WrongType)
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state = 0x9e3779b97f4a7c15u64;
        for len in 0..2000 {
            let bytes: Vec<u8> = (0..len % 64)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let _ = read_repository(&bytes, &[1]);
            let _ = rewrite_repository(&bytes, &[1, 1], "s", "p");
            let _ = read_string(&bytes, &[2]);
        }
    }

    /// Builds a message with a repository (or storage name) at `path`, by hand.
    fn nest(path: &[u32], leaf: Vec<u8>) -> Vec<u8> {
        let mut out = leaf;
        for number in path.iter().rev() {
            let mut wrapped = Vec::new();
            write_varint(&mut wrapped, (u64::from(*number) << 3) | 2);
            write_varint(&mut wrapped, out.len() as u64);
            wrapped.extend_from_slice(&out);
            out = wrapped;
        }
        out
    }

    #[test]
    fn every_registry_row_can_be_read_and_rewritten() {
        let mut checked = 0;
        for method in Registry::global().iter() {
            let mut msg = Vec::new();
            if let Some(path) = &method.target_repository {
                msg.extend(nest(path, repo("virtual", "a.git").encode_to_vec()));
            }
            if let Some(path) = &method.additional_repository {
                msg.extend(nest(path, repo("virtual", "b.git").encode_to_vec()));
            }
            if method.scope == Scope::Storage || method.scope == Scope::Partition {
                if let Some(path) = &method.storage {
                    msg.extend(nest(path, b"virtual".to_vec()));
                }
            }
            if let Some(path) = &method.target_repository {
                assert_eq!(
                    read_repository(&msg, path).unwrap().relative_path,
                    "a.git",
                    "{}",
                    method.full_name
                );
                let out = rewrite_repository(&msg, path, "physical", "@cluster/x").unwrap();
                let got = read_repository(&out, path).unwrap();
                assert_eq!(
                    (got.storage_name.as_str(), got.relative_path.as_str()),
                    ("physical", "@cluster/x")
                );
                if let Some(extra) = &method.additional_repository {
                    assert_eq!(
                        read_repository(&out, extra).unwrap().relative_path,
                        "b.git",
                        "{}",
                        method.full_name
                    );
                }
                checked += 1;
            } else if let Some(path) = &method.storage {
                assert_eq!(
                    read_string(&msg, path).unwrap(),
                    "virtual",
                    "{}",
                    method.full_name
                );
                let out = rewrite_string(&msg, path, "physical").unwrap();
                assert_eq!(read_string(&out, path).unwrap(), "physical");
                checked += 1;
            }
        }
        // 141 repository-scoped RPCs, the 2 intercepted RefTransaction RPCs (which carry a
        // repository), 14 storage-scoped but the 4 Raft RPCs without a storage field, and the
        // partition-scoped one.
        assert_eq!(checked, 141 + 2 + (14 - 4) + 1);
    }
}
