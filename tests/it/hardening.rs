//! Hardening at the edge (issue 17), against real brokers and upstreams: request values that
//! would change the meaning of a broker name are refused before anything reaches the broker,
//! no request can break a shared connection, and a client's own faults never count against a
//! backend.

use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::support::amqp as rabbit;
use crate::support::mqtt as mq;
use crate::support::*;

/// The status and problem body of a WebSocket handshake that must be refused.
async fn refused_handshake(url: &str) -> (StatusCode, serde_json::Value) {
    match tokio_tungstenite::connect_async(url).await {
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            (
                resp.status(),
                serde_json::from_slice(&body).unwrap_or_default(),
            )
        }
        Ok(_) => panic!("{url}: the handshake was accepted"),
        Err(e) => panic!("{url}: {e}"),
    }
}

/// A counter of `/metrics`, 0 when absent.
async fn metric(gw: &Gateway, line_start: &str) -> f64 {
    let (_, _, b) = get(&gw.admin_url("/metrics")).await;
    String::from_utf8_lossy(&b)
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn amqp_binding_and_routing_keys_take_one_word_per_value() {
    let url = rabbit::broker_url().await;
    let x = rabbit::unique("bind-x");
    let q = rabbit::unique("bind-q");
    let gw = Gateway::start(&format!(
        r##"{backend}
routes:
  - id: live
    match: {{ method: GET, path: "/v1/customers/{{customer}}/orders/live" }}
    backend: rabbit
    websocket:
      amqp: {{ consume: {{ bind: [{{ exchange: "{x}", routing_key: "order.{{customer}}.#" }}] }} }}
  - id: publish
    match: {{ method: POST, path: "/v1/orders/{{region}}" }}
    backend: rabbit
    amqp: {{ exchange: "{x}", routing_key: "order.{{region}}.created" }}
  - id: publish-spanning
    match: {{ method: POST, path: "/v2/orders/{{region}}" }}
    backend: rabbit
    amqp: {{ exchange: "{x}", routing_key: "order.{{region}}", multi_word: [region] }}
"##,
        backend = rabbit::rabbit_backend(&url, &x, &q)
    ))
    .await;
    gw.wait_backend("rabbit", true).await;
    let ws = |p: &str| format!("ws://{}{}", gw.listen, p);

    // A wildcard or a dot in the customer would bind other customers' messages.
    for bad in ["*", "%2A", "%23", "a.b", "a%2Eb", "%01", "%C2%85"] {
        let (status, problem) =
            refused_handshake(&ws(&format!("/v1/customers/{bad}/orders/live"))).await;
        assert_eq!(status, 400, "{bad}: {problem}");
        assert_eq!(problem["field"], "customer", "{bad}: {problem}");
    }

    // A socket of customer c1 hears c1's orders and never c2's.
    let (mut c1, _) = tokio_tungstenite::connect_async(ws("/v1/customers/c1/orders/live"))
        .await
        .unwrap();
    let conn = rabbit::client().await;
    let ch = conn.create_channel().await.unwrap();
    for key in ["order.c2.created", "order.c1.created"] {
        ch.basic_publish(
            x.as_str().into(),
            key.into(),
            Default::default(),
            key.as_bytes(),
            Default::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let first = tokio::time::timeout(std::time::Duration::from_secs(5), c1.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first, Message::text("order.c1.created"));
    c1.send(Message::Close(None)).await.ok();

    // A publish's routing key: one word per value unless the route lets it span words.
    let before = rabbit::depth(&conn, &q).await;
    for bad in ["eu.west", "%2A", "%23", "e%09u"] {
        let (s, _, b) = send(
            request(Method::POST, &gw.url(&format!("/v1/orders/{bad}")))
                .body(body("{}"))
                .unwrap(),
        )
        .await;
        assert_eq!(s, 400, "{bad}");
        assert_eq!(json(&b)["field"], "region", "{bad}");
    }
    assert_eq!(
        rabbit::depth(&conn, &q).await,
        before,
        "nothing was published"
    );
    let (s, _, _) = send(
        request(Method::POST, &gw.url("/v2/orders/eu.west"))
            .body(body("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 202);
    for bad in ["eu..west", ".eu", "eu.%23"] {
        let (s, _, _) = send(
            request(Method::POST, &gw.url(&format!("/v2/orders/{bad}")))
                .body(body("{}"))
                .unwrap(),
        )
        .await;
        assert_eq!(s, 400, "{bad}");
    }
    assert_eq!(rabbit::depth(&conn, &q).await, before + 1);
    rabbit::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn mqtt_values_that_would_break_the_shared_connection_are_refused() {
    let addr = mq::broker_addr().await;
    let base = format!("sy-hard/{}", uuid::Uuid::now_v7().simple());
    let gw = Gateway::start(&format!(
        r#"
backends:
  devices: {{ type: mqtt, url: "mqtt://{addr}", client_id: "gw-{id}", keep_alive: 5s }}
routes:
  - id: set
    match: {{ method: PUT, path: "/d/{{device}}/set" }}
    backend: devices
    mqtt: {{ topic: "{base}/{{device}}/set", qos: 1 }}
  - id: by-query
    match: {{ method: PUT, path: "/q/set" }}
    backend: devices
    mqtt: {{ topic: "{base}/{{query.d}}/set", qos: 1 }}
  - id: events
    match: {{ method: GET, path: "/d/{{device}}/events" }}
    backend: devices
    mqtt: {{ topic: "{base}/{{device}}/events", subscribe: true }}
  - id: last
    match: {{ method: GET, path: "/d/{{device}}/last" }}
    backend: devices
    mqtt: {{ topic: "{base}/{{device}}/last", last_value: true, wait: 200ms }}
  - id: top
    match: {{ method: PUT, path: "/t/{{device}}" }}
    backend: devices
    mqtt: {{ topic: "{{device}}/x", qos: 1 }}
  - id: socket
    match: {{ method: GET, path: "/d/{{device}}/socket" }}
    backend: devices
    websocket:
      mqtt: {{ subscribe: ["{base}/{{device}}/out"], publish: "{base}/{{device}}/in" }}
  - id: ops
    match: {{ method: GET, path: "/ops" }}
    backend: devices
    websocket:
      mqtt: {{ allow: ["{base}/#"] }}
"#,
        id = uuid::Uuid::now_v7().simple()
    ))
    .await;
    gw.wait_backend("devices", true).await;
    let disconnects = "switchyard_broker_events_total{backend=\"devices\",event=\"disconnected\"}";

    let bad = [
        "%01", "%1B", "%7F", "%C2%80", "%C2%9F", "%FF", "%FE", "a%2Fb", "%2B", "%23",
    ];
    for v in bad {
        for (method, path) in [
            (Method::PUT, format!("/d/{v}/set")),
            (Method::PUT, format!("/q/set?d={v}")),
            (Method::GET, format!("/d/{v}/events")),
            (Method::GET, format!("/d/{v}/last")),
        ] {
            let (s, _, b) = send(request(method, &gw.url(&path)).body(body("1")).unwrap()).await;
            assert_eq!(s, 400, "{path}: {}", String::from_utf8_lossy(&b));
            let field = if path.starts_with("/q/") {
                "query.d"
            } else {
                "device"
            };
            assert_eq!(json(&b)["field"], field, "{path}");
        }
        let (s, p) = refused_handshake(&format!("ws://{}/d/{v}/socket", gw.listen)).await;
        assert_eq!(
            (s, p["field"].as_str()),
            (StatusCode::BAD_REQUEST, Some("device"))
        );
    }
    // `$` topics belong to the broker: a value may not start one.
    let (s, _, _) = send(
        request(Method::PUT, &gw.url("/t/$SYS"))
            .body(body("1"))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 400);

    // Operations on a socket: a control character in a frame's topic is an error frame.
    let (mut ops, _) = tokio_tungstenite::connect_async(format!("ws://{}/ops", gw.listen))
        .await
        .unwrap();
    for op in ["subscribe", "publish"] {
        let frame = serde_json::json!({"op": op, "topic": format!("{base}/a\u{1}b"), "id": op});
        ops.send(Message::text(frame.to_string())).await.unwrap();
        let reply = loop {
            match ops.next().await.unwrap().unwrap() {
                Message::Text(t) => break serde_json::from_str::<serde_json::Value>(&t).unwrap(),
                _ => continue,
            }
        };
        assert_eq!(reply["op"], "error", "{reply}");
        assert_eq!(reply["field"], "topic", "{reply}");
    }

    // The shared connection never dropped, and a good publish still goes through.
    assert_eq!(metric(&gw, disconnects).await, 0.0);
    let mut sub = mq::Subscriber::start(
        &addr,
        &format!("t-{}", uuid::Uuid::now_v7()),
        &format!("{base}/ok/set"),
    )
    .await;
    let (s, _, _) = send(
        request(Method::PUT, &gw.url("/d/ok/set"))
            .body(body("21"))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 202);
    let got = tokio::time::timeout(std::time::Duration::from_secs(5), sub.rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got.payload[..], b"21");
    assert_eq!(metric(&gw, disconnects).await, 0.0);
}

/// Sends `raw` on a new connection (then half-closes it when `close`) and returns the status
/// the gateway answered, or `None` when it closed without one.
pub(crate) async fn raw_status(gw: &Gateway, raw: &[u8], close: bool) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
    s.write_all(raw).await.unwrap();
    if close {
        s.shutdown().await.unwrap();
    }
    let mut buf = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the gateway neither answered nor closed");
    let head = String::from_utf8_lossy(&buf);
    head.split(' ').nth(1).and_then(|c| c.parse().ok())
}

#[tokio::test]
async fn a_clients_broken_or_slow_body_is_its_own_fault_never_the_backends() {
    let (a, b) = (Upstream::start().await, Upstream::start().await);
    let url = rabbit::broker_url().await;
    let (x, q) = (rabbit::unique("body-x"), rabbit::unique("body-q"));
    let rabbit = rabbit::rabbit_backend(&url, &x, &q);
    let gw = Gateway::start(&format!(
        r#"{rabbit}
  up:
    type: http
    endpoints: ["{}", "{}"]
    eject_after_failures: 2
    breaker: {{ consecutive_failures: 3, open_for: 60s }}
routes:
  - id: up
    match: {{ path: "/up" }}
    backend: up
    timeout: 400ms
    retry: {{ attempts: 3, backoff: 10ms, on: [reset, connect-failure, timeout] }}
    idempotent: true
  - id: publish
    match: {{ method: POST, path: "/pub" }}
    backend: rabbit
    timeout: 400ms
    amqp: {{ exchange: "{x}", routing_key: "k" }}
"#,
        a.url(),
        b.url()
    ))
    .await;
    gw.wait_backend("rabbit", true).await;
    for path in ["/up", "/pub"] {
        for _ in 0..4 {
            // A malformed chunk size.
            let malformed = format!(
                "POST {path} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"
            );
            assert_eq!(
                raw_status(&gw, malformed.as_bytes(), false).await,
                Some(400),
                "{path}"
            );
            // A body cut short: the client half-closes after 5 of 100 bytes.
            let cut =
                format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nhello");
            let status = raw_status(&gw, cut.as_bytes(), true).await;
            assert!(matches!(status, None | Some(400)), "{path}: {status:?}");
            // A body that never finishes: 408, not 504.
            let slow = format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nhel");
            assert_eq!(
                raw_status(&gw, slow.as_bytes(), false).await,
                Some(408),
                "{path}"
            );
        }
    }
    // No breaker opened, no endpoint was ejected, no backend error was counted.
    let (_, _, m) = get(&gw.admin_url("/metrics")).await;
    let m = String::from_utf8_lossy(&m);
    assert!(
        m.contains(r#"switchyard_breaker_state{backend="up"} 0"#),
        "{m}"
    );
    assert!(!m.contains("switchyard_backend_errors_total{"), "{m}");
    assert!(!m.contains("switchyard_retries_total{"), "{m}");
    let (a0, b0) = (a.hits(), b.hits());
    for _ in 0..4 {
        let (s, _, _) = send(
            request(Method::POST, &gw.url("/up"))
                .body(body("ok"))
                .unwrap(),
        )
        .await;
        assert_eq!(s, 200);
    }
    assert!(a.hits() > a0 && b.hits() > b0, "both endpoints still serve");
    let conn = rabbit::client().await;
    rabbit::cleanup(&conn, &[&x], &[&q]).await;
}

/// Sends `raw` (which asks for `Connection: close`) and returns the whole answer as text.
async fn raw_exchange(addr: std::net::SocketAddr, raw: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("the gateway closes the connection")
        .ok();
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn headers_named_by_connection_go_before_the_gateway_adds_its_own() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&format!(
        r#"
backends:
  up: {{ type: http, endpoints: ["{}"] }}
routes:
  - id: up
    match: {{ path: "/echo" }}
    backend: up
    plugins:
      - headers: {{ request: {{ set: {{ x-gateway: switchyard }} }} }}
"#,
        up.url()
    ))
    .await;
    let answer = raw_exchange(
        gw.listen,
        b"GET /echo HTTP/1.1\r\nhost: x\r\nx-request-id: client-chosen\r\nx-secret: 1\r\n\
          connection: close, x-request-id, traceparent, x-gateway, x-secret, host\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    let echoed: serde_json::Value = serde_json::from_str(body).unwrap();
    let h = &echoed["headers"];
    assert_eq!(h["x-gateway"], "switchyard", "{echoed}");
    assert!(h["traceparent"].is_string(), "{echoed}");
    assert!(h["x-forwarded-for"].is_string(), "{echoed}");
    let cid = h["x-request-id"].as_str().expect("the gateway's own id");
    assert_ne!(
        cid, "client-chosen",
        "a hop-by-hop header never reaches the gateway's checks"
    );
    assert!(h.get("x-secret").is_none(), "{echoed}");
    assert!(h.get("connection").is_none(), "{echoed}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains(&format!("x-request-id: {cid}")),
        "{answer}"
    );
}

#[tokio::test]
async fn lenient_framing_is_refused_and_head_is_served_where_get_is() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&format!(
        r#"
backends:
  up: {{ type: http, endpoints: ["{}"] }}
routes:
  - {{ id: get, match: {{ method: GET, path: "/echo" }}, backend: up }}
  - {{ id: post, match: {{ method: POST, path: "/in" }}, backend: up }}
"#,
        up.url()
    ))
    .await;
    let status = |answer: &str| answer.split(' ').nth(1).unwrap_or("").to_string();
    // Two Host headers (RFC 9112 §3.2).
    let a = raw_exchange(
        gw.listen,
        b"GET /echo HTTP/1.1\r\nhost: a\r\nhost: b\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&a), "400", "{a}");
    assert!(a.contains("header.host"), "{a}");
    // A transfer coding other than chunked alone is not silently dropped.
    for te in ["gzip, chunked", "chunked, chunked", "identity"] {
        let a = raw_exchange(
            gw.listen,
            format!(
                "POST /in HTTP/1.1\r\nhost: a\r\ntransfer-encoding: {te}\r\nconnection: close\r\n\r\n0\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert!(matches!(status(&a).as_str(), "501" | "400"), "{te}: {a}");
        assert_eq!(up.hits(), 0, "{te}: nothing reached the upstream");
    }
    let a = raw_exchange(
        gw.listen,
        b"POST /in HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip, chunked\r\nconnection: close\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status(&a), "501", "{a}");
    // HTTP/2: a host header that differs from :authority.
    let req = http::Request::get(gw.url("/echo"))
        .header("host", "elsewhere.example")
        .body(body(""))
        .unwrap();
    let resp = h2c_client().request(req).await.unwrap();
    assert_eq!(resp.status(), 400);
    let req = http::Request::get(gw.url("/echo")).body(body("")).unwrap();
    assert_eq!(h2c_client().request(req).await.unwrap().status(), 200);
    // HEAD is served by the GET route, without a body; 405s list HEAD with GET.
    let a = raw_exchange(
        gw.listen,
        b"HEAD /echo HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&a), "200", "{a}");
    assert!(a.ends_with("\r\n\r\n"), "no body: {a}");
    let (s, h, _) = send(
        request(Method::DELETE, &gw.url("/echo"))
            .body(body(""))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 405);
    assert_eq!(h["allow"], "GET, HEAD");
}

/// Polls `/config` until `f` holds for it.
async fn wait_config(gw: &Gateway, what: &str, f: impl Fn(&serde_json::Value) -> bool) {
    eventually(what, || async {
        let (_, v) = gw.admin_json("/config").await;
        if f(&v) { Ok(()) } else { Err(v) }
    })
    .await
}

#[tokio::test]
async fn reverting_the_file_clears_the_last_error() {
    let up = Upstream::start().await;
    let good = format!(
        "backends:\n  up: {{ type: http, endpoints: [\"{}\"] }}\nroutes:\n  - {{ id: a, match: {{ path: /a }}, backend: up }}\n",
        up.url()
    );
    let gw = Gateway::start(&good).await;
    let running = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(
        gw.config_path(),
        running.replace("backend: up", "backend: nope"),
    )
    .unwrap();
    wait_config(&gw, "the broken file is reported", |v| {
        v["last_error"].as_str().is_some_and(|e| e.contains("nope"))
    })
    .await;
    std::fs::write(gw.config_path(), &running).unwrap();
    wait_config(&gw, "the revert clears it", |v| v["last_error"].is_null()).await;
    assert_eq!(gw.version().await, 1, "a revert is not a new version");
}

#[tokio::test]
async fn a_large_reload_never_stops_the_old_table_serving() {
    let up = Upstream::start().await;
    let mut yaml = format!(
        "backends:\n  up: {{ type: http, endpoints: [\"{}\"] }}\nroutes:\n  - {{ id: a, match: {{ path: /a }}, backend: up }}\n",
        up.url()
    );
    let gw = Gateway::start_with(&yaml, false).await;
    let head = std::fs::read_to_string(gw.config_path()).unwrap();
    let mut big = head.clone();
    for i in 0..4000 {
        big.push_str(&format!(
            "  - {{ id: r{i}, match: {{ path: \"/gen/{i}/{{x}}\" }}, backend: up, timeout: 5s }}\n"
        ));
    }
    yaml.clear();
    std::fs::write(gw.config_path(), &big).unwrap();
    // The reload runs while requests are served; on the test's single-threaded runtime they
    // could not be answered before it finishes if the parse or build held the worker.
    let admin = gw.admin_url("/reload");
    let reload =
        tokio::spawn(async move { send(http::Request::post(admin).body(body("")).unwrap()).await });
    let mut served_during = 0;
    while !reload.is_finished() {
        let (s, _, _) = get(&gw.url("/a")).await;
        assert_eq!(s, 200);
        served_during += 1;
    }
    let (s, _, b) = reload.await.unwrap();
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert!(
        served_during >= 3,
        "only {served_during} requests were served during the reload"
    );
    assert_eq!(get(&gw.url("/gen/3999/x")).await.0, 200);
}

#[tokio::test]
async fn a_second_instance_fails_before_it_connects_to_any_broker() {
    let mosquitto = mq::broker_addr().await;
    let proxy = rabbit::BrokerProxy::start_to(mosquitto).await;
    let yaml = format!(
        r#"
backends:
  devices: {{ type: mqtt, url: "mqtt://{}", client_id: "gw-{}", keep_alive: 5s }}
routes:
  - {{ id: set, match: {{ method: PUT, path: "/d/{{d}}" }}, backend: devices, mqtt: {{ topic: "sy-hard/{{d}}" }} }}
"#,
        proxy.addr,
        uuid::Uuid::now_v7().simple()
    );
    let first = Gateway::start(&yaml).await;
    first.wait_backend("devices", true).await;
    assert_eq!(proxy.sessions(), 1);
    // The same file, the same ports: the second instance fails on its listener...
    let taken = format!(
        "server: {{ listen: \"{}\", admin: \"127.0.0.1:0\" }}\n{yaml}",
        first.listen
    );
    let err = start_error(&taken).await;
    assert!(err.contains("cannot listen"), "{err}");
    // ...without ever opening a connection to the broker (which would take over the client id).
    let (s, _, _) = send(
        request(Method::PUT, &first.url("/d/x"))
            .body(body("1"))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 202);
    assert_eq!(
        proxy.sessions(),
        1,
        "the second instance connected to the broker"
    );
}

#[tokio::test]
async fn credentials_never_leave_in_errors_and_userinfo_is_refused_where_meaningless() {
    let secret = "hunter2-do-not-print";
    let gw = Gateway::start_with(
        &format!(
            r#"
backends:
  rabbit: {{ type: amqp, url: "amqp://guest:{secret}@127.0.0.1:1/%2f", connect_timeout: 200ms, reconnect: {{ min: 50ms, max: 100ms }} }}
routes: []
"#
        ),
        false,
    )
    .await;
    // A broker that cannot be reached: the problem /readyz shows carries no password.
    gw.wait_backend("rabbit", false).await;
    let ready = eventually("the backend reports its problem", || async {
        let (_, ready) = gw.admin_json("/readyz").await;
        if ready["backends"]["rabbit"]["problem"].is_string() {
            Ok(ready)
        } else {
            Err(ready)
        }
    })
    .await;
    assert!(!ready.to_string().contains(secret), "{ready}");

    // Endpoints with user info are refused, and nothing printed holds the password.
    std::fs::write(
        gw.config_path(),
        format!(
            r#"server: {{ listen: "127.0.0.1:0", admin: "127.0.0.1:0" }}
backends:
  up: {{ type: http, endpoints: ["http://user:{secret}@127.0.0.1:9/"] }}
  g: {{ type: grpc, endpoints: ["http://user:{secret}@127.0.0.1:9"], protos: [x.proto] }}
  m: {{ type: mqtt, url: "mqtt://user:{secret}@127.0.0.1:1883" }}
  rabbit: {{ type: amqp, url: "amqp://guest:{secret}@127.0.0.1:1/%2f", connect_timeout: 0s }}
state: {{ store: redis, redis: {{ url: "http://default:{secret}@127.0.0.1:6379" }} }}
routes: []
"#
        ),
    )
    .unwrap();
    let (s, b) = gw.reload().await;
    assert_eq!(s, 422);
    let text = String::from_utf8_lossy(&b);
    assert!(!text.contains(secret), "{text}");
    assert_eq!(text.matches("user info").count(), 3, "{text}");
    // A message that quotes the URL shows it with the password redacted.
    assert!(text.contains("http://default:***@127.0.0.1:6379"), "{text}");
    let (_, config) = gw.admin_json("/config").await;
    assert!(config["last_error"].is_string());
    assert!(!config.to_string().contains(secret), "{config}");
}

#[tokio::test]
async fn open_event_streams_end_with_a_final_event_on_shutdown() {
    use http_body_util::BodyExt;
    let addr = mq::broker_addr().await;
    let base = format!("sy-hard/{}", uuid::Uuid::now_v7().simple());
    let gw = Gateway::start(&format!(
        r#"
server: {{ listen: "127.0.0.1:0", admin: "127.0.0.1:0", shutdown_grace: 10s }}
backends:
  devices: {{ type: mqtt, url: "mqtt://{addr}", client_id: "gw-{id}", keep_alive: 5s }}
routes:
  - id: events
    match: {{ method: GET, path: "/d/{{device}}/events" }}
    backend: devices
    mqtt: {{ topic: "{base}/{{device}}/events", subscribe: true }}
"#,
        id = uuid::Uuid::now_v7().simple()
    ))
    .await;
    gw.wait_backend("devices", true).await;
    let resp = client()
        .request(
            request(Method::GET, &gw.url("/d/k/events"))
                .body(body(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let reader =
        tokio::spawn(async move { resp.into_body().collect().await.map(|b| b.to_bytes()) });
    let started = tokio::time::Instant::now();
    assert!(
        gw.shutdown().await,
        "the stream held shutdown for the whole grace period"
    );
    let body = reader.await.unwrap().expect("the stream ended cleanly");
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.ends_with("retry: 1000\n\n") && text.contains("event: shutdown"),
        "{text}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

/// A TCP proxy to `upstream` that plays a broker closing the connection over a packet: any
/// client bytes holding `marker` cut that connection. Counts the connections it accepted.
struct PoisonProxy {
    addr: std::net::SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PoisonProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PoisonProxy {
    async fn start(upstream: String, marker: &'static [u8]) -> PoisonProxy {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let down = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    });
                    let mut buf = vec![0u8; 65536];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if buf[..n].windows(marker.len()).any(|w| w == marker) {
                            break;
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    down.abort();
                });
            }
        });
        PoisonProxy {
            addr,
            accepted,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test]
async fn a_subscription_the_broker_drops_the_connection_over_is_refused_without_a_storm() {
    let proxy = PoisonProxy::start(mq::broker_addr().await, b"poison").await;
    let base = format!("sy-hard/{}", uuid::Uuid::now_v7().simple());
    let gw = Gateway::start(&format!(
        r#"
backends:
  devices:
    type: mqtt
    url: "mqtt://{}"
    client_id: "gw-{id}"
    keep_alive: 5s
    reconnect: {{ min: 20ms, max: 50ms }}
routes:
  - id: events
    match: {{ method: GET, path: "/d/{{device}}/events" }}
    backend: devices
    mqtt: {{ topic: "{base}/{{device}}/events", subscribe: true }}
  - id: set
    match: {{ method: PUT, path: "/d/{{device}}" }}
    backend: devices
    mqtt: {{ topic: "{base}/{{device}}/set" }}
"#,
        proxy.addr,
        id = uuid::Uuid::now_v7().simple()
    ))
    .await;
    gw.wait_backend("devices", true).await;
    let before = proxy.accepted();
    // The broker "closes the connection" each time this filter is asked for.
    let (s, _, b) = get(&gw.url("/d/poison/events")).await;
    assert_eq!(s, 502, "{}", String::from_utf8_lossy(&b));
    let problem = json(&b);
    assert_eq!(
        problem["type"], "urn:switchyard:problem:subscription-refused",
        "{problem}"
    );
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("closed the connection"),
        "{problem}"
    );
    let reconnects = proxy.accepted() - before;
    assert!(reconnects <= 4, "{reconnects} reconnects for one request");
    // The connection is back and serves the others; the filter is not asked again.
    gw.wait_backend("devices", true).await;
    let settled = proxy.accepted();
    let (s, _, b) = send(
        request(Method::PUT, &gw.url("/d/k"))
            .body(body("1"))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    assert_eq!(proxy.accepted(), settled, "no reconnect after the refusal");
}
