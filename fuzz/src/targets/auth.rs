//! The `authorization` header check of v2 tokens (`wire::auth::check_v2`).
//!
//! `auth_header`: any header against any secret. Properties: no panic, and a header that passes
//! is `Bearer v2.<hex HMAC-SHA256(secret, timestamp)>.<timestamp>` with the timestamp within 30 s
//! of the server's clock (an independent HMAC here, not the crate's).
//!
//! `auth_token`: a token signed for a generated secret and clock offset passes exactly within
//! the window (Expired and InFuture outside it), and any single-byte change, deletion, insertion
//! or truncation of the header, or a token signed with another secret, fails. Changes of
//! letter case are left out: whether `bearer` and upper-case hex pass is a decision of its own
//! (Gitaly accepts both), not something a fuzzer should pin.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arbitrary::{Result as ArbResult, Unstructured};
use hmac::{Hmac, Mac};
use praefect_wire::auth::{check_v2, sign_v2, AuthError};
use sha2::Sha256;

use crate::engine::Target;

pub const HEADER: Target = Target {
    name: "auth_header",
    about: "check_v2 on any header: only correctly signed, fresh tokens pass",
    check: check_header,
    dictionary,
    max_len: 512,
};

pub const TOKEN: Target = Target {
    name: "auth_token",
    about: "check_v2 on signed tokens: the 30 s window, and every one-byte change refused",
    check: check_token,
    dictionary: Vec::new,
    max_len: 256,
};

/// The server's clock in these checks.
const NOW: u64 = 1_700_000_000;

fn at(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn dictionary() -> Vec<Vec<u8>> {
    let now = UNIX_EPOCH + Duration::from_secs(NOW);
    vec![
        b"Bearer ".to_vec(),
        b"v2.".to_vec(),
        b"v1.".to_vec(),
        b".".to_vec(),
        NOW.to_string().into_bytes(),
        (NOW - 31).to_string().into_bytes(),
        b"-1".to_vec(),
        b"9223372036854775808".to_vec(),
        sign_v2(b"secret", now).into_bytes(),
    ]
}

/// HMAC-SHA256 in hex, computed here rather than by the code under test.
fn signature(secret: &[u8], message: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("any key length");
    mac.update(message);
    hex::encode(mac.finalize().into_bytes())
}

fn class(result: &Result<(), AuthError>) -> &'static str {
    match result {
        Ok(()) => "ok",
        Err(AuthError::Missing) => "missing",
        Err(AuthError::InvalidVersion) => "version",
        Err(AuthError::WrongSignature) => "signature",
        Err(AuthError::BadTimestamp(_)) => "timestamp",
        Err(AuthError::Expired) => "expired",
        Err(AuthError::InFuture) => "future",
    }
}

/// Input: a length byte, that many bytes of secret, then the header (none when empty).
fn check_header(input: &[u8]) -> String {
    let (secret, header) = match input.split_first() {
        Some((len, rest)) => rest.split_at(usize::from(*len % 33).min(rest.len())),
        None => (&[][..], &[][..]),
    };
    let header = String::from_utf8_lossy(header);
    let header = (!header.is_empty()).then_some(header.as_ref());
    let now = at(NOW as i64);
    let result = check_v2(secret, header, now);
    if result.is_ok() {
        let header = header.expect("no header never passes");
        let (scheme, token) = header.split_once(' ').expect("a scheme and a token");
        assert!(scheme.eq_ignore_ascii_case("Bearer"), "{header:?}");
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3, "{header:?}");
        assert_eq!(parts[0], "v2");
        assert!(
            parts[1].eq_ignore_ascii_case(&signature(secret, parts[2].as_bytes())),
            "a wrong signature passed: {header:?}"
        );
        let issued: i64 = parts[2].parse().expect("a passing timestamp parses");
        assert!(
            issued.abs_diff(NOW as i64) <= 30,
            "a token outside the window passed: {header:?}"
        );
    }
    let dots = header.map_or(0, |h| h.matches('.').count().min(4));
    format!("{}/{dots} dots", class(&result))
}

/// How the generated token is changed before it is checked.
#[derive(Debug)]
enum Change {
    None,
    Replace(usize, u8),
    Delete(usize),
    Insert(usize, u8),
    Truncate(usize),
    OtherSecret(Vec<u8>),
}

fn generate(u: &mut Unstructured<'_>) -> ArbResult<(Vec<u8>, i64, Change)> {
    let len = u.int_in_range(0..=32usize)?;
    let secret = u.bytes(len)?.to_vec();
    let offset = u.int_in_range(-100..=100i64)?;
    let change = match u.int_in_range(0..=5u8)? {
        0 => Change::None,
        1 => Change::Replace(u.arbitrary()?, u.int_in_range(0..=0x7fu8)?),
        2 => Change::Delete(u.arbitrary()?),
        3 => Change::Insert(u.arbitrary()?, u.int_in_range(0..=0x7fu8)?),
        4 => Change::Truncate(u.arbitrary()?),
        _ => {
            let len = u.int_in_range(0..=32usize)?;
            Change::OtherSecret(u.bytes(len)?.to_vec())
        }
    };
    Ok((secret, offset, change))
}

/// Whether two secrets are the same HMAC key: HMAC pads short keys with zero bytes, so
/// `secret` and `secret\0` sign alike (in Gitaly too); that is no weakness of the check.
fn same_hmac_key(a: &[u8], b: &[u8]) -> bool {
    let trim = |k: &[u8]| k.len() - k.iter().rev().take_while(|b| **b == 0).count();
    a[..trim(a)] == b[..trim(b)]
}

fn check_token(input: &[u8]) -> String {
    let mut u = Unstructured::new(input);
    let Ok((secret, offset, change)) = generate(&mut u) else {
        return "short input".into();
    };
    let now = at(NOW as i64);
    let issued = at(NOW as i64 + offset);
    let signer = match &change {
        Change::OtherSecret(other) => other.clone(),
        _ => secret.clone(),
    };
    let good = format!("Bearer {}", sign_v2(&signer, issued)).into_bytes();
    let mut header = good.clone();
    match change {
        Change::None | Change::OtherSecret(_) => {}
        Change::Replace(i, byte) => {
            let i = i % header.len();
            if header[i].eq_ignore_ascii_case(&byte) {
                return "case change".into();
            }
            header[i] = byte;
        }
        Change::Delete(i) => {
            header.remove(i % header.len());
        }
        Change::Insert(i, byte) => header.insert(i % (header.len() + 1), byte),
        Change::Truncate(i) => header.truncate(i % header.len()),
    }
    let header = String::from_utf8(header).expect("ASCII stays UTF-8");
    let result = check_v2(&secret, Some(&header), now);
    if header.as_bytes() == good && same_hmac_key(&signer, &secret) {
        let expected = match offset {
            o if o < -30 => Err(AuthError::Expired),
            o if o > 30 => Err(AuthError::InFuture),
            _ => Ok(()),
        };
        assert_eq!(result, expected, "offset {offset}");
    } else {
        assert!(
            result.is_err(),
            "a changed token passed: {header:?} for secret {secret:?}"
        );
    }
    class(&result).into()
}
