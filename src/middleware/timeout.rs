//! The overall deadline of a request: sets [`Deadline`] for the layers and backend below it and
//! fails with a 504 (`Problem::timeout`) when the backend has not answered in time — or
//! with a 408 (`ClientBody::TooSlow`, the client's fault) when the client was still sending its
//! body then. Its timer is the request's only one unless a per-try timeout ends sooner: the
//! breaker judges a call the deadline ended when the call is dropped, and a per-try timeout
//! longer than what is left of the deadline sets no timer.

use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tower::{Layer, Service};

use super::context::{BodyProgress, Deadline};
use crate::error::{ClientBody, Problem};
use crate::{BoxError, Request, Response, ResponseFuture};

#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    after: Duration,
    /// The overall timeout sets the request's deadline; a per-try timeout only bounds one try.
    sets_deadline: bool,
}

impl TimeoutLayer {
    /// The overall deadline of a request.
    pub fn new(after: Duration) -> Self {
        TimeoutLayer {
            after,
            sets_deadline: true,
        }
    }

    /// The deadline of one attempt, inside the retry layer.
    pub fn per_try(after: Duration) -> Self {
        TimeoutLayer {
            after,
            sets_deadline: false,
        }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = TimeoutService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TimeoutService {
            inner,
            after: self.after,
            sets_deadline: self.sets_deadline,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TimeoutService<S> {
    inner: S,
    after: Duration,
    sets_deadline: bool,
}

impl<S> Service<Request> for TimeoutService<S>
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
        around(self.after, self.sets_deadline, req, |r| self.inner.call(r))
    }
}

impl crate::DirectCall for TimeoutService<crate::RouteService> {
    fn call(&self, req: Request) -> ResponseFuture {
        around(self.after, self.sets_deadline, req, |r| {
            self.inner.call_shared(r)
        })
    }
}

/// The layer's work around the call below it (`call`).
fn around<F>(
    after: Duration,
    sets_deadline: bool,
    mut req: Request,
    call: impl FnOnce(Request) -> F,
) -> ResponseFuture
where
    F: std::future::Future<Output = Result<Response, BoxError>> + Send + 'static,
{
    let deadline = Instant::now() + after;
    if sets_deadline {
        req.extensions_mut().insert(Deadline {
            at: deadline,
            total: after,
        });
    } else if req
        .extensions()
        .get::<Deadline>()
        .is_some_and(|d| d.at <= deadline)
    {
        // A try that cannot outlast the request's deadline needs no timer of its own: the
        // overall timeout ends it. One timer per request on the fast path.
        return Box::pin(call(req));
    }
    let progress = req.extensions().get::<BodyProgress>().cloned();
    let fut = call(req);
    Box::pin(async move {
        match tokio::time::timeout_at(deadline, fut).await {
            Ok(result) => result,
            Err(_) => Err(expired(after, progress.as_ref())),
        }
    })
}

/// The error of a deadline that passed: the client's (408) when its body was still arriving
/// (`progress` unfinished), else the backend's (504). Every layer that races a deadline
/// answers with this.
pub fn expired(after: Duration, progress: Option<&BodyProgress>) -> BoxError {
    if progress.is_some_and(|p| !p.finished()) {
        ClientBody::TooSlow.into()
    } else {
        Problem::timeout(after).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::empty_body;
    use tower::ServiceExt;

    #[tokio::test(start_paused = true)]
    async fn expires_with_gateway_timeout() {
        let (svc, mut handle) = tower_test::mock::pair::<Request, Response>();
        let svc = TimeoutLayer::new(Duration::from_secs(2)).layer(svc.map_err(|e| e as BoxError));
        let call = tokio::spawn(svc.oneshot(http::Request::new(empty_body())));
        let (req, _send) = handle.next_request().await.unwrap();
        assert!(req.extensions().get::<Deadline>().is_some());
        let err = call.await.unwrap().unwrap_err();
        assert!(matches!(
            err.downcast_ref::<Problem>(),
            Some(p) if p.kind == crate::error::Kind::TIMEOUT
        ));
    }
}
