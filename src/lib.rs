//! Switchyard: a protocol-bridging API gateway. This crate root holds the module tree and the
//! types every layer of the request path shares (body, request, response, route service).
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod backends;
pub mod config;
pub mod error;
pub mod jobs;
pub mod middleware;
pub mod plugins;
pub mod router;
pub mod server;
pub mod spool;
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

/// A route's whole stack (plugins, middleware, backend), built once when config loads.
pub type RouteService = tower::util::BoxCloneSyncService<Request, Response, BoxError>;

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
