//! The voting rules of one transaction, without any I/O: who may vote with what weight, how
//! votes fall into subtransactions, and when a vote is decided. [`super::manager`] wraps a
//! ballot in a lock and lets voters wait for their result.
//!
//! A transaction is a sequence of subtransactions (a node votes once per phase, and a call may
//! update references more than once). A voter's vote goes to the first subtransaction it has
//! not decided yet; once it committed every existing one, its vote opens a new one. A
//! subtransaction is decided when the weights behind one vote reach the threshold: voters
//! holding that vote commit, the others fail, and late voters are judged the same way when
//! they arrive. When no vote can reach the threshold any more, every voter fails.

/// A vote: the SHA-1 of a node's queued reference updates.
pub type Vote = [u8; 20];

/// A voter and its weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Voter {
    pub name: String,
    pub votes: u32,
}

/// Where a voter stands in one subtransaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoteResult {
    /// Not decided yet (voted and waiting, or not voted).
    Undecided,
    Committed,
    Failed,
    /// The voter's call failed (or the transaction ended): it takes no further part.
    Canceled,
    Stopped,
}

/// Why a vote was refused outright.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BallotError {
    #[error("invalid node for transaction: {0:?}")]
    UnknownVoter(String),
    #[error("node already cast a vote: {0:?}")]
    AlreadyVoted(String),
}

/// An invalid set of voters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidVoters {
    #[error("transaction has no voters")]
    None,
    #[error("invalid threshold {threshold} for {total} votes")]
    Threshold { threshold: u32, total: u32 },
}

#[derive(Clone, Debug)]
struct Ballot {
    vote: Option<Vote>,
    result: VoteResult,
}

#[derive(Clone, Debug)]
struct Subtransaction {
    ballots: Vec<Ballot>,
    decided: Option<Vote>,
    /// No vote can reach the threshold any more.
    impossible: bool,
}

/// One transaction's votes.
#[derive(Clone, Debug)]
pub struct Election {
    voters: Vec<Voter>,
    threshold: u32,
    subtransactions: Vec<Subtransaction>,
    /// Voters whose call failed: cancelled in this and every later subtransaction.
    cancelled: Vec<bool>,
    stopped: bool,
}

/// The voters of a write: the primary with S+1 votes and each of the S secondaries with one;
/// the threshold is S+1, plus ceil(S/2) when S > 1. So the primary is always needed, alone
/// enough with at most one secondary, and needs ceil(S/2) secondaries beyond that.
pub fn voters_for(primary: &str, secondaries: &[String]) -> (Vec<Voter>, u32) {
    let s = u32::try_from(secondaries.len()).unwrap_or(u32::MAX - 1);
    let mut voters = vec![Voter {
        name: primary.to_string(),
        votes: s + 1,
    }];
    voters.extend(secondaries.iter().map(|name| Voter {
        name: name.clone(),
        votes: 1,
    }));
    let threshold = if s > 1 { s + 1 + s.div_ceil(2) } else { s + 1 };
    (voters, threshold)
}

impl Election {
    /// A transaction with `voters`; the threshold must be more than half the votes and at
    /// most all of them.
    pub fn new(voters: Vec<Voter>, threshold: u32) -> Result<Self, InvalidVoters> {
        if voters.is_empty() {
            return Err(InvalidVoters::None);
        }
        let total: u32 = voters.iter().map(|v| v.votes).sum();
        if threshold <= total / 2 || threshold > total {
            return Err(InvalidVoters::Threshold { threshold, total });
        }
        let count = voters.len();
        Ok(Election {
            voters,
            threshold,
            subtransactions: Vec::new(),
            cancelled: vec![false; count],
            stopped: false,
        })
    }

    pub fn voters(&self) -> &[Voter] {
        &self.voters
    }

    pub fn voter_index(&self, name: &str) -> Result<usize, BallotError> {
        self.voters
            .iter()
            .position(|v| v.name == name)
            .ok_or_else(|| BallotError::UnknownVoter(name.to_string()))
    }

    /// Casts `voter`'s vote; returns the subtransaction it went to. The result may be
    /// undecided still: see [`Election::result`].
    pub fn vote(&mut self, voter: usize, vote: Vote) -> Result<usize, BallotError> {
        let Some(name) = self.voters.get(voter).map(|v| v.name.clone()) else {
            return Err(BallotError::UnknownVoter(voter.to_string()));
        };
        let index = match self.first_undecided(voter) {
            Some(index) => index,
            None => self.open_subtransaction(),
        };
        let ballot = &mut self.subtransactions[index].ballots[voter];
        if ballot.result == VoteResult::Undecided {
            if ballot.vote.is_some() {
                return Err(BallotError::AlreadyVoted(name));
            }
            ballot.vote = Some(vote);
            self.tally(index);
        }
        Ok(index)
    }

