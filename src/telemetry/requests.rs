//! The request metrics, counted by the front end after each answer (`server::dispatch`):
//! `switchyard_requests_total{route,method,status}` and
//! `switchyard_request_duration_seconds{route}`. Each route counts into one shard per per-core
//! worker (plus one for every other thread), in atomics, so that workers never write the same
//! cache line and no request takes a lock or hashes its labels; `/metrics` merges the shards
//! when it is read. A request whose trace is exported leaves its trace id as its latency
//! bucket's exemplar (OpenMetrics), in its worker's shard.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;

/// The methods and statuses counted in a slot of their own; other answers go to a short list.
const COMMON_METHODS: [http::Method; 5] = [
    http::Method::GET,
    http::Method::POST,
    http::Method::PUT,
    http::Method::DELETE,
    http::Method::PATCH,
];
const COMMON_STATUS: [u16; 8] = [200, 201, 202, 204, 400, 404, 429, 503];
const COMMON: usize = COMMON_METHODS.len() * COMMON_STATUS.len();

/// The latency buckets' upper bounds: 0.5 ms doubling 16 times (about 16 s), then +Inf.
const BUCKETS: usize = 16;

fn bound(i: usize) -> f64 {
    0.0005 * f64::from(1u32 << i)
}

/// Methods as bounded label values: anything non-standard is `OTHER`.
pub fn method_label(m: &http::Method) -> &'static str {
    use http::Method as M;
    match *m {
        M::GET => "GET",
        M::POST => "POST",
        M::PUT => "PUT",
        M::DELETE => "DELETE",
        M::PATCH => "PATCH",
        M::HEAD => "HEAD",
        M::OPTIONS => "OPTIONS",
        M::CONNECT => "CONNECT",
        M::TRACE => "TRACE",
        _ => "OTHER",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: Arc<str>,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: Arc<str>,
}

/// One worker's counts for one route, on cache lines of its own.
#[repr(align(128))]
struct Shard {
    common: [AtomicU64; COMMON],
    /// Answers outside the common slots: (method, status) and their count.
    other: Mutex<Vec<(&'static str, u16, u64)>>,
    /// Per bucket (not cumulative), the last one +Inf.
    buckets: [AtomicU64; BUCKETS + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
    /// Per bucket, the last traced request's exemplar (taken only by traced requests, and
    /// only by this shard's worker then).
    exemplars: Mutex<[Option<Exemplar>; BUCKETS + 1]>,
}

/// A traced request in a latency bucket: its trace id, latency and time.
#[derive(Clone, Copy, Debug)]
pub struct Exemplar {
    pub trace_id: u128,
    pub seconds: f64,
    pub at: SystemTime,
}

impl Default for Shard {
    fn default() -> Self {
        Shard {
            common: std::array::from_fn(|_| AtomicU64::new(0)),
            other: Mutex::new(Vec::new()),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
            exemplars: Mutex::new([None; BUCKETS + 1]),
        }
    }
}

struct RouteCells {
    route: Arc<str>,
    /// Made at the route's first answer: a route that serves nothing costs no shards.
    shards: OnceLock<Box<[Shard]>>,
}

/// A route's handle on its counts. Handles for one route id share them, across reloads.
#[derive(Clone)]
pub struct RouteMetrics(Arc<RouteCells>);

impl RouteMetrics {
    /// The shards, none before the route's first answer.
    fn shards(&self) -> &[Shard] {
        self.0.shards.get().map_or(&[], |s| &s[..])
    }

    /// Counts one answer, in this thread's shard; `trace` is its exported trace's id.
    pub fn record(&self, method: &http::Method, status: u16, seconds: f64, trace: Option<u128>) {
        let shards = self.0.shards.get_or_init(|| {
            let (_, workers) = crate::server::percore::worker();
            (0..=workers).map(|_| Shard::default()).collect()
        });
        let shard = match crate::server::percore::worker() {
            (Some(i), _) if i + 1 < shards.len() => &shards[i],
            _ => &shards[shards.len() - 1],
        };
        let m = COMMON_METHODS.iter().position(|c| c == method);
        let s = COMMON_STATUS.iter().position(|&c| c == status);
        match (m, s) {
            (Some(m), Some(s)) => {
                shard.common[m * COMMON_STATUS.len() + s].fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                let label = method_label(method);
                let mut other = shard
                    .other
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match other
                    .iter_mut()
                    .find(|(m, s, _)| *m == label && *s == status)
                {
                    Some(e) => e.2 += 1,
                    None => other.push((label, status, 1)),
                }
            }
        }
        let bucket = (0..BUCKETS)
            .find(|&i| seconds <= bound(i))
            .unwrap_or(BUCKETS);
        shard.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        if let Some(trace_id) = trace {
            let mut ex = shard
                .exemplars
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            ex[bucket] = Some(Exemplar {
                trace_id,
                seconds,
                at: SystemTime::now(),
            });
        }
        shard.count.fetch_add(1, Ordering::Relaxed);
        shard
            .sum_nanos
            .fetch_add((seconds * 1e9) as u64, Ordering::Relaxed);
    }
}

/// Every route's counts, kept by route id for the life of the process (a counter does not
/// restart when a reload rebuilds its route), and encoded merged when `/metrics` is read.
#[derive(Default)]
pub struct Requests {
    routes: Mutex<HashMap<Arc<str>, RouteMetrics>>,
}

impl std::fmt::Debug for Requests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Requests")
    }
}

