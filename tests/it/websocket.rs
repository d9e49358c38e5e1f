//! WebSocket routes against a real Mosquitto: the handshake's policy (upgrade, version, origin,
//! subprotocol), the MQTT bridge in both modes with broker acknowledgements as frames, close
//! codes for bad frames, sizes, idle clients, slow clients and shutdown, and many connections.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::Method;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::support::mqtt::{self as mq, Subscriber};
use crate::support::*;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn unique() -> String {
    format!("sy-ws/{}", uuid::Uuid::now_v7().simple())
}

/// A gateway config with an MQTT backend on `addr` and the given routes.
fn config(addr: &str, routes: &str) -> String {
    format!(
        r#"
backends:
  devices:
    type: mqtt
    url: "mqtt://{addr}"
    client_id: "gw-{id}"
    keep_alive: 5s
    max_packet_size: 1MiB
routes:
{routes}
"#,
        id = uuid::Uuid::now_v7().simple()
    )
}

/// A WebSocket route to the `devices` backend: `websocket` holds the lines under `websocket:`.
fn ws_route(id: &str, path: &str, websocket: &str) -> String {
    let body: String = websocket.lines().map(|l| format!("      {l}\n")).collect();
    format!(
        "  - id: {id}\n    match: {{ method: GET, path: \"{path}\" }}\n    backend: devices\n    websocket:\n{body}"
    )
}

async fn gateway(routes: &str) -> Gateway {
    let addr = mq::broker_addr().await;
    let gw = Gateway::start(&config(&addr, routes)).await;
    gw.wait_backend("devices", true).await;
    gw
}

fn ws_url(gw: &Gateway, path: &str) -> String {
    format!("ws://{}{}", gw.listen, path)
}

async fn connect(gw: &Gateway, path: &str) -> Ws {
    let (ws, resp) = tokio_tungstenite::connect_async(ws_url(gw, path))
        .await
        .expect("WebSocket handshake");
    assert_eq!(resp.status(), 101);
    assert!(resp.headers().contains_key("x-request-id"));
    ws
}

/// The next text frame as JSON (pings and pongs skipped).
async fn next_json(ws: &mut Ws) -> Value {
    serde_json::from_str(&next_text(ws).await).expect("JSON frame")
}

