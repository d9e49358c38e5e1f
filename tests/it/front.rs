//! The front end: slowloris, idle keep-alive, TLS with h2 via ALPN and certificate reload,
//! graceful drain, the admin endpoints.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

fn routes(upstream: &str) -> String {
    format!(
        r#"
backends:
  up: {{ type: http, endpoints: ["{upstream}"] }}
routes:
  - id: r
    match: {{ path: "/{{*rest}}" }}
    backend: up
"#
    )
}

#[tokio::test]
async fn slowloris_connection_is_closed_and_others_are_served() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&format!(
        "server: {{ listen: \"127.0.0.1:0\", admin: \"127.0.0.1:0\", limits: {{ header_read_timeout: 300ms }} }}\n{}",
        routes(&up.url())
    ))
    .await;
    let mut slow = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
    slow.write_all(b"GET /x HTTP/1.1\r\nhost: a\r\nx-slow: ")
        .await
        .unwrap();
    // Meanwhile, a normal client is served.
    let (s, _, _) = get(&gw.url("/ok")).await;
    assert_eq!(s, 200);
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the slow connection was not closed");
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&format!(
        "server: {{ listen: \"127.0.0.1:0\", admin: \"127.0.0.1:0\", limits: {{ idle_timeout: 200ms }} }}\n{}",
        routes(&up.url())
    ))
    .await;
    let mut c = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
    c.write_all(b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = c.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Nothing more is sent; the gateway closes the connection.
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "idle connection was not closed");
}

fn write_cert(dir: &std::path::Path, name: &str) -> Vec<u8> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), name.to_string()])
        .unwrap();
    std::fs::write(dir.join("cert.pem.tmp"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem.tmp"), ck.signing_key.serialize_pem()).unwrap();
    std::fs::rename(dir.join("key.pem.tmp"), dir.join("key.pem")).unwrap();
    std::fs::rename(dir.join("cert.pem.tmp"), dir.join("cert.pem")).unwrap();
    ck.cert.der().to_vec()
}

async fn tls_connect(
    addr: std::net::SocketAddr,
    roots: &[Vec<u8>],
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Vec<u8>,
) {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store
            .add(rustls_pki_types::CertificateDer::from(r.clone()))
            .unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let peer = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (tls, peer)
}

#[tokio::test]
async fn tls_serves_h2_via_alpn_and_reloads_the_certificate() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let first = write_cert(dir.path(), "one.test");
    let yaml = format!(
        "server: {{ listen: \"127.0.0.1:0\", admin: \"127.0.0.1:0\", tls: {{ cert: {}, key: {} }} }}\n{}",
        dir.path().join("cert.pem").display(),
        dir.path().join("key.pem").display(),
        routes(&up.url())
    );
    let gw = Gateway::start(&yaml).await;

    let (tls, peer) = tls_connect(gw.listen, std::slice::from_ref(&first)).await;
    assert_eq!(peer, first);
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            http::Request::get("https://localhost/secure")
                .body(body(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(json(&b)["headers"]["x-forwarded-proto"], "https");

    // Replace the certificate on disk; new handshakes get the new one.
    let second = write_cert(dir.path(), "two.test");
    eventually("certificate was not reloaded", || async {
        let (_, peer) = tls_connect(gw.listen, &[first.clone(), second.clone()]).await;
        if peer == second { Ok(()) } else { Err(()) }
    })
    .await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&routes(&up.url())).await;
    let url = gw.url("/slow/500");
    let inflight = tokio::spawn(async move { get(&url).await });
    // Wait until the upstream has the request, then shut down.
    eventually("the upstream never got the request", || async {
        if up.hits() == 0 { Err(()) } else { Ok(()) }
    })
    .await;
    let listen = gw.listen;
    assert!(gw.shutdown().await, "drained within the grace period");
    let (s, _, _) = inflight.await.unwrap();
    assert_eq!(s, 200);
    assert!(
        tokio::net::TcpStream::connect(listen).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn admin_endpoints_report_state() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&routes(&up.url())).await;
    let (s, _, _) = get(&gw.url("/count")).await;
    assert_eq!(s, 200);
    let (s, v) = gw.admin_json("/healthz").await;
    assert_eq!((s.as_u16(), v["status"].as_str()), (200, Some("ok")));
    let (s, v) = gw.admin_json("/routes").await;
    assert_eq!(s, 200);
    assert_eq!(v["routes"][0]["id"], "r");
    assert_eq!(v["routes"][0]["backend"], "up");
    let (_, v) = gw.admin_json("/config").await;
    assert_eq!(v["version"], 1);
    assert!(v["hash"].is_string() && v["last_error"].is_null());
    let (s, _, b) = get(&gw.admin_url("/metrics")).await;
    assert_eq!(s, 200);
    let text = String::from_utf8_lossy(&b);
    assert!(
        text.contains(r#"switchyard_requests_total{route="r",method="GET",status="200"} 1"#),
        "{text}"
    );
    assert!(
        text.contains("switchyard_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("switchyard_open_connections"), "{text}");
    assert!(
        text.contains(r#"switchyard_config_reloads_total{result="applied"}"#),
        "{text}"
    );
}

#[tokio::test]
async fn connection_limit_makes_extra_connections_wait() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&format!(
        "server: {{ listen: \"127.0.0.1:0\", admin: \"127.0.0.1:0\", limits: {{ max_connections: 1 }} }}\n{}",
        routes(&up.url())
    ))
    .await;
    let mut first = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
    first
        .write_all(b"GET /a HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = first.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    // The second connection is not served while the first holds the only slot.
    let mut second = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
    second
        .write_all(b"GET /b HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let waited = tokio::time::timeout(Duration::from_millis(300), second.read(&mut buf)).await;
    assert!(waited.is_err(), "served beyond the connection limit");

    // Once the first leaves, the second is served.
    drop(first);
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut out))
        .await
        .expect("served after the slot was freed")
        .unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn h2c_preface_split_across_segments_is_still_http2() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&routes(&up.url())).await;
    let mut c = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
    c.set_nodelay(true).unwrap();
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    c.write_all(&preface[..10]).await.unwrap();
    // A slow client: the rest of the preface comes later, with an empty SETTINGS frame.
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.write_all(&preface[10..]).await.unwrap();
    c.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    // The gateway answers as an HTTP/2 server: its first frame is SETTINGS (type 4).
    let mut head = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut head))
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!(head[3], 4, "{head:?}");
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&format!(
        "server: {{ listen: \"127.0.0.1:0\", admin: \"127.0.0.1:0\", limits: {{ header_read_timeout: 200ms }} }}\n{}",
        routes(&up.url())
    ))
    .await;
    let mut silent = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the silent connection was not closed");
    assert!(buf.is_empty());
    let (s, _, _) = get(&gw.url("/ok")).await;
    assert_eq!(s, 200);
}

