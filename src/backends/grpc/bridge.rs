//! The gRPC bridge behind the one trait pair: what the rest of the gateway asks of it.

use std::path::Path;
use std::sync::Arc;

use super::validate::{valid_grpc_method, validate_grpc_backend, validate_grpc_route};
use super::{GrpcBackend, GrpcRouteService};
use crate::RouteService;
use crate::backends::BuildContext;
use crate::backends::bridge::{Bridge, BridgeSpec, Generated};
use crate::backends::live::Findings;
use crate::backends::websocket::WsRouteService;
use crate::config::template::PathTemplate;
use crate::config::validate::Checks;
use crate::config::{BackendSpec, FieldError, GrpcBackendSpec, RouteSpec, WebSocketSpec};
use crate::telemetry::metrics::Metrics;

impl BridgeSpec for GrpcBackendSpec {
    type Backend = GrpcBackend;

    fn validate(&self, cx: &mut Checks, base: &str) {
        validate_grpc_backend(cx, base, self);
    }

    fn validate_route(
        &self,
        cx: &mut Checks,
        base: &str,
        route: &RouteSpec,
        _template: Option<&PathTemplate>,
    ) {
        let id = Some(route.id.as_str());
        match &route.grpc {
            None => cx.err(
                base,
                id,
                "a route to a grpc backend needs `grpc: { method: package.Service/Method }`",
            ),
            Some(g) => validate_grpc_route(cx, base, id, g),
        }
    }

    fn validate_websocket(
        &self,
        cx: &mut Checks,
        base: &str,
        route: &RouteSpec,
        ws: &WebSocketSpec,
        _template: Option<&PathTemplate>,
    ) {
        let (id, wb) = (Some(route.id.as_str()), format!("{base}.websocket"));
        match &ws.grpc {
            None => cx.err(
                &wb,
                id,
                "a WebSocket route to a grpc backend needs `grpc: { method: package.Service/Method }`",
            ),
            Some(g) if !valid_grpc_method(&g.method) => cx.err(
                &format!("{wb}.grpc.method"),
                id,
                format!(
                    "`{}` is not a method name like `package.Service/Method`",
                    g.method
                ),
            ),
            Some(_) => {}
        }
    }

    fn build(
        &self,
        name: &str,
        _metrics: &Arc<Metrics>,
        cx: &BuildContext<'_>,
    ) -> Result<GrpcBackend, String> {
        GrpcBackend::new(name, self, cx)
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

impl Bridge for GrpcBackend {
    fn ready(&self) -> bool {
        GrpcBackend::ready(self)
    }

    fn route_service(self: Arc<Self>, route: &RouteSpec) -> Result<RouteService, FieldError> {
        let spec = route
            .grpc
            .as_ref()
            .ok_or("a route to a grpc backend needs `grpc:` settings")?;
        Ok(RouteService::new(GrpcRouteService::new(self, route, spec)?))
    }

    fn websocket(
        self: Arc<Self>,
        route: &RouteSpec,
        ws: &WebSocketSpec,
        metrics: &Arc<Metrics>,
    ) -> Result<RouteService, String> {
        Ok(RouteService::new(WsRouteService::grpc(
            self, route, ws, metrics,
        )?))
    }

    /// Methods with `google.api.http` annotations and native routes, when enabled.
    fn generated_routes(&self) -> Generated {
        GrpcBackend::generated_routes(self)
    }

    /// The descriptors again (edited protos, the server's reflection), on the same channel.
    fn refresh(&self, spec: &BackendSpec, cx: &BuildContext<'_>) -> Result<(), String> {
        match spec {
            BackendSpec::Grpc(g) => self.reload_descriptors(g, cx),
            _ => Ok(()),
        }
    }
}
