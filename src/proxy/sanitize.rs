//! Node statuses on their way to the client. A node's error message may name where things
//! are on the node (git's stderr quotes the repository's absolute path: `fatal: not a git
//! repository: '/var/opt/gitlab/git-data/repositories/@cluster/...'`) or another node's
//! address (a replication source). The router's own errors never carry those (`error.rs`);
//! this is the same rule for what the router forwards: absolute paths and node addresses in
//! a forwarded `grpc-message` become `<path>` and `<address>`, and the original message goes
//! to the log with the call's correlation id. Everything else of the answer (code, details,
//! data) passes unchanged, and an answer without such a message is not touched at all.

use std::borrow::Cow;

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::wire::header_names::GRPC_MESSAGE;

/// Node address schemes (see `nodes::address`) and the ones Gitaly uses.
const ADDRESS_SCHEMES: &[&str] = &["tcp://", "tls://", "dns+tls:", "dns:", "unix:"];

/// Whether a path or address may start after `prev`: at the start of the message, after
/// white space, a quote, an opening bracket, `=`, `,` or `:` (git writes `path: reason` and
/// `'path'`).
fn boundary(prev: Option<char>) -> bool {
    match prev {
        None => true,
        Some(c) => {
            c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '(' | '[' | '<' | '=' | ',' | ':')
        }
    }
}

/// Where a path or address that starts at the beginning of `rest` ends.
fn token_end(rest: &str, colon_ends: bool) -> usize {
    rest.char_indices()
        .find(|&(_, c)| {
            c.is_whitespace()
                || matches!(c, '"' | '\'' | '`' | ')' | ']' | '>' | ',' | ';')
                || (colon_ends && c == ':')
        })
        .map_or(rest.len(), |(i, _)| i)
}

/// The length of a dotted IPv4 address with an optional `:port` at the start of `rest`.
fn ipv4_len(rest: &str) -> Option<usize> {
    let bytes = rest.as_bytes();
    let mut i = 0;
    for part in 0..4 {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() && i - start < 3 {
            i += 1;
        }
        if i == start {
            return None;
        }
        if part < 3 {
            if bytes.get(i) != Some(&b'.') {
                return None;
            }
            i += 1;
        }
    }
    if bytes.get(i) == Some(&b':') && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
        i += 1;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
    }
    // Not the start of a longer number or version string.
    match bytes.get(i) {
        Some(b) if b.is_ascii_alphanumeric() || *b == b'.' => None,
        _ => Some(i),
    }
}

/// `message` with absolute paths and node addresses replaced; borrowed when there are none.
pub fn scrub(message: &str) -> Cow<'_, str> {
    let mut out = String::new();
    let mut copied = 0;
    let mut prev = None;
    let mut i = 0;
    while i < message.len() {
        let rest = &message[i..];
        let Some(c) = rest.chars().next() else { break };
        let found = if !boundary(prev) {
            None
        } else if let Some(scheme) = ADDRESS_SCHEMES.iter().find(|s| rest.starts_with(*s)) {
            // `dns: lookup failed` is not an address: something must follow the scheme.
            // A socket path ends at a colon; a host has its port after one.
            match token_end(&rest[scheme.len()..], *scheme == "unix:") {
                0 => None,
                end => Some((scheme.len() + end, "<address>")),
            }
        } else if c == '/' && !rest.starts_with("//") && rest.len() > 1 {
            // `scheme://` URLs (a client's own fetch URL) are not paths on a node.
            Some((token_end(rest, true), "<path>"))
        } else if c.is_ascii_digit() {
            ipv4_len(rest).map(|len| (len, "<address>"))
        } else {
            None
        };
        match found {
            Some((len, replacement)) if len > 1 => {
                out.push_str(&message[copied..i]);
                out.push_str(replacement);
                i += len;
                copied = i;
                prev = message[..i].chars().next_back();
            }
            _ => {
                i += c.len_utf8();
                prev = Some(c);
            }
        }
    }
    if copied == 0 {
        return Cow::Borrowed(message);
    }
    out.push_str(&message[copied..]);
    Cow::Owned(out)
}

/// Scrubs the `grpc-message` of a node's trailers (or trailers-only headers) in place;
/// returns the original message when it changed it.
pub fn scrub_headers(headers: &mut http::HeaderMap) -> Option<String> {
    headers.get(GRPC_MESSAGE)?;
    let status = tonic::Status::from_header_map(headers)?;
    let Cow::Owned(clean) = scrub(status.message()) else {
        return None;
    };
    let rebuilt = tonic::Status::with_details(
        status.code(),
        clean,
        bytes::Bytes::copy_from_slice(status.details()),
    );
    let mut encoded = http::HeaderMap::new();
    rebuilt.add_header(&mut encoded).ok()?;
    headers.insert(GRPC_MESSAGE, encoded.remove(GRPC_MESSAGE)?);
    Some(status.message().to_string())
}

