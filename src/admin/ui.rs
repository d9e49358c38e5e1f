//! The dashboard on the admin listener, beside the request path: its page and assets (built
//! into the binary) at `/ui/`, and what it reads live: `GET /stats` (typed JSON: the routes'
//! counts and latency buckets, the backends, the spool, the config's state), `GET /events`,
//! the same stats every `interval` as server-sent events, and `GET /stats/history`, the
//! gateway's totals of the last five minutes, sampled every second.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::BodyExt;
use serde::Serialize;

use super::{BackendStatus, ConfigStatus, json_response, not_allowed, problem};
use crate::Response;
use crate::app::Shared;
use crate::durable::spool::RouteSpoolStatus;
use crate::telemetry::requests::RouteStats;

const INDEX: &str = include_str!("ui/index.html");
const APP: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/style.css");

/// The page may load only its own assets and talk only to this listener.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// How often `/events` sends stats unless `?interval=` says otherwise, and the bounds of that.
const INTERVAL: Duration = Duration::from_secs(1);
const MIN_INTERVAL: Duration = Duration::from_millis(200);
const MAX_INTERVAL: Duration = Duration::from_secs(60);

/// How much traffic history the gateway keeps for the dashboard, one sample a second.
const HISTORY: usize = 300;

/// The whole gateway's answers at one moment: totals since the start, so that a reader takes
/// rates and percentiles from two samples.
#[derive(Serialize, Clone)]
pub struct Sample {
    pub at_ms: u64,
    pub requests: u64,
    /// 5xx answers.
    pub errors: u64,
    /// Answers per latency bucket, all routes together.
    pub latency: Vec<u64>,
}

/// The last [`HISTORY`] samples, so that the dashboard draws the last minutes at once.
#[derive(Default)]
pub struct History(std::sync::Mutex<std::collections::VecDeque<Sample>>);

impl History {
    fn push(&self, sample: Sample) {
        let mut h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if h.len() == HISTORY {
            h.pop_front();
        }
        h.push_back(sample);
    }

