//! The reference-transaction metadata a router attaches to each node's copy of a transactional
//! call: `gitaly-reference-transaction`, the standard (padded) base64 of the JSON
//! `{"id":<u64>,"node":"<storage>","primary":<bool>}`. The node votes with this id and name,
//! back over the backchannel session the call came in on.

use base64::Engine;
use serde::{Deserialize, Serialize};

/// The metadata key.
pub const METADATA_KEY: &str = "gitaly-reference-transaction";

/// What a node needs to vote in a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionMetadata {
    pub id: u64,
    pub node: String,
    pub primary: bool,
}

/// A metadata value that does not decode.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("reference transaction metadata is not base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("reference transaction metadata is not the expected JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl TransactionMetadata {
    /// The metadata value.
    pub fn encode(&self) -> String {
        // Serializing three plain fields cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        base64::engine::general_purpose::STANDARD.encode(json)
    }

    /// Reads a metadata value.
    pub fn decode(value: &[u8]) -> Result<Self, MetadataError> {
        let json = base64::engine::general_purpose::STANDARD.decode(value)?;
        Ok(serde_json::from_slice(&json)?)
    }

    /// The transaction of a call's metadata, if it has one.
    pub fn from_headers(headers: &http::HeaderMap) -> Result<Option<Self>, MetadataError> {
        headers
            .get(METADATA_KEY)
            .map(|value| Self::decode(value.as_bytes()))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_in_praefects_format() {
        let tx = TransactionMetadata {
            id: 7,
            node: "gitaly-1".into(),
            primary: true,
        };
        let value = tx.encode();
        let json = base64::engine::general_purpose::STANDARD
            .decode(&value)
            .unwrap();
        assert_eq!(json, br#"{"id":7,"node":"gitaly-1","primary":true}"#);
        assert_eq!(TransactionMetadata::decode(value.as_bytes()).unwrap(), tx);
        assert!(TransactionMetadata::decode(b"!!").is_err());
        assert!(TransactionMetadata::decode(b"e30=").is_err()); // "{}"
    }
}
