//! Header names the router looks up on every call, as [`http::HeaderName`] constants, and
//! the gRPC code they carry.
//!
//! A `HeaderMap` lookup by `&str` parses and validates the name first (a few hundred
//! instructions each); a call passes through about fifteen such lookups, which showed in the
//! instruction count per call (`scripts/bench-instructions`). A constant is parsed at compile
//! time, and its lookup only hashes.

use http::HeaderName;

/// gRPC's status code, in trailers or trailers-only headers.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// gRPC's status message (percent-encoded).
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// The sidechannel id a client asks for (see [`crate::sidechannel`]).
pub const SIDECHANNEL_ID: HeaderName = HeaderName::from_static(crate::sidechannel::METADATA_KEY);
/// The reference transaction a write takes part in (see [`crate::transaction`]).
pub const REFERENCE_TRANSACTION: HeaderName =
    HeaderName::from_static(crate::transaction::METADATA_KEY);

/// The gRPC code trailers (or trailers-only headers) report; None when they have no
/// `grpc-status`.
pub fn grpc_code(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get(GRPC_STATUS)
        .map(|code| tonic::Code::from_bytes(code.as_bytes()))
}
