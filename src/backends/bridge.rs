//! The one trait pair every bridge implements (`backends/<protocol>/`), so that the rest of the
//! gateway never names a protocol: [`BridgeSpec`] for its config section (pure checks, the
//! inert build, `validate --live`) and [`Bridge`] for the built backend (readiness, the service
//! at the bottom of a route's stack, the WebSocket session, the spool's ordered sender). The
//! closed set of kinds stays the `BackendSpec` enum, which forwards to these.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use super::BuildContext;
use super::live::Findings;
use crate::RouteService;
use crate::config::template::PathTemplate;
use crate::config::validate::Checks;
use crate::config::{BackendSpec, FieldError, RouteSpec, WebSocketSpec};
use crate::telemetry::metrics::Metrics;

/// A bridge's config section.
pub trait BridgeSpec {
    type Backend: Bridge;

    /// Pure checks of the backend's own section, at `base` (`backends.<name>`).
    fn validate(&self, cx: &mut Checks, base: &str);

    /// Pure checks of a route to this backend (not a WebSocket one), at `base` (`routes[i]`).
    fn validate_route(
        &self,
        cx: &mut Checks,
        base: &str,
        route: &RouteSpec,
        template: Option<&PathTemplate>,
    );

    /// Pure checks of a WebSocket route's bridge settings (`websocket.<protocol>`).
    fn validate_websocket(
        &self,
        cx: &mut Checks,
        base: &str,
        route: &RouteSpec,
        ws: &WebSocketSpec,
        template: Option<&PathTemplate>,
    );

    /// Builds the backend as an inert value: connections and probes wait on the build's
    /// `StartGate`. Fails only on a broken definition (files that do not load), never because
    /// the service is unreachable.
    fn build(
        &self,
        name: &str,
        metrics: &Arc<Metrics>,
        cx: &BuildContext<'_>,
    ) -> Result<Self::Backend, String>;

    /// `validate --live`: tries the real service, creating and sending nothing.
    fn live(
        &self,
        name: &str,
        routes: &[&RouteSpec],
        base: &Path,
    ) -> impl Future<Output = Findings> + Send;
}

/// The routes a backend defines itself ([`Bridge::generated_routes`]). One it cannot serve is
/// left out and said (logged, listed by `/routes` and `validate`), and the others serve.
#[derive(Debug, Default)]
pub struct Generated {
    pub routes: Vec<RouteSpec>,
    pub unserved: Vec<Unserved>,
}

/// A route a backend would make but cannot serve, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unserved {
    pub backend: String,
    /// The route id it would have.
    pub id: String,
    /// What it stands for (`GET /v1/{name=**}/x` of `pkg.Service/Method`).
    pub what: String,
    pub reason: String,
}

impl std::fmt::Display for Unserved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "backend `{}`: route `{}`, {}, is not served: {}",
            self.backend, self.id, self.what, self.reason
        )
    }
}

/// A built backend, shared by its routes and kept across reloads that leave its spec as it was.
pub trait Bridge: Send + Sync + 'static {
    /// Whether the backend can take requests now.
    fn ready(&self) -> bool;

    /// Why the backend is not ready, when it can say.
    fn problem(&self) -> Option<String> {
        None
    }

    /// The service at the bottom of a route's stack.
    fn route_service(self: Arc<Self>, route: &RouteSpec) -> Result<RouteService, FieldError>;

    /// The service of a WebSocket route: the handshake, then a session bridged to this backend.
    fn websocket(
        self: Arc<Self>,
        route: &RouteSpec,
        ws: &WebSocketSpec,
        metrics: &Arc<Metrics>,
    ) -> Result<RouteService, String>;

    /// A sender that keeps a route's order with several messages in flight, for the spool's
    /// forwarder, where the backend has one.
    fn ordered_sender(
        self: Arc<Self>,
        _route: &RouteSpec,
    ) -> Option<Arc<dyn crate::durable::spool::OrderedSend>> {
        None
    }

    /// What the serving routes need of the backend, applied once their table serves.
    fn activate(&self, _name: &str, _routes: &[RouteSpec]) {}

    /// Routes the backend defines itself, and those it cannot serve.
    fn generated_routes(&self) -> Generated {
        Generated::default()
    }

    /// Reloads what a kept backend reads from files, keeping its connections.
    fn refresh(&self, _spec: &BackendSpec, _cx: &BuildContext<'_>) -> Result<(), String> {
        Ok(())
    }
}
