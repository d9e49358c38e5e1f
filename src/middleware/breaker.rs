//! The circuit breaker, one per backend, inside the retry layer of every route that uses the
//! backend: after enough failures it answers 503 with `Retry-After` at once instead of calling
//! the backend, lets a few probes through after `open_for`, and closes when they succeed.
//! Only upstream and gateway faults count as failures; client errors never trip it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tower::Service;

use super::context::{BodyProgress, Deadline};
use crate::config::{BreakerMode, BreakerSpec};
use crate::error::{Fault, Problem, classify};
use crate::telemetry::metrics::Metrics;
use crate::{BoxError, Request, Response, ResponseFuture, fail};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { in_flight: u32, succeeded: u32 },
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open { .. } => "open",
            State::HalfOpen { .. } => "half_open",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// Says nothing about the backend's health (a client error).
    Ignore,
}

struct Inner {
    state: State,
    consecutive: u32,
    /// (second, successes, failures) buckets covering the window, for `rate` mode.
    buckets: VecDeque<(Instant, u32, u32)>,
}

pub struct Breaker {
    backend: Arc<str>,
    spec: BreakerSpec,
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
}

/// Permission to call the backend. Dropped without a recorded outcome (the client left) it says
/// nothing about the backend, but frees its half-open probe slot. Deadlines are not such a
/// case: [`BreakerService`] enforces the request's deadline itself and records the timeout.
pub struct Ticket {
    breaker: Arc<Breaker>,
    probe: bool,
    done: bool,
}

impl Ticket {
    pub fn record(mut self, outcome: Outcome) {
        self.done = true;
        self.breaker.record(self.probe, outcome);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.record(self.probe, Outcome::Ignore);
        }
    }
}

impl Breaker {
    pub fn new(backend: &str, spec: BreakerSpec, metrics: Arc<Metrics>) -> Arc<Self> {
        metrics.breaker_state(backend, State::Closed);
        Arc::new(Breaker {
            backend: backend.into(),
            spec,
            inner: Mutex::new(Inner {
                state: State::Closed,
                consecutive: 0,
                buckets: VecDeque::new(),
            }),
            metrics,
        })
    }

    pub fn state(&self) -> State {
        self.inner.lock().map(|i| i.state).unwrap_or(State::Closed)
    }

    fn transition(&self, inner: &mut Inner, to: State) {
        let from = inner.state;
        inner.state = to;
        if from.name() != to.name() {
            self.metrics.breaker_state(&self.backend, to);
            match to {
                State::Open { until } => tracing::warn!(
                    backend = %self.backend,
                    open_for_ms = until.saturating_duration_since(Instant::now()).as_millis() as u64,
                    "Circuit opened; calls to the backend fail fast."
                ),
                State::HalfOpen { .. } => {
                    tracing::info!(backend = %self.backend, "Circuit half-open; probing the backend.")
                }
                State::Closed => {
                    tracing::info!(backend = %self.backend, "Circuit closed; backend healthy.")
                }
            }
        }
    }

    /// Asks to call the backend: a ticket, or how long until it may be tried again.
    pub fn acquire(self: &Arc<Self>) -> Result<Ticket, Duration> {
        let mut inner = self.inner.lock().map_err(|_| Duration::from_secs(1))?;
        let now = Instant::now();
        let probe = match inner.state {
            State::Closed => false,
            State::Open { until } if now < until => return Err(until - now),
            State::Open { .. } => {
                self.transition(
                    &mut inner,
                    State::HalfOpen {
                        in_flight: 1,
                        succeeded: 0,
                    },
                );
                true
            }
            State::HalfOpen {
                in_flight,
                succeeded,
            } => {
                if in_flight + succeeded >= self.spec.half_open_probes.max(1) {
                    return Err(Duration::from_millis(100));
                }
                inner.state = State::HalfOpen {
                    in_flight: in_flight + 1,
                    succeeded,
                };
                true
            }
        };
        Ok(Ticket {
            breaker: self.clone(),
            probe,
            done: false,
        })
    }

