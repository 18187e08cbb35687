//! The first-message reader (`proxy::frame::read_first`) and, on what it reads, the repository
//! and storage readers and rewriters of `proxy::rewrite` along every field path of the RPC
//! registry: the router's path from a client's bytes to a routed request.
//!
//! Input: the request body. Properties: the message read is the model's, whatever the
//! chunking; no byte is lost (header, message, the rest and the frames not read add up to the
//! body); a readable repository rewrites, reads back as written, rewrites back, and the rewrite
//! is idempotent and leaves the other repositories of the message as they were.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::LazyLock;

use bytes::Bytes;
use futures::StreamExt;
use http_body::Frame;
use praefect::proxy::frame::{read_first, FrameError};

/// The first-message limit the reader is run with: small, so that inputs of a few KiB reach
/// both sides of it (the router's default is 4 MiB, `[proxy] max_first_message_bytes`).
const MAX_FIRST_MESSAGE: usize = 1024;
use praefect::proxy::rewrite::{
    read_optional_repository, read_repository, read_string, rewrite_repository, rewrite_string,
    RewriteError,
};
use praefect::routing::registry::Registry;

use super::{block_on, splittings};
use crate::engine::{fnv, Target};

pub const TARGET: Target = Target {
    name: "first_message",
    about: "read_first over chunked bodies, then repository/storage read and rewrite along every registry path",
    check,
    dictionary,
    max_len: 4096,
};

fn dictionary() -> Vec<Vec<u8>> {
    vec![
        vec![0, 0, 0, 0, 0],
        vec![0, 0, 0, 0, 1],
        vec![1, 0, 0, 0, 0],
        vec![0x0a],
        vec![0x12],
        vec![0x1a],
        vec![0x0a, 0x00],
        vec![0x12, 0x07, b'd', b'e', b'f', b'a', b'u', b'l', b't'],
        b"@hashed/ab/cd/abcd.git".to_vec(),
        vec![0x08, 0x01],
        vec![0x0d, 0, 0, 0, 0],
        vec![0x09, 0, 0, 0, 0, 0, 0, 0, 0],
        vec![0xff, 0xff, 0xff, 0xff, 0x0f],
    ]
}

/// What the model says `read_first` makes of a body.
#[derive(Debug, PartialEq)]
enum Expected<'a> {
    Empty,
    Compressed,
    TooLarge,
    Message(&'a [u8]),
}

fn model(body: &[u8]) -> Expected<'_> {
    if body.len() < 5 {
        return Expected::Empty;
    }
    if body[0] != 0 {
        return Expected::Compressed;
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if len > MAX_FIRST_MESSAGE {
        return Expected::TooLarge;
    }
    match body.get(5..5 + len) {
        Some(message) => Expected::Message(message),
        None => Expected::Empty,
    }
}

/// Field paths (`[1]`, `[1, 1]`, ...): of repositories, and of storage names.
type Paths = (Vec<Vec<u32>>, Vec<Vec<u32>>);

/// The repository and storage field paths of the registry, each once.
static PATHS: LazyLock<Paths> = LazyLock::new(registry_paths);

fn registry_paths() -> Paths {
    let mut repositories = BTreeSet::new();
    let mut storages = BTreeSet::new();
    for method in Registry::global().iter() {
        repositories.extend(method.target_repository.clone());
        repositories.extend(method.additional_repository.clone());
        storages.extend(method.storage.clone());
    }
    (
        repositories.into_iter().collect(),
        storages.into_iter().collect(),
    )
}

