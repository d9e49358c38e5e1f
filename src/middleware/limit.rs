//! Admission control on a route's stack: the token-bucket rate limit (429 with `Retry-After` and
//! the IETF `RateLimit` / `RateLimit-Policy` headers) and the concurrency limits (per route and
//! per backend) that shed load with 503 instead of queueing without bound. Neither takes a lock
//! on a request's path: the bucket is governor's (one compare-and-swap), the slots a counter.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http::{HeaderMap, HeaderName, HeaderValue};
use tower::Service;

use super::context::RequestContext;
use crate::config::{RateFallback, RateLimitKey, RateLimitSpec, RateScope};
use crate::error::Problem;
use crate::store::{RateTaken, SharedStore};
use crate::telemetry::metrics::Metrics;
use crate::{BoxError, Request, Response, ResponseFuture, fail};

static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// Writes `RateLimit-Policy: "default";q=…;w=…` and `RateLimit: "default";r=…;t=…`
/// (draft-ietf-httpapi-ratelimit-headers).
pub fn set_ratelimit_headers(
    h: &mut HeaderMap,
    quota: u32,
    window: u64,
    remaining: u32,
    reset: u64,
) {
    if let Some(v) = policy_value(quota, window) {
        h.insert(RATELIMIT_POLICY.clone(), v);
    }
    if let Some(v) = counted_value(b"r=", remaining.into(), b"t=", reset) {
        h.insert(RATELIMIT.clone(), v);
    }
}

fn policy_value(quota: u32, window: u64) -> Option<HeaderValue> {
    counted_value(b"q=", quota.into(), b"w=", window)
}

/// `"default";{a}{x};{b}{y}`, written without the formatting machinery: the `RateLimit` header
/// is on every answer of a limited route.
fn counted_value(a: &[u8], x: u64, b: &[u8], y: u64) -> Option<HeaderValue> {
    let (mut nx, mut ny) = (itoa::Buffer::new(), itoa::Buffer::new());
    let mut buf = [0u8; 64];
    let mut len = 0;
    for part in [
        &b"\"default\";"[..],
        a,
        nx.format(x).as_bytes(),
        b";",
        b,
        ny.format(y).as_bytes(),
    ] {
        buf.get_mut(len..len + part.len())?.copy_from_slice(part);
        len += part.len();
    }
    HeaderValue::from_bytes(&buf[..len]).ok()
}

type KeyedLimiter =
    RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock, StateInformationMiddleware>;
type DirectLimiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// One bucket for the route (`global`) or one per key.
enum Limiter {
    Direct(DirectLimiter),
    Keyed(KeyedLimiter),
}

/// A limit counted in the shared store (`scope: cluster`), and what decides while the store
/// does not answer.
struct Cluster {
    store: SharedStore,
    emission: Duration,
    burst: u32,
    fallback: RateFallback,
    timeout: Duration,
    /// When a fallback was last logged (ms since the epoch): once in 10 s at most.
    warned: AtomicU64,
}

/// The shared count, or none (the store did not answer in time).
enum Fallible {
    Counted(Result<(u32, u64), Refusal>),
    Uncounted,
}

/// Why a request is not let through.
enum Refusal {
    /// Over the rate: 429, and when to come back.
    Wait(Duration),
    /// A cluster-wide count the store could not give, with `fallback: closed`: 503.
    Uncounted,
}

/// A compiled rate limit, shared by clones of the route's service.
pub struct RateLimit {
    limiter: Limiter,
    /// `scope: cluster`: the shared count, before the local bucket.
    cluster: Option<Cluster>,
    key: RateLimitKey,
    header: Option<HeaderName>,
    quota: u32,
    window_secs: u64,
    /// `RateLimit-Policy`, the same on every answer.
    policy: Option<HeaderValue>,
    checks: AtomicU64,
    route: Arc<str>,
    metrics: Arc<Metrics>,
}