/// The next text frame (pings and pongs skipped).
async fn next_text(ws: &mut Ws) -> String {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame within 10 s")
            .expect("socket open")
            .expect("frame read")
        {
            Message::Text(t) => return t.to_string(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// The close code the gateway sent, reading past anything else.
async fn close_code(ws: &mut Ws) -> u16 {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a close within 10 s");
        match m {
            Some(Ok(Message::Close(Some(f)))) => {
                return u16::from(f.code);
            }
            Some(Ok(Message::Close(None))) => return 1005,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("socket failed before a close frame: {e}"),
            None => panic!("socket ended without a close frame"),
        }
    }
}

async fn send_json(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// Subscribes the socket (operations mode) to `filter`.
async fn subscribe(ws: &mut Ws, filter: &str) {
    send_json(ws, json!({"op": "subscribe", "topic": filter})).await;
    assert_eq!(next_json(ws).await["op"], "subscribed");
}

/// A plain MQTT subscriber on the shared broker, watching `filter`.
async fn watch(addr: &str, filter: &str) -> Subscriber {
    let id = format!("sub-{}", uuid::Uuid::now_v7().simple());
    Subscriber::start(addr, &id, filter).await
}

/// A plain MQTT client publishing on the shared broker.
async fn publisher(addr: &str) -> rumqttc::v5::AsyncClient {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut opts = rumqttc::v5::MqttOptions::new(
        format!("pub-{}", uuid::Uuid::now_v7().simple()),
        host,
        port.parse().unwrap(),
    );
    opts.set_max_packet_size(Some(1024 * 1024));
    let (client, mut el) = rumqttc::v5::AsyncClient::new(opts, 1000);
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    client
}

#[tokio::test]
async fn mqtt_operations_subscribe_publish_and_acknowledge() {
    let prefix = unique();
    let addr = mq::broker_addr().await;
    let gw = gateway(&ws_route(
        "live",
        "/ws/{site}",
        &format!(r#"mqtt: {{ allow: ["{prefix}/{{site}}/#"], qos: 1 }}"#),
    ))
    .await;
    let mut outside = watch(&addr, &format!("{prefix}/#")).await;
    let mut ws = connect(&gw, "/ws/s1").await;

    send_json(
        &mut ws,
        json!({"op": "subscribe", "topic": format!("{prefix}/s1/+/state"), "id": "sub-1"}),
    )
    .await;
    let v = next_json(&mut ws).await;
    assert_eq!(v["op"], "subscribed", "{v}");
    assert_eq!(v["id"], "sub-1");

    // A message published by anyone on the broker reaches the socket.
    let mqtt = publisher(&addr).await;
    mqtt.publish(
        format!("{prefix}/s1/d7/state"),
        QoS::AtLeastOnce,
        false,
        r#"{"t":21.5}"#,
    )
    .await
    .unwrap();
    let v = next_json(&mut ws).await;
    assert_eq!(v["op"], "message", "{v}");
    assert_eq!(v["topic"], format!("{prefix}/s1/d7/state"));
    assert_eq!(v["payload"]["t"], 21.5);
    assert_eq!(v["subscription"], format!("{prefix}/s1/+/state"));
    let seen = outside.next().await; // the outside subscriber saw it too
    assert_eq!(&seen.topic[..], format!("{prefix}/s1/d7/state").as_bytes());

    // A publish is acknowledged once the broker has it, and arrives with its payload.
    send_json(&mut ws, json!({"op": "publish", "topic": format!("{prefix}/s1/d7/cmd"), "payload": {"on": true}, "id": 42})).await;
    let v = next_json(&mut ws).await;
    assert_eq!(
        v,
        json!({"op": "ack", "id": 42, "topic": format!("{prefix}/s1/d7/cmd")})
    );
    let p = outside.next().await;
    assert_eq!(&p.topic[..], format!("{prefix}/s1/d7/cmd").as_bytes());
    assert_eq!(&p.payload[..], br#"{"on":true}"#);
    let props = p.properties.unwrap();
    assert_eq!(props.content_type.as_deref(), Some("application/json"));
    assert!(
        props.correlation_data.is_some(),
        "the connection's correlation id travels"
    );

    // Binary payloads travel as base64.
    send_json(&mut ws, json!({"op": "publish", "topic": format!("{prefix}/s1/raw"), "payload": "AAEC/w==", "encoding": "base64", "qos": 2, "id": "b"})).await;
    assert_eq!(next_json(&mut ws).await["op"], "ack");
    assert_eq!(&outside.next().await.payload[..], &[0, 1, 2, 255]);

    // Bad operations get error frames naming the problem; the connection stays up.
    for (frame, error, field) in [
        (
            json!({"op": "subscribe", "topic": format!("{prefix}/s2/#"), "id": 1}),
            "forbidden",
            Some("topic"),
        ),
        (
            json!({"op": "publish", "topic": format!("{prefix}/s1/+"), "id": 2}),
            "bad-frame",
            Some("topic"),
        ),
        (
            json!({"op": "subscribe", "topic": format!("{prefix}/s1/a#"), "id": 3}),
            "bad-frame",
            Some("topic"),
        ),
        (
            json!({"op": "jump", "topic": "x", "id": 4}),
            "unknown-op",
            Some("op"),
        ),
        (
            json!({"op": "publish", "id": 5}),
            "bad-frame",
            Some("topic"),
        ),
        (
            json!({"op": "publish", "topic": format!("{prefix}/s1/x"), "qos": 3, "id": 6}),
            "bad-frame",
            Some("qos"),
        ),
        (
            json!({"op": "unsubscribe", "topic": format!("{prefix}/s1/none"), "id": 7}),
            "not-subscribed",
            Some("topic"),
        ),
    ] {
        send_json(&mut ws, frame.clone()).await;
        let v = next_json(&mut ws).await;
        assert_eq!(v["op"], "error", "{frame} → {v}");
        assert_eq!(v["error"], error, "{frame} → {v}");
        assert_eq!(v["field"].as_str(), field, "{frame} → {v}");
        assert_eq!(v["id"], frame["id"], "{v}");
    }
    ws.send(Message::text("{not json")).await.unwrap();
    let v = next_json(&mut ws).await;
    assert_eq!(v["error"], "bad-frame", "{v}");
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(next_json(&mut ws).await["error"], "bad-frame");

    // Unsubscribed: nothing more arrives for that filter.
    send_json(
        &mut ws,
        json!({"op": "unsubscribe", "topic": format!("{prefix}/s1/+/state")}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["op"], "unsubscribed");

    // Metrics count the connection and its frames.
    let (_, _, m) = get(&gw.admin_url("/metrics")).await;
    let m = String::from_utf8_lossy(&m);
    assert!(
        m.contains(r#"switchyard_websocket_connections{route="live"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"switchyard_websocket_frames_total{route="live",direction="received"}"#),
        "{m}"
    );

    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn mqtt_fixed_topics_relay_payloads_both_ways() {
    let prefix = unique();
    let addr = mq::broker_addr().await;
    let gw = gateway(&ws_route(
        "fixed",
        "/ws/devices/{device}",
        &format!(
            r#"mqtt: {{ subscribe: ["{prefix}/{{device}}/state"], publish: "{prefix}/{{device}}/cmd", qos: 1, acks: true }}"#
        ),
    ))
    .await;
    let mut outside = watch(&addr, &format!("{prefix}/+/cmd")).await;
    let mut ws = connect(&gw, "/ws/devices/d1").await;
    // The 101 came after the subscription was placed: a message published now arrives.
    let mqtt = publisher(&addr).await;
    mqtt.publish(format!("{prefix}/d1/state"), QoS::AtLeastOnce, false, "on")
        .await
        .unwrap();
    mqtt.publish(
        format!("{prefix}/d1/state"),
        QoS::AtLeastOnce,
        false,
        vec![0xffu8, 0],
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Ping(_) => {}
            m => got.push(m),
        }
    }
    assert_eq!(got[0], Message::text("on"));
    assert_eq!(got[1], Message::binary(vec![0xffu8, 0]));

    ws.send(Message::text("set 20")).await.unwrap();
    let v = next_json(&mut ws).await;
    assert_eq!(
        v,
        json!({"op": "ack", "seq": 1, "topic": format!("{prefix}/d1/cmd")})
    );
    let p = outside.next().await;
    assert_eq!(&p.payload[..], b"set 20");
    assert_eq!(p.properties.unwrap().payload_format_indicator, Some(1));
    ws.send(Message::binary(vec![7u8; 3])).await.unwrap();
    assert_eq!(next_json(&mut ws).await["seq"], 2);
    assert_eq!(&outside.next().await.payload[..], &[7, 7, 7]);

    // A path value with `+` cannot widen the subscription.
    let err = tokio_tungstenite::connect_async(ws_url(&gw, "/ws/devices/%2B"))
        .await
        .unwrap_err();
    match err {
        tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status(), 400);
            let body = json(&bytes::Bytes::from(resp.body().clone().unwrap_or_default()));
            assert_eq!(body["field"], "device", "{body}");
        }
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

#[tokio::test]
async fn handshake_policy_is_answered_in_http() {
    let prefix = unique();
    let gw = gateway(&ws_route(
        "strict",
        "/ws",
        &format!(
            r#"origins: ["https://app.example.com"]
subprotocols: [v2.switchyard, v1.switchyard]
mqtt: {{ allow: ["{prefix}/#"] }}"#
        ),
    ))
    .await;
    // A plain request: 426 with the upgrade it needs.
    let (s, h, b) = get(&gw.url("/ws")).await;
    assert_eq!(s, 426);
    assert_eq!(h["upgrade"], "websocket");
    assert_eq!(h["content-type"], "application/problem+json");
    assert_eq!(json(&b)["type"], "urn:switchyard:problem:upgrade-required");

    let handshake = |origin: Option<&str>, protocols: Option<&str>, version: &str| {
        let mut r = request(Method::GET, &gw.url("/ws"))
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", version)
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        if let Some(p) = protocols {
            r = r.header("sec-websocket-protocol", p);
        }
        r.body(body("")).unwrap()
    };
    let (s, _, b) = send(handshake(
        Some("https://evil.example.com"),
        Some("v1.switchyard"),
        "13",
    ))
    .await;
    assert_eq!(s, 403);
    assert_eq!(json(&b)["field"], "header.origin");
    let (s, _, b) = send(handshake(None, Some("v1.switchyard"), "13")).await;
    assert_eq!(s, 403, "{}", String::from_utf8_lossy(&b));
    let (s, _, b) = send(handshake(
        Some("https://app.example.com"),
        Some("chat"),
        "13",
    ))
    .await;
    assert_eq!(s, 400);
    assert_eq!(json(&b)["field"], "header.sec-websocket-protocol");
    let (s, h, _) = send(handshake(
        Some("https://app.example.com"),
        Some("v1.switchyard"),
        "8",
    ))
    .await;
    assert_eq!(s, 426);
    assert_eq!(h["sec-websocket-version"], "13");

    // A good handshake: the route's preferred protocol among those offered, and the RFC's
    // accept key for the sample nonce.
    let mut req = ws_url(&gw, "/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("origin", "https://APP.example.com".parse().unwrap());
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "v1.switchyard, v2.switchyard".parse().unwrap(),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "v2.switchyard");
    subscribe(&mut ws, &format!("{prefix}/x")).await;

    let (s, h, _) = send(handshake(
        Some("https://app.example.com"),
        Some("v1.switchyard"),
        "13",
    ))
    .await;
    assert_eq!(s, 101);
    assert_eq!(h["sec-websocket-accept"], "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

#[tokio::test]
async fn bad_frames_close_with_the_code_that_says_why() {
    let prefix = unique();
    let gw = gateway(&ws_route(
        "small",
        "/ws",
        &format!(
            r#"max_message_size: 1KiB
mqtt: {{ allow: ["{prefix}/#"] }}"#
        ),
    ))
    .await;
    // Too big: 1009.
    let mut ws = connect(&gw, "/ws").await;
    ws.send(Message::text("x".repeat(2048))).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 1009);

    // A text frame that is not UTF-8: 1007.
    let mut ws = connect(&gw, "/ws").await;
    let frame = Frame::message(vec![0xc3u8, 0x28], OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(frame)).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 1007);

    // A client that closes gets its close answered.
    let mut ws = connect(&gw, "/ws").await;
    ws.close(None).await.unwrap();
    assert!(matches!(
        tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap(),
        None | Some(Ok(Message::Close(_))) | Some(Err(tungstenite::Error::ConnectionClosed))
    ));
}

/// A WebSocket handshake over a raw TCP socket, so the test controls reading (no automatic
/// pongs, no reading at all).
async fn raw_handshake(gw: &Gateway, path: &str) -> tokio::net::TcpStream {
    let mut tcp = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
    tcp.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tcp
}

/// Reads server frames off a raw socket until a close frame; its code.
async fn raw_close_code(tcp: &mut tokio::net::TcpStream) -> u16 {
    loop {
        let mut h = [0u8; 2];
        tcp.read_exact(&mut h).await.expect("a frame header");
        let len = match h[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                tcp.read_exact(&mut l).await.unwrap();
                u16::from_be_bytes(l) as usize
            }
            127 => {
                let mut l = [0u8; 8];
                tcp.read_exact(&mut l).await.unwrap();
                u64::from_be_bytes(l) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        tcp.read_exact(&mut payload).await.unwrap();
        if h[0] & 0x0f == 0x8 {
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

#[tokio::test]
async fn idle_clients_are_closed_and_live_ones_kept() {
    let prefix = unique();
    let gw = gateway(&ws_route(
        "idle",
        "/ws",
        &format!(
            r#"ping_interval: 100ms
idle_timeout: 400ms
mqtt: {{ allow: ["{prefix}/#"] }}"#
        ),
    ))
    .await;
    // A client that never answers pings is closed with 1001.
    let mut raw = raw_handshake(&gw, "/ws").await;
    let code = tokio::time::timeout(Duration::from_secs(5), raw_close_code(&mut raw))
        .await
        .expect("closed within 5 s");
    assert_eq!(code, 1001);

    // A client that reads (and so answers pings) stays: it sees pings for well past the
    // idle timeout, and its socket still works.
    let mut ws = connect(&gw, "/ws").await;
    let mut pings = 0;
    while pings < 10 {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("expected pings, got {other:?}"),
        }
    }
    subscribe(&mut ws, &format!("{prefix}/a")).await;
}

/// Publishes `n` messages of 256 KiB to `topic`, one at a time: `reader` takes each before the
/// next goes, so only clients that do not read fall behind.
async fn publish_in_step(addr: &str, topic: &str, reader: &mut Ws, n: usize) {
    let mqtt = publisher(addr).await;
    let payload = vec![b'x'; 256 * 1024];
    for _ in 0..n {
        mqtt.publish(topic, QoS::AtLeastOnce, false, payload.clone())
            .await
            .unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), reader.next())
                .await
                .unwrap()
            {
                Some(Ok(Message::Binary(_) | Message::Text(_))) => break,
                Some(Ok(_)) => {}
                other => panic!("the reading client was hurt: {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_others_carry_on() {
    let prefix = unique();
    let addr = mq::broker_addr().await;
    let gw = gateway(&ws_route(
        "feed",
        "/ws",
        &format!(
            r#"buffer: 4
write_timeout: 500ms
mqtt: {{ subscribe: ["{prefix}/feed"] }}"#
        ),
    ))
    .await;
    let stuck = raw_handshake(&gw, "/ws").await;
    let mut reader = connect(&gw, "/ws").await;
    // 16 MiB: far more than the socket buffers and the queue hold.
    publish_in_step(&addr, &format!("{prefix}/feed"), &mut reader, 64).await;
    // The stuck client was cut off by the write timeout, without a close frame (it would not
    // read one): 1006. The gateway holds one connection: the reader's.
    let m = eventually("the stuck client was never cut off", || async {
        let (_, _, m) = get(&gw.admin_url("/metrics")).await;
        let m = String::from_utf8_lossy(&m).to_string();
        if m.contains(r#"switchyard_websocket_connections{route="feed"} 1"#) {
            Ok(m)
        } else {
            Err(m)
        }
    })
    .await;
    assert!(
        m.contains(r#"switchyard_websocket_closes_total{route="feed",code="1006"} 1"#),
        "{m}"
    );
    drop(stuck);
}

#[tokio::test]
async fn shutdown_closes_sockets_with_going_away() {
    let prefix = unique();
    let gw = gateway(&ws_route(
        "bye",
        "/ws",
        &format!(r#"mqtt: {{ allow: ["{prefix}/#"] }}"#),
    ))
    .await;
    let mut ws = connect(&gw, "/ws").await;
    subscribe(&mut ws, &format!("{prefix}/a")).await;
    let (drained, code) = tokio::join!(gw.shutdown(), close_code(&mut ws));
    assert_eq!(code, 1001);
    assert!(drained, "the drain waited for the socket and finished");
}

#[tokio::test]
async fn many_connections_each_get_their_own_messages() {
    let prefix = unique();
    let addr = mq::broker_addr().await;
    let gw = gateway(&ws_route(
        "many",
        "/ws/{n}",
        &format!(r#"mqtt: {{ subscribe: ["{prefix}/{{n}}"] }}"#),
    ))
    .await;
    let n = 200;
    let mut sockets = futures_util::future::join_all((0..n).map(|i| {
        let url = ws_url(&gw, &format!("/ws/{i}"));
        async move { tokio_tungstenite::connect_async(url).await.unwrap().0 }
    }))
    .await;
    let mqtt = publisher(&addr).await;
    for i in 0..n {
        mqtt.publish(
            format!("{prefix}/{i}"),
            QoS::AtLeastOnce,
            false,
            format!("to {i}"),
        )
        .await
        .unwrap();
    }
    for (i, ws) in sockets.iter_mut().enumerate() {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .unwrap()
            {
                Some(Ok(Message::Text(t))) => {
                    assert_eq!(t.as_str(), format!("to {i}"));
                    break;
                }
                Some(Ok(Message::Ping(_))) => {}
                other => panic!("socket {i}: {other:?}"),
            }
        }
    }
    let (_, _, m) = get(&gw.admin_url("/metrics")).await;
    assert!(String::from_utf8_lossy(&m).contains(&format!(
        r#"switchyard_websocket_connections{{route="many"}} {n}"#
    )));
}

#[tokio::test]
async fn a_reload_that_replaces_the_backend_closes_its_sockets_with_1011() {
    let prefix = unique();
    let addr = mq::broker_addr().await;
    let routes = format!(
        r#"  - id: swap
    match: {{ method: GET, path: "/ws" }}
    backend: devices
    websocket:
      mqtt: {{ allow: ["{prefix}/#"] }}
"#
    );
    let yaml = config(&addr, &routes);
    let gw = Gateway::start_with(&yaml, false).await;
    gw.wait_backend("devices", true).await;
    let mut ops = connect(&gw, "/ws").await;
    // The same routes with a changed backend (another keep-alive): a new client.
    let changed = with_ephemeral_server(&yaml.replace("keep_alive: 5s", "keep_alive: 6s"));
    std::fs::write(gw.config_path(), changed).unwrap();
    let (s, b) = gw.reload().await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    gw.wait_version(2).await;
    assert_eq!(close_code(&mut ops).await, 1011);
    // New sockets use the new backend.
    gw.wait_backend("devices", true).await;
    let mut ws = connect(&gw, "/ws").await;
    subscribe(&mut ws, &format!("{prefix}/a")).await;
}

#[tokio::test]
async fn websockets_over_http2_extended_connect() {
    let prefix = unique();
    let addr = mq::broker_addr().await;
    let gw = gateway(&ws_route(
        "h2",
        "/ws/{site}",
        &format!(r#"mqtt: {{ allow: ["{prefix}/{{site}}/#"] }}"#),
    ))
    .await;
    let tcp = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(Method::CONNECT)
        .uri(format!("http://{}/ws/s1", gw.listen))
        .header("sec-websocket-version", "13")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let mut resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let upgraded = hyper::upgrade::on(&mut resp).await.unwrap();
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(upgraded),
        tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    let mut outside = watch(&addr, &format!("{prefix}/#")).await;
    ws.send(Message::text(
        json!({"op": "publish", "topic": format!("{prefix}/s1/x"), "payload": "over h2", "id": 1})
            .to_string(),
    ))
    .await
    .unwrap();
    let v = loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Text(t) => break serde_json::from_str::<Value>(&t).unwrap(),
            _ => continue,
        }
    };
    assert_eq!(v["op"], "ack", "{v}");
    assert_eq!(&outside.next().await.payload[..], b"over h2");
}

/// A real WebSocket server: answers `…/gone` with 404, picks `echo.v1` when offered, first
/// sends a JSON frame describing the handshake it saw, then echoes every message; `close-4001`
/// makes it close with 4001, `vanish` makes it drop the TCP connection.
async fn echo_upstream() -> std::net::SocketAddr {
    echo_upstream_logging_closes().await.0
}

/// [`echo_upstream`], and the close codes it received from the gateway.
#[allow(clippy::result_large_err)] // the handshake callback's type is tungstenite's
async fn echo_upstream_logging_closes() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<u16>>>,
) {
    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = closes.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let mut seen = json!({});
                let callback =
                    |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
                        if req.uri().path().ends_with("/gone") {
                            let mut e = ErrorResponse::new(Some("no such socket".into()));
                            *e.status_mut() = http::StatusCode::NOT_FOUND;
                            return Err(e);
                        }
                        let h = |n: &str| {
                            req.headers()
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string)
                        };
                        seen = json!({
                            "path": req.uri().to_string(),
                            "x-forwarded-for": h("x-forwarded-for"),
                            "x-request-id": h("x-request-id"),
                            "protocols": h("sec-websocket-protocol"),
                            "host": h("host"),
                        });
                        if h("sec-websocket-protocol").is_some_and(|p| p.contains("echo.v1")) {
                            resp.headers_mut()
                                .insert("sec-websocket-protocol", "echo.v1".parse().unwrap());
                        }
                        Ok(resp)
                    };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
                    return;
                };
                let _ = ws.send(Message::text(seen.to_string())).await;
                while let Some(Ok(m)) = ws.next().await {
                    match m {
                        Message::Text(t) if t.as_str() == "close-4001" => {
                            let _ = ws
                                .close(Some(tungstenite::protocol::CloseFrame {
                                    code: 4001.into(),
                                    reason: "bye".into(),
                                }))
                                .await;
                            while ws.next().await.is_some() {}
                            return;
                        }
                        Message::Text(t) if t.as_str() == "vanish" => return,
                        Message::Close(f) => {
                            log.lock()
                                .unwrap()
                                .push(f.map_or(1005, |f| u16::from(f.code)));
                        }
                        m @ (Message::Text(_) | Message::Binary(_)) => {
                            // A failed send shows on the next read.
                            let _ = ws.send(m).await;
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    (addr, closes)
}

#[tokio::test]
async fn upstream_websockets_are_relayed_both_ways() {
    let (up, closes) = echo_upstream_logging_closes().await;
    let gw = Gateway::start(&format!(
        r#"
backends:
  chat: {{ type: http, endpoints: ["http://{up}/base"] }}
  nowhere: {{ type: http, endpoints: ["http://127.0.0.1:9"] }}
routes:
  - id: chat
    match: {{ method: GET, path: "/chat/{{*rest}}" }}
    backend: chat
    http: {{ strip_prefix: /chat }}
    websocket: {{ max_message_size: 1KiB }}
  - id: nowhere
    match: {{ method: GET, path: "/nowhere" }}
    backend: nowhere
    websocket: {{}}
"#
    ))
    .await;
    let mut req = ws_url(&gw, "/chat/room/1?x=y")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "other, echo.v1".parse().unwrap());
    req.headers_mut()
        .insert("x-request-id", "ws-rid-1".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "echo.v1");
    // What the upstream saw: the rewritten path under its base, the forwarding headers, the
    // correlation id and the client's offer.
    let seen = next_json(&mut ws).await;
    assert_eq!(seen["path"], "/base/room/1?x=y", "{seen}");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-request-id"], "ws-rid-1");
    assert_eq!(seen["protocols"], "other, echo.v1");
    assert_eq!(seen["host"], up.to_string());

    ws.send(Message::text("hello")).await.unwrap();
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    let mut echoed = Vec::new();
    while echoed.len() < 2 {
        if let m @ (Message::Text(_) | Message::Binary(_)) = ws.next().await.unwrap().unwrap() {
            echoed.push(m);
        }
    }
    assert_eq!(
        echoed,
        vec![Message::text("hello"), Message::binary(vec![1u8, 2, 3])]
    );

    // The upstream's close code reaches the client.
    ws.send(Message::text("close-4001")).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 4001);

    // An upstream that vanishes: 1011 (1014 would be truer, but tungstenite clients refuse it).
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(&gw, "/chat/x"))
        .await
        .unwrap();
    next_json(&mut ws).await;
    ws.send(Message::text("vanish")).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 1011);

    // The client's close code reaches the upstream.
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(&gw, "/chat/x"))
        .await
        .unwrap();
    next_json(&mut ws).await;
    ws.close(Some(tungstenite::protocol::CloseFrame {
        code: 4002.into(),
        reason: "done".into(),
    }))
    .await
    .unwrap();
    eventually("the upstream never saw close 4002", || async {
        let seen = closes.lock().unwrap().clone();
        if seen.contains(&4002) {
            Ok(())
        } else {
            Err(seen)
        }
    })
    .await;

    // The route's limits hold before anything reaches the upstream.
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(&gw, "/chat/x"))
        .await
        .unwrap();
    next_json(&mut ws).await;
    ws.send(Message::text("x".repeat(4096))).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 1009);

    // The upstream's refusal is relayed; an upstream that is down answers 503.
    match tokio_tungstenite::connect_async(ws_url(&gw, "/chat/gone")).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 404),
        other => panic!("expected the upstream's 404, got {other:?}"),
    }
    match tokio_tungstenite::connect_async(ws_url(&gw, "/nowhere")).await {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503);
            let body = json(&bytes::Bytes::from(resp.body().clone().unwrap_or_default()));
            assert_eq!(body["type"], "urn:switchyard:problem:backend-unavailable");
        }
        other => panic!("expected 503, got {other:?}"),
    }
}

