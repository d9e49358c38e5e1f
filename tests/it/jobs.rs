//! Jobs (request-acknowledge-confirm) against real services: `mode: async` on an HTTP
//! upstream, an AMQP publish and an AMQP request/reply, MQTT request/response and gRPC; a job
//! that fails; `on_timeout: accept` keeping a late reply; signed webhooks against a flaky
//! receiver, dead-lettered and replayed; callback URLs checked against the allow-list; a job
//! read from a second gateway sharing Redis; and a job whose gateway was killed run again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderMap, Method, StatusCode};
use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;

use crate::support::amqp as mq;
use crate::support::redis as rd;
use crate::support::*;

const SECRET: &str = "a-test-secret-of-32-characters!!";

async fn post_to(url: &str, b: &str, headers: &[(&str, &str)]) -> (u16, HeaderMap, Value) {
    let mut req = request(Method::POST, url).header("content-type", "application/json");
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let (s, h, b) = send(req.body(body(b.to_string())).unwrap()).await;
    (
        s.as_u16(),
        h,
        serde_json::from_slice(&b).unwrap_or_default(),
    )
}

/// Polls a job until it is no longer pending: its status code, headers and body.
pub(crate) async fn settle(url: &str) -> (u16, HeaderMap, Value) {
    eventually("the job never finished", || async {
        let (s, h, b) = get(url).await;
        let v: Value = serde_json::from_slice(&b).unwrap_or_default();
        if h.get("switchyard-job-status")
            .is_some_and(|v| v != "pending")
        {
            return Ok((s.as_u16(), h, v));
        }
        assert_eq!(s, 202, "a pending job answers 202: {v}");
        assert!(h.contains_key("retry-after"));
        Err(v)
    })
    .await
}

/// The job URL from a 202.
pub(crate) fn location(gw: &Gateway, h: &HeaderMap) -> String {
    gw.url(h["location"].to_str().unwrap())
}