    /// The first subtransaction `voter` has not committed: undecided, or where it failed
    /// (so a failed voter learns it again rather than opening a new one).
    fn first_undecided(&self, voter: usize) -> Option<usize> {
        self.subtransactions
            .iter()
            .position(|sub| sub.ballots[voter].result != VoteResult::Committed)
    }

    /// A new subtransaction: voters that committed everything so far take part; the others
    /// carry their outcome (failed, cancelled, stopped) into it.
    fn open_subtransaction(&mut self) -> usize {
        let ballots = (0..self.voters.len())
            .map(|voter| Ballot {
                vote: None,
                result: if self.stopped {
                    VoteResult::Stopped
                } else if self.cancelled[voter] {
                    VoteResult::Canceled
                } else {
                    self.subtransactions
                        .iter()
                        .map(|sub| sub.ballots[voter].result)
                        .find(|r| *r != VoteResult::Committed)
                        .unwrap_or(VoteResult::Undecided)
                },
            })
            .collect();
        self.subtransactions.push(Subtransaction {
            ballots,
            decided: None,
            impossible: false,
        });
        let index = self.subtransactions.len() - 1;
        self.tally(index);
        index
    }

    /// Decides what can be decided in subtransaction `index`.
    fn tally(&mut self, index: usize) {
        let threshold = self.threshold;
        let weights: Vec<u32> = self.voters.iter().map(|v| v.votes).collect();
        let sub = &mut self.subtransactions[index];
        if sub.decided.is_none() && !sub.impossible {
            let mut totals: Vec<(Vote, u32)> = Vec::new();
            let mut outstanding = 0;
            for (ballot, weight) in sub.ballots.iter().zip(&weights) {
                match (ballot.result, ballot.vote) {
                    (VoteResult::Undecided, Some(vote)) => {
                        match totals.iter_mut().find(|(v, _)| *v == vote) {
                            Some((_, total)) => *total += weight,
                            None => totals.push((vote, *weight)),
                        }
                    }
                    (VoteResult::Undecided, None) => outstanding += weight,
                    _ => {}
                }
            }
            let best = totals.iter().max_by_key(|(_, total)| *total).copied();
            match best {
                Some((vote, total)) if total >= threshold => sub.decided = Some(vote),
                _ => {
                    let best = best.map_or(0, |(_, total)| total);
                    sub.impossible = best + outstanding < threshold;
                }
            }
        }
        for ballot in &mut sub.ballots {
            if ballot.result != VoteResult::Undecided {
                continue;
            }
            match (ballot.vote, sub.decided) {
                (Some(vote), Some(decided)) => {
                    ballot.result = if vote == decided {
                        VoteResult::Committed
                    } else {
                        VoteResult::Failed
                    };
                }
                (Some(_), None) if sub.impossible => ballot.result = VoteResult::Failed,
                _ => {}
            }
        }
    }

    /// `voter`'s result in subtransaction `index`.
    pub fn result(&self, index: usize, voter: usize) -> VoteResult {
        self.subtransactions
            .get(index)
            .and_then(|sub| sub.ballots.get(voter))
            .map_or(VoteResult::Undecided, |b| b.result)
    }

    /// Takes `voter` out (its call failed): cancelled wherever it is undecided, now and later.
    /// Its pending vote no longer counts, which may decide (or doom) the others.
    pub fn cancel(&mut self, voter: usize) {
        if voter >= self.voters.len() || self.cancelled[voter] {
            return;
        }
        self.cancelled[voter] = true;
        for index in 0..self.subtransactions.len() {
            let ballot = &mut self.subtransactions[index].ballots[voter];
            if ballot.result == VoteResult::Undecided {
                ballot.result = VoteResult::Canceled;
                self.tally(index);
            }
        }
    }

    /// Ends the transaction for everyone still waiting or yet to vote: they are cancelled.
    pub fn cancel_all(&mut self) {
        for voter in 0..self.voters.len() {
            self.cancel(voter);
        }
    }

