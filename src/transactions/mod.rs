//! Reference transactions: a write goes to the primary and every up-to-date healthy
//! secondary at once, and the nodes vote (a hash of the reference updates they are about to
//! make, and then made) so that they apply it only together. The router counts the votes:
//! `ballot` (the rules, no I/O), `manager` (live transactions and waiting voters), `service`
//! (`RefTransaction`, served to the nodes over the backchannel), `outcome` (what the
//! finalizer records after the call) and `metrics`.

pub mod ballot;
mod manager;
mod metrics;
pub mod outcome;
mod service;

pub use ballot::{voters_for, ElectionOutcome, Vote, Voter};
pub use manager::{Registration, TransactionError, Transactions, VoteAnswer, VoterCanceller};
pub use service::RefTransactionService;