/// A node's answer with its status message scrubbed (see the module comment); what was
/// removed is logged in the call's span, with the node's storage.
pub fn response<B>(response: http::Response<B>, storage: &str) -> http::Response<tonic::body::Body>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<tonic::Status>,
{
    let span = tracing::Span::current();
    let (mut parts, body) = response.into_parts();
    if let Some(original) = scrub_headers(&mut parts.headers) {
        log(&span, storage, &original);
    }
    let body = Scrubbed {
        inner: body,
        storage: storage.to_string(),
        span,
    };
    http::Response::from_parts(parts, crate::proxy::body::boxed(body))
}

/// Logs what [`scrub_headers`] removed, in the call's span.
fn log(span: &tracing::Span, storage: &str, original: &str) {
    span.in_scope(|| {
        tracing::info!(
            storage,
            node_message = %original,
            "node error message had paths or addresses removed for the client"
        )
    })
}

/// A node's answer body with its trailers scrubbed, its errors as statuses: one concrete
/// layer over the node's body, rather than a mapping layer for each (each boxed), polled
/// for every frame of every call.
struct Scrubbed<B> {
    inner: B,
    storage: String,
    /// The call's span, for the log line of a scrubbed message.
    span: tracing::Span,
}

impl<B> Body for Scrubbed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<tonic::Status>,
{
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(mut frame)) => {
                if let Some(trailers) = frame.trailers_mut() {
                    if let Some(original) = scrub_headers(trailers) {
                        log(&this.span, &this.storage, &original);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(err)) => Poll::Ready(Some(Err(err.into()))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_addresses_are_replaced() {
        let cases = [
            (
                "git symbolic-ref: fatal: not a git repository: '/var/opt/gitlab/git-data/repositories/@cluster/repositories/6b/86/1'",
                "git symbolic-ref: fatal: not a git repository: '<path>'",
            ),
            (
                "open /srv/gitaly/x.git/HEAD: no such file or directory",
                "open <path>: no such file or directory",
            ),
            (
                "dialing source: connecting to tcp://10.1.2.3:8075 failed",
                "dialing source: connecting to <address> failed",
            ),
            ("dial 10.1.2.3:8075: refused", "dial <address>: refused"),
            ("dial unix:/run/gitaly.sock: refused", "dial <address>: refused"),
            ("path=/tmp/x.git", "path=<path>"),
            ("(/tmp/x)", "(<path>)"),
        ];
        for (message, want) in cases {
            assert_eq!(scrub(message), want, "{message}");
        }
        for untouched in [
            "repository not found",
            "reference refs/heads/main does not exist",
            "fatal: unable to access 'https://example.com/x.git/': Could not resolve host",
            "git version 2.47.3",
            "a / b",
            "dns: lookup failed",
            "1.2.3.4.5 is not a version",
            "",
        ] {
            assert!(matches!(scrub(untouched), Cow::Borrowed(_)), "{untouched}");
        }
    }

    #[test]
    fn trailers_keep_their_code_and_details() {
        let status = tonic::Status::with_details(
            tonic::Code::Internal,
            "git gc: fatal: '/srv/x.git' — ünïcode",
            bytes::Bytes::from_static(b"details"),
        );
        let mut headers = http::HeaderMap::new();
        status.add_header(&mut headers).unwrap();
        let original = scrub_headers(&mut headers).unwrap();
        assert_eq!(original, "git gc: fatal: '/srv/x.git' — ünïcode");
        let back = tonic::Status::from_header_map(&headers).unwrap();
        assert_eq!(back.code(), tonic::Code::Internal);
        assert_eq!(back.message(), "git gc: fatal: '<path>' — ünïcode");
        assert_eq!(back.details(), b"details");
        // Nothing to remove: nothing changed.
        let mut clean = http::HeaderMap::new();
        tonic::Status::not_found("repository not found")
            .add_header(&mut clean)
            .unwrap();
        let before = clean.clone();
        assert!(scrub_headers(&mut clean).is_none());
        assert_eq!(clean, before);
    }

    #[test]
    fn arbitrary_text_never_panics() {
        let mut state = 0x2545f4914f6cdd1du64;
        let alphabet: Vec<char> = "/:.'\" 0123tcp://unix:é\u{1F600}ab(),=".chars().collect();
        for len in 0..3000 {
            let text: String = (0..len % 40)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    alphabet[(state % alphabet.len() as u64) as usize]
                })
                .collect();
            let _ = scrub(&text);
        }
    }
}
