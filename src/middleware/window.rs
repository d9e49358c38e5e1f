//! Counts over a sliding window of whole seconds, kept in atomics: what the retry budget and
//! the circuit breaker's `rate` mode count on every request, without a lock (tower's
//! `TpsBudget` takes a mutex on every deposit, which every request of a backend pays).
//!
//! Each slot holds one second's count with the second it belongs to, packed in one `u64`
//! (the second since the window was made in the high 32 bits, the count in the low 32), so a
//! slot moves to a new second and counts in one compare-and-swap. Counts are exact while no
//! second's count passes `u32::MAX`; beyond that they saturate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

// Tokio's clock, so that tests with paused time slide the window as the layers see time.
use tokio::time::Instant;

const COUNT: u64 = u32::MAX as u64;

pub struct Window {
    slots: Box<[AtomicU64]>,
    start: Instant,
}

impl Window {
    /// A window of `span`, rounded up to whole seconds (at least one).
    pub fn new(span: Duration) -> Self {
        let secs = span.as_secs() + u64::from(span.subsec_nanos() > 0);
        Window {
            slots: (0..secs.max(1)).map(|_| AtomicU64::new(0)).collect(),
            start: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        // Seconds since the window was made: 136 years fit in 32 bits.
        self.start.elapsed().as_secs() & COUNT
    }

    /// Counts `n` in the current second.
    pub fn add(&self, n: u32) {
        let now = self.now();
        let slot = &self.slots[(now % self.slots.len() as u64) as usize];
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let next = if cur >> 32 == now {
                (now << 32) | ((cur & COUNT) + u64::from(n)).min(COUNT)
            } else {
                (now << 32) | u64::from(n)
            };
            match slot.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(seen) => cur = seen,
            }
        }
    }

    /// The count of the seconds within the window, the current one included.
    pub fn sum(&self) -> u64 {
        let now = self.now();
        let span = self.slots.len() as u64;
        self.slots
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|v| now.wrapping_sub(v >> 32) & COUNT < span)
            .map(|v| v & COUNT)
            .sum()
    }

    /// Forgets every count.
    pub fn clear(&self) {
        for s in self.slots.iter() {
            s.store(0, Ordering::Relaxed);
        }
    }

    /// The window's length in whole seconds.
    pub fn secs(&self) -> u64 {
        self.slots.len() as u64
    }
}

/// The retry budget of a backend, shared by its routes: over the last `ttl`, retries may be
/// at most `ratio` of the requests plus `min_per_second` per second of the window, so a
/// failing backend never sees a retry storm. Lock-free ([`Window`]); two workers withdrawing
/// the last token at the same moment may both have it.
pub struct RetryBudget {
    deposits: Window,
    withdrawals: Window,
    ratio: f64,
    reserve: u64,
}

impl RetryBudget {
    pub fn new(ttl: Duration, min_per_second: u32, ratio: f32) -> Self {
        let deposits = Window::new(ttl);
        let reserve = u64::from(min_per_second) * deposits.secs();
        RetryBudget {
            withdrawals: Window::new(ttl),
            deposits,
            ratio: f64::from(ratio.clamp(0.0, 1000.0)),
            reserve,
        }
    }

    /// A request was made.
    pub fn deposit(&self) {
        self.deposits.add(1);
    }

    /// Takes a retry from the budget, if there is one.
    pub fn withdraw(&self) -> bool {
        let allowed = self.reserve as f64 + self.deposits.sum() as f64 * self.ratio;
        if (self.withdrawals.sum() as f64) + 1.0 <= allowed {
            self.withdrawals.add(1);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_counts_its_seconds_and_forgets() {
        let w = Window::new(Duration::from_millis(2500));
        assert_eq!(w.secs(), 3);
        w.add(2);
        w.add(3);
        assert_eq!(w.sum(), 5);
        w.clear();
        assert_eq!(w.sum(), 0);
        // A slot last written a window ago is not counted.
        let stale = w.now().wrapping_sub(3) & COUNT;
        w.slots[0].store((stale << 32) | 7, Ordering::Relaxed);
        assert_eq!(w.sum(), 0);
    }

    #[test]
    fn counts_saturate_instead_of_spilling_into_the_second() {
        let w = Window::new(Duration::from_secs(1));
        w.add(u32::MAX);
        w.add(5);
        assert_eq!(w.sum(), COUNT);
    }

    #[test]
    fn the_budget_allows_its_reserve_and_its_ratio() {
        let b = RetryBudget::new(Duration::from_secs(10), 1, 0.1);
        // 1 per second over 10 seconds: 10 retries with no requests at all.
        assert!((0..10).all(|_| b.withdraw()));
        assert!(!b.withdraw());
        for _ in 0..20 {
            b.deposit();
        }
        // 10 % of 20 requests: two more.
        assert!(b.withdraw() && b.withdraw());
        assert!(!b.withdraw());
        let none = RetryBudget::new(Duration::from_secs(1), 0, 0.0);
        none.deposit();
        assert!(!none.withdraw());
    }
}