/// Checks `v` against `schema` (resolving `#/components/schemas/…` in `doc`): an object has
/// every `required` member and none that `properties` does not name; arrays are checked item
/// by item. Enough to keep the document and the answers from drifting apart.
fn conforms(doc: &serde_json::Value, schema: &serde_json::Value, v: &serde_json::Value, at: &str) {
    let schema = match schema.get("$ref").and_then(|r| r.as_str()) {
        Some(r) => {
            let name = r.rsplit('/').next().unwrap();
            &doc["components"]["schemas"][name]
        }
        None => schema,
    };
    if let Some(all) = schema.get("allOf").and_then(|a| a.as_array()) {
        let mut merged = schema.clone();
        let props = merged["properties"].as_object_mut().unwrap();
        for part in all {
            let part = &doc["components"]["schemas"]
                [part["$ref"].as_str().unwrap().rsplit('/').next().unwrap()];
            for (k, p) in part["properties"].as_object().unwrap() {
                props.insert(k.clone(), p.clone());
            }
        }
        return conforms(doc, &merged, v, at);
    }
    if let (Some(obj), Some(props)) = (
        v.as_object(),
        schema.get("properties").and_then(|p| p.as_object()),
    ) {
        for r in schema["required"].as_array().into_iter().flatten() {
            assert!(
                obj.contains_key(r.as_str().unwrap()),
                "{at}: `{r}` is required and missing: {v}"
            );
        }
        for (k, member) in obj {
            let p = props
                .get(k)
                .unwrap_or_else(|| panic!("{at}: `{k}` is not in the document's schema: {v}"));
            conforms(doc, p, member, &format!("{at}.{k}"));
        }
    }
    if let (Some(items), Some(schema)) = (v.as_array(), schema.get("items")) {
        for (i, item) in items.iter().enumerate() {
            conforms(doc, schema, item, &format!("{at}[{i}]"));
        }
    }
    if let (Some(obj), Some(each)) = (
        v.as_object(),
        schema.get("additionalProperties").filter(|a| a.is_object()),
    ) {
        for (k, member) in obj {
            conforms(doc, each, member, &format!("{at}.{k}"));
        }
    }
}