    fn record(&self, probe: bool, outcome: Outcome) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let now = Instant::now();
        if probe {
            if let State::HalfOpen {
                in_flight,
                succeeded,
            } = inner.state
            {
                match outcome {
                    Outcome::Failure => {
                        let until = now + self.spec.open_for.0;
                        self.transition(&mut inner, State::Open { until });
                    }
                    Outcome::Success => {
                        let succeeded = succeeded + 1;
                        if succeeded >= self.spec.half_open_probes.max(1) {
                            inner.consecutive = 0;
                            inner.buckets.clear();
                            self.transition(&mut inner, State::Closed);
                        } else {
                            inner.state = State::HalfOpen {
                                in_flight: in_flight.saturating_sub(1),
                                succeeded,
                            };
                        }
                    }
                    Outcome::Ignore => {
                        inner.state = State::HalfOpen {
                            in_flight: in_flight.saturating_sub(1),
                            succeeded,
                        };
                    }
                }
            }
            return;
        }
        if inner.state != State::Closed {
            return;
        }
        let trip = match outcome {
            Outcome::Ignore => false,
            Outcome::Success => {
                inner.consecutive = 0;
                self.count(&mut inner, now, true);
                false
            }
            Outcome::Failure => {
                inner.consecutive += 1;
                self.count(&mut inner, now, false);
                match self.spec.mode {
                    BreakerMode::Consecutive => {
                        inner.consecutive >= self.spec.consecutive_failures.max(1)
                    }
                    BreakerMode::Rate => {
                        let (ok, failed) = inner
                            .buckets
                            .iter()
                            .fold((0u32, 0u32), |(a, b), (_, s, f)| (a + s, b + f));
                        let total = ok + failed;
                        total >= self.spec.min_requests.max(1)
                            && f64::from(failed) / f64::from(total) >= self.spec.failure_rate
                    }
                }
            }
        };
        if trip {
            let until = now + self.spec.open_for.0;
            self.transition(&mut inner, State::Open { until });
        }
    }

    /// Adds a call to the one-second bucket of `now`, dropping buckets older than the window.
    fn count(&self, inner: &mut Inner, now: Instant, ok: bool) {
        let window = self.spec.window.0;
        while inner
            .buckets
            .front()
            .is_some_and(|(t, _, _)| now.saturating_duration_since(*t) >= window)
        {
            inner.buckets.pop_front();
        }
        match inner.buckets.back_mut() {
            Some((t, s, f)) if now.saturating_duration_since(*t) < Duration::from_secs(1) => {
                if ok {
                    *s += 1
                } else {
                    *f += 1
                }
            }
            _ => inner
                .buckets
                .push_back((now, u32::from(ok), u32::from(!ok))),
        }
    }
}

/// What a call's result says about the backend's health.
pub fn outcome_of(result: &Result<Response, BoxError>) -> Outcome {
    match result {
        Ok(resp) if resp.status().is_server_error() => Outcome::Failure,
        Ok(_) => Outcome::Success,
        Err(e) => match classify(e.as_ref()).fault {
            Fault::Client => Outcome::Ignore,
            Fault::Upstream | Fault::Gateway => Outcome::Failure,
        },
    }
}

#[derive(Clone)]
pub struct BreakerService<S> {
    inner: S,
    breaker: Arc<Breaker>,
}

impl<S> BreakerService<S> {
    pub fn new(inner: S, breaker: Arc<Breaker>) -> Self {
        BreakerService { inner, breaker }
    }
}

