//! Plugins: the open set of per-route request/response processing, wrapped around a route's
//! middleware and backend when the route is built (see `middleware::stack`).
//!
//! A plugin validates its settings without I/O and then wraps the route's inner service. The
//! registry is an explicit list: adding a plugin means adding it to [`REGISTRY`].

pub mod api_key;
pub mod client_cert;
pub mod cors;
pub mod forward_auth;
pub mod headers;
pub mod ip;
pub mod jwt;
pub mod script;

use std::sync::Arc;
use std::task::{Context, Poll};

use crate::backends::BuildContext;
use crate::config::RouteSpec;
use crate::{BoxError, Request, ResponseFuture, RouteService};

pub trait Plugin: Send + Sync + 'static {
    /// The key that names the plugin in a route's `plugins:` list.
    fn name(&self) -> &'static str;
    /// Checks the plugin's settings. Pure.
    fn validate(&self, config: &serde_json::Value) -> Result<(), String>;
    /// Wraps `inner` with this plugin for `route`. Called once per route when config loads;
    /// may read the files the settings name (recorded in `cx`, so that a change reloads the
    /// config) and start background work that waits on `cx`'s gate.
    fn wrap(
        &self,
        config: &serde_json::Value,
        inner: RouteService,
        route: &RouteSpec,
        cx: &BuildContext<'_>,
    ) -> Result<RouteService, String>;
}

/// Every plugin Switchyard knows.
pub static REGISTRY: &[&dyn Plugin] = &[
    &api_key::ApiKeyPlugin,
    &client_cert::ClientCertPlugin,
    &cors::CorsPlugin,
    &forward_auth::ForwardAuthPlugin,
    &headers::HeadersPlugin,
    &ip::IpPlugin,
    &jwt::JwtPlugin,
    &script::ScriptPlugin,
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
    /// Builds the settings for a route: [`Guard::compile`], unless the plugin reads files or
    /// the network (see [`Plugin::wrap`]).
    fn build(config: &serde_json::Value, cx: &BuildContext<'_>) -> Result<Self::Settings, String> {
        let _ = cx;
        Self::compile(config)
    }
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
        _route: &RouteSpec,
        cx: &BuildContext<'_>,
    ) -> Result<RouteService, String> {
        Ok(RouteService::new(Guarded::<G> {
            inner,
            settings: Arc::new(G::build(config, cx)?),
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

/// Removes every query parameter whose decoded name is `name` from the request's target, and
/// returns the first one's decoded value: a credential in the query (browsers' WebSockets
/// cannot set headers) never goes on to the backend. `Err` when the target left could not be
/// made, and the request must not go on.
pub(crate) fn take_query_param(req: &mut Request, name: &str) -> Result<Option<Vec<u8>>, ()> {
    let Some(query) = req.uri().query() else {
        return Ok(None);
    };
    let decode = |s: &str| percent_encoding::percent_decode_str(s).collect::<Vec<u8>>();
    let mut value = None;
    let mut found = false;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if decode(k) != name.as_bytes() {
                return true;
            }
            found = true;
            if value.is_none() {
                value = Some(decode(v));
            }
            false
        })
        .collect();
    if found {
        let path = req.uri().path();
        let target = if rest.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{}", rest.join("&"))
        };
        *req.uri_mut() = target.parse().map_err(|_| ())?;
    }
    Ok(value)
}
