//! `Idempotency-Key` on real routes: a repeat is replayed from the store without a second
//! publish (counted in the real queue), a reuse with another body is 422, a repeat while the
//! first runs is 409, concurrent duplicates publish once, failures release the key, bad keys
//! are 400, a store that is down gives 503 (never a 2xx), and two gateways sharing Redis
//! replay each other's answers.

use http::Method;
use lapin::options::BasicGetOptions;

use crate::support::amqp as mq;
use crate::support::redis as rd;
use crate::support::*;

/// A backend `rabbit` with a queue bound to a topic exchange, and one idempotent route
/// `POST /orders` publishing to it. `state` is the YAML of the `state:` block.
fn amqp_config(url: &str, x: &str, q: &str, state: &str) -> String {
    format!(
        r#"
{state}
{}
routes:
  - id: orders
    match: {{ method: POST, path: /orders }}
    backend: rabbit
    amqp: {{ exchange: "{x}", routing_key: order.created }}
    idempotency: {{ ttl: 1h }}
"#,
        mq::rabbit_backend(url, x, q)
    )
}

async fn post(
    gw: &Gateway,
    path: &str,
    key: Option<&str>,
    b: &str,
) -> (u16, http::HeaderMap, serde_json::Value) {
    let mut req = request(Method::POST, &gw.url(path)).header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    let (s, h, b) = send(req.body(body(b.to_string())).unwrap()).await;
    (
        s.as_u16(),
        h,
        serde_json::from_slice(&b).unwrap_or_default(),
    )
}

