//! Several gateways as one: cluster-wide rate limits counted in the shared Redis (one bucket
//! for every replica), and what each fallback does while Redis is away.

use http::Method;

use crate::support::amqp::BrokerProxy;
use crate::support::haproxy::Haproxy;
use crate::support::redis as rd;
use crate::support::*;

/// A config with an upstream `up` and, at `/{id}`, one route per `(id, rate_limit)`.
fn limited(redis: &str, prefix: &str, up: &str, routes: &[(&str, &str)]) -> String {
    let mut yaml = format!(
        r#"
state: {{ store: redis, redis: {{ url: "{redis}", prefix: "{prefix}" }} }}
backends:
  up: {{ type: http, endpoints: ["{up}"] }}
routes:
"#
    );
    for (id, limit) in routes {
        yaml.push_str(&format!(
            "  - id: {id}\n    match: {{ method: GET, path: /{id} }}\n    backend: up\n    rate_limit: {limit}\n"
        ));
    }
    yaml
}

async fn status(gw: &Gateway, path: &str) -> u16 {
    let (s, _, _) = send(request(Method::GET, &gw.url(path)).body(body("")).unwrap()).await;
    s.as_u16()
}

#[tokio::test]
async fn a_cluster_wide_limit_is_one_count_for_every_replica() {
    let up = Upstream::start().await;
    let yaml = limited(
        &rd::url().await,
        &rd::prefix(),
        &up.url(),
        &[
            ("shared", "{ requests: 10, per: 60s, scope: cluster }"),
            ("apart", "{ requests: 10, per: 60s }"),
        ],
    );
    let (a, b) = (Gateway::start(&yaml).await, Gateway::start(&yaml).await);
    // Twelve requests, alternating between the replicas: ten let through in all.
    let mut answers = Vec::new();
    for i in 0..12 {
        let gw = if i % 2 == 0 { &a } else { &b };
        answers.push(status(gw, "/shared").await);
    }
    assert_eq!(
        answers.iter().filter(|s| **s == 200).count(),
        10,
        "{answers:?}"
    );
    assert_eq!(&answers[10..], &[429, 429], "{answers:?}");
    let (s, h, b429) = send(
        request(Method::GET, &b.url("/shared"))
            .body(body(""))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 429);
    assert!(h.contains_key("retry-after"), "{h:?}");
    assert_eq!(json(&b429)["status"], 429);
    // A local limit counts on each replica apart: twelve pass.
    let mut apart = 0;
    for i in 0..12 {
        let gw = if i % 2 == 0 { &a } else { &b };
        apart += usize::from(status(gw, "/apart").await == 200);
    }
    assert_eq!(apart, 12);
}

#[tokio::test]
async fn while_redis_is_away_each_fallback_decides_as_configured() {
    let up = Upstream::start().await;
    let redis = rd::url().await;
    let addr = redis
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_string();
    let proxy = BrokerProxy::start_to(addr).await;
    let yaml = limited(
        &format!("redis://{}/", proxy.addr),
        &rd::prefix(),
        &up.url(),
        &[
            (
                "closed",
                "{ requests: 100, per: 60s, scope: cluster, fallback: closed }",
            ),
            (
                "local",
                "{ requests: 2, per: 60s, scope: cluster, fallback: local }",
            ),
            (
                "open",
                "{ requests: 1, per: 60s, scope: cluster, fallback: open }",
            ),
        ],
    );
    let gw = Gateway::start(&yaml).await;
    assert_eq!(status(&gw, "/closed").await, 200, "counted in Redis");
    assert_eq!(status(&gw, "/open").await, 200);
    assert_eq!(
        status(&gw, "/open").await,
        429,
        "one per minute, counted in Redis"
    );

    proxy.stop();
    let (s, h, b) = send(
        request(Method::GET, &gw.url("/closed"))
            .body(body(""))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 503, "{}", String::from_utf8_lossy(&b));
    assert_eq!(h["retry-after"], "1");
    assert!(
        json(&b)["type"]
            .as_str()
            .unwrap_or("")
            .ends_with("store-unavailable"),
        "{}",
        String::from_utf8_lossy(&b)
    );
    let local: Vec<u16> = [
        status(&gw, "/local").await,
        status(&gw, "/local").await,
        status(&gw, "/local").await,
    ]
    .to_vec();
    assert_eq!(local, [200, 200, 429], "this replica's own bucket");
    for _ in 0..3 {
        assert_eq!(
            status(&gw, "/open").await,
            200,
            "let through while uncounted"
        );
    }
    assert_eq!(up.hits(), 7, "refusals never reach the upstream");

    // Redis back: counted there again.
    proxy.start_again();
    eventually("the cluster count back", || async {
        match status(&gw, "/closed").await {
            200 => Ok(()),
            s => Err(s),
        }
    })
    .await;
    assert_eq!(status(&gw, "/open").await, 429, "the count kept in Redis");
}

