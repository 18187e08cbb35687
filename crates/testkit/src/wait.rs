//! Waiting for a condition, instead of sleeping for a time that "should be enough": on a
//! loaded two-core CI machine a guessed sleep is either too short (a flaky failure) or far too
//! long (a slow suite). Tests wait on what they really need: rows in PostgreSQL, a router's
//! metrics or log, a process answering.

use std::fmt::Debug;
use std::time::{Duration, Instant};

/// How often a condition is polled. Short, because the conditions polled are cheap (a query,
/// a scrape, an RPC) and because some tests must catch a state that lasts only a moment
/// (a record the reconciler puts back within a fraction of a second).
const POLL: Duration = Duration::from_millis(20);

/// What a check answers: ready (with a value), or not yet (with what it saw instead, for the
/// failure message).
pub trait Ready {
    type Value;
    fn ready(self) -> Result<Self::Value, Option<String>>;
}

impl Ready for bool {
    type Value = ();
    fn ready(self) -> Result<(), Option<String>> {
        if self {
            Ok(())
        } else {
            Err(None)
        }
    }
}

impl<T> Ready for Option<T> {
    type Value = T;
    fn ready(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

/// An `Err` is "not yet"; the last one is shown if the wait times out.
impl<T, E: Debug> Ready for Result<T, E> {
    type Value = T;
    fn ready(self) -> Result<T, Option<String>> {
        self.map_err(|err| Some(format!("{err:?}")))
    }
}

fn timed_out(timeout: Duration, what: &str, last: Option<String>) -> ! {
    match last {
        Some(last) => panic!("timed out after {timeout:?} waiting until {what}; last: {last}"),
        None => panic!("timed out after {timeout:?} waiting until {what}"),
    }
}

/// Polls `check` until it is ready (`true`, `Some`, `Ok`) and returns its value; panics
/// after `timeout`, naming `what` (phrased to follow "waiting until") and, for a `Result`,
/// the last error. The check runs at least once, even with a zero timeout.
pub async fn wait_until<R: Ready>(
    timeout: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> R,
) -> R::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await.ready() {
            Ok(value) => return value,
            Err(last) => last,
        };
        if Instant::now() >= deadline {
            timed_out(timeout, what, last);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// [`wait_until`] for the harness's synchronous code (process start-up, run on a plain
/// thread): the same rules, blocking the thread between polls.
pub fn wait_until_blocking<R: Ready>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> R,
) -> R::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().ready() {
            Ok(value) => return value,
            Err(last) => last,
        };
        if Instant::now() >= deadline {
            timed_out(timeout, what, last);
        }
        std::thread::sleep(POLL);
    }
}