#[tokio::test]
async fn a_repeat_is_replayed_without_a_second_publish_and_another_body_is_422() {
    let url = mq::broker_url().await;
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let gw = Gateway::start(&amqp_config(&url, &x, &q, "")).await;
    gw.wait_backend("rabbit", true).await;

    let (s1, h1, b1) = post(&gw, "/orders", Some("\"order-1\""), r#"{"n":1}"#).await;
    assert_eq!(s1, 202, "{b1}");
    assert!(h1.get("idempotent-replayed").is_none());
    assert_eq!(
        b1["message_id"], "order-1",
        "the key becomes the message id"
    );
    let (s2, h2, b2) = post(&gw, "/orders", Some("\"order-1\""), r#"{"n":1}"#).await;
    assert_eq!(s2, 202);
    assert_eq!(h2["idempotent-replayed"], "true");
    assert_eq!(b1, b2, "the stored answer is replayed as it was");

    let conn = mq::client().await;
    assert_eq!(
        mq::depth(&conn, &q).await,
        1,
        "one publish for two requests"
    );
    let ch = conn.create_channel().await.unwrap();
    let msg = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the message");
    assert_eq!(
        msg.properties.message_id().as_ref().map(|m| m.as_str()),
        Some("order-1")
    );

    // The same key with another body: 422 naming the header, nothing published.
    let (s3, h3, b3) = post(&gw, "/orders", Some("\"order-1\""), r#"{"n":2}"#).await;
    assert_eq!(s3, 422, "{b3}");
    assert_eq!(h3["content-type"], "application/problem+json");
    assert_eq!(b3["field"], "header.idempotency-key");
    assert_eq!(b3["type"], "urn:switchyard:problem:idempotency-key-reused");
    // A bare (unquoted) key is taken too, and is another key.
    let (s4, _, b4) = post(&gw, "/orders", Some("order-2"), r#"{"n":2}"#).await;
    assert_eq!(s4, 202, "{b4}");
    // No key: the route still works, with no replay.
    let (s5, _, _) = post(&gw, "/orders", None, r#"{"n":3}"#).await;
    assert_eq!(s5, 202);
    assert_eq!(mq::depth(&conn, &q).await, 2);
    mq::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn concurrent_duplicates_publish_once() {
    let url = mq::broker_url().await;
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let gw = Gateway::start(&amqp_config(&url, &x, &q, "")).await;
    gw.wait_backend("rabbit", true).await;
    let gw = std::sync::Arc::new(gw);
    let tasks: Vec<_> = (0..12)
        .map(|_| {
            let gw = gw.clone();
            tokio::spawn(async move { post(&gw, "/orders", Some("\"dup\""), r#"{"n":1}"#).await })
        })
        .collect();
    let (mut fresh, mut replayed, mut conflicts) = (0, 0, 0);
    for t in tasks {
        let (s, h, b) = t.await.unwrap();
        match s {
            202 if h.contains_key("idempotent-replayed") => replayed += 1,
            202 => fresh += 1,
            409 => {
                assert_eq!(b["type"], "urn:switchyard:problem:idempotency-key-in-use");
                assert!(h.contains_key("retry-after"));
                conflicts += 1;
            }
            other => panic!("unexpected {other}: {b}"),
        }
    }
    assert_eq!(
        fresh, 1,
        "one request ran ({replayed} replayed, {conflicts} conflicts)"
    );
    let conn = mq::client().await;
    assert_eq!(mq::depth(&conn, &q).await, 1);
    mq::cleanup(&conn, &[&x], &[&q]).await;
}

/// An HTTP route with idempotency over `upstream`.
fn http_config(upstream: &str, extra: &str, state: &str) -> String {
    format!(
        r#"
{state}
backends:
  up: {{ type: http, endpoints: ["{upstream}"] }}
routes:
  - id: pay
    match: {{ method: POST, path: "/{{*rest}}" }}
    backend: up
    timeout: 3s
    idempotency: {{ {extra} }}
"#
    )
}

#[tokio::test]
async fn a_repeat_while_the_first_runs_is_409_and_bad_keys_are_400() {
    let up = Upstream::hanging().await;
    let gw = Gateway::start(&http_config(&up.url(), "max_key_length: 16", "")).await;
    let gw = std::sync::Arc::new(gw);
    let first = {
        let gw = gw.clone();
        tokio::spawn(async move { post(&gw, "/pay", Some("k1"), "{}").await })
    };
    // Wait until the first request reached the upstream (it hangs there).
    eventually("the first request never arrived", || async {
        if up.hits() == 0 { Err(()) } else { Ok(()) }
    })
    .await;
    let (s, h, b) = post(&gw, "/pay", Some("k1"), "{}").await;
    assert_eq!(s, 409, "{b}");
    assert_eq!(b["field"], "header.idempotency-key");
    assert!(h.contains_key("retry-after"));
    assert_eq!(up.hits(), 1, "the repeat never reached the upstream");
    // The first times out (504): the key is released, so the client may try again.
    let (s1, _, _) = first.await.unwrap();
    assert_eq!(s1, 504);
    let again = {
        let gw = gw.clone();
        tokio::spawn(async move { post(&gw, "/pay", Some("k1"), "{}").await })
    };
    eventually("the retry never arrived", || async {
        if up.hits() < 2 { Err(()) } else { Ok(()) }
    })
    .await;
    again.abort();

    for (key, why) in [
        ("\"\"", "empty"),
        ("\"abcdefghijklmnopq\"", "longer than 16"),
        ("\"unterminated", "unclosed quote"),
        ("a b", "space in a bare key"),
        ("\"bad\\x\"", "bad escape"),
    ] {
        let (s, _, b) = post(&gw, "/pay", Some(key), "{}").await;
        assert_eq!(s, 400, "{why}: {b}");
        assert_eq!(b["field"], "header.idempotency-key", "{why}");
    }
    assert_eq!(up.hits(), 2, "bad keys never reach the upstream");
}

#[tokio::test]
async fn answers_are_stored_but_5xx_are_not_and_a_required_key_is_enforced() {
    let ok = Upstream::start().await;
    let gw = Gateway::start(&http_config(&ok.url(), "required: true", "")).await;
    let (s, _, b) = post(&gw, "/echo", None, "{}").await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["field"], "header.idempotency-key");
    let (s1, _, b1) = post(&gw, "/echo", Some("\"a\""), "{\"x\":1}").await;
    let (s2, h2, b2) = post(&gw, "/echo", Some("\"a\""), "{\"x\":1}").await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(b1, b2);
    assert_eq!(h2["idempotent-replayed"], "true");
    assert_eq!(ok.hits(), 1);
    // Another path with the same key is another request: 422.
    let (s3, _, _) = post(&gw, "/other", Some("\"a\""), "{\"x\":1}").await;
    assert_eq!(s3, 422);

    let failing = Upstream::fixed(503).await;
    let gw2 = Gateway::start(&http_config(&failing.url(), "", "")).await;
    for _ in 0..2 {
        let (s, h, _) = post(&gw2, "/x", Some("\"b\""), "{}").await;
        assert_eq!(s, 503);
        assert!(h.get("idempotent-replayed").is_none());
    }
    assert_eq!(
        failing.hits(),
        2,
        "a 5xx releases the key, so the repeat runs"
    );
}

#[tokio::test]
async fn a_store_that_is_down_gives_503_and_the_request_never_runs() {
    let up = Upstream::start().await;
    let dead = free_port().await;
    let state =
        format!("state: {{ store: redis, redis: {{ url: \"redis://{dead}/\", timeout: 300ms }} }}");
    let gw = Gateway::start(&http_config(&up.url(), "", &state)).await;
    let (s, h, b) = post(&gw, "/x", Some("\"k\""), "{}").await;
    assert_eq!(s, 503, "{b}");
    assert_eq!(b["type"], "urn:switchyard:problem:store-unavailable");
    assert!(h.contains_key("retry-after"));
    assert_eq!(up.hits(), 0);
    // Without a key the store is not needed.
    let (s, _, _) = post(&gw, "/x", None, "{}").await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn two_gateways_sharing_redis_replay_each_others_answers() {
    let url = mq::broker_url().await;
    let redis = rd::url().await;
    let prefix = rd::prefix();
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let state =
        format!("state: {{ store: redis, redis: {{ url: \"{redis}\", prefix: \"{prefix}\" }} }}");
    let a = Gateway::start(&amqp_config(&url, &x, &q, &state)).await;
    let b = Gateway::start(&amqp_config(&url, &x, &q, &state)).await;
    a.wait_backend("rabbit", true).await;
    b.wait_backend("rabbit", true).await;
    let (s1, _, b1) = post(&a, "/orders", Some("\"shared\""), "{}").await;
    let (s2, h2, b2) = post(&b, "/orders", Some("\"shared\""), "{}").await;
    assert_eq!((s1, s2), (202, 202), "{b1} {b2}");
    assert_eq!(h2["idempotent-replayed"], "true");
    assert_eq!(b1, b2);
    let conn = mq::client().await;
    assert_eq!(mq::depth(&conn, &q).await, 1);
    mq::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn on_mqtt_the_key_travels_as_correlation_data_and_a_repeat_publishes_nothing() {
    let addr = crate::support::mqtt::broker_addr().await;
    let topic = format!("sy-test/{}/idem", uuid::Uuid::now_v7().simple());
    let mut sub = crate::support::mqtt::Subscriber::start(
        &addr,
        &format!("sub-{}", uuid::Uuid::now_v7().simple()),
        &topic,
    )
    .await;
    let gw = Gateway::start(&format!(
        r#"
backends:
  devices: {{ type: mqtt, url: "mqtt://{addr}", client_id: "gw-{id}" }}
routes:
  - id: set
    match: {{ method: POST, path: /set }}
    backend: devices
    mqtt: {{ topic: "{topic}", qos: 1 }}
    idempotency: {{}}
"#,
        id = uuid::Uuid::now_v7().simple()
    ))
    .await;
    gw.wait_backend("devices", true).await;
    let (s1, _, _) = post(&gw, "/set", Some("\"mqtt-key-1\""), r#"{"v":1}"#).await;
    let (s2, h2, _) = post(&gw, "/set", Some("\"mqtt-key-1\""), r#"{"v":1}"#).await;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(h2["idempotent-replayed"], "true");
    // A marker published after both: the repeat sent nothing in between.
    let (s3, _, _) = post(&gw, "/set", Some("\"mqtt-key-2\""), r#"{"v":2}"#).await;
    assert_eq!(s3, 202);
    let first = sub.next().await;
    let props = first.properties.clone().expect("MQTT 5 properties");
    assert_eq!(props.correlation_data.as_deref(), Some(&b"mqtt-key-1"[..]));
    assert!(
        props
            .user_properties
            .iter()
            .any(|(k, v)| k == "message-id" && v == "mqtt-key-1")
    );
    let second = sub.next().await;
    assert_eq!(
        &second.payload[..],
        br#"{"v":2}"#,
        "the repeat published nothing"
    );
}
