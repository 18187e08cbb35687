//! Gitaly's v2 authentication tokens.
//!
//! A token is `v2.<hex HMAC-SHA256(secret, timestamp)>.<unix seconds>`, sent as gRPC metadata
//! `authorization: Bearer <token>` on every call and valid for 30 seconds either side of the
//! server's clock. Callers sign a fresh token per call ([`TokenInterceptor`]); servers check it
//! in a tower layer ([`AuthLayer`]) with Praefect's exact codes and messages.
//!
//! Edge cases are decided as Gitaly decides them (its token check reads the metadata with
//! go-grpc-middleware's `AuthFromMD` and decodes the signature with `hex.DecodeString`): the
//! scheme is matched without regard to case (`bearer` works), the signature is hex in either
//! case, and of several `authorization` values the first is the one checked. Anything longer
//! than a v2 token can be ([`MAX_TOKEN_BYTES`]) is refused before any HMAC is computed.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};
use tower::{Layer, Service};

/// How far a token's timestamp may be from the server's clock, either way.
pub const TOKEN_VALIDITY: Duration = Duration::from_secs(30);

/// The longest token looked at: a v2 token is `v2.`, 64 hex digits, `.` and a timestamp
/// (about 90 bytes); a longer value (a 16 KiB header, say) is refused as unparsable without
/// hashing it.
pub const MAX_TOKEN_BYTES: usize = 256;

/// In `transitioning` mode, refused tokens are logged at most this often; the line says how
/// many were not logged since the last one (they are all counted in the metrics).
pub const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Calls to these services need no token (load balancers probe them).
const EXEMPT_PREFIXES: &[&str] = &["/grpc.health.v1.Health/"];

/// Why a token was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required")]
    Missing,
    #[error("permission denied: invalid token version")]
    InvalidVersion,
    #[error("permission denied: wrong hmac signature")]
    WrongSignature,
    #[error("permission denied: cannot parse timestamp: {0}")]
    BadTimestamp(String),
    #[error("permission denied: token has expired")]
    Expired,
    #[error("permission denied: token's validity window is in future")]
    InFuture,
}

impl AuthError {
    /// The labels of `gitaly_authentication_errors_total` (version, error) for a token that
    /// was refused; none for a missing or malformed one (those count as unauthenticated).
    pub fn error_labels(&self) -> Option<(&'static str, &'static str)> {
        match self {
            AuthError::Missing => None,
            AuthError::InvalidVersion => Some(("unsupported", "version")),
            AuthError::WrongSignature => Some(("v2", "hmac")),
            AuthError::BadTimestamp(_) => Some(("v2", "timestamp")),
            AuthError::Expired => Some(("v2", "expired")),
            AuthError::InFuture => Some(("v2", "future")),
        }
    }

    /// Unauthenticated when there is no usable token, PermissionDenied when it is wrong.
    pub fn code(&self) -> Code {
        match self {
            AuthError::Missing => Code::Unauthenticated,
            _ => Code::PermissionDenied,
        }
    }

    pub fn to_status(&self) -> Status {
        Status::new(self.code(), self.to_string())
    }
}