#[tokio::test]
async fn the_admin_api_answers_as_its_openapi_document_says() {
    let dead = free_port().await;
    let gw = Gateway::start(&format!(
        r#"
state: {{ spool: {{ retry: {{ min: 50ms, max: 300ms }} }} }}
backends:
  rabbit: {{ type: amqp, url: "amqp://guest:guest@{dead}/%2f", connect_timeout: 200ms }}
routes:
  - id: orders
    match: {{ method: POST, path: "/orders" }}
    backend: rabbit
    amqp: {{ exchange: "x", routing_key: "k" }}
    spool: true
"#
    ))
    .await;
    // Something in the spool, so that its answer is not empty.
    let (s, _, b) = send(
        http::Request::post(gw.url("/orders"))
            .body(body("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    let (s, doc) = gw.admin_json("/openapi.json").await;
    assert_eq!(s, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/healthz",
        "/readyz",
        "/config",
        "/routes",
        "/spool",
        "/dead-letters",
        "/stats",
        "/stats/history",
    ] {
        let (s, v) = gw.admin_json(path).await;
        let answer = &paths[path]["get"]["responses"][s.as_str()];
        assert!(
            answer.is_object(),
            "{path} answered {s}, which the document does not list"
        );
        let schema = &answer["content"]["application/json"]["schema"];
        conforms(&doc, schema, &v, path);
    }
    // A problem answer, and a reload's.
    let (s, v) = gw.admin_json("/dead-letters/nope").await;
    assert_eq!(s, 404);
    conforms(
        &doc,
        &serde_json::json!({ "$ref": "#/components/schemas/Problem" }),
        &v,
        "problem",
    );
    let (s, b) = gw.reload().await;
    let answer = &paths["/reload"]["post"]["responses"][s.as_str()];
    conforms(
        &doc,
        &answer["content"]["application/json"]["schema"],
        &json(&b),
        "/reload",
    );
    // Every path the document names is served (no 404 from the router for a documented path).
    // Only the answer's head is read: `/events` streams for as long as the client stays.
    for path in paths.keys().filter(|p| !p.contains('{')) {
        let resp = client()
            .request(
                http::Request::get(gw.admin_url(path))
                    .body(body(""))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_ne!(resp.status(), 404, "{path}");
    }
}

#[tokio::test]
async fn the_dashboard_and_its_live_stats_are_served_by_the_admin_listener() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&users_route(&up.url())).await;
    for i in 0..3 {
        assert_eq!(get(&gw.url(&format!("/users/{i}"))).await.0, 200);
    }
    assert_eq!(get(&gw.url("/status/x")).await.0, 404);

    // The page and its assets, with a strict policy.
    let (s, h, _) = get(&gw.admin_url("/ui")).await;
    assert_eq!((s.as_u16(), h["location"].to_str().unwrap()), (308, "/ui/"));
    let (s, h, b) = get(&gw.admin_url("/ui/")).await;
    assert_eq!(s, 200);
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert!(
        h["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'self'")
    );
    assert!(String::from_utf8_lossy(&b).contains("/ui/app.js"));
    for (path, ct) in [
        ("/ui/app.js", "text/javascript"),
        ("/ui/style.css", "text/css"),
    ] {
        let (s, h, _) = get(&gw.admin_url(path)).await;
        assert_eq!(s, 200, "{path}");
        assert!(
            h["content-type"].to_str().unwrap().starts_with(ct),
            "{path}"
        );
    }
    let (s, _, b) = get(&gw.admin_url("/ui/nope.js")).await;
    assert_eq!(
        (s.as_u16(), json(&b)["type"].as_str()),
        (404, Some("urn:switchyard:problem:not-found"))
    );

    // The stats: the route's answers in classes and latency buckets, and the unrouted 404.
    let (s, v) = gw.admin_json("/stats").await;
    assert_eq!(s, 200);
    let route = |v: &serde_json::Value, id: &str| {
        v["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["route"] == id)
            .cloned()
            .unwrap()
    };
    let users = route(&v, "users");
    assert_eq!(users["requests"], 3);
    assert_eq!(users["status"]["2xx"], 3);
    let buckets = users["latency"].as_array().unwrap();
    assert_eq!(
        buckets.len(),
        v["latency_bounds"].as_array().unwrap().len() + 1
    );
    assert_eq!(buckets.iter().map(|b| b.as_u64().unwrap()).sum::<u64>(), 3);
    assert_eq!(route(&v, "-")["status"]["4xx"], 1);
    assert_eq!(v["backends"]["up"]["ready"], true);
    assert!(v["spool"].is_null());

    // The event stream: stats at once, then again, the counts moving.
    let resp = client()
        .request(
            http::Request::get(gw.admin_url("/events?interval=200ms"))
                .body(body(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = resp.into_body();
    let mut text = String::new();
    let mut events = Vec::new();
    while events.len() < 2 {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(5), stream.frame())
            .await
            .expect("an event within 5 s")
            .unwrap()
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
        while let Some(end) = text.find("\n\n") {
            let ev: String = text.drain(..end + 2).collect();
            assert!(ev.starts_with("event: stats\ndata: "), "{ev}");
            let data = ev.trim_end().trim_start_matches("event: stats\ndata: ");
            events.push(serde_json::from_str::<serde_json::Value>(data).unwrap());
            if events.len() == 1 {
                assert_eq!(get(&gw.url("/users/9")).await.0, 200);
            }
        }
    }
    assert!(events[1]["at_ms"].as_u64() > events[0]["at_ms"].as_u64());
    assert_eq!(route(&events[0], "users")["requests"], 3);
    assert_eq!(route(&events[1], "users")["requests"], 4);

    let (s, _, b) = get(&gw.admin_url("/events?interval=1ms")).await;
    assert_eq!(
        (s.as_u16(), json(&b)["field"].as_str()),
        (400, Some("interval"))
    );
    let (s, _, _) = send(
        http::Request::post(gw.admin_url("/stats"))
            .body(body(""))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 405);
}