#[tokio::test]
async fn an_async_http_call_is_accepted_then_its_answer_is_kept_in_the_job() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&format!(
        r#"
backends:
  up: {{ type: http, endpoints: ["{}"] }}
routes:
  - id: report
    match: {{ method: POST, path: "/{{*rest}}" }}
    backend: up
    mode: async
"#,
        up.url()
    ))
    .await;
    let (s, h, b) = post_to(&gw.url("/slow/300"), r#"{"q":1}"#, &[]).await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(h["switchyard-job-status"], "pending");
    assert!(h.contains_key("retry-after"));
    let id = b["id"].as_str().unwrap().to_string();
    assert_eq!(h["location"], format!("/jobs/{id}"));
    assert_eq!(b["href"], format!("/jobs/{id}"));
    // Still running: pending, with Retry-After.
    let (s, h, b) = get(&location(&gw, &h)).await;
    assert_eq!(
        (s.as_u16(), &h["switchyard-job-status"]),
        (202, &"pending".parse::<http::HeaderValue>().unwrap()),
        "{}",
        String::from_utf8_lossy(&b)
    );
    let (s, h, v) = settle(&gw.url(&format!("/jobs/{id}"))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(h["switchyard-job-status"], "succeeded");
    assert_eq!(v["status"], "succeeded");
    assert_eq!(v["response"]["status"], 200);
    assert_eq!(v["response"]["headers"]["x-upstream"], "1");
    assert_eq!(v["response"]["body"]["path"], "/slow/300");
    assert_eq!(v["response"]["body"]["body_len"], 7);
    assert!(v["finished_at"].is_string());
    assert_eq!(up.hits(), 1);

    // Unknown, malformed and wrong-method job requests.
    let (s, _, b) = get(&gw.url(&format!("/jobs/{}", uuid::Uuid::now_v7()))).await;
    assert_eq!(s, 404);
    assert_eq!(json(&b)["type"], "urn:switchyard:problem:job-not-found");
    let (s, _, _) = get(&gw.url("/jobs/not-a-job")).await;
    assert_eq!(s, 404);
    let (s, h, _) = post_to(&gw.url(&format!("/jobs/{id}")), "{}", &[]).await;
    assert_eq!(s, 405);
    assert_eq!(h["allow"], "GET, HEAD");
}

#[tokio::test]
async fn a_job_whose_call_fails_answers_its_problem() {
    let up = Upstream::hanging().await;
    let gw = Gateway::start(&format!(
        r#"
backends:
  up: {{ type: http, endpoints: ["{}"] }}
routes:
  - id: slow
    match: {{ method: POST, path: /work }}
    backend: up
    mode: async
    async: {{ timeout: 300ms }}
"#,
        up.url()
    ))
    .await;
    let (s, h, _) = post_to(&gw.url("/work"), "{}", &[]).await;
    assert_eq!(s, 202);
    let (s, h, v) = settle(&location(&gw, &h)).await;
    // The job failed: its problem, as the route would have answered it, naming the job.
    assert_eq!(s, 504, "{v}");
    assert_eq!(h["content-type"], "application/problem+json");
    assert_eq!(h["switchyard-job-status"], "failed");
    assert_eq!(v["type"], "urn:switchyard:problem:timeout");
    assert_eq!(v["job_status"], "failed");
    assert!(v["job_id"].is_string());
    assert!(v["finished_at"].is_string());
}

#[tokio::test]
async fn amqp_jobs_publish_ask_and_keep_a_late_reply() {
    let url = mq::broker_url().await;
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let gw = Gateway::start(&format!(
        r#"{}
routes:
  - id: publish
    match: {{ method: POST, path: /publish }}
    backend: rabbit
    mode: async
    amqp: {{ exchange: "{x}", routing_key: none.such }}
  - id: ask
    match: {{ method: POST, path: /ask }}
    backend: rabbit
    mode: async
    timeout: 3s
    amqp: {{ exchange: "{x}", routing_key: rpc, reply: {{}}, headers: [X-Delay-Ms] }}
  - id: ask-or-accept
    match: {{ method: POST, path: /ask-or-accept }}
    backend: rabbit
    timeout: 300ms
    on_timeout: accept
    async: {{ timeout: 5s }}
    amqp: {{ exchange: "{x}", routing_key: rpc, reply: {{}}, headers: [X-Delay-Ms] }}
"#,
        mq::rabbit_backend(&url, &x, &q)
    ))
    .await;
    gw.wait_backend("rabbit", true).await;
    let _responder = mq::responder(q.clone()).await;

    // A publish as a job: the job keeps the broker-confirmed 202 and its message id.
    let (s, h, b) = post_to(&gw.url("/publish"), "\"hello\"", &[]).await;
    assert_eq!(s, 202, "{b}");
    let (s, _, v) = settle(&location(&gw, &h)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["response"]["status"], 202);
    assert_eq!(v["response"]["body"]["message_id"], b["message_id"]);

    // Request/reply as a job.
    let (s, h, _) = post_to(&gw.url("/ask"), "q1", &[]).await;
    assert_eq!(s, 202);
    let (_, _, v) = settle(&location(&gw, &h)).await;
    assert_eq!(v["response"]["status"], 200, "{v}");
    assert_eq!(v["response"]["body"], "re: q1");

    // A quick reply is answered directly...
    let (s, h, b) = post_to(&gw.url("/ask-or-accept"), "fast", &[]).await;
    assert_eq!(s, 200, "{b}");
    assert!(h.get("location").is_none());
    // ...a slow one is accepted at the timeout, and its late reply lands in the job.
    let started = std::time::Instant::now();
    let (s, h, _) = post_to(&gw.url("/ask-or-accept"), "slow", &[("x-delay-ms", "1200")]).await;
    assert_eq!(s, 202);
    assert!(started.elapsed() < Duration::from_millis(1100));
    let (s, _, v) = settle(&location(&gw, &h)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["response"]["body"], "re: slow");
    let conn = mq::client().await;
    mq::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn mqtt_and_grpc_calls_run_as_jobs() {
    let addr = crate::support::mqtt::broker_addr().await;
    let prefix = format!("sy-test/{}", uuid::Uuid::now_v7().simple());
    let server = crate::support::grpc::GrpcServer::start().await;
    let gw = Gateway::start(&format!(
        r#"{grpc}
  devices: {{ type: mqtt, url: "mqtt://{addr}", client_id: "jobs-{id}" }}
routes:
  - id: command
    match: {{ method: POST, path: "/devices/{{device}}/commands" }}
    backend: devices
    mode: async
    timeout: 3s
    mqtt: {{ topic: "{prefix}/{{device}}/cmd", response: {{}} }}
  - id: get-order
    match: {{ method: GET, path: "/v1/orders/{{id}}" }}
    backend: shop
    mode: async
    grpc: {{ method: shop.v1.Orders/GetOrder }}
"#,
        grpc = crate::grpc::shop_backend(&server.url(), ""),
        id = uuid::Uuid::now_v7().simple(),
    ))
    .await;
    gw.wait_backend("devices", true).await;
    let _device =
        crate::support::device::Device::start(&addr, &prefix, "kitchen", Duration::from_secs(60))
            .await;
    let (s, h, _) = post_to(
        &gw.url("/devices/kitchen/commands"),
        r#"{"setpoint":21}"#,
        &[],
    )
    .await;
    assert_eq!(s, 202);
    let (s, _, v) = settle(&location(&gw, &h)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["response"]["body"]["accepted"], true);

    let (s, h, _) = get(&gw.url("/v1/orders/7")).await;
    assert_eq!(s, 202);
    let (s, _, v) = settle(&location(&gw, &h)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["response"]["body"]["id"], "7");
}

/// A webhook receiver: records each delivery and answers with the next status of `script`
/// (then 200).
pub(crate) struct Receiver {
    addr: std::net::SocketAddr,
    got: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    pub(crate) async fn start(script: Vec<u16>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got: Arc<Mutex<Vec<(HeaderMap, Bytes)>>> = Arc::default();
        let script = Arc::new(Mutex::new(script.into_iter()));
        let (g, sc) = (got.clone(), script.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (g, sc) = (g.clone(), sc.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (g, sc) = (g.clone(), sc.clone());
                        async move {
                            let (parts, b) = req.into_parts();
                            let b = b.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            g.lock().unwrap().push((parts.headers, b));
                            let status = sc.lock().unwrap().next().unwrap_or(200);
                            let mut r = http::Response::new(body("ok"));
                            *r.status_mut() = StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver { addr, got, task }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    pub(crate) async fn wait_for(&self, n: usize) -> Vec<(HeaderMap, Bytes)> {
        eventually(&format!("{n} deliveries never came"), || async {
            match self.count() {
                c if c >= n => Ok(()),
                c => Err(c),
            }
        })
        .await;
        self.got.lock().unwrap().clone()
    }
}

/// Checks `Switchyard-Signature` the way a receiver would.
fn verify(headers: &HeaderMap, body: &[u8]) {
    let sig = headers["switchyard-signature"].to_str().unwrap();
    let (t, v1) = sig.split_once(',').unwrap();
    let t = t.strip_prefix("t=").unwrap();
    let v1 = v1.strip_prefix("v1=").unwrap();
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(v1, want, "the signature verifies");
    let age = crate::support::now_secs().abs_diff(t.parse::<u64>().unwrap());
    assert!(age < 60, "the timestamp is current");
}

/// A gateway on [`webhook_config`] whose webhook goes to `rx` and tries `attempts` times.
async fn hooked(up: &Upstream, rx: &Receiver, attempts: u32) -> Gateway {
    Gateway::start(&webhook_config(
        &up.url(),
        &format!("url: \"{}\", attempts: {attempts}", rx.url("/hook")),
    ))
    .await
}

pub(crate) fn webhook_config(upstream: &str, webhook: &str) -> String {
    format!(
        r#"
backends:
  up: {{ type: http, endpoints: ["{upstream}"] }}
routes:
  - id: hooked
    match: {{ method: POST, path: "/{{*rest}}" }}
    backend: up
    mode: async
    async:
      webhook: {{ secret: "{SECRET}", backoff: {{ min: 20ms, max: 100ms }}, {webhook} }}
"#
    )
}

#[tokio::test]
async fn webhooks_are_signed_and_retried_until_the_receiver_takes_them() {
    let up = Upstream::start().await;
    let rx = Receiver::start(vec![500, 503]).await;
    let gw = hooked(&up, &rx, 5).await;
    let (s, h, b) = post_to(&gw.url("/x"), "{}", &[]).await;
    assert_eq!(s, 202, "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    let got = rx.wait_for(3).await;
    for (headers, body) in &got {
        verify(headers, body);
        assert_eq!(headers["switchyard-job-id"], id.as_str());
        assert_eq!(headers["switchyard-event"], "job.succeeded");
        let v: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["id"], id.as_str());
        assert_eq!(v["response"]["status"], 200);
    }
    // Delivered on the third try; the job says so once it has recorded it.
    let v = eventually("the webhook was never recorded as delivered", || async {
        let v = json(&get(&location(&gw, &h)).await.2);
        if v["webhook"]["delivered"] == true {
            Ok(v)
        } else {
            Err(v)
        }
    })
    .await;
    assert_eq!(v["webhook"]["attempts"], 3);
    assert_eq!(rx.count(), 3);
}

#[tokio::test]
async fn a_webhook_that_keeps_failing_is_dead_lettered_and_can_be_replayed() {
    let up = Upstream::start().await;
    let rx = Receiver::start(vec![500, 500]).await;
    let gw = hooked(&up, &rx, 2).await;
    let (s, _, b) = post_to(&gw.url("/x"), "{}", &[]).await;
    assert_eq!(s, 202, "{b}");
    let dead = gw.first_dead_letter().await;
    assert_eq!(dead["source"], "webhook");
    assert_eq!(dead["attempts"], 2);
    assert!(dead["reason"].as_str().unwrap().contains("500"), "{dead}");
    assert_eq!(rx.count(), 2);
    // The receiver answers 200 now: a replay delivers it.
    let id = dead["id"].as_str().unwrap();
    let (s, b) = gw.replay_dead_letter(id).await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    let got = rx.wait_for(3).await;
    verify(&got[2].0, &got[2].1);
    let (s, _) = gw.admin_json(&format!("/dead-letters/{id}")).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn callback_urls_from_the_request_must_be_allowed() {
    let up = Upstream::start().await;
    let rx = Receiver::start(vec![]).await;
    let gw = Gateway::start(&webhook_config(
        &up.url(),
        &format!(
            "from_header: Callback-Url, allow: [\"{}\"]",
            rx.url("/hooks/")
        ),
    ))
    .await;
    // Dot segments (plain or encoded), encoded slashes and user info never escape the list.
    let escapes = [
        "/hooks/../../admin",
        "/hooks/%2e%2e/admin",
        "/hooks/%2E%2e/admin",
        "/hooks/..%2fadmin",
        "/hooks/.%2E/admin",
        "/hooks/./x",
        "/hooks/a%2Fb",
        "/hooks/a%5cb",
        "/hooks/a\\b",
    ]
    .map(|p| rx.url(p));
    let userinfo = rx.url("/hooks/a").replace("http://", "http://user:pass@");
    for bad in [
        "http://elsewhere.example/hooks/x",
        "not a url",
        &rx.url("/other"),
        &userinfo,
    ]
    .into_iter()
    .chain(escapes.iter().map(String::as_str))
    {
        let (s, _, b) = post_to(&gw.url("/x"), "{}", &[("callback-url", bad)]).await;
        assert_eq!(s, 400, "{bad}: {b}");
        assert_eq!(b["field"], "header.callback-url");
    }
    assert_eq!(up.hits(), 0, "refused requests never run");
    let (s, _, _) = post_to(
        &gw.url("/x"),
        "{}",
        &[("callback-url", &rx.url("/hooks/a"))],
    )
    .await;
    assert_eq!(s, 202);
    let got = rx.wait_for(1).await;
    verify(&got[0].0, &got[0].1);
}

#[tokio::test]
async fn a_job_is_visible_from_a_second_gateway_sharing_redis() {
    let up = Upstream::start().await;
    let redis = rd::url().await;
    let yaml = format!(
        r#"
state: {{ store: redis, redis: {{ url: "{redis}", prefix: "{}" }} }}
backends:
  up: {{ type: http, endpoints: ["{}"] }}
routes:
  - id: shared
    match: {{ method: POST, path: /x }}
    backend: up
    mode: async
"#,
        rd::prefix(),
        up.url()
    );
    let a = Gateway::start(&yaml).await;
    let b = Gateway::start(&yaml).await;
    let (s, h, _) = post_to(&a.url("/x"), "{}", &[]).await;
    assert_eq!(s, 202);
    let (s, _, v) = settle(&b.url(h["location"].to_str().unwrap())).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["response"]["status"], 200);
}

#[tokio::test]
async fn a_job_whose_gateway_was_killed_runs_again_after_a_restart() {
    // The first gateway's upstream hangs; the second's answers. Same state file.
    let hanging = Upstream::hanging().await;
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (free_port().await, free_port().await);
    let write = |upstream: &str| {
        let yaml = format!(
            r#"
server: {{ listen: "{listen}", admin: "{admin}" }}
backends:
  up: {{ type: http, endpoints: ["{upstream}"] }}
routes:
  - id: work
    match: {{ method: POST, path: /work }}
    backend: up
    mode: async
    async: {{ timeout: 1s }}
"#
        );
        std::fs::write(dir.path().join("routes.yaml"), yaml).unwrap();
    };
    write(&hanging.url());
    let mut first = crate::spool::spawn_gateway(&dir.path().join("routes.yaml"));
    crate::spool::wait_up(admin).await;
    let (s, h, _) = post_to(&format!("http://{listen}/work"), "{\"n\":1}", &[]).await;
    assert_eq!(s, 202);
    let job = format!("http://{listen}{}", h["location"].to_str().unwrap());
    // Wait until the hanging upstream has the request, then kill the gateway mid-call.
    eventually("the upstream never got the call", || async {
        if hanging.hits() == 0 { Err(()) } else { Ok(()) }
    })
    .await;
    first.kill();

    write(&up.url());
    let mut second = crate::spool::spawn_gateway(&dir.path().join("routes.yaml"));
    crate::spool::wait_up(admin).await;
    // Pending until the dead gateway's lease runs out, then run again and finished.
    let (s, _, v) = settle(&job).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["response"]["body"]["body_len"], 7);
    assert_eq!(up.hits(), 1);
    second.kill();
}

/// A gateway with one `mode: async` route `POST /work` to `upstream`, and `state` (YAML).
async fn work_gateway(upstream: &str, state: &str) -> Gateway {
    Gateway::start(&format!(
        r#"
{state}
backends:
  up: {{ type: http, endpoints: ["{upstream}"] }}
routes:
  - id: work
    match: {{ method: POST, path: /work }}
    backend: up
    mode: async
"#
    ))
    .await
}

#[tokio::test]
async fn no_job_is_accepted_when_the_store_is_down() {
    let up = Upstream::start().await;
    let dead = free_port().await;
    let gw = work_gateway(
        &up.url(),
        &format!(
            "state: {{ store: redis, redis: {{ url: \"redis://{dead}/\", timeout: 300ms }} }}"
        ),
    )
    .await;
    let (s, h, b) = post_to(&gw.url("/work"), "{}", &[]).await;
    assert_eq!(s, 503, "{b}");
    assert_eq!(b["type"], "urn:switchyard:problem:store-unavailable");
    assert!(h.contains_key("retry-after"));
    assert!(h.get("location").is_none());
    // Nothing was recorded, so nothing runs.
    assert_eq!(up.hits(), 0);
    let (s, _, _) = get(&gw.url(&format!("/jobs/{}", uuid::Uuid::now_v7()))).await;
    assert_eq!(s, 503, "reading a job needs the store too");
}

#[tokio::test]
async fn jobs_live_under_the_configured_path_and_expire_after_their_ttl() {
    let up = Upstream::start().await;
    let gw = work_gateway(
        &up.url(),
        "state: { jobs: { path: /v1/operations, ttl: 1s } }",
    )
    .await;
    let (s, h, b) = post_to(&gw.url("/work"), "{}", &[]).await;
    assert_eq!(s, 202, "{b}");
    let href = h["location"].to_str().unwrap().to_string();
    assert!(href.starts_with("/v1/operations/"), "{href}");
    let (s, _, _) = settle(&gw.url(&href)).await;
    assert_eq!(s, 200);
    // Gone once its TTL has passed.
    let b = eventually("the job outlived its TTL", || async {
        match get(&gw.url(&href)).await {
            (s, _, b) if s == 404 => Ok(b),
            (s, _, _) => Err(s),
        }
    })
    .await;
    assert_eq!(json(&b)["type"], "urn:switchyard:problem:job-not-found");
    // The default prefix is not served when another is configured.
    let (s, _, _) = get(&gw.url(&format!("/jobs/{}", uuid::Uuid::now_v7()))).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn reading_a_job_passes_its_routes_plugins() {
    let up = Upstream::start().await;
    let key = "a-key-of-at-least-16-characters";
    let gw = Gateway::start(&format!(
        r#"
backends:
  up: {{ type: http, endpoints: ["{}"] }}
routes:
  - id: guarded
    match: {{ method: POST, path: /work }}
    backend: up
    mode: async
    plugins:
      - api_key: {{ keys: ["{key}"] }}
      - headers: {{ response: {{ set: {{ x-guarded: "yes" }} }} }}
"#,
        up.url()
    ))
    .await;
    let (s, _, _) = post_to(&gw.url("/work"), "{}", &[]).await;
    assert_eq!(s, 401, "the job itself needs the key");
    let (s, h, b) = post_to(&gw.url("/work"), "{}", &[("x-api-key", key)]).await;
    assert_eq!(s, 202, "{b}");
    let job = gw.url(h["location"].to_str().unwrap());
    // Without the key: 401, and nothing of the job is shown.
    let (s, h, b) = get(&job).await;
    assert_eq!(s, 401, "{}", String::from_utf8_lossy(&b));
    assert!(h.contains_key("www-authenticate"));
    assert!(h.get("switchyard-job-status").is_none());
    // With it: the job, and the route's other plugins applied to the answer.
    let b = eventually("the job never succeeded", || async {
        let req = request(Method::GET, &job)
            .header("x-api-key", key)
            .body(body(""))
            .unwrap();
        let (s, h, b) = send(req).await;
        assert_eq!(h["x-guarded"], "yes");
        match s.as_u16() {
            200 => Ok(b),
            202 => Err(s),
            other => panic!("unexpected {other}"),
        }
    })
    .await;
    assert_eq!(json(&b)["status"], "succeeded");
}

/// The job endpoint is a route the table generates; it serves every host, before any route's
/// catch-all, whatever the method.
#[tokio::test]
async fn the_job_endpoint_serves_every_host_before_catch_all_routes() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&format!(
        r#"
backends:
  up: {{ type: http, endpoints: ["{}"] }}
routes:
  - id: report
    match: {{ method: POST, path: "/reports/{{*rest}}" }}
    backend: up
    mode: async
  - id: everything-on-api
    match: {{ host: api.test, path: "/{{*rest}}" }}
    backend: up
  - id: everything
    match: {{ path: "/{{*rest}}" }}
    backend: up
"#,
        up.url()
    ))
    .await;
    let job = format!("/jobs/{}", uuid::Uuid::now_v7());
    for host in [None, Some("api.test")] {
        let mut req = request(Method::GET, &gw.url(&job));
        if let Some(h) = host {
            req = req.header("host", h);
        }
        let (s, _, b) = send(req.body(body("")).unwrap()).await;
        assert_eq!(s, 404, "{host:?}: {}", String::from_utf8_lossy(&b));
        assert_eq!(json(&b)["type"], "urn:switchyard:problem:job-not-found");
        let mut req = request(Method::DELETE, &gw.url(&job));
        if let Some(h) = host {
            req = req.header("host", h);
        }
        let (s, h, _) = send(req.body(body("")).unwrap()).await;
        assert_eq!(s, 405);
        assert_eq!(h["allow"], "GET, HEAD");
    }
    assert_eq!(up.hits(), 0, "no request reached a catch-all route");
    let (_, v) = gw.admin_json("/routes").await;
    let ids: Vec<&str> = v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"switchyard.jobs"), "{ids:?}");
}