impl RateLimit {
    /// Builds the bucket. `spec` has been validated (requests ≥ 1, per > 0); `store` is the
    /// state store, which a `scope: cluster` limit counts in.
    pub fn new(
        spec: &RateLimitSpec,
        route: Arc<str>,
        metrics: Arc<Metrics>,
        store: Option<SharedStore>,
    ) -> Self {
        let requests = spec.requests.max(1);
        let burst =
            NonZeroU32::new(spec.burst.unwrap_or(requests).max(1)).unwrap_or(NonZeroU32::MIN);
        let period = (spec.per.0 / requests).max(Duration::from_nanos(1));
        let cluster = match (spec.scope, store) {
            (RateScope::Cluster, Some(store)) => Some(Cluster {
                store,
                emission: period,
                burst: burst.get(),
                fallback: spec.fallback,
                timeout: spec.store_timeout.0,
                warned: AtomicU64::new(0),
            }),
            _ => None,
        };
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        let header = match &spec.key {
            RateLimitKey::Header(h) => HeaderName::from_bytes(h.as_bytes()).ok(),
            _ => None,
        };
        let limiter = match spec.key {
            RateLimitKey::Global => Limiter::Direct(
                RateLimiter::direct(quota).with_middleware::<StateInformationMiddleware>(),
            ),
            _ => Limiter::Keyed(
                RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>(),
            ),
        };
        RateLimit {
            limiter,
            cluster,
            key: spec.key.clone(),
            header,
            quota: requests,
            window_secs: spec.per.0.as_secs().max(1),
            policy: policy_value(requests, spec.per.0.as_secs().max(1)),
            checks: AtomicU64::new(0),
            route,
            metrics,
        }
    }

    fn key_of(&self, req: &Request) -> String {
        match &self.key {
            RateLimitKey::Global => String::new(),
            RateLimitKey::ClientIp => req
                .extensions()
                .get::<RequestContext>()
                .map(|c| c.client_addr.ip().to_string())
                .unwrap_or_default(),
            RateLimitKey::Header(_) => self
                .header
                .as_ref()
                .and_then(|h| req.headers().get(h))
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
        }
    }

    /// Takes a token from the shared bucket (`scope: cluster`); while the store does not
    /// answer in time, the fallback decides.
    async fn check_cluster(&self, c: &Cluster, key: String) -> Fallible {
        let why =
            match tokio::time::timeout(c.timeout, c.store.take_rate(&key, c.emission, c.burst))
                .await
            {
                Ok(Ok(RateTaken::Allowed { remaining })) => {
                    return Fallible::Counted(Ok((remaining, self.window_secs)));
                }
                Ok(Ok(RateTaken::Refused { wait })) => {
                    return Fallible::Counted(Err(Refusal::Wait(wait)));
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {:?}", c.timeout),
            };
        let now = crate::store::now_ms();
        let last = c.warned.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 10_000
            && c.warned
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(route = %self.route, error = %why, fallback = ?c.fallback, "The cluster-wide rate limit could not be counted; the fallback decides until the store answers again.");
        }
        Fallible::Uncounted
    }

    /// What `fallback` says while the shared count cannot be had.
    fn fall_back(&self, c: &Cluster, req: &Request) -> Result<(u32, u64), Refusal> {
        match c.fallback {
            RateFallback::Local => self.check(req),
            RateFallback::Open => Ok((self.quota, self.window_secs)),
            RateFallback::Closed => Err(Refusal::Uncounted),
        }
    }

    /// Takes a token: `Ok(remaining)` or `Err(wait)`.
    fn check(&self, req: &Request) -> Result<(u32, u64), Refusal> {
        let outcome = match &self.limiter {
            Limiter::Direct(l) => l.check().map_err(|n| n.wait_time_from(l.clock().now())),
            Limiter::Keyed(l) => {
                // Forget idle keys now and then so per-client buckets cannot grow without bound.
                if self.checks.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
                    l.retain_recent();
                }
                l.check_key(&self.key_of(req))
                    .map_err(|n| n.wait_time_from(l.clock().now()))
            }
        };
        outcome
            .map(|snapshot| (snapshot.remaining_burst_capacity(), self.window_secs))
            .map_err(Refusal::Wait)
    }
}

/// Rejects requests beyond the route's rate with 429.
#[derive(Clone)]
pub struct RateLimitService<S> {
    inner: S,
    limit: Arc<RateLimit>,
}

impl<S> RateLimitService<S> {
    pub fn new(inner: S, limit: Arc<RateLimit>) -> Self {
        RateLimitService { inner, limit }
    }
}

impl<S> Service<Request> for RateLimitService<S>
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
        rate_limited(&self.limit, req, |r| self.inner.call(r))
    }
}

