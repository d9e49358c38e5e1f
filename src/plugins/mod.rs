//! Plugins: the open set of per-route request/response processing, wrapped around a route's
//! middleware and backend when the route is built (see `middleware::stack`).
//!
//! A plugin validates its settings without I/O and then wraps the route's inner service. The
//! registry is an explicit list: adding a plugin means adding it to [`REGISTRY`].

pub mod api_key;
pub mod cors;
pub mod headers;
pub mod ip;

use std::sync::Arc;
use std::task::{Context, Poll};

use crate::{BoxError, Request, ResponseFuture, RouteService};

pub trait Plugin: Send + Sync + 'static {
    /// The key that names the plugin in a route's `plugins:` list.
    fn name(&self) -> &'static str;
    /// Checks the plugin's settings. Pure.
    fn validate(&self, config: &serde_json::Value) -> Result<(), String>;
    /// Wraps `inner` with this plugin. Called once per route when config loads.
    fn wrap(&self, config: &serde_json::Value, inner: RouteService)
    -> Result<RouteService, String>;
}

/// Every plugin Switchyard knows.
pub static REGISTRY: &[&dyn Plugin] = &[
    &api_key::ApiKeyPlugin,
    &cors::CorsPlugin,
    &headers::HeadersPlugin,
    &ip::IpPlugin,
];

pub fn find(name: &str) -> Option<&'static dyn Plugin> {
    REGISTRY.iter().copied().find(|p| p.name() == name)
}

pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|p| p.name()).collect()
}

/// A plugin that compiles its settings once, when the route is built, and then decides on
/// each request with them: it passes the request on to the route's inner service, or answers
/// it itself (a refusal, a preflight).
pub trait Guard: Send + Sync + 'static {
    /// The key that names the plugin in a route's `plugins:` list.
    const NAME: &'static str;
    /// The compiled settings.
    type Settings: Send + Sync + 'static;
    /// Reads and checks the settings. Pure.
    fn compile(config: &serde_json::Value) -> Result<Self::Settings, String>;
    /// Handles one request.
    fn call(settings: &Arc<Self::Settings>, inner: &RouteService, req: Request) -> ResponseFuture;
}

impl<G: Guard> Plugin for G {
    fn name(&self) -> &'static str {
        G::NAME
    }

    fn validate(&self, config: &serde_json::Value) -> Result<(), String> {
        G::compile(config).map(|_| ())
    }

    fn wrap(
        &self,
        config: &serde_json::Value,
        inner: RouteService,
    ) -> Result<RouteService, String> {
        Ok(RouteService::new(Guarded::<G> {
            inner,
            settings: Arc::new(G::compile(config)?),
        }))
    }
}

/// A [`Guard`] around a route's inner service.
struct Guarded<G: Guard> {
    inner: RouteService,
    settings: Arc<G::Settings>,
}

impl<G: Guard> Clone for Guarded<G> {
    fn clone(&self) -> Self {
        Guarded {
            inner: self.inner.clone(),
            settings: self.settings.clone(),
        }
    }
}

impl<G: Guard> tower::Service<Request> for Guarded<G> {
    type Response = crate::Response;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> ResponseFuture {
        G::call(&self.settings, &self.inner, req)
    }
}
