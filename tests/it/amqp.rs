//! The AMQP bridge against the real RabbitMQ: confirmed publishes with every property checked on
//! the delivered message, routing templates from each source, unroutable messages, bad input,
//! request/reply, topology declaration and mismatch, and no acknowledged message lost when the
//! broker goes away under load.

use std::time::{Duration, Instant};

use http::Method;
use lapin::options::BasicGetOptions;
use lapin::types::FieldTable;

use crate::support::amqp::{self as mq, BrokerProxy, header, header_str};
use crate::support::*;

/// A backend `rabbit` with a topic exchange, a queue bound with `binding`, and `routes`.
fn config(url: &str, exchange: &str, queue: &str, binding: &str, routes: &str) -> String {
    format!(
        r#"
backends:
  rabbit:
    type: amqp
    url: "{url}"
    breaker: {{ open_for: 300ms }}
    heartbeat: 5s
    confirm_timeout: 3s
    reconnect: {{ min: 50ms, max: 500ms }}
    topology:
      exchanges: [{{ name: "{exchange}", type: topic, durable: false, auto_delete: false }}]
      queues: [{{ name: "{queue}", durable: false }}]
      bindings: [{{ queue: "{queue}", exchange: "{exchange}", routing_key: "{binding}" }}]
routes:
{routes}
"#
    )
}

/// [`config`] with one route: `POST {path}` publishing to the exchange with `key`.
fn one_route(url: &str, x: &str, q: &str, key: &str, path: &str) -> String {
    config(
        url,
        x,
        q,
        key,
        &format!(
            "  - id: p\n    match: {{ method: POST, path: {path} }}\n    backend: rabbit\n    amqp: {{ exchange: \"{x}\", routing_key: {key} }}"
        ),
    )
}

