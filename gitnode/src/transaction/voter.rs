//! Casting one vote: `RefTransaction/VoteTransaction` to the router, over the backchannel
//! session of the call, and what its answer means for the node.

use std::time::Duration;

use praefect_wire::proto::vote_transaction_request::Phase as ProtoPhase;
use praefect_wire::proto::vote_transaction_response::TransactionState;
use praefect_wire::proto::VoteTransactionRequest;
use praefect_wire::transaction::TransactionMetadata;
use sha1::{Digest, Sha1};
use tonic::Status;

use super::protocol::Phase;
use praefect_wire::backchannel::CallbackChannels;
use praefect_wire::proto::ref_transaction_client::RefTransactionClient;

/// How long a vote waits for the router: until the other nodes have voted too.
pub const VOTE_TIMEOUT: Duration = Duration::from_secs(300);

/// Why a node must not go on with a change (or, after it, why the change is not agreed).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VoteError {
    #[error("transaction was aborted")]
    Aborted,
    #[error("transaction was stopped")]
    Stopped,
    #[error("voting failed: {0}")]
    Failed(String),
}

impl From<VoteError> for Status {
    fn from(err: VoteError) -> Status {
        match err {
            VoteError::Aborted | VoteError::Stopped => Status::aborted(err.to_string()),
            VoteError::Failed(_) => Status::unavailable(err.to_string()),
        }
    }
}

/// Sends votes; `salt` (test only, `GITNODE_TEST_VOTE_SALT`) is mixed into every hash.
#[derive(Clone)]
pub struct Voter {
    clients: CallbackChannels,
    salt: Vec<u8>,
}

impl Voter {
    pub fn new(clients: CallbackChannels, salt: Vec<u8>) -> Self {
        Voter { clients, salt }
    }

    /// The hash as sent: unchanged without a salt, else SHA-1(hash ‖ salt).
    pub fn salted(&self, hash: [u8; 20]) -> [u8; 20] {
        if self.salt.is_empty() {
            return hash;
        }
        let mut hasher = Sha1::new();
        hasher.update(hash);
        hasher.update(&self.salt);
        hasher.finalize().into()
    }

    /// Votes `hash` in `phase` of `tx`, over backchannel session `backchannel`.
    pub async fn vote(
        &self,
        tx: &TransactionMetadata,
        backchannel: u64,
        phase: Phase,
        hash: [u8; 20],
    ) -> Result<(), VoteError> {
        let mut client = RefTransactionClient::new(self.clients.channel(backchannel));
        let mut request = tonic::Request::new(VoteTransactionRequest {
            repository: None,
            transaction_id: tx.id,
            node: tx.node.clone(),
            reference_updates_hash: self.salted(hash).to_vec(),
            phase: match phase {
                Phase::Prepared => ProtoPhase::PreparedPhase,
                Phase::Committed => ProtoPhase::CommittedPhase,
            } as i32,
        });
        request.set_timeout(VOTE_TIMEOUT);
        let answer = tokio::time::timeout(VOTE_TIMEOUT, client.vote_transaction(request)).await;
        let response = match answer {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                self.clients.forget(backchannel);
                return Err(VoteError::Failed(format!(
                    "{:?}: {}",
                    status.code(),
                    status.message()
                )));
            }
            Err(_) => {
                self.clients.forget(backchannel);
                return Err(VoteError::Failed("no answer within 5 minutes".into()));
            }
        };
        tracing::debug!(
            transaction_id = tx.id,
            node = %tx.node,
            %phase,
            state = response.state,
            "voted"
        );
        match TransactionState::try_from(response.state) {
            Ok(TransactionState::Commit) => Ok(()),
            Ok(TransactionState::Abort) => Err(VoteError::Aborted),
            Ok(TransactionState::Stop) => Err(VoteError::Stopped),
            Err(_) => Err(VoteError::Failed(format!(
                "unknown transaction state {}",
                response.state
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use praefect_wire::backchannel::SessionRegistry;

    #[tokio::test]
    async fn the_salt_changes_every_hash_and_no_salt_none() {
        let clients = CallbackChannels::new(SessionRegistry::default());
        let plain = Voter::new(clients.clone(), Vec::new());
        let salted = Voter::new(clients.clone(), b"x".to_vec());
        let other = Voter::new(clients, b"y".to_vec());
        let hash = [7u8; 20];
        assert_eq!(plain.salted(hash), hash);
        assert_ne!(salted.salted(hash), hash);
        assert_ne!(salted.salted(hash), other.salted(hash));
        assert_eq!(salted.salted(hash), salted.salted(hash));
    }

    #[tokio::test]
    async fn a_vote_over_a_missing_session_fails_and_is_forgotten() {
        let clients = CallbackChannels::new(SessionRegistry::default());
        let voter = Voter::new(clients.clone(), Vec::new());
        let tx = TransactionMetadata {
            id: 1,
            node: "n".into(),
            primary: true,
        };
        let err = voter
            .vote(&tx, 42, Phase::Prepared, [0; 20])
            .await
            .unwrap_err();
        assert!(matches!(err, VoteError::Failed(_)), "{err:?}");
        assert!(clients.is_empty());
    }
}