    /// Stops the transaction: undecided voters, and everyone who votes later, get STOP.
    pub fn stop(&mut self) {
        self.stopped = true;
        for sub in &mut self.subtransactions {
            for ballot in &mut sub.ballots {
                if ballot.result == VoteResult::Undecided {
                    ballot.result = VoteResult::Stopped;
                }
            }
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// What the finalizer needs once the call is over.
    pub fn outcome(&self) -> ElectionOutcome {
        ElectionOutcome {
            subtransactions: self.subtransactions.len(),
            primary_voted_first: self
                .subtransactions
                .first()
                .is_some_and(|sub| sub.ballots[0].vote.is_some()),
            committed: (0..self.voters.len())
                .map(|voter| {
                    let name = self.voters[voter].name.clone();
                    let committed = !self.subtransactions.is_empty()
                        && self
                            .subtransactions
                            .iter()
                            .all(|sub| sub.ballots[voter].result == VoteResult::Committed);
                    (name, committed)
                })
                .collect(),
        }
    }
}

/// How a transaction ended, for the finalizer. The first voter is the primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElectionOutcome {
    pub subtransactions: usize,
    /// Whether the primary voted in the first subtransaction.
    pub primary_voted_first: bool,
    /// Every voter, primary first, and whether it committed every subtransaction.
    pub committed: Vec<(String, bool)>,
}

impl ElectionOutcome {
    pub fn committed(&self, name: &str) -> bool {
        self.committed.iter().any(|(n, c)| n == name && *c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Vote = [1; 20];
    const B: Vote = [2; 20];

    fn election(secondaries: usize) -> Election {
        let names: Vec<String> = (1..=secondaries).map(|i| format!("s{i}")).collect();
        let (voters, threshold) = voters_for("p", &names);
        Election::new(voters, threshold).unwrap()
    }

    #[test]
    fn weights_and_thresholds_follow_the_secondaries() {
        for (s, threshold) in [(0, 1), (1, 2), (2, 4), (3, 6), (4, 7)] {
            let names: Vec<String> = (0..s).map(|i| format!("s{i}")).collect();
            let (voters, got) = voters_for("p", &names);
            assert_eq!(got, threshold, "S = {s}");
            assert_eq!(voters[0].votes, s as u32 + 1);
            assert!(Election::new(voters, got).is_ok(), "S = {s} is valid");
        }
        let voters = vec![
            Voter {
                name: "a".into(),
                votes: 1,
            },
            Voter {
                name: "b".into(),
                votes: 1,
            },
        ];
        assert!(
            Election::new(voters.clone(), 1).is_err(),
            "half is not a majority"
        );
        assert!(Election::new(voters, 3).is_err(), "more than all votes");
        assert!(Election::new(Vec::new(), 1).is_err());
    }

    #[test]
    fn the_primary_alone_decides_with_one_secondary() {
        let mut e = election(1);
        let sub = e.vote(0, A).unwrap();
        assert_eq!(
            e.result(sub, 0),
            VoteResult::Committed,
            "S+1 = 2 votes: its own"
        );
        e.vote(1, A).unwrap();
        assert_eq!(e.result(sub, 1), VoteResult::Committed);

        let mut e = election(1);
        let sub = e.vote(1, A).unwrap();
        assert_eq!(
            e.result(sub, 1),
            VoteResult::Undecided,
            "the primary is needed"
        );
        e.vote(0, B).unwrap();
        assert_eq!(e.result(sub, 0), VoteResult::Committed);
        assert_eq!(e.result(sub, 1), VoteResult::Failed);
    }

    #[test]
    fn a_dissenting_secondary_fails_and_the_rest_commit() {
        let mut e = election(2); // threshold 4: primary (3) + one secondary
        let sub = e.vote(0, A).unwrap();
        e.vote(1, B).unwrap();
        assert_eq!(e.result(sub, 0), VoteResult::Undecided);
        e.vote(2, A).unwrap();
        assert_eq!(e.result(sub, 0), VoteResult::Committed);
        assert_eq!(e.result(sub, 1), VoteResult::Failed);
        assert_eq!(e.result(sub, 2), VoteResult::Committed);
        let outcome = e.outcome();
        assert!(outcome.committed("p") && outcome.committed("s2") && !outcome.committed("s1"));
    }

    #[test]
    fn a_dissenting_primary_fails_everyone() {
        let mut e = election(2);
        let sub = e.vote(1, B).unwrap();
        e.vote(2, B).unwrap();
        assert_eq!(
            e.result(sub, 1),
            VoteResult::Undecided,
            "the primary is needed"
        );
        e.vote(0, A).unwrap();
        for voter in 0..3 {
            assert_eq!(e.result(sub, voter), VoteResult::Failed);
        }
    }

    #[test]
    fn late_voters_are_judged_by_the_decided_vote() {
        let mut e = election(3); // threshold 6: primary (4) + 2
        let sub = e.vote(0, A).unwrap();
        e.vote(1, A).unwrap();
        e.vote(2, A).unwrap();
        assert_eq!(e.result(sub, 0), VoteResult::Committed);
        assert_eq!(e.vote(3, B).unwrap(), sub);
        assert_eq!(e.result(sub, 3), VoteResult::Failed);
    }

    #[test]
    fn cancelling_a_needed_voter_fails_those_waiting() {
        let mut e = election(2);
        let sub = e.vote(1, A).unwrap();
        e.cancel(0); // the primary's call failed
        assert_eq!(e.result(sub, 1), VoteResult::Failed);
        assert_eq!(e.result(sub, 0), VoteResult::Canceled);
        // A secondary voting later fails too, in the same subtransaction.
        assert_eq!(e.vote(2, A).unwrap(), sub);
        assert_eq!(e.result(sub, 2), VoteResult::Failed);
    }

    #[test]
    fn cancelling_a_secondary_lets_the_others_decide() {
        let mut e = election(2);
        let sub = e.vote(0, A).unwrap();
        e.vote(1, A).unwrap();
        // Decided already: primary 3 + s1 1 = 4.
        assert_eq!(e.result(sub, 0), VoteResult::Committed);
        let mut e = election(3); // threshold 6
        let sub = e.vote(0, A).unwrap();
        e.vote(1, A).unwrap();
        e.cancel(2);
        assert_eq!(e.result(sub, 0), VoteResult::Undecided, "s3 may still vote");
        e.cancel(3);
        assert_eq!(
            e.result(sub, 0),
            VoteResult::Failed,
            "5 of 6 is all that is left"
        );
        assert_eq!(e.result(sub, 2), VoteResult::Canceled);
    }

    #[test]
    fn votes_after_committing_open_the_next_subtransaction() {
        let mut e = election(2);
        let first = e.vote(0, A).unwrap();
        e.vote(1, A).unwrap();
        let second = e.vote(0, B).unwrap();
        assert_eq!(second, first + 1);
        assert_eq!(e.result(second, 0), VoteResult::Undecided);
        assert_eq!(e.vote(1, B).unwrap(), second);
        assert_eq!(e.result(second, 1), VoteResult::Committed);
        // s2 never voted: it committed nothing, though late votes would still be judged.
        let outcome = e.outcome();
        assert_eq!(outcome.subtransactions, 2);
        assert!(outcome.primary_voted_first && outcome.committed("s1"));
        assert!(!outcome.committed("s2"));
    }

    #[test]
    fn a_failed_voter_stays_failed_and_a_cancelled_one_cancelled() {
        let mut e = election(2);
        let sub = e.vote(0, A).unwrap();
        e.vote(1, B).unwrap();
        e.vote(2, A).unwrap();
        assert_eq!(e.result(sub, 1), VoteResult::Failed);
        e.cancel(2);
        assert_eq!(
            e.result(sub, 2),
            VoteResult::Committed,
            "decided results stay"
        );
        let next = e.vote(0, A).unwrap();
        assert_eq!(e.result(next, 1), VoteResult::Failed);
        assert_eq!(e.result(next, 2), VoteResult::Canceled);
        // s1 votes again: it learns it failed, in the subtransaction where it did.
        assert_eq!(e.vote(1, A).unwrap(), sub);
        assert_eq!(e.result(sub, 1), VoteResult::Failed);
        assert!(
            !e.outcome().committed("p"),
            "p cannot reach 4 without a secondary"
        );
    }

    #[test]
    fn stopping_answers_everyone_stop() {
        let mut e = election(2);
        let sub = e.vote(0, A).unwrap();
        e.stop();
        assert_eq!(e.result(sub, 0), VoteResult::Stopped);
        let sub = e.vote(1, A).unwrap();
        assert_eq!(e.result(sub, 1), VoteResult::Stopped);
        e.stop(); // twice is fine
        assert!(e.is_stopped());
    }

    #[test]
    fn voting_twice_while_waiting_is_refused() {
        let mut e = election(2);
        e.vote(0, A).unwrap();
        assert_eq!(
            e.vote(0, A),
            Err(BallotError::AlreadyVoted("p".to_string()))
        );
        assert!(e.voter_index("nobody").is_err());
    }

    #[test]
    fn no_vote_means_no_subtransaction() {
        let e = election(2);
        let outcome = e.outcome();
        assert_eq!(outcome.subtransactions, 0);
        assert!(!outcome.primary_voted_first);
        assert!(!outcome.committed("p"));
    }
}