impl Requests {
    /// The handle of route `id`, made on first use.
    pub fn route(&self, id: &Arc<str>) -> RouteMetrics {
        let mut routes = self
            .routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        routes
            .entry(id.clone())
            .or_insert_with(|| {
                RouteMetrics(Arc::new(RouteCells {
                    route: id.clone(),
                    shards: OnceLock::new(),
                }))
            })
            .clone()
    }

    /// The handles that have counted something, by route id.
    fn counted(&self) -> Vec<RouteMetrics> {
        let routes = self
            .routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out: Vec<RouteMetrics> = routes
            .values()
            .filter(|r| r.0.shards.get().is_some())
            .cloned()
            .collect();
        out.sort_by(|a, b| a.0.route.cmp(&b.0.route));
        out
    }
}

/// A route's counts as the dashboard reads them (`GET /stats` on the admin listener), merged
/// over its shards.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RouteStats {
    #[serde(serialize_with = "as_str")]
    pub route: Arc<str>,
    pub requests: u64,
    /// Answers by status class, `1xx` to `5xx`.
    pub status: std::collections::BTreeMap<&'static str, u64>,
    /// Answers per latency bucket (not cumulative) of [`latency_bounds`], then one above them.
    pub latency: Vec<u64>,
    pub latency_sum_seconds: f64,
}

fn as_str<S: serde::Serializer>(s: &Arc<str>, out: S) -> Result<S::Ok, S::Error> {
    out.serialize_str(s)
}

/// The upper bounds of the latency buckets, in seconds.
pub fn latency_bounds() -> Vec<f64> {
    (0..BUCKETS).map(bound).collect()
}

impl Requests {
    /// Every route that has answered, by id.
    pub fn stats(&self) -> Vec<RouteStats> {
        self.counted()
            .iter()
            .map(|r| {
                let shards = r.shards();
                let sum = |f: &dyn Fn(&Shard) -> u64| shards.iter().map(f).sum::<u64>();
                let mut status: std::collections::BTreeMap<&'static str, u64> =
                    ["1xx", "2xx", "3xx", "4xx", "5xx"]
                        .into_iter()
                        .map(|c| (c, 0))
                        .collect();
                let mut count = |code: u16, n: u64| {
                    let class = match code {
                        100..200 => "1xx",
                        200..300 => "2xx",
                        300..400 => "3xx",
                        400..500 => "4xx",
                        _ => "5xx",
                    };
                    *status.entry(class).or_default() += n;
                };
                for (k, &code) in (0..COMMON).zip(COMMON_STATUS.iter().cycle()) {
                    count(code, sum(&|s| s.common[k].load(Ordering::Relaxed)));
                }
                for shard in shards {
                    let other = shard
                        .other
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    for &(_, code, n) in other.iter() {
                        count(code, n);
                    }
                }
                RouteStats {
                    route: r.0.route.clone(),
                    requests: sum(&|s| s.count.load(Ordering::Relaxed)),
                    status,
                    latency: (0..=BUCKETS)
                        .map(|i| sum(&|s| s.buckets[i].load(Ordering::Relaxed)))
                        .collect(),
                    latency_sum_seconds: sum(&|s| s.sum_nanos.load(Ordering::Relaxed)) as f64 / 1e9,
                }
            })
            .collect()
    }

