//! The circuit breaker, one per backend, inside the retry layer of every route that uses the
//! backend: after enough failures it answers 503 with `Retry-After` at once instead of calling
//! the backend, lets a few probes through after `open_for`, and closes when they succeed.
//! Only upstream and gateway faults count as failures; client errors never trip it. A closed
//! breaker costs a call two atomic reads and no lock; counts are global (not per worker), so
//! it trips on the backend's whole traffic.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tower::Service;

use super::context::{BodyProgress, Deadline};
use super::window::Window;
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

pub struct Breaker {
    backend: Arc<str>,
    spec: BreakerSpec,
    /// Whether the state is `Closed`, read without the lock by every call: a closed breaker's
    /// calls and their successes take no lock; only failures and the other states do.
    closed: AtomicBool,
    /// Failures in a row (`consecutive` mode); a success stores 0 without the lock.
    consecutive: AtomicU32,
    /// Successes and failures per second over the window (`rate` mode).
    succeeded: Window,
    failed: Window,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
}

/// Permission to call the backend. Dropped without a recorded outcome it judges by the
/// request's deadline: dropped at or after it, the overall timeout above ended the call, so
/// the backend was too slow (a failure, unless the client was still sending its body); before
/// it, the client left, which says nothing about the backend but frees a half-open probe slot.
/// So one timer per request (the overall timeout's) serves the breaker too.
pub struct Ticket {
    breaker: Arc<Breaker>,
    probe: bool,
    done: bool,
    deadline: Option<Deadline>,
    progress: Option<BodyProgress>,
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
            let timed_out = self.deadline.is_some_and(|d| Instant::now() >= d.at)
                && self.progress.as_ref().is_none_or(BodyProgress::finished);
            let outcome = if timed_out {
                Outcome::Failure
            } else {
                Outcome::Ignore
            };
            self.breaker.record(self.probe, outcome);
        }
    }
}

impl Breaker {
    pub fn new(backend: &str, spec: BreakerSpec, metrics: Arc<Metrics>) -> Arc<Self> {
        metrics.breaker_state(backend, State::Closed);
        Arc::new(Breaker {
            backend: backend.into(),
            succeeded: Window::new(spec.window.0),
            failed: Window::new(spec.window.0),
            spec,
            closed: AtomicBool::new(true),
            consecutive: AtomicU32::new(0),
            state: Mutex::new(State::Closed),
            metrics,
        })
    }

    pub fn state(&self) -> State {
        self.state.lock().map(|s| *s).unwrap_or(State::Closed)
    }

    fn transition(&self, state: &mut State, to: State) {
        let from = *state;
        *state = to;
        self.closed
            .store(matches!(to, State::Closed), Ordering::Release);
        if from.name() != to.name() {
            self.metrics.breaker_state(&self.backend, to);
            // One WARN when the circuit opens and one INFO when it closes: a probe that fails
            // (half-open, then open again, every `open_for` of a long outage) is DEBUG.
            let open_for =
                |until: Instant| until.saturating_duration_since(Instant::now()).as_millis() as u64;
            match (from, to) {
                (State::Closed, State::Open { until }) => tracing::warn!(
                    backend = %self.backend,
                    open_for_ms = open_for(until),
                    "Circuit opened; calls to the backend fail fast."
                ),
                (_, State::Open { until }) => tracing::debug!(
                    backend = %self.backend,
                    open_for_ms = open_for(until),
                    "Circuit opened again; the probe failed."
                ),
                (_, State::HalfOpen { .. }) => {
                    tracing::debug!(backend = %self.backend, "Circuit half-open; probing the backend.")
                }
                (_, State::Closed) => {
                    tracing::info!(backend = %self.backend, "Circuit closed; backend healthy.")
                }
            }
        }
    }