impl crate::DirectCall for RateLimitService<crate::RouteService> {
    fn call(&self, req: Request) -> ResponseFuture {
        if self.limit.cluster.is_none() {
            return rate_limited(&self.limit, req, |r| self.inner.call_shared(r));
        }
        // The shared count is a round trip to the store, before the call.
        let (limit, inner) = (self.limit.clone(), self.inner.clone());
        Box::pin(async move {
            let c = limit.cluster.as_ref().expect("a cluster-wide limit");
            let key = format!("{}:{}", limit.route, limit.key_of(&req));
            let outcome = match limit.check_cluster(c, key).await {
                Fallible::Counted(outcome) => outcome,
                Fallible::Uncounted => limit.fall_back(c, &req),
            };
            admit(&limit, req, outcome, |r| inner.call_shared(r)).await
        })
    }
}

/// The rate limit's work around the call below it (`call`).
fn rate_limited<F>(
    limit: &Arc<RateLimit>,
    req: Request,
    call: impl FnOnce(Request) -> F,
) -> ResponseFuture
where
    F: std::future::Future<Output = Result<Response, BoxError>> + Send + 'static,
{
    let outcome = limit.check(&req);
    admit(limit, req, outcome, call)
}

/// The call below (`call`) when `outcome` lets `req` through, with the `RateLimit` headers on
/// its answer; else the refusal.
fn admit<F>(
    limit: &Arc<RateLimit>,
    req: Request,
    outcome: Result<(u32, u64), Refusal>,
    call: impl FnOnce(Request) -> F,
) -> ResponseFuture
where
    F: std::future::Future<Output = Result<Response, BoxError>> + Send + 'static,
{
    match outcome {
        Err(Refusal::Uncounted) => fail(Problem::rate_uncounted()),
        Err(Refusal::Wait(wait)) => {
            limit.metrics.rate_limited(&limit.route);
            if let Some(t) = crate::telemetry::otel::Trace::of(req.extensions()) {
                t.event("rate_limited", || {
                    vec![
                        crate::telemetry::otel::Attr::new(
                            "rate_limit.quota",
                            i64::from(limit.quota),
                        ),
                        crate::telemetry::otel::Attr::new(
                            "retry_after_ms",
                            wait.as_millis() as i64,
                        ),
                    ]
                });
            }
            fail(Problem::rate_limited(wait, limit.quota, limit.window_secs))
        }
        Ok((remaining, reset)) => {
            let fut = call(req);
            let policy = limit.policy.clone();
            Box::pin(async move {
                let mut resp = fut.await?;
                let h = resp.headers_mut();
                if let Some(v) = policy {
                    h.insert(RATELIMIT_POLICY.clone(), v);
                }
                if let Some(v) = counted_value(b"r=", remaining.into(), b"t=", reset) {
                    h.insert(RATELIMIT.clone(), v);
                }
                Ok(resp)
            })
        }
    }
}

/// At most `max` calls in flight, counted without a lock: a call takes a slot or is refused at
/// once (the limits shed load, they never queue), and gives it back when its answer (or its
/// failure) is in.
pub struct Slots {
    max: usize,
    used: AtomicUsize,
}

impl Slots {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Slots {
            max,
            used: AtomicUsize::new(0),
        })
    }

    /// A slot, or `None` when all are taken.
    pub fn take(self: &Arc<Self>) -> Option<Slot> {
        self.used
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.clone()))
    }
}

/// A taken slot, given back when dropped.
pub struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::Release);
    }
}

/// Fails fast with 503 when `limit` calls are already in flight (no queue).
#[derive(Clone)]
pub struct ConcurrencyLimitService<S> {
    inner: S,
    slots: Arc<Slots>,
    scope: Arc<str>,
    metrics: Arc<Metrics>,
}

impl<S> ConcurrencyLimitService<S> {
    pub fn new(inner: S, slots: Arc<Slots>, scope: Arc<str>, metrics: Arc<Metrics>) -> Self {
        ConcurrencyLimitService {
            inner,
            slots,
            scope,
            metrics,
        }
    }
}

impl<S> Service<Request> for ConcurrencyLimitService<S>
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
        let (slots, scope, metrics) = (&self.slots, &self.scope, &self.metrics);
        limited(slots, scope, metrics, req, |r| self.inner.call(r))
    }
}

impl crate::DirectCall for ConcurrencyLimitService<crate::RouteService> {
    fn call(&self, req: Request) -> ResponseFuture {
        limited(&self.slots, &self.scope, &self.metrics, req, |r| {
            self.inner.call_shared(r)
        })
    }
}