#[tokio::test]
async fn a_client_too_far_behind_is_told_1008_and_loses_nothing_silently() {
    let prefix = unique();
    let addr = mq::broker_addr().await;
    let gw = gateway(&ws_route(
        "lag",
        "/ws",
        &format!(
            r#"buffer: 4
write_timeout: 60s
mqtt: {{ subscribe: ["{prefix}/feed"] }}"#
        ),
    ))
    .await;
    let mut slow = connect(&gw, "/ws").await;
    let mut reader = connect(&gw, "/ws").await;
    // 32 MiB: the slow client falls behind past the socket buffers, its queue and the ring.
    publish_in_step(&addr, &format!("{prefix}/feed"), &mut reader, 128).await;
    // The slow client now reads: some messages, then a close that says it fell behind.
    let mut delivered = 0;
    let (code, reason) = loop {
        match tokio::time::timeout(Duration::from_secs(20), slow.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Binary(_) | Message::Text(_))) => delivered += 1,
            Some(Ok(Message::Close(Some(f)))) => break (u16::from(f.code), f.reason.to_string()),
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("too slow"), "{reason}");
    assert!(delivered < 128, "{delivered}");
}

#[tokio::test]
async fn amqp_frames_are_published_with_confirms_and_queues_pushed_after_the_write() {
    use crate::support::amqp as rabbit;
    use lapin::options::{BasicGetOptions, BasicPublishOptions};
    let url = rabbit::broker_url().await;
    let exchange = rabbit::unique("ws-x");
    let inbox = rabbit::unique("ws-inbox");
    let outbox = rabbit::unique("ws-outbox");
    let gw = Gateway::start(&format!(
        r#"
backends:
  rabbit:
    type: amqp
    url: "{url}"
    topology:
      exchanges: [{{ name: "{exchange}", type: topic, durable: false }}]
      queues: [{{ name: "{inbox}", durable: false }}, {{ name: "{outbox}", durable: false }}]
      bindings: [{{ queue: "{inbox}", exchange: "{exchange}", routing_key: "room.*.in" }}]
routes:
  - id: room
    match: {{ method: GET, path: "/rooms/{{room}}" }}
    backend: rabbit
    websocket:
      amqp:
        exchange: "{exchange}"
        routing_key: "room.{{room}}.in"
        acks: true
        consume: {{ bind: [{{ exchange: "{exchange}", routing_key: "room.{{room}}.out" }}] }}
  - id: outbox
    match: {{ method: GET, path: "/outbox" }}
    backend: rabbit
    websocket:
      amqp: {{ consume: {{ queue: "{outbox}", prefetch: 2 }} }}
  - id: nowhere
    match: {{ method: GET, path: "/nowhere" }}
    backend: rabbit
    websocket:
      amqp: {{ exchange: "{exchange}", routing_key: "no.queue", acks: true }}
"#
    ))
    .await;
    gw.wait_backend("rabbit", true).await;
    let conn = rabbit::client().await;
    let ch = conn.create_channel().await.unwrap();

    // Frames go out confirmed: an ack frame per frame, the message in the bound queue.
    let (mut ws, resp) = tokio_tungstenite::connect_async(ws_url(&gw, "/rooms/r1"))
        .await
        .unwrap();
    let cid = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    ws.send(Message::text(r#"{"say":"hi"}"#)).await.unwrap();
    ws.send(Message::binary(vec![0u8, 1])).await.unwrap();
    assert_eq!(next_json(&mut ws).await, json!({"op": "ack", "seq": 1}));
    assert_eq!(next_json(&mut ws).await, json!({"op": "ack", "seq": 2}));
    let got = ch
        .basic_get(inbox.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the first frame is in the queue");
    assert_eq!(&got.data[..], br#"{"say":"hi"}"#);
    // The connection's correlation id travels with every frame it publishes.
    assert_eq!(
        got.properties
            .correlation_id()
            .as_ref()
            .map(|c| c.to_string()),
        Some(cid)
    );
    assert_eq!(
        got.properties.content_type().as_ref().map(|c| c.as_str()),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(got.properties.delivery_mode(), &Some(2));

    // Messages for the room reach this socket through its own bound queue.
    ch.basic_publish(
        exchange.as_str().into(),
        "room.r1.out".into(),
        BasicPublishOptions::default(),
        b"welcome",
        lapin::BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    assert_eq!(next_text(&mut ws).await, "welcome");

    // A frame no queue takes is refused by the broker (mandatory): an error frame, the socket stays.
    let mut lost = connect(&gw, "/nowhere").await;
    lost.send(Message::text("anyone?")).await.unwrap();
    let v = next_json(&mut lost).await;
    assert_eq!(v["op"], "error", "{v}");
    assert_eq!(v["error"], "unroutable", "{v}");
    assert_eq!(v["seq"], 1);

    // A named queue: what waits in it is pushed once a client connects, and taken off the
    // queue (acknowledged) once written to the socket.
    for i in 0..5 {
        ch.basic_publish(
            "".into(),
            outbox.as_str().into(),
            BasicPublishOptions::default(),
            format!("m{i}").as_bytes(),
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    assert_eq!(rabbit::depth(&conn, &outbox).await, 5);
    let mut out = connect(&gw, "/outbox").await;
    let mut seen = Vec::new();
    while seen.len() < 5 {
        seen.push(next_text(&mut out).await);
    }
    assert_eq!(seen, ["m0", "m1", "m2", "m3", "m4"]);
    // Read-only route: a frame gets an error frame.
    out.send(Message::text("hello?")).await.unwrap();
    assert_eq!(next_json(&mut out).await["error"], "read-only");
    out.close(None).await.unwrap();
    eventually("the delivered messages were not acknowledged", || async {
        if rabbit::depth(&conn, &outbox).await != 0 {
            Err(())
        } else {
            Ok(())
        }
    })
    .await;
    // And nothing is acknowledged twice or left unacknowledged: a new client finds the
    // queue empty.
    ch.basic_publish(
        "".into(),
        outbox.as_str().into(),
        BasicPublishOptions::default(),
        b"later",
        lapin::BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let mut again = connect(&gw, "/outbox").await;
    assert_eq!(next_text(&mut again).await, "later");
    rabbit::cleanup(&conn, &[&exchange], &[&inbox, &outbox]).await;
}

#[tokio::test]
async fn grpc_streams_of_every_kind_one_json_frame_per_message() {
    use crate::support::grpc::{GrpcServer, proto_dir};
    let server = GrpcServer::start().await;
    let dir = proto_dir();
    let closed = free_port().await;
    let gw = Gateway::start(&format!(
        r#"
backends:
  shop:
    type: grpc
    endpoints: ["{url}"]
    protos: ["{proto}"]
    import_paths: ["{dir}"]
  gone:
    type: grpc
    endpoints: ["http://{closed}"]
    protos: ["{proto}"]
    import_paths: ["{dir}"]
routes:
  - id: gone
    match: {{ method: GET, path: /ws/gone }}
    backend: gone
    websocket: {{ grpc: {{ method: shop.v1.Orders/WatchOrders }} }}
  - id: watch
    match: {{ method: GET, path: /ws/watch }}
    backend: shop
    websocket: {{ grpc: {{ method: shop.v1.Orders/WatchOrders }} }}
  - id: import
    match: {{ method: GET, path: /ws/import }}
    backend: shop
    websocket: {{ grpc: {{ method: shop.v1.Orders/ImportOrders }} }}
  - id: track
    match: {{ method: GET, path: /ws/track }}
    backend: shop
    websocket: {{ grpc: {{ method: shop.v1.Orders/TrackOrders }} }}
"#,
        url = server.url(),
        proto = dir.join("shop.proto").display(),
        dir = dir.display()
    ))
    .await;

    // A backend none of whose endpoints accepts a connection: 503 before the handshake.
    match tokio_tungstenite::connect_async(ws_url(&gw, "/ws/gone")).await {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503);
            let body = json(&bytes::Bytes::from(resp.body().clone().unwrap_or_default()));
            assert_eq!(body["type"], "urn:switchyard:problem:backend-unavailable");
        }
        other => panic!("expected 503, got {other:?}"),
    }

    // Server streaming: the first frame is the request; three replies, then status OK, 1000.
    let mut ws = connect(&gw, "/ws/watch").await;
    send_json(&mut ws, json!({"id": "o-1"})).await;
    for n in 1..=3 {
        let v = next_json(&mut ws).await;
        assert_eq!(v["id"], "o-1", "{v}");
        assert_eq!(v["note"], format!("update {n}"));
    }
    assert_eq!(
        next_json(&mut ws).await,
        json!({"op": "status", "code": 0, "status": "OK", "message": ""})
    );
    assert_eq!(close_code(&mut ws).await, 1000);

    // A status after some replies: the replies, then the status frame and 1011.
    let mut ws = connect(&gw, "/ws/watch").await;
    send_json(&mut ws, json!({"id": "fail"})).await;
    next_json(&mut ws).await;
    next_json(&mut ws).await;
    let v = next_json(&mut ws).await;
    assert_eq!(v["status"], "ABORTED", "{v}");
    assert_eq!(v["message"], "stream broke");
    assert_eq!(close_code(&mut ws).await, 1011);

    // A frame that does not fit the request: an error frame naming the field; the socket stays
    // and a good frame still starts the call.
    let mut ws = connect(&gw, "/ws/watch").await;
    send_json(&mut ws, json!({"idd": "x"})).await;
    let v = next_json(&mut ws).await;
    assert_eq!(v["op"], "error", "{v}");
    assert_eq!(v["field"], "idd", "{v}");
    send_json(&mut ws, json!({"id": "o-2"})).await;
    assert_eq!(next_json(&mut ws).await["id"], "o-2");

    // Client streaming: every frame a message, an empty binary frame ends them; one reply.
    let mut ws = connect(&gw, "/ws/import").await;
    for (id, q) in [("a", 2), ("b", 3)] {
        send_json(&mut ws, json!({"id": id, "quantity": q})).await;
    }
    ws.send(Message::binary(Vec::<u8>::new())).await.unwrap();
    let v = next_json(&mut ws).await;
    assert_eq!(v["count"], 2, "{v}");
    assert_eq!(next_json(&mut ws).await["status"], "OK");
    assert_eq!(close_code(&mut ws).await, 1000);

    // Bidirectional: each request answered as it arrives, before the client's side ends.
    let mut ws = connect(&gw, "/ws/track").await;
    for id in ["t1", "t2"] {
        send_json(&mut ws, json!({"id": id})).await;
        let v = next_json(&mut ws).await;
        assert_eq!(v["note"], format!("tracking {id}"), "{v}");
    }
    send_json(&mut ws, json!({"op": "end"})).await;
    assert_eq!(next_json(&mut ws).await["status"], "OK");
    assert_eq!(close_code(&mut ws).await, 1000);
}

#[tokio::test]
async fn mqtt_sockets_ride_out_a_broker_outage_and_amqp_sockets_close_1011() {
    use crate::support::amqp::{self as rabbit, BrokerProxy};
    // MQTT: the socket stays open; a publish meanwhile gets an error frame; a message the
    // broker kept for the gateway's session arrives after the reconnect, and later ones too.
    let addr = mq::broker_addr().await;
    let proxy = BrokerProxy::start_to(addr.clone()).await;
    let prefix = unique();
    let gw = Gateway::start(&config(
        &proxy.addr.to_string(),
        &ws_route(
            "live",
            "/ws",
            &format!(r#"mqtt: {{ allow: ["{prefix}/#"] }}"#),
        ),
    ))
    .await;
    gw.wait_backend("devices", true).await;
    let mut ws = connect(&gw, "/ws").await;
    subscribe(&mut ws, &format!("{prefix}/a")).await;
    // `subscribed` comes after the broker's SUBACK: a message published now arrives.
    let mqtt = publisher(&addr).await;
    mqtt.publish(format!("{prefix}/a"), QoS::AtLeastOnce, false, "before")
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["payload"], "before");
    proxy.stop();
    gw.wait_backend("devices", false).await;
    send_json(
        &mut ws,
        json!({"op": "publish", "topic": format!("{prefix}/b"), "payload": 1, "id": 9}),
    )
    .await;
    let v = next_json(&mut ws).await;
    assert_eq!(v["error"], "backend-unavailable", "{v}");
    assert_eq!(v["id"], 9);
    let mut outside = watch(&addr, &format!("{prefix}/a")).await;
    mqtt.publish(format!("{prefix}/a"), QoS::AtLeastOnce, false, "while away")
        .await
        .unwrap();
    outside.next().await; // the broker has it
    proxy.start_again();
    gw.wait_backend("devices", true).await;
    mqtt.publish(format!("{prefix}/a"), QoS::AtLeastOnce, false, "after")
        .await
        .unwrap();
    // What the broker kept for the session, then what came after: none lost, in order. QoS 1
    // is at least once: "before" may come again if its PUBACK was lost with the connection.
    let mut got = Vec::new();
    while got.last().map(String::as_str) != Some("after") {
        let v = next_json(&mut ws).await;
        assert_eq!(v["op"], "message", "{v}");
        got.push(v["payload"].as_str().unwrap().to_string());
    }
    got.retain(|p| p != "before");
    assert_eq!(got, ["while away", "after"]);

    // AMQP: the connection's own queue dies with the broker connection, so the socket closes.
    let rabbit_proxy = BrokerProxy::start().await;
    let exchange = rabbit::unique("ws-outage");
    let gw = Gateway::start(&format!(
        r##"
backends:
  rabbit:
    type: amqp
    url: "{proxied}"
    reconnect: {{ min: 50ms, max: 300ms }}
    topology:
      exchanges: [{{ name: "{exchange}", type: topic, durable: false }}]
routes:
  - id: feed
    match: {{ method: GET, path: /feed }}
    backend: rabbit
    websocket:
      amqp: {{ consume: {{ bind: [{{ exchange: "{exchange}", routing_key: "#" }}] }} }}
"##,
        proxied = rabbit_proxy.url()
    ))
    .await;
    gw.wait_backend("rabbit", true).await;
    let mut feed = connect(&gw, "/feed").await;
    rabbit_proxy.cut();
    assert_eq!(close_code(&mut feed).await, 1011);
    let conn = rabbit::client().await;
    rabbit::cleanup(&conn, &[&exchange], &[]).await;
}

#[tokio::test]
async fn api_keys_are_checked_before_the_upgrade_and_never_passed_on() {
    let up = echo_upstream().await;
    let key = "k-0123456789abcdef-test";
    let gw = Gateway::start(&format!(
        r#"
backends:
  chat: {{ type: http, endpoints: ["http://{up}"] }}
routes:
  - id: chat
    match: {{ method: GET, path: "/chat" }}
    backend: chat
    plugins:
      - api_key: {{ keys: ["{key}"], query: api_key }}
    websocket: {{}}
"#
    ))
    .await;
    // No key, a wrong key: 401 before any upgrade, with the challenge.
    for url in [
        ws_url(&gw, "/chat"),
        ws_url(&gw, "/chat?api_key=wrong-wrong-wrong-wrong"),
    ] {
        match tokio_tungstenite::connect_async(url).await {
            Err(tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 401);
                assert_eq!(
                    resp.headers()["www-authenticate"],
                    r#"ApiKey header="x-api-key""#
                );
                let body = json(&bytes::Bytes::from(resp.body().clone().unwrap_or_default()));
                assert_eq!(
                    body["type"], "urn:switchyard:problem:unauthorized",
                    "{body}"
                );
            }
            other => panic!("expected 401, got {other:?}"),
        }
    }
    // In the query (browsers) or the header: upgraded, and the upstream never sees the key.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(ws_url(&gw, &format!("/chat?room=1&api_key={key}")))
            .await
            .unwrap();
    assert_eq!(next_json(&mut ws).await["path"], "/chat?room=1");
    let (mut ws, _) =
        tokio_tungstenite::connect_async(ws_url(&gw, &format!("/chat?api%5Fkey={key}&x=1")))
            .await
            .unwrap();
    assert_eq!(next_json(&mut ws).await["path"], "/chat?x=1");
    // The header wins, and a stray query copy is removed all the same.
    let mut req = ws_url(&gw, "/chat?api_key=leak-me&api_key=again")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("x-api-key", key.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let seen = next_json(&mut ws).await;
    assert_eq!(seen["path"], "/chat", "{seen}");
}

#[tokio::test]
async fn a_websocket_bridges_both_ways_over_an_mqtt_3_1_1_backend() {
    let prefix = unique();
    let addr = mq::broker_addr().await;
    let yaml = config(
        &addr,
        &ws_route(
            "fixed311",
            "/ws/{device}",
            &format!(
                r#"mqtt: {{ subscribe: ["{prefix}/{{device}}/state"], publish: "{prefix}/{{device}}/cmd", qos: 1, acks: true }}"#
            ),
        ),
    )
    .replace("    keep_alive: 5s\n", "    keep_alive: 5s\n    protocol: v3.1.1\n");
    let gw = Gateway::start(&yaml).await;
    gw.wait_backend("devices", true).await;
    let mut outside = watch(&addr, &format!("{prefix}/+/cmd")).await;
    let mut ws = connect(&gw, "/ws/d1").await;
    let mqtt = publisher(&addr).await;
    mqtt.publish(format!("{prefix}/d1/state"), QoS::AtLeastOnce, false, "on")
        .await
        .unwrap();
    assert_eq!(next_text(&mut ws).await, "on");
    ws.send(Message::text("set 20")).await.unwrap();
    assert_eq!(
        next_json(&mut ws).await["seq"],
        1,
        "acknowledged after the PUBACK"
    );
    let p = outside.next().await;
    assert_eq!(&p.payload[..], b"set 20");
    assert!(
        p.properties
            .is_none_or(|pr| pr.payload_format_indicator.is_none()),
        "3.1.1 carries no properties"
    );
}

#[tokio::test]
async fn a_subscription_the_broker_refuses_gets_an_error_frame() {
    let broker = mq::PrivateBroker::start_with_subscribe_acl(&["open/#", "switchyard/#"]).await;
    let gw = Gateway::start(&config(
        &broker.addr(),
        &ws_route("live", "/ws", r##"mqtt: { allow: ["#"] }"##),
    ))
    .await;
    gw.wait_backend("devices", true).await;
    let mut ws = connect(&gw, "/ws").await;
    send_json(
        &mut ws,
        json!({"op": "subscribe", "topic": "closed/+/state", "id": "s1"}),
    )
    .await;
    let v = next_json(&mut ws).await;
    assert_eq!(v["op"], "error", "{v}");
    assert_eq!(v["error"], "subscription-refused", "{v}");
    assert_eq!(v["id"], "s1");
    // The socket stays open, and an allowed filter is granted.
    send_json(
        &mut ws,
        json!({"op": "subscribe", "topic": "open/+/state", "id": "s2"}),
    )
    .await;
    let v = next_json(&mut ws).await;
    assert_eq!(v["op"], "subscribed", "{v}");
}
