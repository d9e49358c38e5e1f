//! The MQTT bridge behind the one trait pair: what the rest of the gateway asks of it.

use std::path::Path;
use std::sync::Arc;

use super::validate::{validate_mqtt_backend, validate_mqtt_route, validate_ws_mqtt};
use super::{MqttBackend, MqttRouteService};
use crate::RouteService;
use crate::backends::BuildContext;
use crate::backends::bridge::{Bridge, BridgeSpec};
use crate::backends::live::Findings;
use crate::backends::websocket::WsRouteService;
use crate::config::template::PathTemplate;
use crate::config::validate::Checks;
use crate::config::{FieldError, MqttBackendSpec, MqttProtocol, RouteSpec, WebSocketSpec};
use crate::telemetry::metrics::Metrics;

impl BridgeSpec for MqttBackendSpec {
    type Backend = MqttBackend;

    fn validate(&self, cx: &mut Checks, base: &str) {
        validate_mqtt_backend(cx, base, self);
    }

    fn validate_route(
        &self,
        cx: &mut Checks,
        base: &str,
        route: &RouteSpec,
        template: Option<&PathTemplate>,
    ) {
        let id = Some(route.id.as_str());
        let Some(m) = &route.mqtt else {
            cx.err(
                base,
                id,
                "a route to an mqtt backend needs `mqtt: { topic: … }`",
            );
            return;
        };
        validate_mqtt_route(cx, base, id, m, template);
        if self.protocol == MqttProtocol::V311 && m.response.is_some() {
            cx.err_key_route(
                &format!("{base}.mqtt.response"),
                id,
                format!(
                    "request/response needs MQTT 5 (response topic and correlation data); backend `{}` speaks 3.1.1",
                    route.backend
                ),
            );
        }
    }

    fn validate_websocket(
        &self,
        cx: &mut Checks,
        base: &str,
        route: &RouteSpec,
        ws: &WebSocketSpec,
        template: Option<&PathTemplate>,
    ) {
        let (id, wb) = (Some(route.id.as_str()), format!("{base}.websocket"));
        match &ws.mqtt {
            None => cx.err(
                &wb,
                id,
                "a WebSocket route to an mqtt backend needs `mqtt: { allow: [...] }` (JSON operations) or `mqtt: { subscribe: [...], publish: ... }` (fixed topics)",
            ),
            Some(m) => validate_ws_mqtt(cx, &format!("{wb}.mqtt"), id, m, template),
        }
    }

    fn build(
        &self,
        name: &str,
        metrics: &Arc<Metrics>,
        cx: &BuildContext<'_>,
    ) -> Result<MqttBackend, String> {
        MqttBackend::new(name, self, metrics, cx.base, &cx.gate)
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

impl Bridge for MqttBackend {
    fn ready(&self) -> bool {
        MqttBackend::ready(self)
    }

    fn problem(&self) -> Option<String> {
        MqttBackend::problem(self)
    }

    fn route_service(self: Arc<Self>, route: &RouteSpec) -> Result<RouteService, FieldError> {
        let spec = route
            .mqtt
            .as_ref()
            .ok_or("a route to an mqtt backend needs `mqtt:` settings")?;
        Ok(RouteService::new(MqttRouteService::new(
            &self, route, spec,
        )?))
    }

    fn websocket(
        self: Arc<Self>,
        route: &RouteSpec,
        ws: &WebSocketSpec,
        metrics: &Arc<Metrics>,
    ) -> Result<RouteService, String> {
        Ok(RouteService::new(WsRouteService::mqtt(
            self.handle(),
            route,
            ws,
            metrics,
        )?))
    }
}
