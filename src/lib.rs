//! Switchyard: a protocol-bridging API gateway. This crate root holds the module tree and the
//! types every layer of the request path shares (body, request, response, route service).
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod backends;
pub mod backoff;
pub mod config;
pub mod durable;
pub mod error;
pub mod middleware;
pub mod plugins;
pub mod router;
pub mod server;
pub mod store;
pub mod telemetry;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};

/// Any error crossing a service boundary. The error edge (`error::rescue`) classifies it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
/// The body type used on both sides of every route service.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BodyError>;

/// The error of a [`Body`]: a concrete type (not a bare `Box<dyn Error>`) so that futures holding
/// bodies stay provably `Send` for every lifetime.
#[derive(Debug)]
pub struct BodyError(pub BoxError);

impl BodyError {
    pub fn new(e: impl Into<BoxError>) -> Self {
        BodyError(e.into())
    }
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("body stream failed")
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}
pub type Request = http::Request<Body>;
pub type Response = http::Response<Body>;
/// The future every layer of a route's stack returns.
pub type ResponseFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, BoxError>> + Send>>;

/// A future that fails at once with `err` (a layer refusing a request).
pub fn fail(err: impl Into<BoxError>) -> ResponseFuture {
    let err = err.into();
    Box::pin(async move { Err(err) })
}

/// A route's whole stack (plugins, middleware, backend), built once when config loads, or one
/// layer of it. Cloning one is a reference count, not a copy of the stack: the front end clones
/// the route's service for every request, and layers clone the service below them for every
/// call (tower's `BoxCloneSyncService` allocated once per layer for each).
#[derive(Clone)]
pub struct RouteService(std::sync::Arc<dyn SharedCall>);

/// What a [`RouteService`] holds: a service called through a shared reference.
trait SharedCall: Send + Sync {
    fn call(&self, req: Request) -> ResponseFuture;
}

/// A layer of a route's stack: a service answering with a [`ResponseFuture`], cheap to clone.
pub trait StackLayer:
    tower::Service<Request, Response = Response, Error = BoxError, Future = ResponseFuture>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> StackLayer for S where
    S: tower::Service<Request, Response = Response, Error = BoxError, Future = ResponseFuture>
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// A service cloned for each call, so that `call` needs no `&mut`; the layers of a stack keep
/// their state behind `Arc`s, so the clone is a few reference counts.
struct CloneOnCall<S>(S);

impl<S: StackLayer> SharedCall for CloneOnCall<S> {
    fn call(&self, req: Request) -> ResponseFuture {
        let mut svc = self.0.clone();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        // The layers are ready at once (limits refuse rather than wait); a service that is
        // not yet gets a future that waits for it.
        match svc.poll_ready(&mut cx) {
            std::task::Poll::Ready(Ok(())) => svc.call(req),
            std::task::Poll::Ready(Err(e)) => fail(e),
            std::task::Poll::Pending => {
                Box::pin(async move { tower::ServiceExt::ready(&mut svc).await?.call(req).await })
            }
        }
    }
}

/// A layer called through a shared reference: it clones only what its future keeps (a
/// breaker ticket, a concurrency slot), not itself, so a request does not touch the reference
/// counts of every layer's state (which all workers share).
pub trait DirectCall: Send + Sync + 'static {
    fn call(&self, req: Request) -> ResponseFuture;
}

struct Direct<S>(S);

impl<S: DirectCall> SharedCall for Direct<S> {
    fn call(&self, req: Request) -> ResponseFuture {
        self.0.call(req)
    }
}

impl RouteService {
    /// A service whose future is already a [`ResponseFuture`] (every layer of the gateway).
    pub fn new<S: StackLayer>(svc: S) -> Self {
        RouteService(std::sync::Arc::new(CloneOnCall(svc)))
    }

    /// A layer of the gateway's own, called without a clone ([`DirectCall`]).
    pub fn direct<S: DirectCall>(svc: S) -> Self {
        RouteService(std::sync::Arc::new(Direct(svc)))
    }

    /// Calls the service through a shared reference.
    pub fn call_shared(&self, req: Request) -> ResponseFuture {
        self.0.call(req)
    }

    /// Any other service: its future is boxed.
    pub fn boxing<S>(svc: S) -> Self
    where
        S: tower::Service<Request, Response = Response, Error = BoxError>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        Self::new(tower::util::MapFuture::new(svc, |f| -> ResponseFuture {
            Box::pin(f)
        }))
    }
}

impl tower::Service<Request> for RouteService {
    type Response = Response;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> ResponseFuture {
        self.0.call(req)
    }
}

/// A header value formatted on the stack when it is short (up to 128 bytes), so that a value
/// made for every request costs one allocation, not two. `None` when it is not a valid value.
pub fn header_value(args: std::fmt::Arguments<'_>) -> Option<http::HeaderValue> {
    use std::io::Write;
    let mut buf = [0u8; 128];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    if cursor.write_fmt(args).is_err() {
        return http::HeaderValue::from_str(&std::fmt::format(args)).ok();
    }
    let n = cursor.position() as usize;
    http::HeaderValue::from_bytes(&buf[..n]).ok()
}

/// An empty body.
pub fn empty_body() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// The whole of a request body (its limit error, if any, kept as the cause).
pub async fn collect_body(body: Body) -> Result<Bytes, BoxError> {
    Ok(body
        .collect()
        .await
        .map_err(|e: BodyError| -> BoxError { Box::new(e) })?
        .to_bytes())
}

/// A body holding `bytes` in full.
pub fn full_body(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}