#[tokio::test]
async fn a_confirmed_publish_lands_with_every_property_and_templates_from_each_source() {
    let url = mq::broker_url().await;
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let gw = Gateway::start(&config(
        &url,
        &x,
        &q,
        "order.#",
        &format!(
            r#"
  - id: create-order
    match: {{ method: POST, path: "/orders/{{region}}" }}
    backend: rabbit
    amqp:
      exchange: "{x}"
      routing_key: "order.{{region}}.{{query.kind}}.{{header.x-tenant}}.{{body.customer.tier}}"
      type: order.created
      expiration: 60s
      priority: 3
      headers: [X-Tenant]"#
        ),
    ))
    .await;
    gw.wait_backend("rabbit", true).await;
    let req = request(Method::POST, &gw.url("/orders/eu-west?kind=retail"))
        .header("content-type", "application/json")
        .header("idempotency-key", "key-123")
        .header("x-request-id", "rid-456")
        .header("x-tenant", "acme")
        .header("cc", "elsewhere")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body(body(r#"{"customer":{"tier":"gold"},"items":[1,2]}"#))
        .unwrap();
    let (s, h, b) = send(req).await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    assert_eq!(h["content-type"], "application/json");
    let answer = json(&b);
    assert_eq!(answer["message_id"], "key-123");
    assert_eq!(answer["correlation_id"], "rid-456");
    assert_eq!(answer["routing_key"], "order.eu-west.retail.acme.gold");

    // The broker confirmed before the answer: the message is in the queue now.
    let conn = mq::client().await;
    let ch = conn.create_channel().await.unwrap();
    let got = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the confirmed message is in the queue");
    assert_eq!(
        got.delivery.data,
        br#"{"customer":{"tier":"gold"},"items":[1,2]}"#
    );
    assert_eq!(
        got.delivery.routing_key.as_str(),
        "order.eu-west.retail.acme.gold"
    );
    let p = &got.delivery.properties;
    assert_eq!(p.delivery_mode(), &Some(2), "persistent by default");
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(p.message_id().as_ref().unwrap().as_str(), "key-123");
    assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "rid-456");
    assert_eq!(p.kind().as_ref().unwrap().as_str(), "order.created");
    assert_eq!(p.app_id().as_ref().unwrap().as_str(), "switchyard");
    assert_eq!(p.expiration().as_ref().unwrap().as_str(), "60000");
    assert_eq!(p.priority(), &Some(3));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(p.timestamp().unwrap().abs_diff(now) < 60);
    assert_eq!(header_str(p, "x-tenant").as_deref(), Some("acme"));
    assert!(
        header_str(p, "traceparent")
            .unwrap()
            .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    );
    assert!(
        header(p, "cc").is_none() && header(p, "CC").is_none(),
        "CC never travels"
    );

    // Without an Idempotency-Key the message id is generated.
    let req = request(Method::POST, &gw.url("/orders/us?kind=b2b"))
        .header("x-tenant", "t")
        .body(body(r#"{"customer":{"tier":2}}"#))
        .unwrap();
    let (s, _, b) = send(req).await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["routing_key"], "order.us.b2b.t.2");
    assert_eq!(json(&b)["message_id"].as_str().unwrap().len(), 36);

    // Values that are missing or unfit are named.
    for (path, tenant, payload, field) in [
        (
            "/orders/eu?kind=a",
            Some("t"),
            r#"{"customer":{}}"#,
            "body.customer.tier",
        ),
        ("/orders/eu?kind=a", Some("t"), "not json", "body"),
        (
            "/orders/eu?kind=a",
            Some("t"),
            r#"{"customer":{"tier":[1]}}"#,
            "body.customer.tier",
        ),
        (
            "/orders/eu",
            Some("t"),
            r#"{"customer":{"tier":1}}"#,
            "query.kind",
        ),
        (
            "/orders/eu?kind=a",
            None,
            r#"{"customer":{"tier":1}}"#,
            "header.x-tenant",
        ),
    ] {
        let mut r = request(Method::POST, &gw.url(path));
        if let Some(t) = tenant {
            r = r.header("x-tenant", t);
        }
        let (s, _, b) = send(r.body(body(payload)).unwrap()).await;
        assert_eq!(s, 400, "{path} {payload}: {}", String::from_utf8_lossy(&b));
        assert_eq!(json(&b)["field"], field, "{path} {payload}");
    }
    let long = "k".repeat(300);
    let req = request(Method::POST, &gw.url(&format!("/orders/eu?kind={long}")))
        .header("x-tenant", "t")
        .body(body(r#"{"customer":{"tier":1}}"#))
        .unwrap();
    let (s, _, b) = send(req).await;
    assert_eq!(s, 400, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["field"], "routing_key");
    assert_eq!(mq::depth(&conn, &q).await, 1, "nothing bad was published");
    mq::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn unroutable_messages_answer_as_configured() {
    let url = mq::broker_url().await;
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let gw = Gateway::start(&config(
        &url,
        &x,
        &q,
        "bound.*",
        &format!(
            r#"
  - id: default
    match: {{ method: POST, path: "/a/{{key}}" }}
    backend: rabbit
    amqp: {{ exchange: "{x}", routing_key: "{{key}}", multi_word: [key] }}
  - id: as-404
    match: {{ method: POST, path: "/b/{{key}}" }}
    backend: rabbit
    amqp: {{ exchange: "{x}", routing_key: "{{key}}", unroutable_status: 404 }}
  - id: fire-and-forget
    match: {{ method: POST, path: "/c/{{key}}" }}
    backend: rabbit
    amqp: {{ exchange: "{x}", routing_key: "{{key}}", mandatory: false, status: 200 }}
  - id: missing-exchange
    match: {{ method: POST, path: /d }}
    backend: rabbit
    amqp: {{ exchange: "{x}-nope", routing_key: "k" }}"#
        ),
    ))
    .await;
    gw.wait_backend("rabbit", true).await;
    let post = |p: &str| request(Method::POST, &gw.url(p)).body(body("x")).unwrap();
    assert_eq!(send(post("/a/bound.one")).await.0, 202);
    let (s, h, b) = send(post("/a/nowhere")).await;
    assert_eq!(s, 502, "{}", String::from_utf8_lossy(&b));
    assert_eq!(h["content-type"], "application/problem+json");
    assert_eq!(json(&b)["type"], "urn:switchyard:problem:unroutable");
    assert_eq!(send(post("/b/nowhere")).await.0, 404);
    assert_eq!(send(post("/c/nowhere")).await.0, 200);
    // A missing exchange is named too, and the pool recovers its channel afterwards.
    let (s, _, b) = send(post("/d")).await;
    assert_eq!(s, 502, "{}", String::from_utf8_lossy(&b));
    for _ in 0..8 {
        assert_eq!(send(post("/a/bound.two")).await.0, 202);
    }
    let conn = mq::client().await;
    assert_eq!(mq::depth(&conn, &q).await, 9);
    mq::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn request_reply_over_direct_reply_to_and_a_named_queue() {
    let url = mq::broker_url().await;
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let replies = mq::unique("replies");
    let mut yaml = config(
        &url,
        &x,
        &q,
        "rpc",
        &format!(
            r#"
  - id: ask
    match: {{ method: POST, path: /ask }}
    backend: rabbit
    timeout: 2s
    amqp: {{ exchange: "{x}", routing_key: rpc, headers: [X-Want], reply: {{}} }}
  - id: ask-short
    match: {{ method: POST, path: /ask-short }}
    backend: rabbit
    timeout: 300ms
    amqp: {{ exchange: "{x}", routing_key: rpc, reply: {{}} }}
  - id: ask-late
    match: {{ method: POST, path: /ask-late }}
    backend: rabbit
    timeout: 300ms
    amqp: {{ exchange: "{x}", routing_key: rpc, headers: [X-Delay-Ms], reply: {{}} }}
  - id: ask-nowhere
    match: {{ method: POST, path: /ask-nowhere }}
    backend: rabbit
    amqp: {{ exchange: "{x}-missing", routing_key: rpc, reply: {{}} }}
  - id: ask-named
    match: {{ method: POST, path: /ask-named }}
    backend: rabbit
    timeout: 2s
    amqp: {{ exchange: "{x}", routing_key: rpc, reply: {{ queue: "{replies}" }} }}"#
        ),
    );
    // The named reply queue is part of the backend's topology.
    yaml = yaml.replace(
        &format!("queues: [{{ name: \"{q}\", durable: false }}]"),
        &format!("queues: [{{ name: \"{q}\", durable: false }}, {{ name: \"{replies}\", durable: false }}]"),
    );
    let gw = Gateway::start(&yaml).await;
    gw.wait_backend("rabbit", true).await;
    let _responder = mq::responder(q.clone()).await;
    let ask = |path: &str, payload: &'static str, want: &str| {
        request(Method::POST, &gw.url(path))
            .header("x-want", want)
            .body(body(payload))
            .unwrap()
    };
    let (s, h, b) = send(ask("/ask", "hello", "201")).await;
    assert_eq!(s, 201, "{}", String::from_utf8_lossy(&b));
    assert_eq!(h["content-type"], "text/plain");
    assert_eq!(&b[..], b"re: hello");

    // Publishes to a missing exchange close their channels; the replacements still get replies.
    for _ in 0..6 {
        let (s, _, b) = send(ask("/ask-nowhere", "x", "200")).await;
        assert_eq!(s, 502, "{}", String::from_utf8_lossy(&b));
    }
    for i in 0..6 {
        let (s, _, b) = send(ask("/ask", "again", "200")).await;
        assert_eq!((s.as_u16(), &b[..]), (200, &b"re: again"[..]), "try {i}");
    }

    let (s, _, b) = send(ask("/ask-named", "named", "200")).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(&b[..], b"re: named");

    // Concurrent requests each get their own reply.
    let answers = futures_util::future::join_all((0..20).map(|i| {
        let payload: &'static str = Box::leak(format!("n{i}").into_boxed_str());
        send(ask("/ask", payload, "200"))
    }))
    .await;
    for (i, (s, _, b)) in answers.into_iter().enumerate() {
        assert_eq!((s.as_u16(), &b[..]), (200, format!("re: n{i}").as_bytes()));
    }

    // No reply in time: 504. A stray reply is dropped and counted; the right one still wins.
    let started = Instant::now();
    let (s, _, b) = send(ask("/ask-short", "ignore", "200")).await;
    assert_eq!(s, 504, "{}", String::from_utf8_lossy(&b));
    assert!(started.elapsed() < Duration::from_secs(2));
    let (s, _, b) = send(ask("/ask", "stray", "200")).await;
    assert_eq!((s.as_u16(), &b[..]), (200, &b"re: stray"[..]));
    let unmatched = || async {
        let (_, _, m) = get(&gw.admin_url("/metrics")).await;
        String::from_utf8_lossy(&m)
            .lines()
            .find_map(|l| {
                l.strip_prefix(
                    "switchyard_broker_events_total{backend=\"rabbit\",event=\"reply_unmatched\"} ",
                )?
                .parse::<f64>()
                .ok()
            })
            .unwrap_or(0.0)
    };
    assert_eq!(unmatched().await, 1.0, "the stray reply");
    // A reply that comes after the request timed out is dropped and counted too.
    let late = request(Method::POST, &gw.url("/ask-late"))
        .header("x-delay-ms", "700")
        .body(body("late"))
        .unwrap();
    let (s, _, b) = send(late).await;
    assert_eq!(s, 504, "{}", String::from_utf8_lossy(&b));
    eventually("the late reply was never counted as unmatched", || async {
        match unmatched().await {
            n if n >= 2.0 => Ok(()),
            n => Err(n),
        }
    })
    .await;
    assert_eq!(unmatched().await, 2.0, "the late reply");
    let conn = mq::client().await;
    mq::cleanup(&conn, &[&x], &[&q, &replies]).await;
}

#[tokio::test]
async fn a_topology_that_does_not_match_the_broker_is_reported() {
    let url = mq::broker_url().await;
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let conn = mq::client().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        x.as_str().into(),
        lapin::ExchangeKind::Direct,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let gw = Gateway::start(&one_route(&url, &x, &q, "k", "/p")).await;
    let entry = gw.wait_backend("rabbit", false).await;
    // The first state is "connecting"; wait for the broker's verdict.
    let problem = eventually("the broker's verdict never came", || async {
        let (_, v) = gw.admin_json("/readyz").await;
        let p = v["backends"]["rabbit"]["problem"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if p.contains("exchange") {
            Ok(p)
        } else {
            Err(p)
        }
    })
    .await;
    assert!(
        problem.contains(&format!("declaring exchange `{x}`")) && problem.contains("PRECONDITION"),
        "{problem} {entry}"
    );
    let (s, h, _) = send(
        request(Method::POST, &gw.url("/p"))
            .body(body("x"))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 503);
    assert!(h.contains_key("retry-after"));
    mq::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn no_acknowledged_message_is_lost_when_the_connection_dies_under_load() {
    let proxy = BrokerProxy::start().await;
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let gw = Gateway::start(&one_route(&proxy.url(), &x, &q, "load", "/load")).await;
    gw.wait_backend("rabbit", true).await;
    let gw = std::sync::Arc::new(gw);
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let want = 600;
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let refused = std::sync::Arc::new(AtomicUsize::new(0));
    let unconfirmed = std::sync::Arc::new(AtomicUsize::new(0));
    let until = Instant::now() + Duration::from_secs(30);
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (gw, accepted, refused, unconfirmed) = (
                gw.clone(),
                accepted.clone(),
                refused.clone(),
                unconfirmed.clone(),
            );
            tokio::spawn(async move {
                while accepted.load(SeqCst) < want && Instant::now() < until {
                    let req = request(Method::POST, &gw.url("/load"))
                        .body(body("m"))
                        .unwrap();
                    let (s, _, b) = send(req).await;
                    match s.as_u16() {
                        202 => {
                            accepted.fetch_add(1, SeqCst);
                        }
                        503 => {
                            refused.fetch_add(1, SeqCst);
                            if json(&b)["type"] == "urn:switchyard:problem:unconfirmed" {
                                unconfirmed.fetch_add(1, SeqCst);
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        other => panic!("unexpected status {other}"),
                    }
                }
            })
        })
        .collect();
    // Kill the connection in the middle of the load; the gateway reconnects by itself and the
    // load goes on until `want` messages were accepted.
    eventually("a third of the load was never accepted", || async {
        match accepted.load(SeqCst) {
            n if n >= want / 3 => Ok(()),
            n => Err(n),
        }
    })
    .await;
    proxy.cut();
    for w in workers {
        w.await.unwrap();
    }
    let conn = mq::client().await;
    let ok = accepted.load(SeqCst);
    assert!(
        ok >= want,
        "the load finished after the reconnect ({ok} accepted)"
    );
    assert!(refused.load(SeqCst) > 0, "the cut hit requests in flight");
    // Every 2xx has its message in the queue. Beyond those, only messages whose confirm was
    // lost with the connection (answered 503 `unconfirmed`, never 2xx) may be there too.
    let depth = mq::depth(&conn, &q).await as usize;
    let maybe = unconfirmed.load(SeqCst);
    assert!(
        depth >= ok && depth <= ok + maybe,
        "queue {depth}, accepted {ok}, unconfirmed {maybe}"
    );
    mq::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn a_broker_that_goes_away_gets_fast_503s_and_is_reconnected_when_back() {
    let proxy = BrokerProxy::start().await;
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let gw = Gateway::start(&one_route(&proxy.url(), &x, &q, "k", "/p")).await;
    gw.wait_backend("rabbit", true).await;
    let post = || {
        request(Method::POST, &gw.url("/p"))
            .body(body("x"))
            .unwrap()
    };
    assert_eq!(send(post()).await.0, 202);
    proxy.stop();
    gw.wait_backend("rabbit", false).await;
    let started = Instant::now();
    let (s, h, b) = send(post()).await;
    assert_eq!(s, 503, "{}", String::from_utf8_lossy(&b));
    assert!(h.contains_key("retry-after"));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "fails fast while down"
    );
    proxy.start_again();
    gw.wait_backend("rabbit", true).await;
    assert_eq!(send(post()).await.0, 202);
    let conn = mq::client().await;
    assert_eq!(mq::depth(&conn, &q).await, 2);
    mq::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn the_example_worker_answers_through_publish_and_reply_routes() {
    let url = mq::broker_url().await;
    let (x, orders, quotes) = (
        mq::unique("events"),
        mq::unique("orders"),
        mq::unique("quotes"),
    );
    let gw = Gateway::start(&format!(
        r#"
backends:
  rabbit:
    type: amqp
    url: "{url}"
    topology:
      exchanges: [{{ name: "{x}", type: topic, durable: false }}]
      queues: [{{ name: "{orders}", durable: false }}, {{ name: "{quotes}", durable: false, message_ttl: 30s }}]
      bindings:
        - {{ queue: "{orders}", exchange: "{x}", routing_key: "order.#" }}
        - {{ queue: "{quotes}", exchange: "{x}", routing_key: quote.request }}
routes:
  - id: order-event
    match: {{ method: POST, path: "/v1/events/orders/{{region}}" }}
    backend: rabbit
    amqp: {{ exchange: "{x}", routing_key: "order.created.{{region}}", type: order.created }}
  - id: quote
    match: {{ method: POST, path: /v1/quotes }}
    backend: rabbit
    timeout: 3s
    amqp: {{ exchange: "{x}", routing_key: quote.request, reply: {{}} }}
"#
    ))
    .await;
    gw.wait_backend("rabbit", true).await;
    let worker = crate::support::worker::Worker::start(&url, &orders, &quotes)
        .await
        .unwrap();
    let post = |p: &str, b: &'static str| request(Method::POST, &gw.url(p)).body(body(b)).unwrap();
    assert_eq!(
        send(post("/v1/events/orders/eu", r#"{"id":7}"#)).await.0,
        202
    );
    let (s, h, b) = send(post("/v1/quotes", r#"{"item":"tea","quantity":4}"#)).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(json(&b)["price"], 10.0);
    let (s, _, b) = send(post("/v1/quotes", r#"{"item":"tea"}"#)).await;
    assert_eq!(s, 422, "{}", String::from_utf8_lossy(&b));
    // The order was consumed (the worker acks after handling).
    eventually("the worker never got the order", || async {
        if worker.orders.load(std::sync::atomic::Ordering::SeqCst) < 1 {
            Err(())
        } else {
            Ok(())
        }
    })
    .await;
    drop(worker);
    let conn = mq::client().await;
    mq::cleanup(&conn, &[&x], &[&orders, &quotes]).await;
}

#[tokio::test]
async fn a_reply_wait_ends_at_once_when_the_connection_dies() {
    let proxy = BrokerProxy::start().await;
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let gw = Gateway::start(&config(
        &proxy.url(),
        &x,
        &q,
        "rpc",
        &format!(
            r#"
  - id: ask
    match: {{ method: POST, path: /ask }}
    backend: rabbit
    timeout: 20s
    amqp: {{ exchange: "{x}", routing_key: rpc, reply: {{}} }}"#
        ),
    ))
    .await;
    gw.wait_backend("rabbit", true).await;
    let started = Instant::now();
    let req = request(Method::POST, &gw.url("/ask"))
        .body(body("ignore"))
        .unwrap();
    let call = tokio::spawn(send(req));
    // Nobody answers: the request sits in the queue while the gateway, which has the broker's
    // confirm, waits for the reply.
    let conn = mq::client().await;
    eventually("the publish was never confirmed", || async {
        let (_, _, m) = get(&gw.admin_url("/metrics")).await;
        let m = String::from_utf8_lossy(&m).to_string();
        let confirmed =
            m.contains("switchyard_broker_events_total{backend=\"rabbit\",event=\"confirmed\"} 1");
        if confirmed || call.is_finished() {
            Ok(())
        } else {
            Err(m)
        }
    })
    .await;
    assert_eq!(mq::depth(&conn, &q).await, 1);
    proxy.cut();
    let (s, _, b) = call.await.unwrap();
    assert_eq!(s, 502, "{}", String::from_utf8_lossy(&b));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "not held until the 20 s timeout"
    );
    mq::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn a_reload_that_keeps_the_backend_keeps_its_connection() {
    let url = mq::broker_url().await;
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let first = one_route(&url, &x, &q, "k", "/p");
    let gw = Gateway::start(&first).await;
    gw.wait_backend("rabbit", true).await;
    let connects = |m: &[u8]| {
        String::from_utf8_lossy(m)
            .lines()
            .find(|l| {
                l.starts_with(
                    "switchyard_broker_events_total{backend=\"rabbit\",event=\"connected\"}",
                )
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (_, _, m) = get(&gw.admin_url("/metrics")).await;
    assert_eq!(connects(&m), 1);
    let version = gw.version().await;
    let second = format!(
        "{first}\n  - id: p2\n    match: {{ method: POST, path: /p2 }}\n    backend: rabbit\n    amqp: {{ exchange: \"{x}\", routing_key: k }}\n"
    );
    std::fs::write(gw.config_path(), with_ephemeral_server(&second)).unwrap();
    let (s, b) = gw.reload().await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    gw.wait_version(version + 1).await;
    let (s, _, _) = send(
        request(Method::POST, &gw.url("/p2"))
            .body(body("x"))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 202);
    let (_, _, m) = get(&gw.admin_url("/metrics")).await;
    assert_eq!(connects(&m), 1, "the connection was kept");
    let conn = mq::client().await;
    mq::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn amqps_with_a_private_ca_and_a_client_certificate() {
    let server = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let client =
        rcgen::generate_simple_self_signed(vec!["switchyard-gateway".to_string()]).unwrap();
    let front = mq::TlsBrokerFront::start(
        &server.cert.pem(),
        &server.signing_key.serialize_pem(),
        Some(&client.cert.pem()),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), server.cert.pem()).unwrap();
    std::fs::write(dir.path().join("client.pem"), client.cert.pem()).unwrap();
    std::fs::write(
        dir.path().join("client.key"),
        client.signing_key.serialize_pem(),
    )
    .unwrap();
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let config = |tls: &str| {
        let yaml = mq::rabbit_backend(&front.url(), &x, &q).replace(
            "    topology:",
            &format!(
                "    tls: {{ {tls} }}\n    reconnect: {{ min: 50ms, max: 200ms }}\n    topology:"
            ),
        );
        format!(
            "{yaml}routes:\n  - id: p\n    match: {{ method: POST, path: /p }}\n    backend: rabbit\n    amqp: {{ exchange: \"{x}\", routing_key: tls }}\n"
        )
    };
    // The files are found next to routes.yaml, whatever the working directory.
    let write = |name: &str, text: &str| {
        let d = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "client.pem", "client.key"] {
            std::fs::copy(dir.path().join(f), d.path().join(f)).unwrap();
        }
        std::fs::write(d.path().join(name), text).unwrap();
        d
    };
    let d = write(
        "routes.yaml",
        &with_ephemeral_server(&config("ca: ca.pem, cert: client.pem, key: client.key")),
    );
    let path = d.path().join("routes.yaml");
    let gw = Gateway::start_at(d, path, false).await;
    gw.wait_backend("rabbit", true).await;
    let (s, _, b) = send(
        request(Method::POST, &gw.url("/p"))
            .body(body("over tls"))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    let conn = mq::client().await;
    assert_eq!(mq::depth(&conn, &q).await, 1);

    // No client certificate: the front refuses the handshake; the backend never connects.
    let refused = front.refused.load(std::sync::atomic::Ordering::SeqCst);
    let d = write("routes.yaml", &with_ephemeral_server(&config("ca: ca.pem")));
    let path = d.path().join("routes.yaml");
    let gw2 = Gateway::start_at(d, path, false).await;
    eventually("the handshake was never refused", || async {
        if front.refused.load(std::sync::atomic::Ordering::SeqCst) == refused {
            Err(())
        } else {
            Ok(())
        }
    })
    .await;
    let (_, v) = gw2.admin_json("/readyz").await;
    assert_eq!(v["backends"]["rabbit"]["ready"], false, "{v}");
    mq::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn named_reply_queues_are_consumed_only_while_a_serving_route_uses_them() {
    let url = mq::broker_url().await;
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let (r1, r2) = (mq::unique("replies1"), mq::unique("replies2"));
    // The reply queues exist whatever the config (declared by the test, as an operator would).
    let conn = mq::client().await;
    let ch = conn.create_channel().await.unwrap();
    for r in [&r1, &r2] {
        ch.queue_declare(r.as_str().into(), Default::default(), FieldTable::default())
            .await
            .unwrap();
    }
    let consumers = |queue: String| {
        let conn = &conn;
        async move {
            let ch = conn.create_channel().await.unwrap();
            let passive = lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            ch.queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await
                .unwrap()
                .consumer_count()
        }
    };
    let wait_consumers = |queue: String, want: u32| {
        let consumers = &consumers;
        async move {
            let what = format!("{queue}: never {want} consumers");
            eventually(&what, || async {
                match consumers(queue.clone()).await {
                    n if n == want => Ok(()),
                    n => Err(n),
                }
            })
            .await;
        }
    };
    let plain = one_route(&url, &x, &q, "k", "/p");
    let ask = |queue: &str| {
        format!(
            "  - id: ask\n    match: {{ method: POST, path: /ask }}\n    backend: rabbit\n    amqp: {{ exchange: \"{x}\", routing_key: rpc, reply: {{ queue: \"{queue}\" }} }}\n"
        )
    };
    let gw = Gateway::start_with(&plain, false).await;
    gw.wait_backend("rabbit", true).await;
    // A reload that is rejected (an unknown plugin on a later route) names r1...
    let rejected = format!(
        "{plain}\n{}  - id: broken\n    match: {{ method: POST, path: /broken }}\n    backend: rabbit\n    amqp: {{ exchange: \"{x}\", routing_key: k }}\n    plugins: [{{ no-such-plugin: {{}} }}]\n",
        ask(&r1)
    );
    std::fs::write(gw.config_path(), with_ephemeral_server(&rejected)).unwrap();
    let (s, _) = gw.reload().await;
    assert_eq!(s, 422);
    // ...then one that applies names r2: once r2 is consumed, r1 would have been by then.
    std::fs::write(
        gw.config_path(),
        with_ephemeral_server(&format!("{plain}\n{}", ask(&r2))),
    )
    .unwrap();
    let (s, b) = gw.reload().await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    wait_consumers(r2.clone(), 1).await;
    assert_eq!(
        consumers(r1.clone()).await,
        0,
        "a rejected config started no consumer"
    );
    // A route that goes away takes its consumer with it.
    std::fs::write(gw.config_path(), with_ephemeral_server(&plain)).unwrap();
    let (s, _) = gw.reload().await;
    assert_eq!(s, 200);
    wait_consumers(r2.clone(), 0).await;
    mq::cleanup(&conn, &[&x], &[&q, &r1, &r2]).await;
}

#[tokio::test]
async fn amqps_checks_tls_server_name_instead_of_the_url_host() {
    // The broker's certificate names `broker.internal`; the URL reaches it as `localhost`.
    let server = rcgen::generate_simple_self_signed(vec!["broker.internal".to_string()]).unwrap();
    let front = mq::TlsBrokerFront::start(
        &server.cert.pem(),
        &server.signing_key.serialize_pem(),
        None,
    )
    .await;
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let start = |tls: &'static str| {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("ca.pem"), server.cert.pem()).unwrap();
        let yaml = mq::rabbit_backend(&front.url(), &x, &q).replace(
            "    topology:",
            &format!(
                "    tls: {{ {tls} }}\n    reconnect: {{ min: 50ms, max: 200ms }}\n    topology:"
            ),
        );
        let yaml = format!(
            "{yaml}routes:\n  - id: p\n    match: {{ method: POST, path: /p }}\n    backend: rabbit\n    amqp: {{ exchange: \"{x}\", routing_key: tls }}\n"
        );
        std::fs::write(d.path().join("routes.yaml"), with_ephemeral_server(&yaml)).unwrap();
        let path = d.path().join("routes.yaml");
        Gateway::start_at(d, path, false)
    };
    let gw = start("ca: ca.pem, server_name: broker.internal").await;
    gw.wait_backend("rabbit", true).await;
    let (s, _, b) = send(
        request(Method::POST, &gw.url("/p"))
            .body(body("named"))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    let conn = mq::client().await;
    assert_eq!(mq::depth(&conn, &q).await, 1);

    // Without it, the URL's host is checked, and the certificate does not carry it.
    assert_eq!(front.refused.load(std::sync::atomic::Ordering::SeqCst), 0);
    let gw2 = start("ca: ca.pem").await;
    eventually("never refused", || async {
        let entry = gw2.wait_backend("rabbit", false).await;
        match entry["problem"].as_str() {
            Some(p) if p.contains("cannot connect") => Ok(()),
            _ => Err(entry),
        }
    })
    .await;
    assert!(front.refused.load(std::sync::atomic::Ordering::SeqCst) > 0);
    mq::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn under_concurrent_load_every_2xx_is_exactly_one_message_in_the_queue() {
    let url = mq::broker_url().await;
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let gw = Gateway::start(&one_route(&url, &x, &q, "load", "/load")).await;
    gw.wait_backend("rabbit", true).await;
    let gw = std::sync::Arc::new(gw);
    let (workers, each) = (16, 25);
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let gw = gw.clone();
            tokio::spawn(async move {
                let mut accepted = 0;
                for i in 0..each {
                    let req = request(Method::POST, &gw.url("/load"))
                        .body(body(format!("{w}-{i}")))
                        .unwrap();
                    let (s, _, b) = send(req).await;
                    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
                    accepted += 1;
                }
                accepted
            })
        })
        .collect();
    let mut accepted = 0;
    for t in tasks {
        accepted += t.await.unwrap();
    }
    assert_eq!(accepted, workers * each);
    let conn = mq::client().await;
    assert_eq!(mq::depth(&conn, &q).await as usize, accepted);
    mq::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn the_topology_declares_quorum_queues_with_length_limits_and_dead_lettering() {
    let url = mq::broker_url().await;
    let (x, dlx, q, dead) = (
        mq::unique("x"),
        mq::unique("dlx"),
        mq::unique("quorum"),
        mq::unique("dead"),
    );
    let gw = Gateway::start(&format!(
        r#"
backends:
  rabbit:
    type: amqp
    url: "{url}"
    topology:
      exchanges:
        - {{ name: "{x}", type: direct }}
        - {{ name: "{dlx}", type: direct }}
      queues:
        - {{ name: "{q}", type: quorum, max_length: 1, dead_letter_exchange: "{dlx}", dead_letter_routing_key: dead }}
        - {{ name: "{dead}", message_ttl: 10m }}
      bindings:
        - {{ queue: "{q}", exchange: "{x}", routing_key: k }}
        - {{ queue: "{dead}", exchange: "{dlx}", routing_key: dead }}
routes:
  - id: p
    match: {{ method: POST, path: /p }}
    backend: rabbit
    amqp: {{ exchange: "{x}", routing_key: k }}
"#
    ))
    .await;
    gw.wait_backend("rabbit", true).await;
    for i in 0..3 {
        let (s, _, b) = send(
            request(Method::POST, &gw.url("/p"))
                .body(body(format!("m{i}")))
                .unwrap(),
        )
        .await;
        assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    }
    // The quorum queue keeps one message; the two pushed out are dead-lettered, with the
    // routing key the topology set.
    let conn = mq::client().await;
    eventually("the dead-letter queue never held two", || async {
        match mq::depth(&conn, &dead).await {
            n if n >= 2 => Ok(()),
            n => Err(n),
        }
    })
    .await;
    assert_eq!(mq::depth(&conn, &q).await, 1);
    assert_eq!(mq::depth(&conn, &dead).await, 2);
    // The broker holds them as declared: redeclaring with other arguments is refused.
    for (name, args) in [(&q, vec![("x-queue-type", "classic")]), (&dead, vec![])] {
        let ch = conn.create_channel().await.unwrap();
        let mut table = FieldTable::default();
        for (k, v) in args {
            table.insert(k.into(), lapin::types::AMQPValue::LongString(v.into()));
        }
        let redeclared = ch
            .queue_declare(
                name.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                table,
            )
            .await;
        let err = redeclared
            .expect_err("the queue's arguments differ")
            .to_string();
        assert!(err.contains("PRECONDITION_FAILED"), "{name}: {err}");
    }
    mq::cleanup(&conn, &[&x, &dlx], &[&q, &dead]).await;
}

#[tokio::test]
async fn a_publish_the_broker_nacks_is_a_503() {
    let url = mq::broker_url().await;
    let (x, q, full) = (mq::unique("x"), mq::unique("q"), mq::unique("full"));
    let gw = Gateway::start(&one_route(&url, &x, &q, "k", "/p")).await;
    gw.wait_backend("rabbit", true).await;
    // A second queue on the same binding that takes one message and refuses the rest.
    let conn = mq::client().await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), lapin::types::AMQPValue::LongInt(1));
    args.insert(
        "x-overflow".into(),
        lapin::types::AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare(full.as_str().into(), Default::default(), args)
        .await
        .unwrap();
    ch.queue_bind(
        full.as_str().into(),
        x.as_str().into(),
        "k".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let post = || {
        send(
            request(Method::POST, &gw.url("/p"))
                .body(body("m"))
                .unwrap(),
        )
    };
    let (s, _, b) = post().await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    let (s, h, b) = post().await;
    assert_eq!(s, 503, "{}", String::from_utf8_lossy(&b));
    assert!(h.contains_key("retry-after"));
    assert!(
        json(&b)["detail"].as_str().unwrap().contains("nack"),
        "{}",
        String::from_utf8_lossy(&b)
    );
    let (_, _, m) = get(&gw.admin_url("/metrics")).await;
    assert!(
        String::from_utf8_lossy(&m).lines().any(|l| l
            .starts_with("switchyard_broker_events_total{backend=\"rabbit\",event=\"nacked\"}")),
        "{}",
        String::from_utf8_lossy(&m)
    );
    mq::cleanup(&conn, &[&x], &[&q, &full]).await;
}

#[tokio::test]
async fn an_envelope_carries_the_request_and_content_encoding_passes_on_raw_bodies() {
    let url = mq::broker_url().await;
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let routes = format!(
        r#"  - id: env
    match: {{ method: POST, path: "/orders/{{id}}" }}
    backend: rabbit
    amqp: {{ exchange: "{x}", routing_key: env, envelope: true, headers: [x-tenant] }}
  - id: raw
    match: {{ method: POST, path: /raw }}
    backend: rabbit
    amqp: {{ exchange: "{x}", routing_key: raw }}"#
    );
    let gw = Gateway::start(&config(&url, &x, &q, "#", &routes)).await;
    gw.wait_backend("rabbit", true).await;
    let (s, _, b) = send(
        request(Method::POST, &gw.url("/orders/o%2D7?rush=yes"))
            .header("content-type", "application/json")
            .header("x-tenant", "acme")
            .header("x-secret", "not copied")
            .body(body(r#"{"qty":2}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    let (s, _, b) = send(
        request(Method::POST, &gw.url("/raw"))
            .header("content-type", "text/plain")
            .header("content-encoding", "gzip")
            .body(body(&b"\x1f\x8b not really"[..]))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    let conn = mq::client().await;
    let ch = conn.create_channel().await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("a message");
        got.push(m.delivery);
    }
    let env = &got[0];
    let v: serde_json::Value = serde_json::from_slice(&env.data).unwrap();
    assert_eq!(v["method"], "POST", "{v}");
    // The normalised path: `%2D` is an unreserved character, decoded.
    assert_eq!(v["path"], "/orders/o-7", "{v}");
    assert_eq!(v["params"]["id"], "o-7", "{v}");
    assert_eq!(v["query"]["rush"], "yes", "{v}");
    assert_eq!(
        v["headers"],
        serde_json::json!({ "x-tenant": "acme" }),
        "{v}"
    );
    assert_eq!(v["body"], serde_json::json!({ "qty": 2 }), "{v}");
    assert_eq!(
        env.properties.content_type().as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    let raw = &got[1];
    assert_eq!(&raw.data[..], b"\x1f\x8b not really");
    assert_eq!(
        raw.properties
            .content_encoding()
            .as_ref()
            .map(|c| c.as_str()),
        Some("gzip")
    );
    assert_eq!(
        raw.properties.content_type().as_ref().map(|c| c.as_str()),
        Some("text/plain")
    );
    mq::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn bad_header_values_and_oversized_bodies_publish_nothing() {
    let url = mq::broker_url().await;
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let routes = format!(
        r#"  - id: p
    match: {{ method: POST, path: /p }}
    backend: rabbit
    max_body_size: 16B
    amqp: {{ exchange: "{x}", routing_key: k, headers: [x-tenant] }}"#
    );
    let gw = Gateway::start(&config(&url, &x, &q, "k", &routes)).await;
    gw.wait_backend("rabbit", true).await;
    for (name, value) in [
        ("x-tenant", "a\0b"),
        ("x-tenant", "a\rb"),
        ("x-other", "a\0b"),
    ] {
        let (s, b) = crate::matching::raw(
            gw.listen,
            "POST",
            "/p",
            &[(name, value), ("content-length", "0")],
        )
        .await;
        assert_eq!(s, 400, "{name}: {value:?}: {b}");
    }
    let (s, _, b) = send(
        request(Method::POST, &gw.url("/p"))
            .body(body("x".repeat(17)))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 413, "{}", String::from_utf8_lossy(&b));
    // A good request still goes through; it is the only message.
    let (s, _, b) = send(
        request(Method::POST, &gw.url("/p"))
            .header("x-tenant", "acme")
            .body(body("ok"))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    let conn = mq::client().await;
    assert_eq!(mq::depth(&conn, &q).await, 1);
    mq::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn a_reload_that_adds_a_direct_reply_route_gets_replies_at_once() {
    // Without a route taking replies, the pool's channels do not consume direct reply-to; a
    // reload that adds one must not leave it on channels that cannot take its replies.
    let url = mq::broker_url().await;
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let plain = one_route(&url, &x, &q, "k", "/p");
    let gw = Gateway::start_with(&plain, false).await;
    gw.wait_backend("rabbit", true).await;
    let publish = || {
        request(Method::POST, &gw.url("/p"))
            .body(body("m"))
            .unwrap()
    };
    for _ in 0..4 {
        assert_eq!(send(publish()).await.0, 202);
    }
    std::fs::write(
        gw.config_path(),
        with_ephemeral_server(&format!(
            "{plain}\n  - id: ask\n    match: {{ method: POST, path: /ask }}\n    backend: rabbit\n    timeout: 5s\n    amqp: {{ exchange: \"{x}\", routing_key: k, reply: {{}} }}\n"
        )),
    )
    .unwrap();
    let (s, b) = gw.reload().await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let _responder = mq::responder(q.clone()).await;
    // Concurrent asks take several channels of the pool, each opened without the consumer.
    let answers = futures_util::future::join_all((0..8).map(|i| {
        let req = request(Method::POST, &gw.url("/ask"))
            .header("x-want", "200")
            .body(body(format!("n{i}")))
            .unwrap();
        send(req)
    }))
    .await;
    for (i, (s, _, b)) in answers.into_iter().enumerate() {
        assert_eq!(s, 200, "ask {i}: {}", String::from_utf8_lossy(&b));
        assert_eq!(b, format!("re: n{i}").as_bytes(), "ask {i}");
    }
    // Plain publishes still go through on the same channels.
    assert_eq!(send(publish()).await.0, 202);
    let conn = mq::client().await;
    mq::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn an_edited_ca_file_reloads_and_rebuilds_the_backend() {
    let server = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let front = mq::TlsBrokerFront::start(
        &server.cert.pem(),
        &server.signing_key.serialize_pem(),
        None,
    )
    .await;
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("ca.pem"), server.cert.pem()).unwrap();
    let yaml = mq::rabbit_backend(&front.url(), &x, &q).replace(
        "    topology:",
        "    tls: { ca: ca.pem }\n    reconnect: { min: 50ms, max: 200ms }\n    topology:",
    );
    std::fs::write(
        d.path().join("routes.yaml"),
        with_ephemeral_server(&format!("{yaml}routes: []\n")),
    )
    .unwrap();
    let ca = d.path().join("ca.pem");
    let path = d.path().join("routes.yaml");
    let gw = Gateway::start_at(d, path, true).await;
    gw.wait_backend("rabbit", true).await;
    // Only the CA file changes: the config reloads and the backend is rebuilt with it, so the
    // broker's certificate is no longer trusted.
    std::fs::write(&ca, other.cert.pem()).unwrap();
    gw.wait_version(2).await;
    let entry = gw.wait_backend("rabbit", false).await;
    assert!(entry["problem"].is_string(), "{entry}");
}