impl<S> Service<Request> for BreakerService<S>
where
    S: Service<Request, Response = Response, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        match self.breaker.acquire() {
            Err(retry_after) => fail(Problem::circuit_open(&self.breaker.backend, retry_after)),
            Ok(ticket) => {
                let deadline = req.extensions().get::<Deadline>().copied();
                let progress = deadline.and(req.extensions().get::<BodyProgress>().cloned());
                let fut = self.inner.call(req);
                Box::pin(async move {
                    // The overall timeout sits above this layer and would drop the call without
                    // an outcome; race the deadline here so a slow backend is judged slow.
                    let result = match deadline {
                        Some(d) => match tokio::time::timeout_at(d.at, fut).await {
                            Ok(r) => r,
                            Err(_) => Err(super::timeout::expired(d.total, progress.as_ref())),
                        },
                        None => fut.await,
                    };
                    ticket.record(outcome_of(&result));
                    result
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::types::Dur;

    fn spec(mode: BreakerMode) -> BreakerSpec {
        BreakerSpec {
            mode,
            consecutive_failures: 3,
            failure_rate: 0.5,
            window: Dur::secs(10),
            min_requests: 4,
            open_for: Dur::secs(5),
            half_open_probes: 2,
            ..BreakerSpec::default()
        }
    }

    fn call(b: &Arc<Breaker>, o: Outcome) -> bool {
        match b.acquire() {
            Ok(t) => {
                t.record(o);
                true
            }
            Err(_) => false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn closed_open_half_open_closed_and_back_to_open() {
        let b = Breaker::new(
            "b",
            spec(BreakerMode::Consecutive),
            Arc::new(Metrics::new()),
        );
        // Client errors and interleaved successes never trip it.
        for o in [
            Outcome::Failure,
            Outcome::Failure,
            Outcome::Success,
            Outcome::Ignore,
            Outcome::Failure,
            Outcome::Failure,
        ] {
            assert!(call(&b, o));
        }
        assert_eq!(b.state(), State::Closed);
        assert!(call(&b, Outcome::Failure));
        assert!(matches!(b.state(), State::Open { .. }));
        let wait = b.acquire().err().unwrap();
        assert_eq!(wait, Duration::from_secs(5));

        tokio::time::advance(Duration::from_secs(5)).await;
        // Half-open: two probes allowed, a third is refused while they run.
        let p1 = b.acquire().unwrap();
        let p2 = b.acquire().unwrap();
        assert!(b.acquire().is_err());
        assert!(matches!(b.state(), State::HalfOpen { .. }));
        p1.record(Outcome::Success);
        p2.record(Outcome::Success);
        assert_eq!(b.state(), State::Closed);

        // Trip again, then a failed probe re-opens.
        for _ in 0..3 {
            call(&b, Outcome::Failure);
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        let p = b.acquire().unwrap();
        p.record(Outcome::Failure);
        assert!(matches!(b.state(), State::Open { .. }));

        // A probe abandoned without an outcome (the client left) frees its slot and proves
        // nothing; the next probe decides.
        tokio::time::advance(Duration::from_secs(5)).await;
        drop(b.acquire().unwrap());
        assert!(matches!(b.state(), State::HalfOpen { in_flight: 0, .. }));
        let p1 = b.acquire().unwrap();
        let p2 = b.acquire().unwrap();
        p1.record(Outcome::Success);
        p2.record(Outcome::Success);
        assert_eq!(b.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_mode_needs_minimum_volume_and_forgets_old_buckets() {
        let b = Breaker::new("b", spec(BreakerMode::Rate), Arc::new(Metrics::new()));
        // 3 failures: below min_requests (4).
        for _ in 0..3 {
            call(&b, Outcome::Failure);
        }
        assert_eq!(b.state(), State::Closed);
        // The window slides past them.
        tokio::time::advance(Duration::from_secs(11)).await;
        call(&b, Outcome::Success);
        call(&b, Outcome::Success);
        call(&b, Outcome::Failure);
        assert_eq!(b.state(), State::Closed, "1 of 3 failed");
        call(&b, Outcome::Failure);
        assert!(matches!(b.state(), State::Open { .. }), "2 of 4 failed");
    }
}