// HMAC accepts keys of any length (longer ones are hashed, shorter ones padded), so
// new_from_slice never returns its InvalidLength error for Hmac; the hmac crate has no
// constructor for a key of any length that does not return a Result.
#[allow(clippy::expect_used)]
fn mac(secret: &[u8], message: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

fn unix_seconds(now: SystemTime) -> i64 {
    match now.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// A v2 token for `secret`, stamped `now`.
pub fn sign_v2(secret: &[u8], now: SystemTime) -> String {
    let timestamp = unix_seconds(now).to_string();
    format!(
        "v2.{}.{timestamp}",
        hex::encode(mac(secret, timestamp.as_bytes()))
    )
}

/// The `authorization` metadata value for `secret`, stamped now.
pub fn bearer(secret: &[u8]) -> String {
    bearer_at(secret, SystemTime::now())
}

fn bearer_at(secret: &[u8], now: SystemTime) -> String {
    format!("Bearer {}", sign_v2(secret, now))
}

/// A caller's `authorization` value for one secret, signed again only when the second changes:
/// a v2 token carries whole seconds, so within one second the signature comes out the same
/// anyway, and a busy caller (the router's node connections) need not compute an HMAC and a
/// header per call. Shared by the clones of a connection; the lock is held only to copy the
/// value out or put a new one in.
#[derive(Debug)]
pub struct TokenCache {
    secret: Arc<[u8]>,
    current: Mutex<Option<(u64, http::HeaderValue)>>,
}

impl TokenCache {
    /// A cache for `token`; none for an empty token (no `authorization` is sent).
    pub fn new(token: &str) -> Option<Self> {
        (!token.is_empty()).then(|| TokenCache {
            secret: Arc::from(token.as_bytes()),
            current: Mutex::new(None),
        })
    }

    /// The value for now: the one signed earlier in this second, or a new one.
    pub fn header(&self) -> Option<http::HeaderValue> {
        let now = SystemTime::now();
        let Ok(second) = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()) else {
            // A clock before 1970 has no second to key on: sign every time.
            return http::HeaderValue::try_from(bearer_at(&self.secret, now)).ok();
        };
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, value)) = current.as_ref() {
            if *at == second {
                return Some(value.clone());
            }
        }
        let value = http::HeaderValue::try_from(bearer_at(&self.secret, now)).ok()?;
        *current = Some((second, value.clone()));
        Some(value)
    }
}

/// Checks an `authorization` metadata value against `secret` at time `now`.
pub fn check_v2(secret: &[u8], header: Option<&str>, now: SystemTime) -> Result<(), AuthError> {
    let issued = verify_signature(secret, bearer_token(header)?)?;
    check_window(issued, now)
}

/// The token of an `authorization` metadata value: `Bearer <token>`, the scheme in any case.
fn bearer_token(header: Option<&str>) -> Result<&str, AuthError> {
    let (scheme, token) = header
        .and_then(|h| h.split_once(' '))
        .ok_or(AuthError::Missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::Missing);
    }
    Ok(token)
}

/// Checks a token's shape, version and signature: its timestamp if they are right.
fn verify_signature(secret: &[u8], token: &str) -> Result<i64, AuthError> {
    let mut parts = token.split('.');
    let (Some(version), Some(signature), Some(timestamp), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Missing);
    };
    if version != "v2" {
        return Err(AuthError::InvalidVersion);
    }
    // Decoded, not compared as text: hex in upper or mixed case is the same signature.
    let expected = mac(secret, timestamp.as_bytes());
    let given = hex::decode(signature).map_err(|_| AuthError::WrongSignature)?;
    if !bool::from(expected.as_slice().ct_eq(given.as_slice())) {
        return Err(AuthError::WrongSignature);
    }
    timestamp
        .parse()
        .map_err(|e: std::num::ParseIntError| AuthError::BadTimestamp(e.to_string()))
}

/// Checks that a token issued at `issued` (unix seconds) is valid at `now`.
fn check_window(issued: i64, now: SystemTime) -> Result<(), AuthError> {
    let now = unix_seconds(now);
    let window = TOKEN_VALIDITY.as_secs() as i64;
    if issued < now - window {
        return Err(AuthError::Expired);
    }
    if issued > now + window {
        return Err(AuthError::InFuture);
    }
    Ok(())
}

/// The last token whose signature a server verified, and its timestamp. A client signs a new
/// token per call, but a token only carries whole seconds, so within a second its calls bring
/// the same token again: one that is byte for byte the remembered one (compared in constant
/// time) has the same, valid, signature, and only its validity window is left to check. Any
/// other token gets the full check.
#[derive(Debug, Default)]
struct LastVerified(Mutex<Option<Verified>>);

#[derive(Debug)]
struct Verified {
    /// The secret it was verified with.
    secret: Arc<[u8]>,
    token: Box<str>,
    issued: i64,
}