    /// Each route's latest exemplar per latency bucket, merged over its shards.
    fn exemplars(&self) -> HashMap<(Arc<str>, usize), Exemplar> {
        let mut out: HashMap<(Arc<str>, usize), Exemplar> = HashMap::new();
        for r in self.counted() {
            for shard in r.shards() {
                let ex = shard
                    .exemplars
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for (i, e) in ex.iter().enumerate() {
                    if let Some(e) = e {
                        let slot = out.entry((r.0.route.clone(), i)).or_insert(*e);
                        if e.at > slot.at {
                            *slot = *e;
                        }
                    }
                }
            }
        }
        out
    }

    /// Adds the exemplars to the latency buckets of `text` (the OpenMetrics exposition):
    /// `…_bucket{le="0.004",route="r"} 7 # {trace_id="…"} 0.0031 1733331234.567`. The
    /// encoder of prometheus-client takes exemplars only from its own histogram type, which
    /// would take a lock per request; the shards keep theirs, and they are written here.
    pub fn add_exemplars(&self, text: String) -> String {
        const BUCKET: &str = "switchyard_request_duration_seconds_bucket{";
        let exemplars = self.exemplars();
        if exemplars.is_empty() {
            return text;
        }
        let mut out = String::with_capacity(text.len() + exemplars.len() * 80);
        for line in text.split_inclusive('\n') {
            let found = line.strip_prefix(BUCKET).and_then(|rest| {
                let le = label(rest, "le")?;
                let i = if le == "+Inf" {
                    BUCKETS
                } else {
                    let le: f64 = le.parse().ok()?;
                    (0..BUCKETS).find(|&i| bound(i) == le)?
                };
                let route: Arc<str> = label(rest, "route")?.into();
                exemplars.get(&(route, i))
            });
            match found {
                Some(e) => {
                    let at =
                        e.at.duration_since(SystemTime::UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_secs_f64();
                    out.push_str(line.trim_end_matches('\n'));
                    out.push_str(&format!(
                        " # {{trace_id=\"{:032x}\"}} {} {at:.3}\n",
                        e.trace_id, e.seconds
                    ));
                }
                None => out.push_str(line),
            }
        }
        out
    }
}

/// The value of label `name` in an exposition line's label set (`name="value",…}`),
/// unescaped.
fn label(labels: &str, name: &str) -> Option<String> {
    let start = labels
        .match_indices(&format!("{name}=\""))
        .find(|(i, _)| *i == 0 || labels.as_bytes()[i - 1] == b',')?
        .0
        + name.len()
        + 2;
    let mut value = String::new();
    let mut chars = labels[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(value),
            '\\' => match chars.next()? {
                'n' => value.push('\n'),
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}

impl Collector for Requests {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let routes = self.counted();
        let merged =
            |f: &dyn Fn(&Shard) -> u64, shards: &[Shard]| -> u64 { shards.iter().map(f).sum() };
        let mut counters = encoder.encode_descriptor(
            "requests",
            "Requests answered, by route, method and status",
            None,
            MetricType::Counter,
        )?;
        for r in &routes {
            let shards = r.shards();
            let mut answers: Vec<(&'static str, u16, u64)> = Vec::new();
            for (i, m) in COMMON_METHODS.iter().enumerate() {
                for (j, &status) in COMMON_STATUS.iter().enumerate() {
                    let k = i * COMMON_STATUS.len() + j;
                    let n = merged(&|s| s.common[k].load(Ordering::Relaxed), shards);
                    if n > 0 {
                        answers.push((method_label(m), status, n));
                    }
                }
            }
            for shard in shards.iter() {
                let other = shard
                    .other
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for &(m, status, n) in other.iter() {
                    match answers.iter_mut().find(|(a, b, _)| *a == m && *b == status) {
                        Some(e) => e.2 += n,
                        None => answers.push((m, status, n)),
                    }
                }
            }
            for (method, status, n) in answers {
                let labels = RequestLabels {
                    route: r.0.route.clone(),
                    method,
                    status,
                };
                ConstCounter::new(n).encode(counters.encode_family(&labels)?)?;
            }
        }
        let mut histograms = encoder.encode_descriptor(
            "request_duration_seconds",
            "Time to the response head, by route",
            None,
            MetricType::Histogram,
        )?;
        for r in &routes {
            let shards = r.shards();
            let buckets: Vec<(f64, u64)> = (0..=BUCKETS)
                .map(|i| {
                    let upper = if i == BUCKETS {
                        f64::INFINITY
                    } else {
                        bound(i)
                    };
                    (
                        upper,
                        merged(&|s| s.buckets[i].load(Ordering::Relaxed), shards),
                    )
                })
                .collect();
            let count = merged(&|s| s.count.load(Ordering::Relaxed), shards);
            let sum = merged(&|s| s.sum_nanos.load(Ordering::Relaxed), shards) as f64 / 1e9;
            let labels = RouteLabels {
                route: r.0.route.clone(),
            };
            histograms
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts from several threads (each a shard of its own when it is a worker) come out
    /// merged, with the histogram's buckets cumulative and +Inf last.
    #[test]
    fn shards_are_merged_when_read() {
        let requests = Arc::new(Requests::default());
        let id: Arc<str> = "r".into();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let route = requests.route(&id);
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        route.record(&http::Method::GET, 200, 0.0004, None);
                    }
                    route.record(&http::Method::POST, 500, 30.0, None);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let mut registry = prometheus_client::registry::Registry::with_prefix("switchyard");
        registry.register_collector(Box::new(requests.clone()));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"switchyard_requests_total{route="r",method="GET",status="200"} 400"#,
            r#"switchyard_requests_total{route="r",method="POST",status="500"} 4"#,
            r#"switchyard_request_duration_seconds_count{route="r"} 404"#,
            r#"switchyard_request_duration_seconds_bucket{le="0.0005",route="r"} 400"#,
            r#"switchyard_request_duration_seconds_bucket{le="16.384",route="r"} 400"#,
            r#"switchyard_request_duration_seconds_bucket{le="+Inf",route="r"} 404"#,
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    /// A traced request's trace id is its bucket's exemplar; a later one in the same bucket
    /// replaces it, and route names are matched as the exposition escapes them.
    #[test]
    fn traced_requests_are_their_buckets_exemplars() {
        let requests = Arc::new(Requests::default());
        let id: Arc<str> = "a\"b".into();
        let route = requests.route(&id);
        route.record(&http::Method::GET, 200, 0.0004, Some(1));
        route.record(&http::Method::GET, 200, 0.0003, Some(0xabc));
        route.record(&http::Method::GET, 200, 0.003, None);
        route.record(&http::Method::GET, 200, 99.0, Some(7));
        let mut registry = prometheus_client::registry::Registry::with_prefix("switchyard");
        registry.register_collector(Box::new(requests.clone()));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let text = requests.add_exemplars(text);
        let line = |le: &str| {
            text.lines()
                .find(|l| l.contains(&format!("_bucket{{le=\"{le}\"")))
                .unwrap()
                .to_string()
        };
        assert!(
            line("0.0005")
                .contains(r#"} 2 # {trace_id="00000000000000000000000000000abc"} 0.0003 "#),
            "{text}"
        );
        assert!(!line("0.004").contains('#'), "{text}");
        assert!(
            line("+Inf").contains(r#"# {trace_id="00000000000000000000000000000007"} 99 "#),
            "{text}"
        );
    }

    #[test]
    fn stats_sort_answers_into_classes_and_buckets() {
        let requests = Requests::default();
        let id: Arc<str> = "r".into();
        let route = requests.route(&id);
        route.record(&http::Method::GET, 200, 0.0004, None);
        route.record(&http::Method::DELETE, 503, 0.0004, None);
        route.record(&http::Method::OPTIONS, 502, 0.003, None);
        route.record(&http::Method::GET, 404, 99.0, None);
        let s = &requests.stats()[0];
        assert_eq!(s.requests, 4);
        assert_eq!(
            (s.status["2xx"], s.status["4xx"], s.status["5xx"]),
            (1, 1, 2)
        );
        assert_eq!(s.latency.len(), latency_bounds().len() + 1);
        assert_eq!((s.latency[0], s.latency[3], s.latency[BUCKETS]), (2, 1, 1));
    }
}
