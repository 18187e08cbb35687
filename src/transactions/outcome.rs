//! What a transactional write comes to once every node answered: whether anything changed at
//! all, and which secondaries applied it together with the primary. The rules are Praefect's:
//!
//! - no subtransaction and a failing primary, or one subtransaction the primary never voted
//!   in: nothing changed, nothing is recorded;
//! - otherwise the primary is "dirty" and gets the new generation; a secondary does too only
//!   if it committed every subtransaction and answered exactly what the primary answered (the
//!   same gRPC code and message); every other storage gets a replication job, counted by
//!   reason in `gitaly_praefect_tx_replications_total`.

use super::ballot::ElectionOutcome;
use super::metrics::TX_REPLICATIONS;

/// How a node's call ended: its gRPC code (0 is OK) and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallStatus {
    pub code: i32,
    pub message: String,
}

impl CallStatus {
    pub fn ok() -> Self {
        CallStatus {
            code: 0,
            message: String::new(),
        }
    }

    pub fn is_ok(&self) -> bool {
        self.code == 0
    }
}

/// Why a storage was left outdated by a write (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A replication target: it was not part of the write.
    Outdated,
    /// Nobody voted, so nothing says the secondaries did what the primary did.
    NoVotes,
    PrimaryNotCommitted,
    NodeNotCommitted,
    /// It committed, but its call ended differently from the primary's.
    NodeErrorStatus,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Outdated => "outdated",
            Reason::NoVotes => "no-votes",
            Reason::PrimaryNotCommitted => "primary-not-committed",
            Reason::NodeNotCommitted => "node-not-committed",
            Reason::NodeErrorStatus => "node-error-status",
        }
    }
}

/// What to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The write changed nothing anywhere: no generation, no job.
    NothingChanged,
    /// The primary changed; these secondaries applied the same, the others did not.
    Changed {
        updated_secondaries: Vec<String>,
        outdated: Vec<(String, Reason)>,
    },
}

/// Decides from the transaction's end state and every node's answer. `secondaries` are the
/// storages that took part besides the primary, with how their calls ended.
pub fn decide(
    election: &ElectionOutcome,
    primary: &str,
    primary_status: &CallStatus,
    secondaries: &[(String, CallStatus)],
    replication_targets: &[String],
) -> Decision {
    let nothing_voted = election.subtransactions == 0;
    if (nothing_voted && !primary_status.is_ok())
        || (election.subtransactions == 1 && !election.primary_voted_first)
    {
        return Decision::NothingChanged;
    }
    let mut updated_secondaries = Vec::new();
    let mut outdated: Vec<(String, Reason)> = replication_targets
        .iter()
        .map(|target| (target.clone(), Reason::Outdated))
        .collect();
    let primary_committed = election.committed(primary);
    for (secondary, status) in secondaries {
        let reason = if nothing_voted {
            Some(Reason::NoVotes)
        } else if !primary_committed {
            Some(Reason::PrimaryNotCommitted)
        } else if !election.committed(secondary) {
            Some(Reason::NodeNotCommitted)
        } else if status != primary_status {
            Some(Reason::NodeErrorStatus)
        } else {
            None
        };
        match reason {
            Some(reason) => outdated.push((secondary.clone(), reason)),
            None => updated_secondaries.push(secondary.clone()),
        }
    }
    Decision::Changed {
        updated_secondaries,
        outdated,
    }
}

/// Counts the replications a decision causes, by reason.
pub fn count_replications(decision: &Decision) {
    if let Decision::Changed { outdated, .. } = decision {
        for (_, reason) in outdated {
            TX_REPLICATIONS.with_label_values(&[reason.label()]).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn election(
        subtransactions: usize,
        primary_voted: bool,
        committed: &[&str],
    ) -> ElectionOutcome {
        ElectionOutcome {
            subtransactions,
            primary_voted_first: primary_voted,
            committed: ["p", "s1", "s2"]
                .iter()
                .map(|n| (n.to_string(), committed.contains(n)))
                .collect(),
        }
    }

    fn failed(message: &str) -> CallStatus {
        CallStatus {
            code: 13,
            message: message.into(),
        }
    }

    fn secondaries(statuses: [CallStatus; 2]) -> Vec<(String, CallStatus)> {
        let [a, b] = statuses;
        vec![("s1".into(), a), ("s2".into(), b)]
    }

    fn changed(updated: &[&str], outdated: &[(&str, Reason)]) -> Decision {
        Decision::Changed {
            updated_secondaries: updated.iter().map(|s| s.to_string()).collect(),
            outdated: outdated.iter().map(|(s, r)| (s.to_string(), *r)).collect(),
        }
    }

    #[test]
    fn the_spec_rules() {
        let ok = CallStatus::ok;
        let targets = ["t".to_string()];
        #[rustfmt::skip]
        let cases: Vec<(ElectionOutcome, CallStatus, [CallStatus; 2], Decision)> = vec![
            // A failure before any vote changed nothing.
            (election(0, false, &[]), failed("x"), [ok(), ok()], Decision::NothingChanged),
            // One subtransaction without the primary: it never got as far as voting.
            (election(1, false, &[]), ok(), [ok(), ok()], Decision::NothingChanged),
            // Nobody voted but the call succeeded: the secondaries cannot be trusted.
            (election(0, false, &[]), ok(), [ok(), ok()],
             changed(&[], &[("t", Reason::Outdated), ("s1", Reason::NoVotes), ("s2", Reason::NoVotes)])),
            // Everyone committed and answered alike.
            (election(2, true, &["p", "s1", "s2"]), ok(), [ok(), ok()],
             changed(&["s1", "s2"], &[("t", Reason::Outdated)])),
            // A dissenting secondary.
            (election(2, true, &["p", "s2"]), ok(), [failed("aborted"), ok()],
             changed(&["s2"], &[("t", Reason::Outdated), ("s1", Reason::NodeNotCommitted)])),
            // Committed but failed differently afterwards.
            (election(2, true, &["p", "s1", "s2"]), ok(), [failed("late"), ok()],
             changed(&["s2"], &[("t", Reason::Outdated), ("s1", Reason::NodeErrorStatus)])),
            // The same failure everywhere after committing: all alike.
            (election(2, true, &["p", "s1", "s2"]), failed("x"), [failed("x"), failed("x")],
             changed(&["s1", "s2"], &[("t", Reason::Outdated)])),
            // The primary did not commit: nobody is trusted.
            (election(1, true, &["s1", "s2"]), failed("x"), [ok(), ok()],
             changed(&[], &[("t", Reason::Outdated), ("s1", Reason::PrimaryNotCommitted), ("s2", Reason::PrimaryNotCommitted)])),
        ];
        for (i, (election, primary, statuses, want)) in cases.into_iter().enumerate() {
            let got = decide(&election, "p", &primary, &secondaries(statuses), &targets);
            assert_eq!(got, want, "case {i}");
        }
    }
}