    /// Asks to call the backend: a ticket, or how long until it may be tried again.
    pub fn acquire(self: &Arc<Self>) -> Result<Ticket, Duration> {
        let ticket = |probe| Ticket {
            breaker: self.clone(),
            probe,
            done: false,
            deadline: None,
            progress: None,
        };
        if self.closed.load(Ordering::Acquire) {
            return Ok(ticket(false));
        }
        let mut state = self.state.lock().map_err(|_| Duration::from_secs(1))?;
        let now = Instant::now();
        let probe = match *state {
            State::Closed => false,
            State::Open { until } if now < until => return Err(until - now),
            State::Open { .. } => {
                self.transition(
                    &mut state,
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
                *state = State::HalfOpen {
                    in_flight: in_flight + 1,
                    succeeded,
                };
                true
            }
        };
        Ok(ticket(probe))
    }

    fn record(&self, probe: bool, outcome: Outcome) {
        if probe {
            return self.record_probe(outcome);
        }
        let rate = self.spec.mode == BreakerMode::Rate;
        match outcome {
            Outcome::Ignore => return,
            Outcome::Success => {
                // The fast path: no lock, and no write when there is nothing to reset.
                if self.consecutive.load(Ordering::Relaxed) != 0 {
                    self.consecutive.store(0, Ordering::Relaxed);
                }
                if rate {
                    self.succeeded.add(1);
                }
                return;
            }
            Outcome::Failure => {}
        }
        if !self.closed.load(Ordering::Acquire) {
            // A call let through before the breaker opened: it has already been judged.
            return;
        }
        let failures = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        let trip = match self.spec.mode {
            BreakerMode::Consecutive => failures >= self.spec.consecutive_failures.max(1),
            BreakerMode::Rate => {
                self.failed.add(1);
                let failed = self.failed.sum();
                let total = self.succeeded.sum() + failed;
                total >= u64::from(self.spec.min_requests.max(1))
                    && failed as f64 / total as f64 >= self.spec.failure_rate
            }
        };
        if trip {
            let Ok(mut state) = self.state.lock() else {
                return;
            };
            if *state == State::Closed {
                let until = Instant::now() + self.spec.open_for.0;
                self.transition(&mut state, State::Open { until });
            }
        }
    }

    fn record_probe(&self, outcome: Outcome) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let State::HalfOpen {
            in_flight,
            succeeded,
        } = *state
        else {
            return;
        };
        match outcome {
            Outcome::Failure => {
                let until = Instant::now() + self.spec.open_for.0;
                self.transition(&mut state, State::Open { until });
            }
            Outcome::Success => {
                let succeeded = succeeded + 1;
                if succeeded >= self.spec.half_open_probes.max(1) {
                    self.consecutive.store(0, Ordering::Relaxed);
                    self.succeeded.clear();
                    self.failed.clear();
                    self.transition(&mut state, State::Closed);
                } else {
                    *state = State::HalfOpen {
                        in_flight: in_flight.saturating_sub(1),
                        succeeded,
                    };
                }
            }
            Outcome::Ignore => {
                *state = State::HalfOpen {
                    in_flight: in_flight.saturating_sub(1),
                    succeeded,
                };
            }
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
        around(&self.breaker, req, |r| self.inner.call(r))
    }
}

impl crate::DirectCall for BreakerService<crate::RouteService> {
    fn call(&self, req: Request) -> ResponseFuture {
        around(&self.breaker, req, |r| self.inner.call_shared(r))
    }
}

/// The layer's work around the call below it (`call`).
fn around<F>(
    breaker: &Arc<Breaker>,
    req: Request,
    call: impl FnOnce(Request) -> F,
) -> ResponseFuture
where
    F: std::future::Future<Output = Result<Response, BoxError>> + Send + 'static,
{
    match breaker.acquire() {
        Err(retry_after) => {
            if let Some(t) = crate::telemetry::otel::Trace::of(req.extensions()) {
                t.event("circuit_open", || {
                    vec![
                        crate::telemetry::otel::Attr::new(
                            "switchyard.backend",
                            breaker.backend.to_string(),
                        ),
                        crate::telemetry::otel::Attr::new(
                            "retry_after_ms",
                            retry_after.as_millis() as i64,
                        ),
                    ]
                });
            }
            fail(Problem::circuit_open(&breaker.backend, retry_after))
        }
        Ok(mut ticket) => {
            // The overall timeout above ends a slow call by dropping it; the ticket then
            // judges it by the deadline (no timer of this layer's own).
            ticket.deadline = req.extensions().get::<Deadline>().copied();
            ticket.progress = ticket
                .deadline
                .and(req.extensions().get::<BodyProgress>().cloned());
            let fut = call(req);
            Box::pin(async move {
                let result = fut.await;
                ticket.record(outcome_of(&result));
                result
            })
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

    /// The breaker keeps no timer: a call the overall timeout above ends is dropped, and its
    /// ticket judges it by the deadline, a failure; a caller who leaves before the deadline
    /// proves nothing.
    #[tokio::test(start_paused = true)]
    async fn a_call_the_deadline_ends_is_a_failure_and_one_the_client_leaves_is_not() {
        use tower::{Layer, ServiceExt};
        let b = Breaker::new(
            "b",
            spec(BreakerMode::Consecutive),
            Arc::new(Metrics::new()),
        );
        let (mock, mut handle) = tower_test::mock::pair::<Request, Response>();
        let inner = BreakerService::new(tower::util::MapErr::new(mock, |e: BoxError| e), b.clone());
        let svc = super::super::timeout::TimeoutLayer::new(Duration::from_secs(1)).layer(inner);
        // The backend never answers.
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(pair) = handle.next_request().await {
                held.push(pair);
            }
        });
        let req = || http::Request::new(crate::empty_body());
        // Two callers leave early: nothing is counted.
        for _ in 0..2 {
            let call = tokio::spawn(svc.clone().oneshot(req()));
            tokio::time::sleep(Duration::from_millis(100)).await;
            call.abort();
            let _ = call.await;
        }
        assert_eq!(b.consecutive.load(Ordering::Relaxed), 0);
        // Three calls end at the deadline: three failures in a row open it.
        for _ in 0..3 {
            let err = svc.clone().oneshot(req()).await.unwrap_err();
            let p = err.downcast_ref::<Problem>().expect("a Problem");
            assert_eq!(p.kind, crate::error::Kind::TIMEOUT, "{p}");
        }
        assert!(matches!(b.state(), State::Open { .. }));
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