#[tokio::test]
async fn a_cluster_wide_limit_needs_the_shared_store() {
    let e = start_error(
        r#"
backends:
  up: { type: http, endpoints: ["http://127.0.0.1:9"] }
routes:
  - id: a
    match: { path: /a }
    backend: up
    rate_limit: { requests: 1, scope: cluster }
  - id: b
    match: { path: /b }
    backend: up
    rate_limit: { requests: 1, fallback: open }
"#,
    )
    .await;
    assert!(e.contains("set `state.store: redis`"), "{e}");
    assert!(e.contains("it needs `scope: cluster`"), "{e}");
}

/// Requests through `lb` from `clients` tasks until `stop`: a GET to the upstream and a POST
/// that publishes, in turn. What each answered, and the message ids of the 202s.
#[derive(Default)]
struct Traffic {
    answers: std::collections::BTreeMap<u16, usize>,
    published: Vec<String>,
    /// The body of the first answer that was neither 200 nor 202.
    failure: Option<String>,
}

async fn traffic(
    lb: String,
    clients: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Traffic {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (lb, stop) = (lb.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut t = Traffic::default();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let req = if i.is_multiple_of(2) {
                    request(Method::GET, &format!("{lb}/up/{c}/{i}")).body(body(""))
                } else {
                    request(Method::POST, &format!("{lb}/orders"))
                        .header("content-type", "application/json")
                        .body(body(format!("{{\"client\":{c},\"n\":{i}}}")))
                };
                let (s, _, b) = send(req.unwrap()).await;
                *t.answers.entry(s.as_u16()).or_default() += 1;
                if s == 202 {
                    t.published
                        .push(json(&b)["message_id"].as_str().unwrap().to_string());
                } else if s != 200 && t.failure.is_none() {
                    t.failure = Some(String::from_utf8_lossy(&b).into_owned());
                }
            }
            t
        }));
    }
    let mut all = Traffic::default();
    for task in tasks {
        let t = task.await.unwrap();
        for (s, n) in t.answers {
            *all.answers.entry(s).or_default() += n;
        }
        all.published.extend(t.published);
        all.failure = all.failure.or(t.failure);
    }
    all
}