    fn samples(&self) -> Vec<Sample> {
        let h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        h.iter().cloned().collect()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Samples the gateway's totals every second until `shutdown`.
pub async fn sample(shared: Arc<Shared>, shutdown: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let routes = shared.metrics.route_stats();
        let mut latency = vec![0; crate::telemetry::requests::latency_bounds().len() + 1];
        for r in &routes {
            for (sum, n) in latency.iter_mut().zip(&r.latency) {
                *sum += n;
            }
        }
        shared.history.push(Sample {
            at_ms: now_ms(),
            requests: routes.iter().map(|r| r.requests).sum(),
            errors: routes.iter().map(|r| r.status["5xx"]).sum(),
            latency,
        });
    }
}

/// `GET /stats/history`.
#[derive(Serialize)]
struct HistoryAnswer {
    latency_bounds: Vec<f64>,
    /// Oldest first, one a second.
    samples: Vec<Sample>,
}

/// `GET /stats`, and each event of `GET /events`.
#[derive(Serialize)]
pub struct Stats {
    /// When the stats were read (ms since the epoch).
    pub at_ms: u64,
    /// Whether every backend a route uses is ready (as `/readyz`).
    pub ready: bool,
    pub config: ConfigStatus,
    /// The upper bounds (seconds) of the latency buckets of every route's `latency`.
    pub latency_bounds: Vec<f64>,
    /// Every route that has answered since the gateway started, by id.
    pub routes: Vec<RouteStats>,
    pub backends: BTreeMap<String, BackendStatus>,
    /// Per spooling route, what waits; absent when no route uses the state store.
    pub spool: Option<BTreeMap<String, RouteSpoolStatus>>,
}

pub fn stats(shared: &Shared) -> Stats {
    let readiness = super::readiness(shared);
    let spool = shared.table.load().state.as_ref().map(|s| {
        s.spool
            .status()
            .into_iter()
            .map(|(id, st)| (id.to_string(), st))
            .collect()
    });
    Stats {
        at_ms: now_ms(),
        ready: readiness.ready,
        config: super::config_status(shared),
        latency_bounds: crate::telemetry::requests::latency_bounds(),
        routes: shared.metrics.route_stats(),
        backends: readiness.backends,
        spool,
    }
}

/// Whether `path` is one of the dashboard's assets (served without the admin token: they hold
/// no data, and the page asks for the token).
pub fn is_asset(path: &str) -> bool {
    matches!(path, "/ui" | "/ui/" | "/ui/app.js" | "/ui/style.css")
}

/// Answers the dashboard's paths, or `None` for another path.
pub fn handle(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> Option<Response> {
    let asset = |body: &'static str, content_type: &'static str| {
        let mut r = http::Response::new(crate::full_body(Bytes::from_static(body.as_bytes())));
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        r
    };
    let get = method == Method::GET || method == Method::HEAD;
    Some(match path {
        _ if is_asset(path) && !get => not_allowed(&[Method::GET, Method::HEAD]),
        "/ui" => {
            let mut r = http::Response::new(crate::empty_body());
            *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
            r.headers_mut()
                .insert(header::LOCATION, HeaderValue::from_static("/ui/"));
            r
        }
        "/ui/" => asset(INDEX, "text/html; charset=utf-8"),
        "/ui/app.js" => asset(APP, "text/javascript; charset=utf-8"),
        "/ui/style.css" => asset(STYLE, "text/css; charset=utf-8"),
        "/stats" if method == Method::GET => json_response(StatusCode::OK, &stats(shared)),
        "/stats/history" if method == Method::GET => json_response(
            StatusCode::OK,
            &HistoryAnswer {
                latency_bounds: crate::telemetry::requests::latency_bounds(),
                samples: shared.history.samples(),
            },
        ),
        "/events" if method == Method::GET => match interval(query) {
            Ok(every) => events(shared.clone(), every),
            Err(detail) => crate::error::problem_json(
                &crate::error::Problem::bad_request(detail).with_field("interval"),
                None,
            ),
        },
        "/stats" | "/stats/history" | "/events" => not_allowed(&[Method::GET]),
        p if p.starts_with("/ui/") => problem(
            StatusCode::NOT_FOUND,
            format!("The dashboard has no `{p}`."),
        ),
        _ => return None,
    })
}

/// `?interval=` of `/events` (`500ms`, `2s`), within its bounds.
fn interval(query: Option<&str>) -> Result<Duration, String> {
    let Some(v) = query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "interval")
        .map(|(_, v)| v)
    else {
        return Ok(INTERVAL);
    };
    let d = humantime::parse_duration(v)
        .map_err(|_| format!("`interval` is a duration such as `1s` or `500ms`, not `{v}`."))?;
    if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&d) {
        return Err("`interval` is from 200ms to 60s.".into());
    }
    Ok(d)
}

/// The stats as a stream of server-sent events (`event: stats`), the first at once. It ends
/// when the client goes or the admin listener shuts down (which drops the connection).
fn events(shared: Arc<Shared>, every: Duration) -> Response {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let frames = futures_util::stream::unfold((shared, tick), |(shared, mut tick)| async move {
        tick.tick().await;
        let json = serde_json::to_string(&stats(&shared)).unwrap_or_else(|_| "{}".into());
        let frame = Bytes::from(format!("event: stats\ndata: {json}\n\n"));
        Some((
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(frame)),
            (shared, tick),
        ))
    });
    let body = http_body_util::StreamBody::new(frames)
        .map_err(|e| match e {})
        .boxed_unsync();
    let mut r = http::Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_are_durations_within_bounds() {
        assert_eq!(interval(None), Ok(INTERVAL));
        assert_eq!(
            interval(Some("interval=500ms")),
            Ok(Duration::from_millis(500))
        );
        assert!(interval(Some("interval=5ms")).is_err());
        assert!(interval(Some("interval=soon")).is_err());
    }
}