fn check(body: &[u8]) -> String {
    let expected = model(body);
    // The stream ends with an error for half of the inputs, chosen by the input itself.
    let ends_in_error = fnv(body) & 2 != 0;
    let mut read = None;
    for (n, chunks) in splittings(body).into_iter().enumerate() {
        let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = Vec::new();
        let mut frames_err: Vec<Result<Frame<Bytes>, std::io::Error>> = Vec::new();
        for chunk in chunks {
            // A non-data frame between data frames (the third splitting) must be skipped.
            if n == 2 {
                frames.push(Ok(Frame::trailers(http::HeaderMap::new())));
                frames_err.push(Ok(Frame::trailers(http::HeaderMap::new())));
            }
            frames.push(Ok(Frame::data(Bytes::copy_from_slice(chunk))));
            frames_err.push(Ok(Frame::data(Bytes::copy_from_slice(chunk))));
        }
        let (result, remaining) = if ends_in_error {
            frames_err.push(Err(std::io::Error::other("client went away")));
            let mut stream = futures::stream::iter(frames_err);
            let result = block_on(read_first(&mut stream, MAX_FIRST_MESSAGE));
            let remaining: Vec<u8> = block_on(stream.collect::<Vec<_>>())
                .into_iter()
                .filter_map(|f| f.ok().and_then(|f| f.into_data().ok()))
                .flat_map(|d| d.to_vec())
                .collect();
            (result, remaining)
        } else {
            let mut stream = futures::stream::iter(frames);
            let result = block_on(read_first(&mut stream, MAX_FIRST_MESSAGE));
            let remaining: Vec<u8> = block_on(stream.collect::<Vec<_>>())
                .into_iter()
                .filter_map(|f| f.ok().and_then(|f| f.into_data().ok()))
                .flat_map(|d| d.to_vec())
                .collect();
            (result, remaining)
        };
        match (&expected, result) {
            (Expected::Message(message), Ok(first)) => {
                assert_eq!(&first.message[..], *message, "splitting {n}");
                let mut rebuilt = body[..5].to_vec();
                rebuilt.extend_from_slice(&first.message);
                rebuilt.extend_from_slice(&first.rest);
                rebuilt.extend_from_slice(&remaining);
                assert_eq!(rebuilt, body, "bytes lost or reordered, splitting {n}");
                read = Some(first.message);
            }
            (Expected::Empty, Err(FrameError::Body(_))) if ends_in_error => {}
            (Expected::Empty, Err(FrameError::Empty)) if !ends_in_error => {}
            (Expected::Compressed, Err(FrameError::Compressed)) => {}
            (Expected::TooLarge, Err(FrameError::TooLarge { limit, .. }))
                if limit == MAX_FIRST_MESSAGE => {}
            (expected, Err(err)) => panic!("splitting {n}: expected {expected:?}, got {err:?}"),
            (expected, Ok(first)) => panic!(
                "splitting {n}: expected {expected:?}, got a message of {} bytes",
                first.message.len()
            ),
        }
    }
    match read {
        Some(message) => format!("message/{}", check_rewrites(&message)),
        None => format!("{expected:?}"),
    }
}

/// Whether rewriting `path` may change what is read at `other`: the same path, or one
/// through the storage or path field (2, 3) of the other's repository.
fn affects(path: &[u32], other: &[u32]) -> bool {
    let through_fields = |short: &[u32], long: &[u32]| {
        long.len() > short.len() && long.starts_with(short) && matches!(long[short.len()], 2 | 3)
    };
    path == other || through_fields(path, other) || through_fields(other, path)
}

fn class(result: &Result<impl Sized, RewriteError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(RewriteError::Malformed) => "malformed",
        Err(RewriteError::NotFound) => "absent",
        Err(RewriteError::Ambiguous) => "ambiguous",
        Err(RewriteError::WrongType) => "wrongtype",
    }
}

/// Checks the repository and storage paths on `message`; returns the outcome classes.
fn check_rewrites(message: &[u8]) -> String {
    let (repositories, storages) = &*PATHS;
    let mut classes = Vec::new();
    for path in repositories {
        let read = read_repository(message, path);
        classes.push(class(&read));
        match (&read, read_optional_repository(message, path)) {
            (Ok(a), Ok(Some(b))) => assert_eq!(a, &b),
            (Err(RewriteError::NotFound), Ok(None)) => {}
            (Err(a), Err(b)) => assert_eq!(a, &b),
            (a, b) => panic!("read_repository {a:?} but read_optional_repository {b:?}"),
        }
        let Ok(original) = read else { continue };
        let (storage, relative) = ("fuzz-storage", "@cluster/repositories/6b/86/1");
        let rewritten = rewrite_repository(message, path, storage, relative)
            .unwrap_or_else(|e| panic!("a readable repository at {path:?} failed to rewrite: {e}"));
        let back = read_repository(&rewritten, path).expect("rewritten repository reads");
        assert_eq!(
            (back.storage_name.as_str(), back.relative_path.as_str()),
            (storage, relative)
        );
        let again = rewrite_repository(&rewritten, path, storage, relative).unwrap();
        assert_eq!(again, rewritten, "rewriting twice changed the message");
        let restored = rewrite_repository(
            &rewritten,
            path,
            &original.storage_name,
            &original.relative_path,
        )
        .unwrap();
        assert_eq!(read_repository(&restored, path).unwrap(), original);
        for other in repositories.iter().filter(|o| !affects(path, o)) {
            assert_eq!(
                read_repository(&rewritten, other),
                read_repository(message, other),
                "rewriting {path:?} changed {other:?}"
            );
        }
    }
    for path in storages {
        let read = read_string(message, path);
        classes.push(class(&read));
        let written = rewrite_string(message, path, "fuzz-virtual");
        if let Ok(written) = &written {
            assert_eq!(read_string(written, path).unwrap(), "fuzz-virtual");
        }
        if matches!(&read, Ok(name) if !name.is_empty()) {
            assert!(
                written.is_ok(),
                "a storage name read at {path:?} failed to rewrite"
            );
        }
    }
    classes.join(",")
}