/// Whether a replica has answered a request since it started (its counters start at zero).
async fn has_served(admin: std::net::SocketAddr) -> bool {
    let (_, _, m) = get(&format!("http://{admin}/metrics")).await;
    String::from_utf8_lossy(&m).contains("switchyard_requests_total{")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_behind_haproxy_fails_no_request_and_loses_no_message() {
    use crate::support::amqp as rabbit;
    let up = Upstream::start().await;
    let url = rabbit::broker_url().await;
    let (x, q) = (rabbit::unique("x"), rabbit::unique("q"));
    let yaml = format!(
        r#"{}  up: {{ type: http, endpoints: ["{}"] }}
routes:
  - id: up
    match: {{ method: GET, path: "/up/{{*rest}}" }}
    backend: up
  - id: orders
    match: {{ method: POST, path: /orders }}
    backend: rabbit
    amqp: {{ exchange: "{x}", routing_key: orders.new }}
"#,
        rabbit::rabbit_backend(&url, &x, &q),
        up.url()
    );
    let mut replicas = Vec::new();
    for _ in 0..2 {
        replicas
            .push(Binary::start_with_server(&yaml, "drain_delay: 600ms, shutdown_grace: 5s").await);
    }
    let lb = Haproxy::start(
        &replicas
            .iter()
            .map(|r| (r.listen, r.admin))
            .collect::<Vec<_>>(),
    )
    .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn(traffic(lb.url(""), 4, stop.clone()));

    // Each replica in turn: SIGTERM, out of rotation while it drains, started again, back in.
    for r in &mut replicas {
        eventually("the replica to serve through HAProxy", || async {
            if has_served(r.admin).await {
                Ok(())
            } else {
                Err("not yet")
            }
        })
        .await;
        let status = r.terminate().await;
        assert!(status.success(), "{status}: {}", r.log());
        r.restart().await;
        // Back in rotation before the next one goes.
        eventually("the restarted replica to serve through HAProxy", || async {
            if has_served(r.admin).await {
                Ok(())
            } else {
                Err("not yet")
            }
        })
        .await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let t = load.await.unwrap();
    let total: usize = t.answers.values().sum();
    assert_eq!(
        t.answers.keys().copied().collect::<Vec<_>>(),
        [200, 202],
        "every request answered 200 or 202 through the restarts: {:?}; {:?}",
        t.answers,
        t.failure
    );
    assert!(total > 100, "{:?}", t.answers);

    // Every acknowledged publish is in the queue, once.
    let conn = rabbit::client().await;
    let ch = conn.create_channel().await.unwrap();
    let mut delivered = std::collections::BTreeMap::<String, usize>::new();
    for id in message_ids(&ch, &q).await {
        *delivered.entry(id).or_default() += 1;
    }
    let lost: Vec<&String> = t
        .published
        .iter()
        .filter(|id| !delivered.contains_key(*id))
        .collect();
    // The figures docs/deployment.md quotes (`cargo test rolling -- --nocapture`).
    eprintln!(
        "rolling restart: {total} requests, answers {:?}; {} publishes acknowledged, {} delivered, {} lost, {} duplicated",
        t.answers,
        t.published.len(),
        delivered.len(),
        lost.len(),
        delivered.values().filter(|n| **n > 1).count()
    );
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages lost",
        lost.len(),
        t.published.len()
    );
    assert!(
        delivered.values().all(|n| *n == 1),
        "a message delivered twice"
    );
    rabbit::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn a_draining_gateway_says_so_and_serves_until_the_delay_is_over() {
    let up = Upstream::start().await;
    let mut gw = Binary::start_with_server(
        &format!(
            "backends:\n  up: {{ type: http, endpoints: [\"{}\"] }}\nroutes:\n  - id: up\n    match: {{ path: \"/{{*rest}}\" }}\n    backend: up\n",
            up.url()
        ),
        "drain_delay: 30s",
    )
    .await;
    let ready = format!("http://{}/readyz", gw.admin);
    assert_eq!(get(&ready).await.0, 200);
    gw.sigterm();
    let v = eventually("the gateway to say it drains", || async {
        let (s, _, b) = get(&ready).await;
        if s == 503 { Ok(json(&b)) } else { Err(s) }
    })
    .await;
    assert_eq!(
        (v["ready"].as_bool(), v["draining"].as_bool()),
        (Some(false), Some(true)),
        "{v}"
    );
    // Still serving, each HTTP/1.1 answer closing its connection.
    let (s, h, _) = get(&format!("http://{}/x", gw.listen)).await;
    assert_eq!(s, 200);
    assert_eq!(h["connection"], "close");
    // A second signal ends the delay: the gateway drains and exits.
    let status = gw.terminate().await;
    assert!(status.success(), "{status}");
}

/// A GET on a replica's admin API, as JSON.
async fn admin(r: &Binary, path: &str) -> (u16, serde_json::Value) {
    let (s, _, b) = get(&format!("http://{}{path}", r.admin)).await;
    (s.as_u16(), serde_json::from_slice(&b).unwrap_or_default())
}

async fn post_on(
    base: &str,
    path: &str,
    key: Option<&str>,
) -> (u16, http::HeaderMap, serde_json::Value) {
    let mut req =
        request(Method::POST, &format!("{base}{path}")).header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("idempotency-key", format!("\"{k}\""));
    }
    let (s, h, b) = send(req.body(body(r#"{"n":1}"#)).unwrap()).await;
    (
        s.as_u16(),
        h,
        serde_json::from_slice(&b).unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_idempotency_keys_jobs_and_dead_letters() {
    use crate::support::amqp as rabbit;
    let up = Upstream::start().await;
    // The webhook receiver refuses twice (the webhook is dead-lettered), then takes it.
    let rx = crate::jobs::Receiver::start(vec![500, 500]).await;
    let url = rabbit::broker_url().await;
    let (x, q) = (rabbit::unique("x"), rabbit::unique("q"));
    let yaml = format!(
        r#"state: {{ store: redis, redis: {{ url: "{redis}", prefix: "{prefix}" }} }}
{rabbit}  up: {{ type: http, endpoints: ["{up}"] }}
routes:
  - id: orders
    match: {{ method: POST, path: /orders }}
    backend: rabbit
    amqp: {{ exchange: "{x}", routing_key: orders.new }}
    idempotency: {{}}
  - id: work
    match: {{ method: POST, path: /work }}
    backend: up
    mode: async
    async:
      webhook: {{ url: "{hook}", secret: "a-test-secret-of-32-characters!!", attempts: 2, backoff: {{ min: 20ms, max: 50ms }} }}
"#,
        redis = rd::url().await,
        prefix = rd::prefix(),
        rabbit = rabbit::rabbit_backend(&url, &x, &q).trim_start_matches('\n'),
        up = up.url(),
        hook = rx.url("/hook"),
    );
    let a = Binary::start(&yaml, &[], None).await;
    let b = Binary::start(&yaml, &[], None).await;
    let (on_a, on_b) = (
        format!("http://{}", a.listen),
        format!("http://{}", b.listen),
    );
    for r in [&a, &b] {
        eventually("the replica to be ready", || async {
            match admin(r, "/readyz").await {
                (200, _) => Ok(()),
                (_, v) => Err(v),
            }
        })
        .await;
    }

    // An Idempotency-Key used on A is replayed by B, with A's answer.
    let (s, h, first) = post_on(&on_a, "/orders", Some("k1")).await;
    assert_eq!(s, 202, "{first}");
    assert!(!h.contains_key("idempotent-replayed"));
    let (s, h, again) = post_on(&on_b, "/orders", Some("k1")).await;
    assert_eq!(s, 202, "{again}");
    assert!(h.contains_key("idempotent-replayed"), "{h:?}");
    assert_eq!(again["message_id"], first["message_id"]);
    // Concurrent duplicates on both replicas: one publish.
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let base = if i % 2 == 0 {
                on_a.clone()
            } else {
                on_b.clone()
            };
            tokio::spawn(async move { post_on(&base, "/orders", Some("k2")).await })
        })
        .collect();
    let mut fresh = 0;
    for t in tasks {
        let (s, h, v) = t.await.unwrap();
        assert!(s == 202 || s == 409, "{s}: {v}");
        fresh += usize::from(s == 202 && !h.contains_key("idempotent-replayed"));
    }
    assert_eq!(fresh, 1, "one of the duplicates ran");
    let conn = rabbit::client().await;
    assert_eq!(rabbit::depth(&conn, &q).await, 2, "k1 and k2, once each");

    // A job accepted on A is read from B.
    let (s, h, v) = post_on(&on_a, "/work", None).await;
    assert_eq!(s, 202, "{v}");
    let (s, _, job) =
        crate::jobs::settle(&format!("{on_b}{}", h["location"].to_str().unwrap())).await;
    assert_eq!(s, 200, "{job}");
    assert_eq!(job["response"]["status"], 200);
    // Its webhook, refused twice, is a dead letter that both replicas list; replayed from B,
    // it is delivered once.
    let listed = |r: &'static str, who: &Binary| {
        let admin_addr = who.admin;
        async move {
            eventually(&format!("the dead letter listed on {r}"), || async {
                let (_, _, b) = get(&format!("http://{admin_addr}/dead-letters")).await;
                let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
                match v["dead_letters"]
                    .as_array()
                    .and_then(|d| d.first())
                    .cloned()
                {
                    Some(d) => Ok(d),
                    None => Err(v),
                }
            })
            .await
        }
    };
    let (dead_a, dead_b) = (listed("A", &a).await, listed("B", &b).await);
    assert_eq!(dead_a["id"], dead_b["id"]);
    assert_eq!(dead_b["source"], "webhook");
    let id = dead_b["id"].as_str().unwrap();
    let (s, _, body_) = send(
        request(
            Method::POST,
            &format!("http://{}/dead-letters/{id}/replay", b.admin),
        )
        .body(body(""))
        .unwrap(),
    )
    .await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&body_));
    let got = rx.wait_for(3).await;
    assert_eq!(got.len(), 3, "two refused tries and the replay");
    let (s, _) = admin(&a, &format!("/dead-letters/{id}")).await;
    assert_eq!(s, 404, "gone for A too");
    rabbit::cleanup(&conn, &[&x], &[&q]).await;
}

/// An upstream whose first call never gets an answer and whose later calls get 200: the
/// address and the number of calls so far.
async fn hangs_once() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let n = counted.fetch_add(1, Ordering::SeqCst);
                    async move {
                        if n == 0 {
                            std::future::pending::<()>().await;
                        }
                        Ok::<_, std::convert::Infallible>(http::Response::new(body("done")))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            });
        }
    });
    (addr, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_replica_is_killed_mid_run_is_finished_by_another() {
    let (up, calls) = hangs_once().await;
    let yaml = format!(
        r#"state: {{ store: redis, redis: {{ url: "{}", prefix: "{}" }} }}
backends:
  up: {{ type: http, endpoints: ["http://{up}"] }}
routes:
  - id: work
    match: {{ method: POST, path: /work }}
    backend: up
    mode: async
    async: {{ timeout: 1s }}
"#,
        rd::url().await,
        rd::prefix(),
    );
    let mut a = Binary::start(&yaml, &[], None).await;
    let b = Binary::start(&yaml, &[], None).await;
    let (s, h, v) = post_on(&format!("http://{}", a.listen), "/work", None).await;
    assert_eq!(s, 202, "{v}");
    // A holds the job's lease, its call hanging; then A dies.
    eventually("A's call to reach the upstream", || async {
        match calls.load(std::sync::atomic::Ordering::SeqCst) {
            0 => Err(()),
            _ => Ok(()),
        }
    })
    .await;
    a.kill();
    // B takes the job over once the dead replica's lease runs out, and finishes it.
    let (s, _, job) = crate::jobs::settle(&format!(
        "http://{}{}",
        b.listen,
        h["location"].to_str().unwrap()
    ))
    .await;
    assert_eq!(s, 200, "{job}");
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["response"]["status"], 200);
    assert!(job["runs"].as_u64().unwrap_or(2) >= 1);
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "run again once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_replicas_spool_drains_after_that_replica_restarts() {
    use crate::support::amqp as rabbit;
    let proxy = BrokerProxy::start().await;
    proxy.stop();
    let (x, q) = (rabbit::unique("x"), rabbit::unique("q"));
    let state = format!(
        "state: {{ store: redis, redis: {{ url: \"{}\", prefix: \"{}\" }}, spool: {{ retry: {{ min: 50ms, max: 300ms }} }} }}",
        rd::url().await,
        rd::prefix()
    );
    let yaml = crate::spool::config(&proxy.url(), &x, &q, &state, "");
    let mut a = Binary::start(&yaml, &[], None).await;
    let mut b = Binary::start(&yaml, &[], None).await;
    // The broker is away: each replica spools what it is sent, on its own disk.
    let mut acknowledged = std::collections::BTreeSet::new();
    for (i, r) in [&a, &b, &a, &b, &a, &b].into_iter().enumerate() {
        let (s, h, v) = send(
            request(Method::POST, &format!("http://{}/orders/{i}", r.listen))
                .header("content-type", "application/json")
                .body(body(format!("{{\"seq\":{i}}}")))
                .unwrap(),
        )
        .await;
        assert_eq!(s, 202, "{}", String::from_utf8_lossy(&v));
        assert_eq!(h["switchyard-spooled"], "true");
        acknowledged.insert(json(&v)["message_id"].as_str().unwrap().to_string());
    }
    // A crashes, B is stopped; the broker comes back while both are down.
    a.kill();
    let status = b.terminate().await;
    assert!(status.success(), "{status}");
    proxy.start_again();
    let conn = rabbit::client().await;
    let ch = conn.create_channel().await.unwrap();
    let mut delivered = Vec::new();
    // Each replica, started again on its own disk, sends what it spooled: A's three first.
    for (r, want) in [(&mut a, 3), (&mut b, 6)] {
        r.restart().await;
        // Ready: connected, the queue declared.
        eventually("the replica to be ready", || async {
            match admin(r, "/readyz").await {
                (200, _) => Ok(()),
                (_, v) => Err(v),
            }
        })
        .await;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        while delivered.len() < want {
            delivered.extend(message_ids(&ch, &q).await);
            assert!(
                tokio::time::Instant::now() < deadline,
                "the replica's spool did not drain: {} of {want}",
                delivered.len()
            );
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }
    assert_eq!(delivered.len(), 6, "{delivered:?}");
    let got: std::collections::BTreeSet<String> = delivered.into_iter().collect();
    assert_eq!(got, acknowledged, "every acknowledged message, once");
    rabbit::cleanup(&conn, &[&x], &[&q]).await;
}

/// The message ids of what queue `q` holds now, taken from it.
async fn message_ids(ch: &lapin::Channel, q: &str) -> Vec<String> {
    let mut ids = Vec::new();
    while let Some(m) = ch
        .basic_get(q.into(), lapin::options::BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        ids.push(
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .unwrap()
                .to_string(),
        );
    }
    ids
}

#[tokio::test]
async fn an_amqp_backend_fails_over_to_the_next_broker_and_back_to_the_first() {
    use crate::support::amqp as rabbit;
    // Two "nodes": two proxies to the local RabbitMQ; the first is down.
    let (first, second) = (BrokerProxy::start().await, BrokerProxy::start().await);
    first.stop();
    let (x, q) = (rabbit::unique("x"), rabbit::unique("q"));
    let backend = rabbit::rabbit_backend(&first.url(), &x, &q).replace(
        "    type: amqp\n",
        &format!(
            "    type: amqp\n    failover: [\"{}\"]\n    connect_timeout: 1s\n    reconnect: {{ min: 50ms, max: 200ms }}\n",
            second.url()
        ),
    );
    let gw = Gateway::start(&format!(
        r#"{backend}
routes:
  - id: orders
    match: {{ method: POST, path: /orders }}
    backend: rabbit
    amqp: {{ exchange: "{x}", routing_key: orders.new }}
"#
    ))
    .await;
    gw.wait_backend("rabbit", true).await;
    let publish = || async {
        let (s, _, b) = send(
            request(Method::POST, &gw.url("/orders"))
                .header("content-type", "application/json")
                .body(body("{}"))
                .unwrap(),
        )
        .await;
        assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    };
    publish().await;
    back_to_the_first(&gw, "rabbit", &first, &second).await;
    publish().await;
    assert_eq!(first.sessions(), 1, "back on the first broker");
    let conn = rabbit::client().await;
    assert_eq!(rabbit::depth(&conn, &q).await, 2);
    rabbit::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn failover_brokers_are_checked_when_the_config_loads() {
    let e = start_error(
        r#"
backends:
  rabbit:
    type: amqp
    url: "amqp://guest:guest@127.0.0.1:5672/%2f"
    failover: ["amqps://guest:guest@127.0.0.2:5671/%2f", "not a url", "amqp://guest:guest@127.0.0.1:5672/%2f"]
routes:
  - id: orders
    match: { method: POST, path: /orders }
    backend: rabbit
    amqp: { exchange: x, routing_key: k }
"#,
    )
    .await;
    assert!(e.contains("use the scheme of `url`"), "{e}");
    assert!(e.contains("not an AMQP URL"), "{e}");
    assert!(e.contains("this broker is listed already"), "{e}");
}

#[tokio::test]
async fn an_mqtt_backend_fails_over_to_the_next_broker_and_back_to_the_first() {
    let addr = crate::support::mqtt::broker_addr().await;
    let (prefix, mut sub) = crate::support::mqtt::Subscriber::on_fresh_prefix(&addr).await;
    let (first, second) = (
        BrokerProxy::start_to(addr.clone()).await,
        BrokerProxy::start_to(addr.clone()).await,
    );
    first.stop();
    let gw = Gateway::start(&format!(
        r#"
backends:
  devices:
    type: mqtt
    url: "mqtt://{}"
    failover: ["mqtt://{}"]
    client_id: "gw-{}"
    connect_timeout: 1s
    reconnect: {{ min: 50ms, max: 200ms }}
routes:
  - id: readings
    match: {{ method: POST, path: /readings }}
    backend: devices
    mqtt: {{ topic: "{prefix}/readings", qos: 1 }}
"#,
        first.addr,
        second.addr,
        uuid::Uuid::now_v7().simple()
    ))
    .await;
    gw.wait_backend("devices", true).await;
    let publish = |n: u32| {
        let url = gw.url("/readings");
        async move {
            let (s, _, b) = send(
                request(Method::POST, &url)
                    .body(body(format!("{{\"n\":{n}}}")))
                    .unwrap(),
            )
            .await;
            assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
        }
    };
    publish(1).await;
    assert_eq!(&sub.next().await.payload[..], b"{\"n\":1}");
    back_to_the_first(&gw, "devices", &first, &second).await;
    publish(2).await;
    assert_eq!(&sub.next().await.payload[..], b"{\"n\":2}");
    assert_eq!(first.sessions(), 1, "back on the first broker");
}

/// With the backend connected through `second` (`first` down), `second` goes down and `first`
/// comes back; returns once the backend is connected again.
async fn back_to_the_first(gw: &Gateway, backend: &str, first: &BrokerProxy, second: &BrokerProxy) {
    assert_eq!(
        (first.sessions(), second.sessions()),
        (0, 1),
        "connected through the second broker"
    );
    first.start_again();
    second.stop();
    gw.wait_backend(backend, false).await;
    gw.wait_backend(backend, true).await;
}
