//! The one endpoint balancer of the backends with several endpoints (HTTP and gRPC), consulted
//! at the bottom of a route's stack for every call: round robin over the endpoints that are not
//! ejected. An endpoint is ejected for a while after a failed connect, or after enough failed
//! calls in a row; when every endpoint is ejected, all of them are tried in turn, so that a
//! recovered backend is found again without waiting.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

struct Slot {
    /// Milliseconds since `Balancer::epoch` until which the endpoint is skipped.
    ejected_until: AtomicU64,
    /// Calls that failed in a row.
    failures: AtomicU32,
}

pub struct Balancer {
    slots: Vec<Slot>,
    next: AtomicUsize,
    epoch: Instant,
    eject_for: Duration,
    eject_after: u32,
}

impl Balancer {
    /// A balancer over `n` endpoints that skips one for `eject_for` once it failed
    /// `eject_after` calls in a row (at least one).
    pub fn new(n: usize, eject_for: Duration, eject_after: u32) -> Self {
        Balancer {
            slots: (0..n)
                .map(|_| Slot {
                    ejected_until: AtomicU64::new(0),
                    failures: AtomicU32::new(0),
                })
                .collect(),
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            eject_for,
            eject_after: eject_after.max(1),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The endpoint for the next call.
    pub fn pick(&self) -> usize {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        if n <= 1 {
            return 0;
        }
        let now = self.now_ms();
        (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| self.slots[i].ejected_until.load(Ordering::Relaxed) <= now)
            .unwrap_or(start % n)
    }

    /// Skips endpoint `i` for `eject_for` (its connect failed: no call can get through).
    pub fn eject(&self, i: usize) {
        let until = self.now_ms() + self.eject_for.as_millis() as u64;
        if let Some(s) = self.slots.get(i) {
            s.ejected_until.store(until, Ordering::Relaxed);
            s.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Records a call's outcome on endpoint `i`. Enough failures in a row eject it, but only
    /// when another endpoint is left to take its traffic; says whether it was ejected now.
    pub fn record(&self, i: usize, ok: bool) -> bool {
        let Some(s) = self.slots.get(i) else {
            return false;
        };
        if ok {
            s.failures.store(0, Ordering::Relaxed);
            return false;
        }
        if s.failures.fetch_add(1, Ordering::Relaxed) + 1 >= self.eject_after
            && self.slots.len() > 1
        {
            self.eject(i);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_ejected_endpoints_until_all_are() {
        let b = Balancer::new(3, Duration::from_secs(60), 2);
        assert!(!b.record(1, false));
        assert!(b.record(1, false), "the second failure in a row ejects");
        let picks: Vec<_> = (0..6).map(|_| b.pick()).collect();
        assert!(!picks.contains(&1), "{picks:?}");
        assert!(picks.contains(&0) && picks.contains(&2), "{picks:?}");
        b.eject(0);
        b.eject(2);
        // All ejected: every endpoint is tried in turn.
        let picks: std::collections::BTreeSet<_> = (0..6).map(|_| b.pick()).collect();
        assert_eq!(picks.len(), 3);
        // A success clears the count; one endpoint is never ejected by failures.
        let one = Balancer::new(1, Duration::from_secs(60), 1);
        assert!(!one.record(0, false));
        assert_eq!(one.pick(), 0);
    }
}
