//! The HTTP bridge behind the one trait pair: what the rest of the gateway asks of it.

use std::path::Path;
use std::sync::Arc;

use super::validate::{validate_http_backend, validate_http_route};
use super::{HttpBackend, HttpRouteService};
use crate::RouteService;
use crate::backends::BuildContext;
use crate::backends::bridge::{Bridge, BridgeSpec};
use crate::backends::live::Findings;
use crate::backends::websocket::WsRouteService;
use crate::config::template::PathTemplate;
use crate::config::validate::Checks;
use crate::config::{FieldError, HttpBackendSpec, RouteSpec, WebSocketSpec};
use crate::telemetry::metrics::Metrics;

impl BridgeSpec for HttpBackendSpec {
    type Backend = HttpBackend;

    fn validate(&self, cx: &mut Checks, base: &str) {
        validate_http_backend(cx, base, self);
    }

    fn validate_route(
        &self,
        cx: &mut Checks,
        base: &str,
        route: &RouteSpec,
        template: Option<&PathTemplate>,
    ) {
        if let Some(h) = &route.http {
            validate_http_route(cx, base, Some(route.id.as_str()), h, template);
        }
    }

    /// A WebSocket proxied to an HTTP upstream takes the route's `http:` settings.
    fn validate_websocket(
        &self,
        cx: &mut Checks,
        base: &str,
        route: &RouteSpec,
        _ws: &WebSocketSpec,
        template: Option<&PathTemplate>,
    ) {
        self.validate_route(cx, base, route, template);
    }

    fn build(
        &self,
        name: &str,
        _metrics: &Arc<Metrics>,
        cx: &BuildContext<'_>,
    ) -> Result<HttpBackend, String> {
        HttpBackend::new(name, self, cx.base, &cx.gate)
    }

    fn live(
        &self,
        name: &str,
        routes: &[&RouteSpec],
        base: &Path,
    ) -> impl Future<Output = Findings> + Send {
        super::live::check(name, self, routes, base)
    }
}

impl Bridge for HttpBackend {
    fn ready(&self) -> bool {
        HttpBackend::ready(self)
    }

    fn route_service(self: Arc<Self>, route: &RouteSpec) -> Result<RouteService, FieldError> {
        Ok(RouteService::new(HttpRouteService::new(
            self,
            route.http.clone().unwrap_or_default(),
        )))
    }

    fn websocket(
        self: Arc<Self>,
        route: &RouteSpec,
        ws: &WebSocketSpec,
        metrics: &Arc<Metrics>,
    ) -> Result<RouteService, String> {
        let upstream = HttpRouteService::new(self, route.http.clone().unwrap_or_default());
        Ok(RouteService::new(WsRouteService::upstream(
            upstream, route, ws, metrics,
        )))
    }
}
