//! A value kept for a while: many page views within its lifetime cost one collection.

use std::future::Future;
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
}
