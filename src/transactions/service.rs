//! `gitaly.RefTransaction`, served to the nodes over the backchannel of each node connection
//! (the node votes back on the connection this router dialled, so votes reach the router
//! that registered the transaction).

use tonic::{Request, Response, Status};

use super::ballot::Vote;
use super::manager::{TransactionError, Transactions, VoteAnswer};
use crate::wire::proto::ref_transaction_server::{RefTransaction, RefTransactionServer};
use crate::wire::proto::vote_transaction_response::TransactionState;
use crate::wire::proto::{
    StopTransactionRequest, StopTransactionResponse, VoteTransactionRequest,
    VoteTransactionResponse,
};

/// The service over `transactions`.
pub struct RefTransactionService {
    transactions: Transactions,
}

impl RefTransactionService {
    pub fn server(transactions: Transactions) -> RefTransactionServer<Self> {
        RefTransactionServer::new(RefTransactionService { transactions })
    }
}

/// The gRPC status of a vote that could not be taken.
fn status(err: TransactionError) -> Status {
    match err {
        TransactionError::NotFound(_) => Status::not_found(err.to_string()),
        TransactionError::Canceled => Status::cancelled(err.to_string()),
        TransactionError::Ballot(_) => Status::internal(err.to_string()),
    }
}

#[tonic::async_trait]
impl RefTransaction for RefTransactionService {
    async fn vote_transaction(
        &self,
        request: Request<VoteTransactionRequest>,
    ) -> Result<Response<VoteTransactionResponse>, Status> {
        let request = request.into_inner();
        let vote: Vote = request
            .reference_updates_hash
            .as_slice()
            .try_into()
            .map_err(|_| {
                Status::invalid_argument(format!(
                    "invalid reference hash: expected 20 bytes, got {}",
                    request.reference_updates_hash.len()
                ))
            })?;
        let answer = self
            .transactions
            .vote(request.transaction_id, &request.node, vote)
            .await
            .map_err(status)?;
        let state = match answer {
            VoteAnswer::Commit => TransactionState::Commit,
            VoteAnswer::Abort => TransactionState::Abort,
            VoteAnswer::Stop => TransactionState::Stop,
        };
        Ok(Response::new(VoteTransactionResponse {
            state: state.into(),
        }))
    }

    async fn stop_transaction(
        &self,
        request: Request<StopTransactionRequest>,
    ) -> Result<Response<StopTransactionResponse>, Status> {
        self.transactions
            .stop(request.get_ref().transaction_id)
            .map_err(status)?;
        Ok(Response::new(StopTransactionResponse {}))
    }
}
