//! Periodic background work that ends when the router stops.
//!
//! Every background worker of `serve` does the same thing: some work, a wait, the work again,
//! until the stop token is cancelled. This module is that loop, written once, so that each
//! worker only says what it does and how often.
//!
//! The period is counted from the end of the previous run (a sleep, not a fixed-rate
//! interval): a slow run, such as one waiting out a database timeout, delays the next one
//! instead of being followed by a burst of catch-up runs. When the period has elapsed and the
//! token is cancelled at the same time, cancellation wins: a stopping router does not start
//! another run.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// When a [`Ticker`]'s first run is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstRun {
    /// At once (workers whose state matters from the start, such as node health).
    Immediately,
    /// After one period (housekeeping that has nothing to do right after a start).
    AfterPeriod,
}

/// Says when the next run of a periodic worker is due, or that the worker should stop.
pub struct Ticker {
    period: Duration,
    stop: CancellationToken,
    /// Whether the next tick is the first one and due at once.
    due_now: bool,
}

impl Ticker {
    pub fn new(period: Duration, stop: CancellationToken, first: FirstRun) -> Self {
        Ticker {
            period,
            stop,
            due_now: first == FirstRun::Immediately,
        }
    }

    /// Waits until the next run is due: true then, false once the token is cancelled.
    pub async fn tick(&mut self) -> bool {
        self.tick_or(std::future::pending::<()>()).await
    }

    /// [`Ticker::tick`], except that the run is also due as soon as `wake` completes: for a
    /// worker that must react to an event (a database writer found again) without waiting
    /// out its period.
    pub async fn tick_or(&mut self, wake: impl Future) -> bool {
        if self.stop.is_cancelled() {
            return false;
        }
        if std::mem::take(&mut self.due_now) {
            return true;
        }
        tokio::select! {
            biased;
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(self.period) => true,
            _ = wake => true,
        }
    }
}

/// Runs `work` every `period` (from the end of one run to the start of the next) until `stop`
/// is cancelled. A run that has started is never cut: the worker stops at its next wait.
pub async fn run_every<F, Fut>(
    period: Duration,
    stop: &CancellationToken,
    first: FirstRun,
    mut work: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut ticker = Ticker::new(period, stop.clone(), first);
    while ticker.tick().await {
        work().await;
    }
}

/// Sleeps for `duration` unless `stop` is cancelled first; whether the whole sleep passed
/// (false: the caller should stop). For the waits that are not periodic, such as a back-off.
pub async fn sleep_unless_cancelled(duration: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        biased;
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(duration) => true,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use tokio::time::Instant;

    use super::*;

    const PERIOD: Duration = Duration::from_secs(30);

    /// Spawns `run_every` counting its runs; (runs, task).
    fn counting(
        first: FirstRun,
        stop: &CancellationToken,
    ) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
        let runs = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let runs = runs.clone();
            let stop = stop.clone();
            async move {
                run_every(PERIOD, &stop, first, || async {
                    runs.fetch_add(1, Ordering::SeqCst);
                })
                .await
            }
        });
        (runs, task)
    }

    /// Lets the spawned task run until it waits on the (paused) clock.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn immediate_runs_at_once_then_every_period() {
        let stop = CancellationToken::new();
        let (runs, _task) = counting(FirstRun::Immediately, &stop);
        settle().await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        tokio::time::sleep(PERIOD - Duration::from_millis(1)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1, "not before the period");
        tokio::time::sleep(Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        tokio::time::sleep(PERIOD).await;
        settle().await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn after_period_waits_for_the_first_run() {
        let stop = CancellationToken::new();
        let (runs, _task) = counting(FirstRun::AfterPeriod, &stop);
        settle().await;
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        tokio::time::sleep(PERIOD - Duration::from_millis(1)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        tokio::time::sleep(Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_period_counts_from_the_end_of_a_run() {
        let stop = CancellationToken::new();
        let starts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let _task = tokio::spawn({
            let (stop, starts) = (stop.clone(), starts.clone());
            async move {
                run_every(PERIOD, &stop, FirstRun::Immediately, || async {
                    starts.lock().unwrap().push(Instant::now());
                    tokio::time::sleep(Duration::from_secs(10)).await;
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_secs(100)).await;
        let starts = starts.lock().unwrap().clone();
        assert!(starts.len() >= 2);
        for pair in starts.windows(2) {
            assert_eq!(pair[1] - pair[0], Duration::from_secs(40));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_stops_a_waiting_worker_at_once() {
        let stop = CancellationToken::new();
        let (runs, task) = counting(FirstRun::Immediately, &stop);
        settle().await;
        let cancelled_at = Instant::now();
        stop.cancel();
        task.await.unwrap();
        // No time passed on the paused clock: the worker did not wait out its period.
        assert_eq!(Instant::now(), cancelled_at);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_token_means_no_run_at_all() {
        let stop = CancellationToken::new();
        stop.cancel();
        let (runs, task) = counting(FirstRun::Immediately, &stop);
        task.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_in_progress_finishes_before_the_worker_stops() {
        let stop = CancellationToken::new();
        let finished = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let (stop, finished) = (stop.clone(), finished.clone());
            async move {
                run_every(PERIOD, &stop, FirstRun::Immediately, || async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    finished.fetch_add(1, Ordering::SeqCst);
                })
                .await
            }
        });
        settle().await;
        stop.cancel();
        task.await.unwrap();
        assert_eq!(finished.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn wake_makes_the_next_run_due_early() {
        let stop = CancellationToken::new();
        let mut ticker = Ticker::new(PERIOD, stop.clone(), FirstRun::AfterPeriod);
        let started = Instant::now();
        let woken = ticker
            .tick_or(tokio::time::sleep(Duration::from_secs(1)))
            .await;
        assert!(woken);
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        stop.cancel();
        assert!(!ticker.tick_or(std::future::ready(())).await);
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_unless_cancelled_reports_which_came_first() {
        let stop = CancellationToken::new();
        assert!(sleep_unless_cancelled(Duration::from_secs(1), &stop).await);
        let sleeping = tokio::spawn({
            let stop = stop.clone();
            async move { sleep_unless_cancelled(Duration::from_secs(3600), &stop).await }
        });
        settle().await;
        stop.cancel();
        assert!(!sleeping.await.unwrap());
    }
}
