//! The transactions of calls in flight, by id: registered when a transactional write is
//! forwarded, voted on by the nodes (over the backchannel, see [`super::service`]), ended
//! when the call is over. Ids come from a counter starting at 1: unique within this process,
//! which is enough because a node votes back over the connection this router dialled.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::watch;

use super::ballot::{
    BallotError, Election, ElectionOutcome, InvalidVoters, Vote, VoteResult, Voter,
};
use super::metrics;

/// What a node's vote comes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoteAnswer {
    Commit,
    Abort,
    Stop,
}

/// A vote or stop that could not be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransactionError {
    #[error("transaction not found: {0}")]
    NotFound(u64),
    #[error("transaction was canceled")]
    Canceled,
    #[error(transparent)]
    Ballot(#[from] BallotError),
}

/// The registry of live transactions; cheap to clone.
#[derive(Clone, Default)]
pub struct Transactions {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Arc<Transaction>>>,
}

struct Transaction {
    election: Mutex<Election>,
    /// Bumped on every change, so that waiting voters look again.
    changed: watch::Sender<u64>,
}

impl Transaction {
    fn lock(&self) -> MutexGuard<'_, Election> {
        self.election.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `change` and wakes the voters waiting on this transaction.
    fn update<T>(&self, change: impl FnOnce(&mut Election) -> T) -> T {
        let out = change(&mut self.lock());
        self.changed.send_modify(|version| *version += 1);
        out
    }
}

