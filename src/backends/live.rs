//! `switchyard validate --live`: not on the request path, the CLI's last stage. After the pure
//! checks and the build, every backend is tried against its real service, and every route's
//! names against what the service holds. Nothing is created or sent: brokers are asked with
//! passive declarations, MQTT brokers through a clean session of the checker's own, gRPC
//! servers by reflection (or, without it, by an empty unary call the server refuses before
//! the method runs), HTTP endpoints with one GET.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::config::state::StoreKind;
use crate::config::{BackendSpec, ConfigSpec, RouteSpec};

/// How one check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// It works.
    Ok,
    /// Not checked, or not a fault yet (a topology object the gateway declares when it
    /// connects).
    Warn,
    /// It will not work: a route or backend fails as configured.
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// `backend <name>`, `route <id>` or `state`.
    pub subject: String,
    /// What was checked (`connect`, `exchange orders`, `method shop.v1.Orders/Get`).
    pub check: String,
    pub result: Verdict,
    /// What was found, in the service's own words where it gave some.
    pub detail: String,
}

/// The findings of one backend's check, written as they come.
pub struct Findings {
    backend: String,
    pub list: Vec<Finding>,
}

impl Findings {
    pub fn new(backend: &str) -> Self {
        Findings {
            backend: format!("backend {backend}"),
            list: Vec::new(),
        }
    }

    fn push(&mut self, subject: String, check: impl Into<String>, result: Verdict, detail: &str) {
        self.list.push(Finding {
            subject,
            check: check.into(),
            result,
            detail: crate::telemetry::redact::secrets(detail).into_owned(),
        });
    }

    /// A finding about the backend itself.
    pub fn backend(&mut self, check: impl Into<String>, result: Verdict, detail: &str) {
        self.push(self.backend.clone(), check, result, detail);
    }

    /// A finding about one route of the backend.
    pub fn route(&mut self, id: &str, check: impl Into<String>, result: Verdict, detail: &str) {
        self.push(format!("route {id}"), check, result, detail);
    }
}

/// Whether a template takes values from the request, so that the name it makes is known only
/// per request.
pub fn templated(t: &str) -> bool {
    t.contains('{')
}

/// Checks every backend (all at once, each within a bound) and the state store, when a route
/// needs it.
pub async fn check(spec: &ConfigSpec, base: &Path) -> Vec<Finding> {
    let checks = spec.backends.iter().map(|(name, b)| {
        let routes: Vec<&RouteSpec> = spec.routes.iter().filter(|r| &r.backend == name).collect();
        async move {
            // Each step is bounded by the backend's connect timeout; a few steps in a row.
            let within = connect_timeout(b) * 3 + Duration::from_secs(10);
            let run = b.live(name, &routes, base);
            match tokio::time::timeout(within, run).await {
                Ok(f) => f.list,
                Err(_) => {
                    let mut f = Findings::new(name);
                    let took = humantime::format_duration(within);
                    f.backend(
                        "answers",
                        Verdict::Fail,
                        &format!("no answer within {took}"),
                    );
                    f.list
                }
            }
        }
    });
    let mut all: Vec<Finding> = futures_util::future::join_all(checks)
        .await
        .into_iter()
        .flatten()
        .collect();
    if spec.routes.iter().any(crate::router::table::needs_state) {
        all.push(state(spec, base).await);
    }
    all
}

fn connect_timeout(b: &BackendSpec) -> Duration {
    match b {
        BackendSpec::Http(h) => h.connect_timeout.0,
        BackendSpec::Grpc(g) => g.connect_timeout.0,
        BackendSpec::Amqp(a) => a.connect_timeout.0,
        BackendSpec::Mqtt(m) => m.connect_timeout.0,
    }
}

/// The state store: Redis answers PING; the embedded store's folder exists and is writable
/// (the file is not opened: a running gateway holds it).
async fn state(spec: &ConfigSpec, base: &Path) -> Finding {
    let s = &spec.state;
    let (check, result, detail) = match s.store {
        StoreKind::Redis => {
            let ping = async {
                let client = redis::Client::open(s.redis.url.as_str())?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                redis::cmd("PING").query_async::<String>(&mut conn).await
            };
            let check = "redis answers PING".to_string();
            match tokio::time::timeout(s.redis.timeout.0, ping).await {
                Ok(Ok(_)) => (check, Verdict::Ok, "PONG".to_string()),
                Ok(Err(e)) => (check, Verdict::Fail, e.to_string()),
                Err(_) => (check, Verdict::Fail, "no answer in time".to_string()),
            }
        }
        StoreKind::Embedded => {
            let path = base.join(&s.path);
            let dir = path.parent().unwrap_or(base).to_path_buf();
            let check = format!("folder of {}", path.display());
            match std::fs::metadata(&dir) {
                Ok(m) if !m.is_dir() => (check, Verdict::Fail, "not a folder".to_string()),
                Ok(m) if m.permissions().readonly() => {
                    (check, Verdict::Fail, "read-only".to_string())
                }
                Ok(_) => (check, Verdict::Ok, "exists and is writable".to_string()),
                Err(e) => (check, Verdict::Fail, e.to_string()),
            }
        }
    };
    Finding {
        subject: "state".into(),
        check,
        result,
        detail: crate::telemetry::redact::secrets(&detail).into_owned(),
    }
}

/// The report as a table: one line per finding, then a count.
pub fn table(findings: &[Finding]) -> String {
    let label = |v: Verdict| match v {
        Verdict::Ok => "ok",
        Verdict::Warn => "warn",
        Verdict::Fail => "FAIL",
    };
    let w_subject = findings.iter().map(|f| f.subject.len()).max().unwrap_or(0);
    let w_check = findings.iter().map(|f| f.check.len()).max().unwrap_or(0);
    let mut out = String::new();
    for f in findings {
        out.push_str(&format!(
            "{:<w_subject$}  {:<w_check$}  {:<4}  {}\n",
            f.subject,
            f.check,
            label(f.result),
            f.detail
        ));
    }
    let count = |v| findings.iter().filter(|f| f.result == v).count();
    out.push_str(&format!(
        "{} checks: {} ok, {} not checked or warned, {} failed\n",
        findings.len(),
        count(Verdict::Ok),
        count(Verdict::Warn),
        count(Verdict::Fail)
    ));
    out
}
