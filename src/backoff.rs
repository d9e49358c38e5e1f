//! The one backoff: exponential with full jitter. Off the request path's happy case: the retry
//! layer waits with it between tries, and the AMQP and MQTT reconnect loops, the spool's
//! forwarder and webhook deliveries wait with it between attempts.

use std::time::Duration;

/// The n-th wait is random within `[floor, min(max, base × 2^(n-1))]`: spread out (full
/// jitter), so that many waiters do not come back at once, and bounded.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    floor: Duration,
    /// Waits handed out since the last reset.
    attempt: u32,
}

impl Backoff {
    /// Waits of at least `min`, growing from `min` to `max`: for loops that try again until
    /// something comes back (a broker, a webhook), where an instant retry helps no one.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            base: min,
            max,
            floor: min,
            attempt: 0,
        }
    }

    /// Waits from zero up to a bound growing from `base` to `max`: for retries of one request,
    /// where the first may well go at once.
    pub fn from_zero(base: Duration, max: Duration) -> Self {
        Backoff {
            floor: Duration::ZERO,
            ..Backoff::new(base, max)
        }
    }

    /// The bound of the n-th wait (n from 1): `min(max, base × 2^(n-1))`.
    pub fn ceiling(&self, n: u32) -> Duration {
        self.base
            .saturating_mul(1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX))
            .min(self.max)
    }

    /// The n-th wait (n from 1), without counting it.
    pub fn nth(&self, n: u32) -> Duration {
        self.ceiling(n).mul_f64(fastrand::f64()).max(self.floor)
    }

    /// The next wait, counted.
    pub fn next_wait(&mut self) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        self.nth(self.attempt)
    }

    /// Starts over from the first wait (the thing came back).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_are_bounded_full_jitter() {
        let b = Backoff::from_zero(Duration::from_millis(100), Duration::from_millis(1000));
        for n in 1..40 {
            let cap = Duration::from_millis((100u64 << (n - 1).min(20)).min(1000));
            assert_eq!(b.ceiling(n), cap, "wait {n}");
            for _ in 0..100 {
                assert!(b.nth(n) <= cap, "wait {n}");
            }
        }
        // Full jitter spreads waits over the whole range.
        let waits: Vec<_> = (0..500).map(|_| b.nth(4)).collect();
        assert!(waits.iter().any(|w| *w < Duration::from_millis(200)));
        assert!(waits.iter().any(|w| *w > Duration::from_millis(600)));
    }

    #[test]
    fn a_floor_holds_and_a_reset_starts_over() {
        let (min, max) = (Duration::from_millis(50), Duration::from_millis(400));
        let mut b = Backoff::new(min, max);
        let waits: Vec<_> = (0..10).map(|_| b.next_wait()).collect();
        assert!(waits.iter().all(|w| *w >= min && *w <= max), "{waits:?}");
        assert_eq!(b.ceiling(b.attempt), max);
        b.reset();
        assert_eq!(b.next_wait(), min);
    }
}
