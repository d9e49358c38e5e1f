//! Retries, inside the overall timeout and outside the circuit breaker: exponential backoff with
//! full jitter, a maximum number of tries, and a retry budget shared by every route of a backend
//! so a failing backend never sees a retry storm. Only safe retries are made: a call that never
//! reached the backend, or one whose method, `Idempotency-Key` or route says it may be repeated.

use std::sync::Arc;

use super::window::RetryBudget;
use bytes::Bytes;
use http::{HeaderName, Method, header};

use super::context::Deadline;
use crate::backoff::Backoff;
use crate::config::{RetryCondition, RetryOn, RetrySpec};
use crate::error::{Fault, Problem, RetryClass, classify};
use crate::telemetry::metrics::Metrics;
use crate::{BoxError, Request, Response, RouteService, full_body};

static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// A route's compiled retry policy.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub attempts: u32,
    /// Waits between tries, from zero (full jitter).
    pub backoff: Backoff,
    pub on: Vec<RetryOn>,
    pub max_buffer: u64,
    /// The route declared its calls idempotent.
    pub idempotent: bool,
}

impl RetryPolicy {
    pub fn new(spec: &RetrySpec, idempotent: bool) -> Self {
        RetryPolicy {
            attempts: spec.attempts.max(1),
            backoff: Backoff::from_zero(spec.backoff.0, spec.max_backoff.0),
            on: spec.on.clone(),
            max_buffer: spec.max_buffer.0,
            idempotent,
        }
    }

    /// Why `result` may be retried, and whether the backend may have acted on the request.
    fn condition(&self, result: &Result<Response, BoxError>) -> Option<(&'static str, bool)> {
        let wants = |c: RetryCondition| self.on.contains(&RetryOn::Condition(c));
        match result {
            Ok(resp) => {
                let code = resp.status().as_u16();
                self.on
                    .contains(&RetryOn::Status(code))
                    .then_some((status_reason(code), true))
            }
            Err(e) => {
                // The client's fault (a broken body, say) is never retried.
                if classify(e.as_ref()).fault == Fault::Client {
                    return None;
                }
                let p = e.downcast_ref::<Problem>()?;
                let status = p.status.as_u16();
                let reason = match p.retry {
                    RetryClass::ConnectFailure if wants(RetryCondition::ConnectFailure) => {
                        "connect-failure"
                    }
                    RetryClass::Reset if wants(RetryCondition::Reset) => "reset",
                    RetryClass::Timeout if wants(RetryCondition::Timeout) => "timeout",
                    RetryClass::Unavailable if wants(RetryCondition::Unavailable) => "unavailable",
                    RetryClass::Unavailable | RetryClass::Answered
                        if self.on.contains(&RetryOn::Status(status)) =>
                    {
                        status_reason(status)
                    }
                    _ => return None,
                };
                // The error itself knows whether the backend may have acted.
                Some((reason, p.retry.may_have_acted()))
            }
        }
    }
}

fn status_reason(code: u16) -> &'static str {
    match code {
        500 => "status-500",
        502 => "status-502",
        503 => "status-503",
        504 => "status-504",
        _ => "status-5xx",
    }
}

fn safe_to_repeat(req: &Request, route_idempotent: bool) -> bool {
    route_idempotent
        || matches!(
            *req.method(),
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        )
        || req.headers().contains_key(&IDEMPOTENCY_KEY)
}

/// The retry layer. Its state is behind one `Arc`: a call clones that, not each part.
#[derive(Clone)]
pub struct RetryService(Arc<Retrying>);

struct Retrying {
    inner: RouteService,
    policy: Arc<RetryPolicy>,
    budget: Arc<RetryBudget>,
    route: Arc<str>,
    backend: Arc<str>,
    metrics: Arc<Metrics>,
}

impl RetryService {
    pub fn new(
        inner: RouteService,
        policy: Arc<RetryPolicy>,
        budget: Arc<RetryBudget>,
        route: Arc<str>,
        backend: Arc<str>,
        metrics: Arc<Metrics>,
    ) -> Self {
        RetryService(Arc::new(Retrying {
            inner,
            policy,
            budget,
            route,
            backend,
            metrics,
        }))
    }
}