impl LastVerified {
    /// The timestamp of `token` if it is the one remembered for `secret`. A lock held by
    /// another call is not waited for: the full check is done instead.
    fn issued(&self, secret: &[u8], token: &str) -> Option<i64> {
        let guard = self.0.try_lock().ok()?;
        let known = guard.as_ref()?;
        let same =
            *known.secret == *secret && bool::from(known.token.as_bytes().ct_eq(token.as_bytes()));
        same.then_some(known.issued)
    }

    fn remember(&self, secret: &Arc<[u8]>, token: &str, issued: i64) {
        if let Ok(mut guard) = self.0.try_lock() {
            *guard = Some(Verified {
                secret: secret.clone(),
                token: token.into(),
                issued,
            });
        }
    }
}

/// What became of one call's token, for the server's metrics (Gitaly's
/// `gitaly_authentications_total{enforced,status}` and
/// `gitaly_authentication_errors_total{version,error}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthEvent {
    /// False in `transitioning` mode (and with authentication disabled).
    pub enforced: bool,
    /// `ok`, `would be ok` (transitioning), `unauthenticated`, `denied` or `server disabled
    /// authentication`.
    pub status: &'static str,
    /// For a refused token: its version and what was wrong ([`AuthError::error_labels`]).
    pub error: Option<(&'static str, &'static str)>,
}

/// Told of every checked call; the server's metrics live with the server, not here.
#[derive(Clone)]
pub struct AuthObserver(Arc<dyn Fn(AuthEvent) + Send + Sync>);

impl AuthObserver {
    pub fn new(observe: impl Fn(AuthEvent) + Send + Sync + 'static) -> Self {
        AuthObserver(Arc::new(observe))
    }
}

impl std::fmt::Debug for AuthObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthObserver")
    }
}

/// The log of tokens refused in `transitioning` mode: a client with a bad token calls as
/// often as it likes, and one line per call would let it fill the disk, so a line is written
/// at most every [`FAILURE_LOG_INTERVAL`], with the count of failures not logged before it.
/// The line names the method and what was wrong, never the token.
#[derive(Debug, Default)]
struct FailureLog(Mutex<FailureLogState>);

#[derive(Debug, Default)]
struct FailureLogState {
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl FailureLog {
    /// Whether to log a failure now, and how many were suppressed since the last line.
    fn admit(&self, now: std::time::Instant) -> Option<u64> {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match state.last {
            Some(last) if now.duration_since(last) < FAILURE_LOG_INTERVAL => {
                state.suppressed += 1;
                None
            }
            _ => {
                state.last = Some(now);
                Some(std::mem::take(&mut state.suppressed))
            }
        }
    }
}

/// How a server checks tokens. No secret means authentication is disabled.
#[derive(Clone, Debug, Default)]
pub struct AuthConfig {
    pub secret: Option<Arc<[u8]>>,
    /// Check and log, but never refuse (for rolling a token out).
    pub transitioning: bool,
    /// Shared by the clones of this configuration (one per connection and call).
    last_verified: Arc<LastVerified>,
    failures: Arc<FailureLog>,
    observer: Option<AuthObserver>,
}

impl AuthConfig {
    pub fn new(token: &str, transitioning: bool) -> Self {
        AuthConfig {
            secret: (!token.is_empty()).then(|| Arc::from(token.as_bytes())),
            transitioning,
            last_verified: Arc::default(),
            failures: Arc::default(),
            observer: None,
        }
    }

