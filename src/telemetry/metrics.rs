//! Prometheus metrics: requests by route/method/status, latency by route, backend errors,
//! reloads by result, open connections. Rendered by the admin listener's `/metrics`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub use super::requests::RouteMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendErrorLabels {
    backend: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BrokerEventLabels {
    backend: String,
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    route: Arc<str>,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FrameLabels {
    route: Arc<str>,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    route: Arc<str>,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabels {
    scope: Arc<str>,
}

pub struct Metrics {
    registry: Registry,
    /// Requests and their latency, per route, in per-worker shards.
    requests: Arc<super::requests::Requests>,
    /// The handle of the answers no route made (404s, bad requests), kept at hand: a flood of
    /// them must not queue on the table of handles.
    unrouted: std::sync::OnceLock<(Arc<str>, RouteMetrics)>,
    backend_errors: Family<BackendErrorLabels, Counter>,
    backend_ready: Family<BackendLabels, Gauge>,
    reloads: Family<ReloadLabels, Counter>,
    config_version: Gauge,
    retries: Family<RetryLabels, Counter>,
    budget_exhausted: Family<BackendLabels, Counter>,
    breaker: Family<BackendLabels, Gauge>,
    rate_limited: Family<RouteLabels, Counter>,
    shed: Family<ScopeLabels, Counter>,
    broker_events: Family<BrokerEventLabels, Counter>,
    streams: Family<BackendLabels, Gauge>,
    websockets: Family<RouteLabels, Gauge>,
    ws_frames: Family<FrameLabels, Counter>,
    ws_closes: Family<CloseLabels, Counter>,
    spool_messages: Family<RouteLabels, Gauge>,
    spool_bytes: Family<RouteLabels, Gauge>,
    spool_age: Family<RouteLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    spool_events: Family<SpoolEventLabels, Counter>,
    script_failures: Family<ScriptLabels, Counter>,
    pub open_connections: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScriptLabels {
    route: String,
    script: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpoolEventLabels {
    route: Arc<str>,
    event: &'static str,
}

/// One route's spool, as exported.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpoolGauges {
    pub messages: u64,
    pub bytes: u64,
    /// Seconds the oldest message has waited (0 when empty).
    pub age: f64,
}

/// One WebSocket connection's counters, looked up once when it opens.
pub struct WsCounters {
    pub received: Counter,
    pub sent: Counter,
    open: Gauge,
    route: Arc<str>,
}

impl WsCounters {
    /// Counts the close code the connection ended with; the open count drops with `self`.
    pub fn closed(&self, metrics: &Metrics, code: u16) {
        metrics
            .ws_closes
            .get_or_create(&CloseLabels {
                route: self.route.clone(),
                code,
            })
            .inc();
    }
}

impl Drop for WsCounters {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("switchyard");
        let requests = Arc::new(super::requests::Requests::default());
        let backend_errors = Family::<BackendErrorLabels, Counter>::default();
        let backend_ready = Family::<BackendLabels, Gauge>::default();
        let reloads = Family::<ReloadLabels, Counter>::default();
        let config_version = Gauge::default();
        let open_connections = Gauge::default();
        let retries = Family::<RetryLabels, Counter>::default();
        let budget_exhausted = Family::<BackendLabels, Counter>::default();
        let breaker = Family::<BackendLabels, Gauge>::default();
        let rate_limited = Family::<RouteLabels, Counter>::default();
        let shed = Family::<ScopeLabels, Counter>::default();
        let script_failures = Family::<ScriptLabels, Counter>::default();
        registry.register(
            "script_failures",
            "Requests a script plugin failed (an error, a limit), answered 500, by route and script",
            script_failures.clone(),
        );
        let broker_events = Family::<BrokerEventLabels, Counter>::default();
        let streams = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "open_streams",
            "Live broker subscriptions held for clients (SSE streams, WebSocket subscriptions), by backend",
            streams.clone(),
        );
        let websockets = Family::<RouteLabels, Gauge>::default();
        registry.register(
            "websocket_connections",
            "WebSocket connections open, by route",
            websockets.clone(),
        );
        let ws_frames = Family::<FrameLabels, Counter>::default();
        registry.register(
            "websocket_frames",
            "WebSocket data frames by route and direction (received from or sent to clients)",
            ws_frames.clone(),
        );
        let ws_closes = Family::<CloseLabels, Counter>::default();
        registry.register(
            "websocket_closes",
            "WebSocket connections closed, by route and close code",
            ws_closes.clone(),
        );
        let spool_messages = Family::<RouteLabels, Gauge>::default();
        registry.register(
            "spool_messages",
            "Messages waiting in the spool, by route",
            spool_messages.clone(),
        );
        let spool_bytes = Family::<RouteLabels, Gauge>::default();
        registry.register(
            "spool_bytes",
            "Bytes waiting in the spool, by route",
            spool_bytes.clone(),
        );
        let spool_age = Family::<RouteLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "spool_oldest_age_seconds",
            "Age of the oldest message waiting in the spool, by route",
            spool_age.clone(),
        );
        let spool_events = Family::<SpoolEventLabels, Counter>::default();
        registry.register(
            "spool_events",
            "Spool events by route: spooled, forwarded, dead_lettered, full",
            spool_events.clone(),
        );
        registry.register(
            "broker_events",
            "Message broker events by backend: connected, disconnected, confirmed, returned, nacked, confirm_timeout, reply_unmatched",
            broker_events.clone(),
        );
        registry.register(
            "retries",
            "Retries made, by route and reason",
            retries.clone(),
        );
        registry.register(
            "retry_budget_exhausted",
            "Retries refused because the backend's retry budget was spent",
            budget_exhausted.clone(),
        );
        registry.register(
            "breaker_state",
            "Circuit breaker state by backend: 0 closed, 1 open, 2 half-open",
            breaker.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused with 429, by route",
            rate_limited.clone(),
        );
        registry.register(
            "load_shed",
            "Requests refused with 503 by a concurrency limit, by route or backend",
            shed.clone(),
        );
        // `requests_total` and `request_duration_seconds`, merged from their shards.
        registry.register_collector(Box::new(requests.clone()));
        registry.register(
            "backend_errors",
            "Backend calls that failed, by backend and the status answered",
            backend_errors.clone(),
        );
        registry.register(
            "backend_ready",
            "1 when the backend is ready",
            backend_ready.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads, by result",
            reloads.clone(),
        );
        registry.register(
            "config_version",
            "Version of the config being served",
            config_version.clone(),
        );
        registry.register(
            "open_connections",
            "Open client connections",
            open_connections.clone(),
        );
        Metrics {
            registry,
            requests,
            unrouted: std::sync::OnceLock::new(),
            backend_errors,
            backend_ready,
            reloads,
            config_version,
            retries,
            budget_exhausted,
            breaker,
            rate_limited,
            shed,
            broker_events,
            streams,
            websockets,
            ws_frames,
            ws_closes,
            spool_messages,
            spool_bytes,
            spool_age,
            spool_events,
            script_failures,
            open_connections,
        }
    }

    /// A script failed on a request of `route`.
    pub fn script_failure(&self, route: &str, script: &str) {
        self.script_failures
            .get_or_create(&ScriptLabels {
                route: route.to_string(),
                script: script.to_string(),
            })
            .inc();
    }

    /// A WebSocket connection opened on `route`: its counters.
    pub fn websocket(&self, route: &Arc<str>) -> WsCounters {
        let open = self
            .websockets
            .get_or_create(&RouteLabels {
                route: route.clone(),
            })
            .clone();
        open.inc();
        let frames = |direction| {
            self.ws_frames
                .get_or_create(&FrameLabels {
                    route: route.clone(),
                    direction,
                })
                .clone()
        };
        WsCounters {
            received: frames("received"),
            sent: frames("sent"),
            open,
            route: route.clone(),
        }
    }

    /// A stream to a client opened (`+1`) or closed (`-1`).
    pub fn stream(&self, backend: &str, delta: i64) {
        self.streams
            .get_or_create(&BackendLabels {
                backend: backend.to_string(),
            })
            .inc_by(delta);
    }

    /// The counter of one backend's broker event, for a caller that counts it on every message
    /// (no label lookup each time).
    pub fn broker_event_counter(&self, backend: &str, event: &'static str) -> Counter {
        self.broker_events
            .get_or_create(&BrokerEventLabels {
                backend: backend.to_string(),
                event,
            })
            .clone()
    }

    /// Counts an event of a broker connection (see `broker_events`).
    pub fn broker_event(&self, backend: &str, event: &'static str) {
        self.broker_events
            .get_or_create(&BrokerEventLabels {
                backend: backend.to_string(),
                event,
            })
            .inc();
    }

    pub fn retry(&self, route: &Arc<str>, reason: &'static str) {
        self.retries
            .get_or_create(&RetryLabels {
                route: route.clone(),
                reason,
            })
            .inc();
    }

    pub fn retry_budget_exhausted(&self, backend: &str) {
        self.budget_exhausted
            .get_or_create(&BackendLabels {
                backend: backend.to_string(),
            })
            .inc();
    }

    pub fn breaker_state(&self, backend: &str, state: crate::middleware::breaker::State) {
        use crate::middleware::breaker::State;
        let v = match state {
            State::Closed => 0,
            State::Open { .. } => 1,
            State::HalfOpen { .. } => 2,
        };
        self.breaker
            .get_or_create(&BackendLabels {
                backend: backend.to_string(),
            })
            .set(v);
    }

    pub fn rate_limited(&self, route: &Arc<str>) {
        self.rate_limited
            .get_or_create(&RouteLabels {
                route: route.clone(),
            })
            .inc();
    }

    pub fn shed(&self, scope: &Arc<str>) {
        self.shed
            .get_or_create(&ScopeLabels {
                scope: scope.clone(),
            })
            .inc();
    }

    /// A route's handle on its request counts, made when the route is built; handles for one
    /// route id share their counts, across reloads. The front end counts each answer of the
    /// route through it (`RouteMetrics::record`: no lock, no hashing).
    pub fn route(&self, route: &Arc<str>) -> RouteMetrics {
        self.requests.route(route)
    }

    /// Counts one answered request that has no route handle (no route matched).
    pub fn request(&self, route: &Arc<str>, method: &http::Method, status: u16, seconds: f64) {
        let (id, handle) = self
            .unrouted
            .get_or_init(|| (route.clone(), self.requests.route(route)));
        if id == route {
            handle.record(method, status, seconds, None);
        } else {
            self.requests
                .route(route)
                .record(method, status, seconds, None);
        }
    }

    pub fn backend_error(&self, backend: &str, status: u16) {
        self.backend_errors
            .get_or_create(&BackendErrorLabels {
                backend: backend.to_string(),
                status: status.to_string(),
            })
            .inc();
    }

    pub fn backend_ready(&self, backend: &str, ready: bool) {
        self.backend_ready
            .get_or_create(&BackendLabels {
                backend: backend.to_string(),
            })
            .set(i64::from(ready));
    }

    pub fn reload(&self, applied: bool, version: u64) {
        let result = if applied { "applied" } else { "rejected" };
        self.reloads
            .get_or_create(&ReloadLabels {
                result: result.into(),
            })
            .inc();
        self.config_version.set(version as i64);
    }

    /// Sets one route's spool gauges (the spool calls this before each render).
    pub fn spool(&self, route: &Arc<str>, g: SpoolGauges) {
        let labels = RouteLabels {
            route: route.clone(),
        };
        self.spool_messages
            .get_or_create(&labels)
            .set(g.messages as i64);
        self.spool_bytes.get_or_create(&labels).set(g.bytes as i64);
        self.spool_age.get_or_create(&labels).set(g.age);
    }

    /// Counts a spool event: `spooled`, `forwarded`, `dead_lettered` or `full`.
    pub fn spool_event(&self, route: &Arc<str>, event: &'static str) {
        self.spool_events
            .get_or_create(&SpoolEventLabels {
                route: route.clone(),
                event,
            })
            .inc();
    }

    /// Every route's request counts, for the dashboard.
    pub fn route_stats(&self) -> Vec<super::requests::RouteStats> {
        self.requests.stats()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        self.requests.add_exemplars(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A route's handle counts into the route's series, common answers or not, and a new
    /// handle for the same route (a reload) goes on counting them.
    #[test]
    fn a_route_handle_counts_into_the_routes_series() {
        let m = Metrics::new();
        let id: Arc<str> = "r".into();
        let first = m.route(&id);
        first.record(&http::Method::GET, 200, 0.001, None);
        first.record(&http::Method::GET, 200, 0.001, None);
        first.record(&http::Method::OPTIONS, 418, 0.001, None);
        let reloaded = m.route(&id);
        reloaded.record(&http::Method::GET, 200, 0.001, None);
        m.request(&id, &http::Method::GET, 200, 0.001);
        // Answers of no route: the first id seen is kept at hand, any other still counts.
        let none: Arc<str> = "(none)".into();
        m.request(&none, &http::Method::GET, 404, 0.001);
        m.request(&none, &http::Method::GET, 404, 0.001);
        let text = m.render();
        assert!(
            text.contains(
                r#"switchyard_requests_total{route="(none)",method="GET",status="404"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"switchyard_requests_total{route="r",method="GET",status="200"} 4"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"switchyard_requests_total{route="r",method="OPTIONS",status="418"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"switchyard_request_duration_seconds_count{route="r"} 5"#),
            "{text}"
        );
    }
}