/// The concurrency limit's work around the call below it (`call`).
fn limited<F>(
    slots: &Arc<Slots>,
    scope: &Arc<str>,
    metrics: &Metrics,
    req: Request,
    call: impl FnOnce(Request) -> F,
) -> ResponseFuture
where
    F: std::future::Future<Output = Result<Response, BoxError>> + Send + 'static,
{
    match slots.take() {
        Some(slot) => {
            let fut = call(req);
            Box::pin(async move {
                let r = fut.await;
                drop(slot);
                r
            })
        }
        None => {
            metrics.shed(scope);
            if let Some(t) = crate::telemetry::otel::Trace::of(req.extensions()) {
                t.event("overloaded", || {
                    vec![crate::telemetry::otel::Attr::new(
                        "switchyard.limit",
                        scope.to_string(),
                    )]
                });
            }
            fail(Problem::overloaded(scope))
        }
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;
    use crate::config::types::Dur;
    use crate::empty_body;
    use crate::error::Kind;

    type Mock =
        tower::util::MapErr<tower_test::mock::Mock<Request, Response>, fn(BoxError) -> BoxError>;

    fn mock() -> (Mock, tower_test::mock::Handle<Request, Response>) {
        let (svc, handle) = tower_test::mock::pair::<Request, Response>();
        (svc.map_err((|e| e) as fn(BoxError) -> BoxError), handle)
    }

    fn problem(e: &BoxError) -> &Problem {
        e.downcast_ref::<Problem>().expect("a Problem")
    }

    #[tokio::test(start_paused = true)]
    async fn the_concurrency_limit_sheds_at_once_and_frees_its_slot() {
        let (svc, mut handle) = mock();
        let metrics = Arc::new(Metrics::new());
        let svc = ConcurrencyLimitService::new(svc, Slots::new(1), "r".into(), metrics);
        let first = tokio::spawn(svc.clone().oneshot(http::Request::new(empty_body())));
        let (_, send) = handle.next_request().await.unwrap();
        // The slot is taken: the next call is refused without waiting or reaching the backend.
        let err = svc
            .clone()
            .oneshot(http::Request::new(empty_body()))
            .await
            .unwrap_err();
        let p = problem(&err);
        assert_eq!((p.kind, p.status.as_u16()), (Kind::OVERLOADED, 503));
        assert_eq!(p.headers[http::header::RETRY_AFTER], "1");
        send.send_response(http::Response::new(empty_body()));
        first.await.unwrap().unwrap();
        // The slot is back.
        let next = tokio::spawn(svc.oneshot(http::Request::new(empty_body())));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(http::Response::new(empty_body()));
        assert!(next.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_answers_429_with_its_headers_per_key() {
        let (svc, mut handle) = mock();
        let spec = RateLimitSpec {
            requests: 2,
            per: Dur::secs(60),
            burst: None,
            key: RateLimitKey::Header("x-tenant".into()),
            scope: RateScope::Local,
            fallback: RateFallback::Local,
            store_timeout: Dur::millis(100),
        };
        let limit = Arc::new(RateLimit::new(
            &spec,
            "r".into(),
            Arc::new(Metrics::new()),
            None,
        ));
        let svc = RateLimitService::new(svc, limit);
        let req = |tenant: &str| {
            http::Request::get("/")
                .header("x-tenant", tenant)
                .body(empty_body())
                .unwrap()
        };
        for remaining in ["1", "0"] {
            let call = tokio::spawn(svc.clone().oneshot(req("a")));
            let (_, send) = handle.next_request().await.unwrap();
            send.send_response(http::Response::new(empty_body()));
            let resp = call.await.unwrap().unwrap();
            let h = resp.headers()["ratelimit"].to_str().unwrap();
            assert!(h.contains(&format!("r={remaining}")), "{h}");
        }
        let err = svc.clone().oneshot(req("a")).await.unwrap_err();
        let p = problem(&err);
        assert_eq!((p.kind, p.status.as_u16()), (Kind::RATE_LIMITED, 429));
        assert!(p.headers.contains_key(http::header::RETRY_AFTER));
        assert_eq!(p.headers["ratelimit-policy"], "\"default\";q=2;w=60");
        // Another tenant has its own bucket.
        let call = tokio::spawn(svc.oneshot(req("b")));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(http::Response::new(empty_body()));
        assert!(call.await.unwrap().is_ok());
    }
}