/// A try's copy of the request; `None` for a request without a body (no body to buffer).
/// The request of try number `attempt` (from 1), marked as a resend after the first.
fn rebuild(parts: &http::request::Parts, body: Option<&Bytes>, attempt: u32) -> Request {
    let mut req = http::Request::new(match body {
        Some(b) => full_body(b.clone()),
        None => crate::empty_body(),
    });
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    *req.extensions_mut() = parts.extensions.clone();
    if attempt > 1 {
        req.extensions_mut()
            .insert(crate::telemetry::otel::Resend(attempt - 1));
    }
    req
}

crate::backends::route_service!(RetryService);

impl crate::DirectCall for RetryService {
    fn call(&self, req: Request) -> crate::ResponseFuture {
        Box::pin(self.clone().call_backend(req))
    }
}

impl RetryService {
    async fn call_backend(self, req: Request) -> Result<Response, BoxError> {
        let this = &*self.0;
        this.budget.deposit();
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        use http_body::Body as _;
        let bufferable =
            req.body().is_end_stream() || declared.is_some_and(|n| n <= this.policy.max_buffer);
        if !bufferable || this.policy.attempts <= 1 {
            // Too large (or of unknown length) to keep for a second try: one attempt only.
            return this.inner.call_shared(req).await;
        }
        let safe = safe_to_repeat(&req, this.policy.idempotent);
        let empty = req.body().is_end_stream();
        let (parts, body) = req.into_parts();
        let body = if empty {
            None
        } else {
            Some(crate::collect_body(body).await?)
        };
        let deadline = parts.extensions.get::<Deadline>().map(|d| d.at);
        let mut attempt = 1;
        // The access log's count of tries, when it is on.
        let tries = parts
            .extensions
            .get::<crate::telemetry::access::Tries>()
            .cloned();
        loop {
            if let Some(t) = &tries {
                t.set(attempt);
            }
            let result = this
                .inner
                .call_shared(rebuild(&parts, body.as_ref(), attempt))
                .await;
            let Some((reason, acted)) = this.policy.condition(&result) else {
                return result;
            };
            if attempt >= this.policy.attempts || (acted && !safe) {
                return result;
            }
            if !this.budget.withdraw() {
                this.metrics.retry_budget_exhausted(&this.backend);
                tracing::warn!(route = %this.route, backend = %this.backend, reason, "Retry budget exhausted; not retrying.");
                return result;
            }
            let wait = this.policy.backoff.nth(attempt);
            if deadline.is_some_and(|d| tokio::time::Instant::now() + wait >= d) {
                return result;
            }
            this.metrics.retry(&this.route, reason);
            if let Some(t) = crate::telemetry::otel::Trace::of(&parts.extensions) {
                t.event("retry", || {
                    vec![
                        crate::telemetry::otel::Attr::new("retry.attempt", i64::from(attempt + 1)),
                        crate::telemetry::otel::Attr::new("retry.reason", reason),
                        crate::telemetry::otel::Attr::new("retry.wait_ms", wait.as_millis() as i64),
                    ]
                });
            }
            tracing::info!(route = %this.route, backend = %this.backend, attempt = attempt + 1, reason, wait_ms = wait.as_millis() as u64, "Retrying.");
            drop(result);
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::types::{Dur, Size};
    use crate::empty_body;
    use std::time::Duration;
    use tower::ServiceExt;

    fn policy(attempts: u32) -> RetryPolicy {
        RetryPolicy::new(
            &RetrySpec {
                attempts,
                backoff: Dur::millis(100),
                max_backoff: Dur::millis(1000),
                on: vec![
                    RetryOn::Condition(RetryCondition::ConnectFailure),
                    RetryOn::Condition(RetryCondition::Reset),
                    RetryOn::Status(503),
                ],
                max_buffer: Size(1024),
            },
            false,
        )
    }

    fn unavailable() -> BoxError {
        Problem::backend_unavailable("b", "cannot connect to the backend").into()
    }

    fn service(
        p: RetryPolicy,
        budget: RetryBudget,
    ) -> (RetryService, tower_test::mock::Handle<Request, Response>) {
        let (mock, handle) = tower_test::mock::pair::<Request, Response>();
        let inner = RouteService::boxing(tower::util::MapErr::new(mock, |e: BoxError| e));
        let svc = RetryService::new(
            inner,
            Arc::new(p),
            Arc::new(budget),
            "r".into(),
            "b".into(),
            Arc::new(Metrics::new()),
        );
        (svc, handle)
    }

    #[tokio::test(start_paused = true)]
    async fn connect_failures_are_retried_even_for_post() {
        let (svc, mut handle) = service(
            policy(3),
            RetryBudget::new(Duration::from_secs(10), 100, 0.2),
        );
        let req = http::Request::post("/x").body(empty_body()).unwrap();
        let call = tokio::spawn(svc.oneshot(req));
        for _ in 0..2 {
            let (_, send) = handle.next_request().await.unwrap();
            send.send_error(unavailable());
        }
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(http::Response::new(empty_body()));
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }

    #[tokio::test(start_paused = true)]
    async fn post_is_not_retried_after_the_backend_may_have_acted() {
        let (svc, mut handle) = service(
            policy(3),
            RetryBudget::new(Duration::from_secs(10), 100, 0.2),
        );
        let req = http::Request::post("/x").body(empty_body()).unwrap();
        let call = tokio::spawn(svc.oneshot(req));
        let (_, send) = handle.next_request().await.unwrap();
        let mut resp = http::Response::new(empty_body());
        *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        send.send_response(resp);
        assert_eq!(call.await.unwrap().unwrap().status(), 503);
        // With an Idempotency-Key the same answer is retried.
        let req = http::Request::post("/x")
            .header("idempotency-key", "k1")
            .body(empty_body())
            .unwrap();
        let (svc, mut handle) = service(
            policy(2),
            RetryBudget::new(Duration::from_secs(10), 100, 0.2),
        );
        let call = tokio::spawn(svc.oneshot(req));
        let (_, send) = handle.next_request().await.unwrap();
        let mut resp = http::Response::new(empty_body());
        *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        send.send_response(resp);
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(http::Response::new(empty_body()));
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }

    #[tokio::test(start_paused = true)]
    async fn grpc_unavailable_is_retried_when_the_route_names_it() {
        let mut p = policy(2);
        p.on.push(RetryOn::Condition(RetryCondition::Unavailable));
        let (svc, mut handle) = service(p, RetryBudget::new(Duration::from_secs(10), 100, 0.2));
        let call = tokio::spawn(svc.oneshot(http::Request::get("/x").body(empty_body()).unwrap()));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_error(crate::backends::grpc::status::problem(
            "b",
            tonic::Code::Unavailable,
            "",
            None,
        ));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(http::Response::new(empty_body()));
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }

    #[tokio::test(start_paused = true)]
    async fn an_exhausted_budget_stops_retries() {
        // No reserve, 0 % of deposits: no retry is ever allowed.
        let (svc, mut handle) =
            service(policy(5), RetryBudget::new(Duration::from_secs(1), 0, 0.0));
        let call = tokio::spawn(svc.oneshot(http::Request::get("/x").body(empty_body()).unwrap()));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_error(unavailable());
        assert!(call.await.unwrap().is_err());
    }

    /// The layer order's reason for retries inside the overall timeout: the retry layer reads
    /// the deadline the timeout set (on Tokio's clock) and stops before a wait would pass it,
    /// answering with the backend's last failure rather than a 504.
    #[tokio::test(start_paused = true)]
    async fn retries_inside_the_overall_timeout_stop_before_its_deadline() {
        use tower::Layer;
        let (svc, mut handle) = service(
            policy(50),
            RetryBudget::new(Duration::from_secs(10), 1000, 1.0),
        );
        let svc =
            crate::middleware::timeout::TimeoutLayer::new(Duration::from_millis(700)).layer(svc);
        let tries = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = tries.clone();
        tokio::spawn(async move {
            while let Some((_, send)) = handle.next_request().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                send.send_error(unavailable());
            }
        });
        let started = tokio::time::Instant::now();
        let err = svc
            .oneshot(http::Request::get("/x").body(empty_body()).unwrap())
            .await
            .unwrap_err();
        let p = err.downcast_ref::<Problem>().expect("a Problem");
        assert_eq!(p.kind, crate::error::Kind::BACKEND_UNAVAILABLE, "{p}");
        assert!(started.elapsed() < Duration::from_millis(700));
        assert!(tries.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    }
}
