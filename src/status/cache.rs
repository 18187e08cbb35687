//! A value kept for a while: many page views within its lifetime cost one collection.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One cached value and when it was made. Refreshing holds the lock, so viewers arriving
/// during a collection wait for it instead of starting their own.
pub struct Cached<T> {
    slot: tokio::sync::Mutex<Option<(Instant, T)>>,
}

impl<T: Clone> Default for Cached<T> {
    fn default() -> Self {
        Cached {
            slot: tokio::sync::Mutex::new(None),
        }
    }
}

impl<T: Clone> Cached<T> {
    /// The value and its age: the kept one if younger than `ttl`, else a fresh one from
    /// `refresh`.
    pub async fn get<F, Fut>(&self, ttl: Duration, refresh: F) -> (T, Duration)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        self.get_by(|_| ttl, refresh).await
    }

    /// [`Cached::get`] with a lifetime that depends on the value (a failure may be kept
    /// longer than a success, so that a statement that times out is not retried at once).
    pub async fn get_by<F, Fut>(&self, ttl: impl Fn(&T) -> Duration, refresh: F) -> (T, Duration)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let mut slot = self.slot.lock().await;
        if let Some((at, value)) = slot.as_ref() {
            if at.elapsed() < ttl(value) {
                return (value.clone(), at.elapsed());
            }
        }
        let value = refresh().await;
        *slot = Some((Instant::now(), value.clone()));
        (value, Duration::ZERO)
    }
}

/// A value refreshed in the background: once there is one, a viewer never waits for the next
/// (it gets the kept value and its age, and an expired value starts one refresh in a task of
/// its own). Only the first value is waited for, by one viewer for all. For what takes longer
/// than a page view should: the repository counts at a million repositories.
///
/// A value is kept at least [`COST_FACTOR`] times as long as it took to make, so that a page
/// left open (it reloads itself) keeps the database busy with this a tenth of the time at
/// most, however slow it is.
pub struct Refreshed<T> {
    /// The value, when it was made and how long that took.
    slot: std::sync::Mutex<Option<(Instant, Duration, T)>>,
    refreshing: AtomicBool,
    first: tokio::sync::Mutex<()>,
}

impl<T> Default for Refreshed<T> {
    fn default() -> Self {
        Refreshed {
            slot: std::sync::Mutex::new(None),
            refreshing: AtomicBool::new(false),
            first: tokio::sync::Mutex::new(()),
        }
    }
}

/// Clears the refreshing flag when the refresh ends, however it ends.
struct RefreshDone<T>(Arc<Refreshed<T>>);

impl<T> Drop for RefreshDone<T> {
    fn drop(&mut self) {
        self.0.refreshing.store(false, Ordering::Release);
    }
}

/// See [`Refreshed`].
pub const COST_FACTOR: u32 = 10;

impl<T: Clone + Send + 'static> Refreshed<T> {
    fn kept(&self) -> Option<(Instant, Duration, T)> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn keep(&self, started: Instant, value: T) {
        let took = started.elapsed();
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), took, value));
    }

    /// The kept value and its age; when it is older than `ttl(value)`, a refresh starts in
    /// the background (one at a time). Without a value yet, the first one is made here.
    pub async fn get<F, Fut>(
        self: &Arc<Self>,
        ttl: impl Fn(&T) -> Duration,
        refresh: F,
    ) -> (T, Duration)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        if let Some((at, took, value)) = self.kept() {
            let lifetime = ttl(&value).max(took.saturating_mul(COST_FACTOR));
            if at.elapsed() >= lifetime && !self.refreshing.swap(true, Ordering::AcqRel) {
                let done = RefreshDone(Arc::clone(self));
                let next = refresh();
                tokio::spawn(async move {
                    let started = Instant::now();
                    let value = next.await;
                    done.0.keep(started, value);
                });
            }
            return (value, at.elapsed());
        }
        let _first = self.first.lock().await;
        if let Some((at, _, value)) = self.kept() {
            return (value, at.elapsed());
        }
        let started = Instant::now();
        let value = refresh().await;
        self.keep(started, value.clone());
        (value, Duration::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refreshes_only_when_expired() {
        let cached = Cached::<u32>::default();
        let (first, age) = cached.get(Duration::from_secs(60), || async { 1 }).await;
        assert_eq!((first, age), (1, Duration::ZERO));
        let (kept, _) = cached.get(Duration::from_secs(60), || async { 2 }).await;
        assert_eq!(kept, 1);
        let (fresh, _) = cached.get(Duration::ZERO, || async { 3 }).await;
        assert_eq!(fresh, 3);
        let by_value = |v: &u32| Duration::from_secs(u64::from(*v == 3) * 60);
        let (kept, _) = cached.get_by(by_value, || async { 4 }).await;
        assert_eq!(kept, 3, "3 is kept a minute");
    }

    #[tokio::test]
    async fn a_kept_value_is_served_while_the_next_is_made() {
        let refreshed = Arc::new(Refreshed::<u32>::default());
        let (first, age) = refreshed.get(|_| Duration::ZERO, || async { 1 }).await;
        assert_eq!(
            (first, age),
            (1, Duration::ZERO),
            "the first value is waited for"
        );
        // Past ten times what the first value took (microseconds).
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Expired: the kept value comes back at once, the slow refresh runs behind it.
        let (gate_tx, gate) = tokio::sync::oneshot::channel::<()>();
        let (kept, _) = refreshed
            .get(
                |_| Duration::ZERO,
                || async move {
                    let _ = gate.await;
                    2
                },
            )
            .await;
        assert_eq!(kept, 1);
        // Only one refresh at a time: this one is not started.
        let (kept, _) = refreshed.get(|_| Duration::ZERO, || async { 3 }).await;
        assert_eq!(kept, 1);
        gate_tx.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (value, _) = refreshed
                .get(|_| Duration::from_secs(60), || async { 4 })
                .await;
            if value == 2 {
                break;
            }
            assert!(Instant::now() < deadline, "the refresh never landed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_slow_value_is_kept_ten_times_as_long_as_it_took() {
        let refreshed = Arc::new(Refreshed::<u32>::default());
        let slow = || async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            1
        };
        refreshed.get(|_| Duration::ZERO, slow).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Expired by its ttl (zero), not by its cost (about a second): no refresh starts.
        refreshed.get(|_| Duration::ZERO, || async { 2 }).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (kept, age) = refreshed
            .get(|_| Duration::from_secs(60), || async { 3 })
            .await;
        assert_eq!(kept, 1);
        assert!(age >= Duration::from_millis(200), "{age:?}");
    }
}