    /// The same configuration, telling `observer` of every call it checks.
    pub fn observed_by(mut self, observer: AuthObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    fn observe(&self, status: &'static str, error: Option<(&'static str, &'static str)>) {
        if let Some(observer) = &self.observer {
            (observer.0)(AuthEvent {
                enforced: self.secret.is_some() && !self.transitioning,
                status,
                error,
            });
        }
    }

    /// [`check_v2`], remembering the last verified token (see [`LastVerified`]).
    fn check(
        &self,
        secret: &Arc<[u8]>,
        header: Option<&str>,
        now: SystemTime,
    ) -> Result<(), AuthError> {
        let token = bearer_token(header)?;
        let issued = match self.last_verified.issued(secret, token) {
            Some(issued) => issued,
            None => {
                let issued = verify_signature(secret, token)?;
                self.last_verified.remember(secret, token, issued);
                issued
            }
        };
        check_window(issued, now)
    }

    /// The verdict for one call: Ok to serve it, or the status to answer with.
    pub fn authorize(&self, path: &str, header: Option<&str>) -> Result<(), Status> {
        if EXEMPT_PREFIXES.iter().any(|p| path.starts_with(p)) {
            return Ok(());
        }
        let Some(secret) = &self.secret else {
            self.observe("server disabled authentication", None);
            return Ok(());
        };
        let result = self.check(secret, header, SystemTime::now());
        match &result {
            Ok(()) if self.transitioning => self.observe("would be ok", None),
            Ok(()) => self.observe("ok", None),
            Err(err) => {
                let status = match err.code() {
                    Code::Unauthenticated => "unauthenticated",
                    _ => "denied",
                };
                self.observe(status, err.error_labels());
            }
        }
        match result {
            Ok(()) => Ok(()),
            Err(err) if self.transitioning => {
                if let Some(suppressed) = self.failures.admit(std::time::Instant::now()) {
                    tracing::warn!(
                        grpc.method = path,
                        error = %err,
                        suppressed,
                        "authentication would have failed"
                    );
                }
                Ok(())
            }
            Err(err) => Err(err.to_status()),
        }
    }
}

/// Tower layer that checks v2 tokens before a call reaches its service.
#[derive(Clone, Debug, Default)]
pub struct AuthLayer {
    config: AuthConfig,
}

impl AuthLayer {
    pub fn new(config: AuthConfig) -> Self {
        AuthLayer { config }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            config: self.config.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    config: AuthConfig,
}

impl<S, B> Service<http::Request<B>> for AuthService<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    /// The service's own future (not boxed again), or the refusal.
    type Future =
        futures::future::Either<S::Future, std::future::Ready<Result<Self::Response, Self::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let header = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match self.config.authorize(request.uri().path(), header) {
            Ok(()) => futures::future::Either::Left(self.inner.call(request)),
            Err(status) => {
                futures::future::Either::Right(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// Client-side interceptor that signs a fresh token for every call.
#[derive(Clone)]
pub struct TokenInterceptor {
    secret: Option<Arc<[u8]>>,
}

impl TokenInterceptor {
    /// An empty token sends no `authorization` metadata.
    pub fn new(token: &str) -> Self {
        TokenInterceptor {
            secret: (!token.is_empty()).then(|| Arc::from(token.as_bytes())),
        }
    }
}

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(secret) = &self.secret {
            let value = MetadataValue::try_from(bearer(secret))
                .map_err(|_| Status::internal("token is not valid metadata"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"secret";

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn header(token: &str) -> String {
        format!("Bearer {token}")
    }

    #[test]
    fn tokens_have_the_v2_shape() {
        let token = sign_v2(SECRET, at(1_700_000_000));
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts[0], "v2");
        assert_eq!(parts[1].len(), 64);
        assert!(parts[1]
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(parts[2], "1700000000");
        // HMAC-SHA256("secret", "1700000000"), computed with Python's hmac module.
        assert_eq!(
            parts[1],
            "4b227f8831b3763d066901751ad4c583ed08832bf1924a4ec50c2e871b1e8586"
        );
    }

    #[test]
    fn a_fresh_token_passes_within_the_window() {
        let token = sign_v2(SECRET, at(1_000_000));
        for now in [1_000_000 - 30, 1_000_000, 1_000_000 + 30] {
            assert_eq!(check_v2(SECRET, Some(&header(&token)), at(now)), Ok(()));
        }
    }

    #[test]
    fn each_failure_has_its_code_and_message() {
        let now = at(1_000_000);
        let good = sign_v2(SECRET, now);
        let cases: Vec<(Option<String>, AuthError)> = vec![
            (None, AuthError::Missing),
            (Some("Basic abc".into()), AuthError::Missing),
            (Some(header("v2.abc")), AuthError::Missing),
            (
                Some(header(&good.replacen("v2", "v1", 1))),
                AuthError::InvalidVersion,
            ),
            (
                Some(header(&sign_v2(b"other", now))),
                AuthError::WrongSignature,
            ),
            (
                Some(header(&sign_v2(SECRET, at(1_000_000 - 31)))),
                AuthError::Expired,
            ),
            (
                Some(header(&sign_v2(SECRET, at(1_000_000 + 31)))),
                AuthError::InFuture,
            ),
        ];
        for (value, expected) in cases {
            assert_eq!(
                check_v2(SECRET, value.as_deref(), now),
                Err(expected.clone()),
                "{value:?}"
            );
        }
        let bad_ts = format!("v2.{}.soon", hex::encode(mac(SECRET, b"soon")));
        assert!(matches!(
            check_v2(SECRET, Some(&header(&bad_ts)), now),
            Err(AuthError::BadTimestamp(_))
        ));
        assert_eq!(AuthError::Missing.to_status().code(), Code::Unauthenticated);
        assert_eq!(
            AuthError::Missing.to_status().message(),
            "authentication required"
        );
        assert_eq!(
            AuthError::Expired.to_status().code(),
            Code::PermissionDenied
        );
        assert_eq!(
            AuthError::WrongSignature.to_status().message(),
            "permission denied: wrong hmac signature"
        );
    }

    #[test]
    fn a_remembered_token_is_checked_as_strictly() {
        let config = AuthConfig::new("secret", false);
        let secret = config.secret.clone().unwrap();
        let token = header(&sign_v2(SECRET, at(1_000_000)));
        // Verified once, then remembered: the window is still checked on every call.
        for now in [1_000_000, 1_000_030, 1_000_000 - 30] {
            assert_eq!(config.check(&secret, Some(&token), at(now)), Ok(()));
        }
        assert_eq!(
            config.check(&secret, Some(&token), at(1_000_031)),
            Err(AuthError::Expired)
        );
        assert_eq!(
            config.check(&secret, Some(&token), at(1_000_000 - 31)),
            Err(AuthError::InFuture)
        );
        // Other tokens, and the same token under another secret, get the full check.
        let forged = header(&sign_v2(b"other", at(1_000_000)));
        assert_eq!(
            config.check(&secret, Some(&forged), at(1_000_000)),
            Err(AuthError::WrongSignature)
        );
        assert_eq!(config.check(&secret, Some(&token), at(1_000_000)), Ok(()));
        let other_secret: Arc<[u8]> = Arc::from(&b"other"[..]);
        assert_eq!(
            config.check(&other_secret, Some(&token), at(1_000_000)),
            Err(AuthError::WrongSignature)
        );
        let truncated = &token[..token.len() - 1];
        assert_eq!(
            config.check(&secret, Some(truncated), at(1_000_000)),
            Err(AuthError::WrongSignature)
        );
        assert_eq!(
            config.check(
                &secret,
                Some(&token.replace("Bearer ", "Basic ")),
                at(1_000_000)
            ),
            Err(AuthError::Missing)
        );
    }

    #[test]
    fn edge_cases_are_decided_as_gitaly_decides_them() {
        let now = at(1_000_000);
        let token = sign_v2(SECRET, now);
        // The scheme in any case, the signature in upper case.
        for value in [
            format!("bearer {token}"),
            format!("BEARER {token}"),
            format!(
                "Bearer {}",
                token.replace(&token[3..67], &token[3..67].to_uppercase())
            ),
        ] {
            assert_eq!(check_v2(SECRET, Some(&value), now), Ok(()), "{value}");
        }
        // Not hex, an odd length, a signature too short: wrong signature, not a panic.
        for signature in ["zz", "abc", "ab"] {
            let value = format!("Bearer v2.{signature}.1000000");
            assert_eq!(
                check_v2(SECRET, Some(&value), now),
                Err(AuthError::WrongSignature)
            );
        }
        // Another scheme, no space, and anything longer than a token: unauthenticated.
        let huge = format!("Bearer {token}{}", "0".repeat(16 * 1024));
        for value in ["Basic abc", "Bearer", "Bearertoken", huge.as_str()] {
            assert_eq!(
                check_v2(SECRET, Some(value), now),
                Err(AuthError::Missing),
                "{:.20}",
                value
            );
        }
    }

    #[test]
    fn refused_tokens_are_logged_at_a_bounded_rate() {
        let log = FailureLog::default();
        let start = std::time::Instant::now();
        assert_eq!(log.admit(start), Some(0));
        for i in 1..100 {
            assert_eq!(log.admit(start + Duration::from_millis(i)), None);
        }
        assert_eq!(log.admit(start + FAILURE_LOG_INTERVAL), Some(99));
        assert_eq!(log.admit(start + FAILURE_LOG_INTERVAL), None);
    }

    #[test]
    fn health_is_exempt_and_transitioning_never_refuses() {
        let strict = AuthConfig::new("secret", false);
        assert!(strict
            .authorize("/grpc.health.v1.Health/Check", None)
            .is_ok());
        assert!(strict
            .authorize("/gitaly.RefService/RefExists", None)
            .is_err());
        let lenient = AuthConfig::new("secret", true);
        assert!(lenient
            .authorize("/gitaly.RefService/RefExists", None)
            .is_ok());
        let disabled = AuthConfig::new("", false);
        assert!(disabled
            .authorize("/gitaly.RefService/RefExists", None)
            .is_ok());
    }

    #[test]
    fn every_checked_call_is_reported_with_gitalys_labels() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let observer = {
            let events = events.clone();
            AuthObserver::new(move |event| events.lock().unwrap().push(event))
        };
        let method = "/gitaly.RefService/RefExists";
        let good = header(&sign_v2(b"secret", SystemTime::now()));
        let wrong = header(&sign_v2(b"other", SystemTime::now()));
        let strict = AuthConfig::new("secret", false).observed_by(observer.clone());
        let _ = strict.authorize("/grpc.health.v1.Health/Check", None);
        let _ = strict.authorize(method, Some(&good));
        let _ = strict.authorize(method, None);
        let _ = strict.authorize(method, Some(&wrong));
        let lenient = AuthConfig::new("secret", true).observed_by(observer.clone());
        let _ = lenient.authorize(method, Some(&good));
        let _ = lenient.authorize(method, Some("Bearer v1.abc.123"));
        let disabled = AuthConfig::new("", false).observed_by(observer);
        let _ = disabled.authorize(method, None);
        let event = |enforced, status, error| AuthEvent {
            enforced,
            status,
            error,
        };
        assert_eq!(
            *events.lock().unwrap(),
            vec![
                event(true, "ok", None),
                event(true, "unauthenticated", None),
                event(true, "denied", Some(("v2", "hmac"))),
                event(false, "would be ok", None),
                event(false, "denied", Some(("unsupported", "version"))),
                event(false, "server disabled authentication", None),
            ]
        );
    }

    #[test]
    fn cached_tokens_are_valid_and_reused_within_their_second() {
        assert!(TokenCache::new("").is_none(), "no token, no header");
        let cache = TokenCache::new("secret").unwrap();
        let (first, second) = loop {
            let before = unix_seconds(SystemTime::now());
            let pair = (cache.header().unwrap(), cache.header().unwrap());
            // Both within one second, or the comparison below says nothing.
            if unix_seconds(SystemTime::now()) == before {
                break pair;
            }
        };
        assert_eq!(first, second);
        let config = AuthConfig::new("secret", false);
        assert!(config
            .authorize("/gitaly.RefService/RefExists", first.to_str().ok())
            .is_ok());
    }
}
