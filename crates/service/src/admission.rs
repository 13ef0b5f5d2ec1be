//! Bounded admission with draining, the one primitive the router and the worker decide with
//! whether a request may start: a request holds a [`Permit`] for its whole life; when the
//! capacity is used up the next one is refused at once (RESOURCE_EXHAUSTED, never a queue that
//! grows without bound); after shutdown begins every new request is refused ([`Refusal::Draining`])
//! and [`Admission::drain`] waits, up to a deadline, for the permits in use to come back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("at capacity ({capacity} requests in flight)")]
    Full { capacity: usize },
    #[error("draining")]
    Draining,
}

/// A request's place in the service; dropping it gives the place back.
#[derive(Debug)]
pub struct Permit(#[allow(dead_code)] OwnedSemaphorePermit);

/// At most `capacity` requests in flight, and none new once draining.
#[derive(Debug)]
pub struct Admission {
    slots: Arc<Semaphore>,
    capacity: usize,
    draining: AtomicBool,
}

impl Admission {
    pub fn new(capacity: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            draining: AtomicBool::new(false),
        }
    }

    /// A permit now, or why not (never waits).
    pub fn try_admit(&self) -> Result<Permit, Refusal> {
        if self.is_draining() {
            return Err(Refusal::Draining);
        }
        self.slots
            .clone()
            .try_acquire_owned()
            .map(Permit)
            .map_err(|_| Refusal::Full {
                capacity: self.capacity,
            })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Permits held now.
    pub fn in_flight(&self) -> usize {
        self.capacity - self.slots.available_permits()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Refuses every new request from now on.
    pub fn stop_admitting(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Stops admitting, then waits until every permit is back or `deadline` has passed.
    /// Returns whether everything in flight finished.
    pub async fn drain(&self, deadline: Duration) -> bool {
        self.stop_admitting();
        let all = u32::try_from(self.capacity).unwrap_or(u32::MAX);
        tokio::time::timeout(deadline, self.slots.acquire_many(all))
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admits_up_to_capacity_refuses_when_full_or_draining_and_drains() {
        let a = Arc::new(Admission::new(2));
        let p1 = a.try_admit().unwrap();
        let p2 = a.try_admit().unwrap();
        assert_eq!(a.in_flight(), 2);
        assert_eq!(a.try_admit().unwrap_err(), Refusal::Full { capacity: 2 });
        drop(p1);
        assert_eq!(a.in_flight(), 1);

        let drainer = {
            let a = a.clone();
            tokio::spawn(async move { a.drain(Duration::from_secs(10)).await })
        };
        tokio::task::yield_now().await;
        assert!(a.is_draining());
        assert_eq!(a.try_admit().unwrap_err(), Refusal::Draining);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!drainer.is_finished(), "a permit is still held");
        drop(p2);
        assert!(
            drainer.await.unwrap(),
            "drained once the last permit came back"
        );
    }

    #[tokio::test]
    async fn drain_gives_up_at_the_deadline() {
        let a = Admission::new(1);
        let _held = a.try_admit().unwrap();
        assert!(!a.drain(Duration::from_millis(20)).await);
    }
}
