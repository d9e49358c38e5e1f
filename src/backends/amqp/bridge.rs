//! The AMQP bridge behind the one trait pair: what the rest of the gateway asks of it.

use std::path::Path;
use std::sync::Arc;

use super::validate::{validate_amqp_backend, validate_amqp_route, validate_ws_amqp};
use super::{AmqpBackend, AmqpRouteService};
use crate::RouteService;
use crate::backends::BuildContext;
use crate::backends::bridge::{Bridge, BridgeSpec};
use crate::backends::live::Findings;
use crate::backends::websocket::WsRouteService;
use crate::config::template::PathTemplate;
use crate::config::validate::Checks;
use crate::config::{AmqpBackendSpec, DIRECT_REPLY_TO, FieldError, RouteSpec, WebSocketSpec};
use crate::telemetry::metrics::Metrics;

impl BridgeSpec for AmqpBackendSpec {
    type Backend = AmqpBackend;

    fn validate(&self, cx: &mut Checks, base: &str) {
        validate_amqp_backend(cx, base, self);
    }

    fn validate_route(
        &self,
        cx: &mut Checks,
        base: &str,
        route: &RouteSpec,
        template: Option<&PathTemplate>,
    ) {
        let id = Some(route.id.as_str());
        match &route.amqp {
            None => cx.err(
                base,
                id,
                "a route to an amqp backend needs `amqp: { exchange: …, routing_key: … }`",
            ),
            Some(a) => validate_amqp_route(cx, base, id, a, template),
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
        match &ws.amqp {
            None => cx.err(
                &wb,
                id,
                "a WebSocket route to an amqp backend needs `amqp: { exchange: …, routing_key: … }` (publish frames) and/or `amqp: { consume: … }` (push messages)",
            ),
            Some(a) => validate_ws_amqp(cx, &format!("{wb}.amqp"), id, a, template),
        }
    }

    fn build(
        &self,
        name: &str,
        metrics: &Arc<Metrics>,
        cx: &BuildContext<'_>,
    ) -> Result<AmqpBackend, String> {
        AmqpBackend::new(name, self, metrics, cx.base, &cx.gate)
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

/// The spool's ordered sender: one channel, confirms awaited together.
#[async_trait::async_trait]
impl crate::durable::spool::OrderedSend for AmqpRouteService {
    async fn send_ordered(&self, reqs: Vec<crate::Request>) -> Vec<Result<(), crate::BoxError>> {
        self.publish_ordered(reqs).await
    }
}

impl Bridge for AmqpBackend {
    fn ready(&self) -> bool {
        AmqpBackend::ready(self)
    }

    fn problem(&self) -> Option<String> {
        AmqpBackend::problem(self)
    }

    fn route_service(self: Arc<Self>, route: &RouteSpec) -> Result<RouteService, FieldError> {
        let spec = route
            .amqp
            .as_ref()
            .ok_or("a route to an amqp backend needs `amqp:` settings")?;
        Ok(RouteService::new(AmqpRouteService::new(&self, spec)?))
    }

    fn websocket(
        self: Arc<Self>,
        route: &RouteSpec,
        ws: &WebSocketSpec,
        metrics: &Arc<Metrics>,
    ) -> Result<RouteService, String> {
        Ok(RouteService::new(WsRouteService::amqp(
            self, route, ws, metrics,
        )?))
    }

    /// Publishes without a reply keep their order with several in flight, on a backend with
    /// at least two channels (a batch holds one channel while it lasts).
    fn ordered_sender(
        self: Arc<Self>,
        route: &RouteSpec,
    ) -> Option<Arc<dyn crate::durable::spool::OrderedSend>> {
        let spec = route.amqp.as_ref()?;
        if spec.reply.is_some() || self.shared.spec.channels < 2 {
            return None;
        }
        Some(Arc::new(AmqpRouteService::new(&self, spec).ok()?))
    }

    /// The named reply queues the serving routes wait on, and whether its channels consume
    /// direct reply-to.
    fn activate(&self, name: &str, routes: &[RouteSpec]) {
        let replies = || {
            routes
                .iter()
                .filter(|r| r.backend == name)
                .filter_map(|r| r.amqp.as_ref()?.reply.as_ref())
        };
        let queues = replies()
            .filter(|reply| reply.queue != DIRECT_REPLY_TO)
            .map(|reply| reply.queue.clone())
            .collect();
        let direct = replies().any(|reply| reply.queue == DIRECT_REPLY_TO);
        self.set_reply_queues(queues, direct);
    }
}