impl Transactions {
    fn live(&self) -> MutexGuard<'_, HashMap<u64, Arc<Transaction>>> {
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, id: u64) -> Result<Arc<Transaction>, TransactionError> {
        self.live().get(&id).cloned().ok_or_else(|| {
            metrics::action("invalid");
            TransactionError::NotFound(id)
        })
    }

    /// Starts a transaction among `voters`; it lives until the [`Registration`] is finished
    /// or dropped.
    pub fn register(
        &self,
        virtual_storage: &str,
        voters: Vec<Voter>,
        threshold: u32,
    ) -> Result<Registration, InvalidVoters> {
        let count = voters.len();
        let election = Election::new(voters, threshold)?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let transaction = Arc::new(Transaction {
            election: Mutex::new(election),
            changed: watch::Sender::new(0),
        });
        self.live().insert(id, transaction.clone());
        metrics::action("registered");
        metrics::voters(virtual_storage, count);
        Ok(Registration {
            id,
            transaction,
            registry: self.clone(),
            finished: false,
        })
    }

    /// `node`'s vote in transaction `id`: waits until it is decided (or the transaction ends).
    pub async fn vote(
        &self,
        id: u64,
        node: &str,
        vote: Vote,
    ) -> Result<VoteAnswer, TransactionError> {
        let transaction = self.get(id)?;
        let started = Instant::now();
        metrics::action("started");
        let mut changes = transaction.changed.subscribe();
        let (voter, subtransaction) = transaction
            .update(|election| {
                let voter = election.voter_index(node)?;
                let subtransaction = election.vote(voter, vote)?;
                Ok::<_, BallotError>((voter, subtransaction))
            })
            .inspect_err(|_| metrics::action("invalid"))?;
        loop {
            let result = transaction.lock().result(subtransaction, voter);
            let answer = match result {
                VoteResult::Undecided => None,
                VoteResult::Committed => Some(Ok(VoteAnswer::Commit)),
                VoteResult::Failed => Some(Ok(VoteAnswer::Abort)),
                VoteResult::Stopped => Some(Ok(VoteAnswer::Stop)),
                VoteResult::Canceled => Some(Err(TransactionError::Canceled)),
            };
            if let Some(answer) = answer {
                metrics::vote_delay(started.elapsed());
                metrics::action(match answer {
                    Ok(VoteAnswer::Commit) => "committed",
                    Ok(VoteAnswer::Abort) => "failed",
                    Ok(VoteAnswer::Stop) => "stopped",
                    Err(_) => "canceled",
                });
                return answer;
            }
            if changes.changed().await.is_err() {
                return Err(TransactionError::Canceled);
            }
        }
    }

    /// Stops transaction `id`: every pending and later vote is answered STOP. Stopping twice
    /// is fine.
    pub fn stop(&self, id: u64) -> Result<(), TransactionError> {
        self.get(id)?.update(Election::stop);
        Ok(())
    }

    /// How many transactions are live (for tests and the status of a draining router).
    pub fn len(&self) -> usize {
        self.live().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A live transaction, owned by the call it belongs to. Dropping it (or [`finish`]ing it)
/// ends the transaction: waiting voters are cancelled and the id is forgotten.
///
/// [`finish`]: Registration::finish
pub struct Registration {
    id: u64,
    transaction: Arc<Transaction>,
    registry: Transactions,
    finished: bool,
}

impl Registration {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Takes `node` out of the transaction (its call failed); the others go on without it.
    pub fn cancel_voter(&self, node: &str) {
        self.canceller().cancel(node);
    }

    /// A handle that can take voters out, for the tasks running each node's call.
    pub fn canceller(&self) -> VoterCanceller {
        VoterCanceller(self.transaction.clone())
    }

    /// Ends the transaction and says how it went.
    pub fn finish(mut self) -> ElectionOutcome {
        self.end()
    }

    fn end(&mut self) -> ElectionOutcome {
        self.finished = true;
        self.registry.live().remove(&self.id);
        let outcome = self.transaction.update(|election| {
            election.cancel_all();
            election.outcome()
        });
        metrics::subtransactions(outcome.subtransactions);
        outcome
    }
}

/// Takes voters out of one transaction (see [`Registration::canceller`]).
#[derive(Clone)]
pub struct VoterCanceller(Arc<Transaction>);

impl VoterCanceller {
    pub fn cancel(&self, node: &str) {
        self.0.update(|election| {
            if let Ok(voter) = election.voter_index(node) {
                election.cancel(voter);
            }
        });
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if !self.finished {
            self.end();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::ballot::voters_for;
    use super::*;
    use std::time::Duration;

    const A: Vote = [7; 20];
    const B: Vote = [8; 20];

    fn register(transactions: &Transactions, secondaries: &[&str]) -> Registration {
        let secondaries: Vec<String> = secondaries.iter().map(|s| s.to_string()).collect();
        let (voters, threshold) = voters_for("p", &secondaries);
        transactions.register("vs", voters, threshold).unwrap()
    }

    async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), future)
            .await
            .expect("decided in time")
    }

    #[tokio::test]
    async fn voters_wait_for_each_other() {
        let transactions = Transactions::default();
        let registration = register(&transactions, &["s1", "s2"]);
        let id = registration.id();
        let t = transactions.clone();
        let primary = tokio::spawn(async move { t.vote(id, "p", A).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!primary.is_finished(), "the primary needs a secondary");
        let t = transactions.clone();
        let dissent = tokio::spawn(async move { t.vote(id, "s1", B).await });
        assert_eq!(
            within(transactions.vote(id, "s2", A)).await,
            Ok(VoteAnswer::Commit)
        );
        assert_eq!(within(primary).await.unwrap(), Ok(VoteAnswer::Commit));
        assert_eq!(within(dissent).await.unwrap(), Ok(VoteAnswer::Abort));
        let outcome = registration.finish();
        assert_eq!(outcome.subtransactions, 1);
        assert!(outcome.committed("s2") && !outcome.committed("s1"));
        assert_eq!(
            transactions.vote(id, "p", A).await,
            Err(TransactionError::NotFound(id))
        );
    }

    #[tokio::test]
    async fn a_cancelled_primary_aborts_the_waiting_secondaries() {
        let transactions = Transactions::default();
        let registration = register(&transactions, &["s1"]);
        let id = registration.id();
        let t = transactions.clone();
        let secondary = tokio::spawn(async move { t.vote(id, "s1", A).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        registration.cancel_voter("p");
        assert_eq!(within(secondary).await.unwrap(), Ok(VoteAnswer::Abort));
    }

    #[tokio::test]
    async fn ending_the_call_cancels_pending_votes_and_stop_answers_stop() {
        let transactions = Transactions::default();
        let registration = register(&transactions, &["s1", "s2"]);
        let id = registration.id();
        let t = transactions.clone();
        let pending = tokio::spawn(async move { t.vote(id, "p", A).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(registration);
        assert_eq!(
            within(pending).await.unwrap(),
            Err(TransactionError::Canceled)
        );
        assert!(transactions.is_empty());

        let registration = register(&transactions, &["s1", "s2"]);
        let id = registration.id();
        let t = transactions.clone();
        let pending = tokio::spawn(async move { t.vote(id, "p", A).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        transactions.stop(id).unwrap();
        transactions.stop(id).unwrap();
        assert_eq!(within(pending).await.unwrap(), Ok(VoteAnswer::Stop));
        assert_eq!(
            within(transactions.vote(id, "s1", A)).await,
            Ok(VoteAnswer::Stop)
        );
        assert_eq!(transactions.stop(999), Err(TransactionError::NotFound(999)));
        assert!(matches!(
            transactions.vote(id, "stranger", A).await,
            Err(TransactionError::Ballot(BallotError::UnknownVoter(_)))
        ));
    }
}
