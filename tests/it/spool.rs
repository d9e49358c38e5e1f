//! The spool against the real RabbitMQ, reached through a proxy the tests stop and start to
//! play a broker that is down: spooled requests are answered 202 and forwarded in order once
//! the broker is back (counted in the real queue), a full spool is 503, a message the broker
//! refuses goes to the dead letters and can be replayed from the admin API, and — with the
//! gateway binary — the spool survives `kill -9` and a restart with exactly the messages it
//! acknowledged.

use std::time::Duration;

use http::Method;
use lapin::options::{BasicGetOptions, QueueBindOptions};

use crate::support::amqp::{self as mq, BrokerProxy};
use crate::support::*;

/// A backend `rabbit` at `url` with an exchange and a queue bound to `order.#`, and a route
/// `POST /orders/{n}` that publishes `order.{n}` with `spool: true`.
pub(crate) fn config(url: &str, x: &str, q: &str, state: &str, route_extra: &str) -> String {
    keyed(url, x, q, state, "order.{n}", route_extra)
}

/// [`config`] with the route publishing with routing key `key`.
fn keyed(url: &str, x: &str, q: &str, state: &str, key: &str, route_extra: &str) -> String {
    let state = if state.is_empty() {
        "state: { spool: { retry: { min: 50ms, max: 300ms } } }"
    } else {
        state
    };
    format!(
        r#"
{state}
backends:
  rabbit:
    type: amqp
    url: "{url}"
    connect_timeout: 1s
    reconnect: {{ min: 50ms, max: 300ms }}
    breaker: {{ open_for: 300ms }}
    topology:
      exchanges: [{{ name: "{x}", type: topic, durable: false }}]
      queues: [{{ name: "{q}", durable: false }}]
      bindings: [{{ queue: "{q}", exchange: "{x}", routing_key: "order.#" }}]
routes:
  - id: orders
    match: {{ method: POST, path: "/orders/{{n}}" }}
    backend: rabbit
    spool: true
    amqp: {{ exchange: "{x}", routing_key: "{key}"{route_extra} }}
"#
    )
}

async fn post(base: &str, path: &str, b: &str) -> (u16, http::HeaderMap, serde_json::Value) {
    let req = request(Method::POST, &format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(body(b.to_string()))
        .unwrap();
    let (s, h, b) = send(req).await;
    (
        s.as_u16(),
        h,
        serde_json::from_slice(&b).unwrap_or_default(),
    )
}

/// Messages in `queue`; 0 while the gateway has not declared it yet.
async fn depth(conn: &lapin::Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.unwrap();
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), passive, Default::default())
        .await
        .map_or(0, |q| q.message_count())
}

/// Waits until `queue` holds `n` messages.
async fn wait_depth(conn: &lapin::Connection, queue: &str, n: u32) {
    let what = format!("the queue never held {n} messages");
    let d = eventually_within(&what, Duration::from_secs(30), || async {
        match depth(conn, queue).await {
            d if d >= n => Ok(d),
            d => Err(d),
        }
    })
    .await;
    assert_eq!(d, n, "more messages than were sent");
}

/// Takes every message from `queue`: (routing key, body as JSON, message id).
async fn drain(conn: &lapin::Connection, queue: &str) -> Vec<(String, serde_json::Value, String)> {
    let ch = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        out.push((
            m.routing_key.to_string(),
            serde_json::from_slice(&m.data).unwrap(),
            m.properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
        ));
    }
    out
}

/// Sends `n` requests, one after another, and checks each was spooled. Their message ids.
async fn spool_n(base: &str, from: usize, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in from..from + n {
        let (s, h, b) = post(base, &format!("/orders/{i}"), &format!("{{\"seq\":{i}}}")).await;
        assert_eq!(s, 202, "request {i}: {b}");
        assert_eq!(h["switchyard-spooled"], "true", "request {i}");
        assert_eq!(b["status"], "spooled");
        ids.push(b["message_id"].as_str().unwrap().to_string());
    }
    ids
}

#[tokio::test]
async fn spooled_requests_are_forwarded_in_order_once_the_broker_is_back() {
    let proxy = BrokerProxy::start().await;
    proxy.stop();
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let gw = Gateway::start(&config(&proxy.url(), &x, &q, "", "")).await;
    let base = format!("http://{}", gw.listen);
    let ids = spool_n(&base, 0, 20).await;

    let (_, spool) = gw.admin_json("/spool").await;
    assert_eq!(spool["routes"]["orders"]["messages"], 20, "{spool}");
    assert!(spool["routes"]["orders"]["bytes"].as_u64().unwrap() > 0);
    assert_eq!(spool["routes"]["orders"]["forwarding"], true);
    let (_, _, metrics) = get(&gw.admin_url("/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("switchyard_spool_messages{route=\"orders\"} 20"),
        "{metrics}"
    );
    assert!(metrics.contains("switchyard_spool_oldest_age_seconds{route=\"orders\"}"));

    proxy.start_again();
    let conn = mq::client().await;
    wait_depth(&conn, &q, 20).await;
    let got = drain(&conn, &q).await;
    for (i, (key, body, id)) in got.iter().enumerate() {
        assert_eq!(body["seq"], i, "in order");
        assert_eq!(key, &format!("order.{i}"), "the route's templates applied");
        assert_eq!(id, &ids[i], "the message id the 202 gave");
    }
    // Once drained, the spool is empty and requests are published directly again.
    eventually("the spool never drained", || async {
        let (_, spool) = gw.admin_json("/spool").await;
        if spool["routes"]["orders"]["messages"] == 0 {
            Ok(())
        } else {
            Err(spool)
        }
    })
    .await;
    gw.wait_backend("rabbit", true).await;
    let (s, h, _) = post(&base, "/orders/99", "{\"seq\":99}").await;
    assert_eq!(s, 202);
    assert!(h.get("switchyard-spooled").is_none(), "published directly");
    wait_depth(&conn, &q, 1).await;
    mq::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn a_full_spool_answers_503() {
    let proxy = BrokerProxy::start().await;
    proxy.stop();
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let gw = Gateway::start(&config(
        &proxy.url(),
        &x,
        &q,
        "state: { spool: { max_messages: 3 } }",
        "",
    ))
    .await;
    let base = format!("http://{}", gw.listen);
    spool_n(&base, 0, 3).await;
    let (s, h, b) = post(&base, "/orders/3", "{}").await;
    assert_eq!(s, 503, "{b}");
    assert_eq!(b["type"], "urn:switchyard:problem:spool-full");
    assert!(h.contains_key("retry-after"));
    let (_, spool) = gw.admin_json("/spool").await;
    assert_eq!(spool["routes"]["orders"]["messages"], 3);
}

#[tokio::test]
async fn a_message_the_broker_refuses_is_dead_lettered_and_can_be_replayed() {
    let proxy = BrokerProxy::start().await;
    proxy.stop();
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    // `mandatory`, and a routing key the queue's binding (`order.#`) does not take: the
    // broker refuses the message for good once it is reachable.
    let gw = Gateway::start(&keyed(
        &proxy.url(),
        &x,
        &q,
        "",
        "lost.{n}",
        ", mandatory: true",
    ))
    .await;
    let base = format!("http://{}", gw.listen);
    let (s, _, b) = post(&base, "/orders/1", "{\"seq\":1}").await;
    assert_eq!(s, 202, "{b}");
    proxy.start_again();
    let dead = gw.first_dead_letter().await;
    assert_eq!(dead["route"], "orders");
    assert_eq!(dead["source"], "spool");
    assert!(
        dead["reason"].as_str().unwrap().contains("no queue"),
        "{dead}"
    );
    let id = dead["id"].as_str().unwrap().to_string();
    let (s, full) = gw.admin_json(&format!("/dead-letters/{id}")).await;
    assert_eq!(s, 200);
    assert!(full["body_base64"].as_str().is_some());
    // The forwarder removes what it dead-lettered from the spool right after (a message is
    // in one or both for a moment, never in neither).
    eventually("the spool is empty", || async {
        let (_, spool) = gw.admin_json("/spool").await;
        if spool["routes"]["orders"]["messages"] == 0 {
            Ok(())
        } else {
            Err(spool)
        }
    })
    .await;

    // Fix the routing, replay: the message arrives, and leaves the dead letters.
    let conn = mq::client().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_bind(
        q.as_str().into(),
        x.as_str().into(),
        "lost.#".into(),
        QueueBindOptions::default(),
        Default::default(),
    )
    .await
    .unwrap();
    let (s, b) = gw.replay_dead_letter(&id).await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    wait_depth(&conn, &q, 1).await;
    let got = drain(&conn, &q).await;
    assert_eq!(got[0].1["seq"], 1);
    let (s, _) = gw.admin_json(&format!("/dead-letters/{id}")).await;
    assert_eq!(s, 404);
    let (s, _, _) = send(
        request(
            Method::DELETE,
            &gw.admin_url(&format!("/dead-letters/{id}")),
        )
        .body(body(""))
        .unwrap(),
    )
    .await;
    assert_eq!(s, 404);
    mq::cleanup(&conn, &[&x], &[&q]).await;
}

/// The gateway binary, killed with SIGKILL when dropped (also when a test fails midway).
pub(crate) struct Process(std::process::Child);

impl Process {
    /// `kill -9`, and wait for it to be gone.
    pub(crate) fn kill(&mut self) {
        self.0.kill().expect("SIGKILL");
        self.0.wait().unwrap();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the gateway binary on `config`.
pub(crate) fn spawn_gateway(config: &std::path::Path) -> Process {
    Process(
        std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the gateway binary starts"),
    )
}

/// Waits until the process's admin API answers.
pub(crate) async fn wait_up(admin: std::net::SocketAddr) {
    eventually("the gateway never came up", || async {
        if tokio::net::TcpStream::connect(admin).await.is_err() {
            Err(())
        } else {
            Ok(())
        }
    })
    .await;
}

#[tokio::test]
async fn the_spool_survives_kill_9_and_delivers_exactly_what_it_acknowledged() {
    const N: usize = 50;
    let proxy = BrokerProxy::start().await;
    proxy.stop();
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (free_port().await, free_port().await);
    let yaml = format!(
        "server: {{ listen: \"{listen}\", admin: \"{admin}\" }}\n{}",
        config(&proxy.url(), &x, &q, "", "")
    );
    let path = dir.path().join("routes.yaml");
    std::fs::write(&path, yaml).unwrap();
    let base = format!("http://{listen}");

    let mut first = spawn_gateway(&path);
    wait_up(admin).await;
    let ids = spool_n(&base, 0, N).await;
    first.kill();

    let mut second = spawn_gateway(&path);
    wait_up(admin).await;
    let (_, spool) = {
        let (s, _, b) = get(&format!("http://{admin}/spool")).await;
        (s, serde_json::from_slice::<serde_json::Value>(&b).unwrap())
    };
    assert_eq!(spool["routes"]["orders"]["messages"], N, "{spool}");
    proxy.start_again();
    let conn = mq::client().await;
    wait_depth(&conn, &q, N as u32).await;
    // Give a duplicate the time to show up, judged by the spool being empty.
    eventually("the spool never drained", || async {
        let (_, _, b) = get(&format!("http://{admin}/spool")).await;
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        if v["routes"]["orders"]["messages"] == 0 {
            Ok(())
        } else {
            Err(v)
        }
    })
    .await;
    let got = drain(&conn, &q).await;
    assert_eq!(got.len(), N, "exactly the acknowledged messages");
    for (i, (_, body, id)) in got.iter().enumerate() {
        assert_eq!(body["seq"], i, "in order");
        assert_eq!(id, &ids[i]);
    }
    second.kill();
    mq::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn mqtt_publishes_are_spooled_while_the_broker_is_unreachable_and_forwarded_in_order() {
    let addr = crate::support::mqtt::broker_addr().await;
    let topic = format!("sy-test/{}/spooled", uuid::Uuid::now_v7().simple());
    // The subscriber talks to the broker directly; the gateway through a proxy that is "down".
    let mut sub = crate::support::mqtt::Subscriber::start(
        &addr,
        &format!("sub-{}", uuid::Uuid::now_v7().simple()),
        &topic,
    )
    .await;
    let proxy = BrokerProxy::start_to(addr.clone()).await;
    proxy.stop();
    let gw = Gateway::start(&format!(
        r#"
state: {{ spool: {{ retry: {{ min: 50ms, max: 300ms }} }} }}
backends:
  devices:
    type: mqtt
    url: "mqtt://{proxy}"
    client_id: "gw-{id}"
    reconnect: {{ min: 50ms, max: 300ms }}
routes:
  - id: readings
    match: {{ method: POST, path: "/readings/{{n}}" }}
    backend: devices
    spool: true
    mqtt: {{ topic: "{topic}", qos: 1 }}
"#,
        proxy = proxy.addr,
        id = uuid::Uuid::now_v7().simple()
    ))
    .await;
    let base = format!("http://{}", gw.listen);
    let mut ids = Vec::new();
    for i in 0..10 {
        let (s, h, b) = post(
            &base,
            &format!("/readings/{i}"),
            &format!("{{\"seq\":{i}}}"),
        )
        .await;
        assert_eq!(s, 202, "{b}");
        assert_eq!(h["switchyard-spooled"], "true");
        ids.push(b["message_id"].as_str().unwrap().to_string());
    }
    proxy.start_again();
    for (i, id) in ids.iter().enumerate() {
        let p = sub.next().await;
        let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
        assert_eq!(v["seq"], i, "in order");
        let props = p.properties.expect("MQTT 5 properties");
        assert_eq!(
            props.correlation_data.as_deref(),
            Some(id.as_bytes()),
            "the message id the 202 gave, as correlation data"
        );
    }
}

#[tokio::test]
async fn a_connection_cut_while_draining_loses_nothing_and_keeps_the_order() {
    const N: usize = 300;
    let proxy = BrokerProxy::start().await;
    proxy.stop();
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let gw = Gateway::start(&config(&proxy.url(), &x, &q, "", "")).await;
    let base = format!("http://{}", gw.listen);
    // Spooled concurrently in 10 streams; the spool's order is the order of the 202s.
    let mut streams = Vec::new();
    for s in 0..10 {
        let base = base.clone();
        streams.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            for i in 0..N / 10 {
                let n = s * 1000 + i;
                let (st, _, b) =
                    post(&base, &format!("/orders/{n}"), &format!("{{\"seq\":{n}}}")).await;
                assert_eq!(st, 202, "{b}");
                accepted.push(n);
            }
            accepted
        }));
    }
    for s in streams {
        s.await.unwrap();
    }
    proxy.start_again();
    let conn = mq::client().await;
    // Cut the gateway's connection once the drain is under way.
    eventually("the drain never started", || async {
        if depth(&conn, &q).await == 0 {
            Err(())
        } else {
            Ok(())
        }
    })
    .await;
    proxy.cut();
    eventually_within(
        "the spool never drained",
        Duration::from_secs(30),
        || async {
            let (_, v) = gw.admin_json("/spool").await;
            if v["routes"]["orders"]["messages"] == 0 {
                Ok(())
            } else {
                Err(v)
            }
        },
    )
    .await;
    let got = drain(&conn, &q).await;
    let seqs: Vec<u64> = got
        .iter()
        .map(|(_, b, _)| b["seq"].as_u64().unwrap())
        .collect();
    // Every acknowledged message arrived (a message whose confirm was lost may come twice)…
    let mut unique: Vec<u64> = seqs.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), N, "every spooled message arrived");
    // …and within each sender's stream, first arrivals keep the order of the 202s.
    let mut seen = std::collections::HashSet::new();
    let mut last = [None::<u64>; 10];
    for s in seqs {
        if !seen.insert(s) {
            continue;
        }
        let stream = (s / 1000) as usize;
        assert!(
            last[stream].is_none_or(|l| l < s),
            "{s} arrived after {:?}",
            last[stream]
        );
        last[stream] = Some(s);
    }
    mq::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn in_an_ordered_batch_only_the_unroutable_message_is_dead_lettered() {
    let proxy = BrokerProxy::start().await;
    proxy.stop();
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    // `mandatory` (the default) and a routing key from the path; the queue takes `order.#`.
    let gw = Gateway::start(&keyed(&proxy.url(), &x, &q, "", "{n}", ", multi_word: [n]")).await;
    let base = format!("http://{}", gw.listen);
    for (i, key) in ["order.a", "order.b", "lost.c", "order.d", "order.e"]
        .iter()
        .enumerate()
    {
        let (s, _, b) = post(
            &base,
            &format!("/orders/{key}"),
            &format!("{{\"seq\":{i}}}"),
        )
        .await;
        assert_eq!(s, 202, "{b}");
    }
    proxy.start_again();
    let dead = gw.first_dead_letter().await;
    assert_eq!(dead["uri"], "/orders/lost.c", "{dead}");
    let conn = mq::client().await;
    wait_depth(&conn, &q, 4).await;
    let got: Vec<String> = drain(&conn, &q)
        .await
        .into_iter()
        .map(|(k, ..)| k)
        .collect();
    assert_eq!(got, ["order.a", "order.b", "order.d", "order.e"]);
    let (_, v) = gw.admin_json("/dead-letters").await;
    assert_eq!(v["dead_letters"].as_array().unwrap().len(), 1, "{v}");
    mq::cleanup(&conn, &[&x], &[&q]).await;
}
