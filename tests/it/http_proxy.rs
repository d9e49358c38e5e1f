//! Proxying through the HTTP backend: rewrites, forwarded headers, correlation and trace
//! context, streaming bodies both ways, round robin.

use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;

use crate::support::*;

fn yaml(upstream: &str) -> String {
    format!(
        r#"
backends:
  up: {{ type: http, endpoints: ["{upstream}"] }}
routes:
  - id: strip
    match: {{ path: "/api/{{*rest}}" }}
    backend: up
    http: {{ strip_prefix: /api }}
  - id: rewrite
    match: {{ method: GET, path: "/v1/users/{{id}}" }}
    backend: up
    http: {{ rewrite: "/users/{{id}}/profile" }}
  - id: plain
    match: {{ path: "/plain/{{*rest}}" }}
    backend: up
    max_body_size: 1KiB
    plugins:
      - headers:
          request: {{ set: {{ x-added: yes }}, remove: [x-drop] }}
          response: {{ set: {{ x-resp: 1 }}, remove: [x-upstream] }}
"#
    )
}

#[tokio::test]
async fn rewrites_paths_and_sets_forwarded_headers() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&yaml(&up.url())).await;

    let (s, _, b) = get(&gw.url("/api/things/7?x=1")).await;
    assert_eq!(s, 200);
    let v = json(&b);
    assert_eq!(v["path"], "/things/7");
    assert_eq!(v["uri"], "/things/7?x=1");
    assert_eq!(v["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(v["headers"]["x-forwarded-proto"], "http");
    assert_eq!(v["headers"]["x-forwarded-host"], gw.listen.to_string());
    assert_eq!(v["headers"]["host"], up.addr.to_string());

    let (s, _, b) = get(&gw.url("/v1/users/42")).await;
    assert_eq!(s, 200);
    assert_eq!(json(&b)["path"], "/users/42/profile");

    // A value that an upstream decoding before routing would split is refused.
    let hits = up.hits();
    for bad in ["a%2F..%2Fadmin", "a%2fb", "a%5Cb"] {
        let (s, _, b) = get(&gw.url(&format!("/v1/users/{bad}"))).await;
        assert_eq!(s, 400, "{bad}");
        assert_eq!(json(&b)["field"], "id", "{bad}");
    }
    assert_eq!(up.hits(), hits, "nothing reached the upstream");
}

#[tokio::test]
async fn correlation_id_is_minted_forwarded_and_echoed() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&yaml(&up.url())).await;

    let (_, h, b) = get(&gw.url("/plain/a")).await;
    let minted = h["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(uuid::Uuid::parse_str(&minted).unwrap().get_version_num(), 7);
    assert_eq!(json(&b)["headers"]["x-request-id"], minted.as_str());
    let tp = json(&b)["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(tp.len(), 55, "a new trace is started: {tp}");

    let req = request(Method::GET, &gw.url("/plain/a"))
        .header("x-request-id", "client-chosen-1")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body(body(""))
        .unwrap();
    let (_, h, b) = send(req).await;
    assert_eq!(h["x-request-id"], "client-chosen-1");
    let v = json(&b);
    assert_eq!(v["headers"]["x-request-id"], "client-chosen-1");
    let tp = v["headers"]["traceparent"].as_str().unwrap();
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );
    assert!(
        !tp.contains("00f067aa0ba902b7"),
        "a new span id is used: {tp}"
    );

    // Errors carry it too.
    let req = request(Method::GET, &gw.url("/nowhere"))
        .header("x-request-id", "err-id")
        .body(body(""))
        .unwrap();
    let (s, h, b) = send(req).await;
    assert_eq!(s, 404);
    assert_eq!(h["x-request-id"], "err-id");
    assert_eq!(json(&b)["correlation_id"], "err-id");
}

#[tokio::test]
async fn removes_hop_by_hop_headers_and_applies_header_plugin() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&yaml(&up.url())).await;
    let req = request(Method::GET, &gw.url("/plain/x"))
        .header("connection", "x-secret")
        .header("x-secret", "1")
        .header("x-drop", "1")
        .header("te", "trailers")
        .body(body(""))
        .unwrap();
    let (s, h, b) = send(req).await;
    assert_eq!(s, 200);
    let v = json(&b);
    assert!(v["headers"].get("x-secret").is_none());
    assert!(v["headers"].get("te").is_none());
    assert!(v["headers"].get("x-drop").is_none());
    assert_eq!(v["headers"]["x-added"], "yes");
    assert_eq!(h["x-resp"], "1");
    assert!(h.get("x-upstream").is_none());
    assert!(h.get("connection").is_none() || h["connection"] != "x-secret");
}

#[tokio::test]
async fn streams_bodies_both_ways() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&yaml(&up.url())).await;

    // 8 MiB sent as a stream of chunks; the upstream reports what it received.
    let chunks = futures_util::stream::iter((0..128).map(|i| {
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from(vec![
            (i % 251)
                as u8;
            64 * 1024
        ])))
    }));
    let req = request(Method::POST, &gw.url("/api/upload"))
        .body(http_body_util::StreamBody::new(chunks).boxed())
        .unwrap();
    let (s, _, b) = send(req).await;
    assert_eq!(s, 200);
    let v = json(&b);
    assert_eq!(v["body_len"], 128 * 64 * 1024);
    let want: u64 = (0..128u64).map(|i| (i % 251) * 64 * 1024).sum();
    assert_eq!(v["body_sum"], want);

    // A streamed response arrives whole.
    let (s, _, b) = get(&gw.url("/api/stream/300")).await;
    assert_eq!(s, 200);
    assert_eq!(b.len(), 300 * 1024);
}

#[tokio::test]
async fn round_robin_skips_a_dead_endpoint() {
    let a = Upstream::start().await;
    let b = Upstream::start().await;
    let dead = free_port().await;
    let gw = Gateway::start(&format!(
        r#"
backends:
  up: {{ type: http, endpoints: ["{}", "http://{dead}", "{}"], eject_for: 30s }}
routes:
  - id: r
    match: {{ path: "/{{*rest}}" }}
    backend: up
"#,
        a.url(),
        b.url()
    ))
    .await;
    let mut failures = 0;
    for _ in 0..30 {
        let (s, _, _) = get(&gw.url("/x")).await;
        if s != 200 {
            failures += 1;
        }
    }
    // At most one request hits the dead endpoint before it is ejected.
    assert!(failures <= 1, "{failures} failures");
    assert!(
        a.hits() >= 10 && b.hits() >= 10,
        "a={} b={}",
        a.hits(),
        b.hits()
    );
}

/// One route on `path` to an upstream spoken to over HTTP/2 (h2c).
fn h2_upstream(upstream: &str, path: &str) -> String {
    format!(
        r#"
backends:
  up: {{ type: http, endpoints: ["{upstream}"], protocol: http2 }}
routes:
  - id: r
    match: {{ path: "{path}" }}
    backend: up
"#
    )
}

#[tokio::test]
async fn h2c_client_and_h2_upstream() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&h2_upstream(&up.url(), "/{*rest}")).await;
    let resp = h2c_client()
        .request(http::Request::get(gw.url("/h2")).body(body("")).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(json(&b)["version"], "HTTP/2.0");
}

/// Sends `n` sequential GETs on one client connection and returns their statuses.
async fn sequential(url: &str, n: usize) -> Vec<u16> {
    let client = client();
    let mut out = Vec::new();
    for _ in 0..n {
        let resp = client
            .request(http::Request::get(url).body(body("")).unwrap())
            .await
            .expect("request sent");
        out.push(resp.status().as_u16());
        resp.into_body().collect().await.expect("body read");
    }
    out
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let up = Upstream::start().await;
    // One pool: the shared runtime's (per core, each worker has its own).
    let config = format!(
        "server: {{ listen: \"127.0.0.1:0\", admin: \"127.0.0.1:0\", runtime: shared }}\n{}",
        yaml(&up.url()).replace(
            r#"type: http, endpoints"#,
            r#"type: http, probe_interval: 1h, endpoints"#,
        )
    );
    let gw = Gateway::start(&config).await;
    // The readiness probe's connection is counted before the requests.
    gw.wait_backend("up", true).await;
    let conns = || up.conns.load(std::sync::atomic::Ordering::SeqCst);
    let before = conns();
    // Ten requests on one keep-alive connection travel on one upstream connection.
    assert_eq!(sequential(&gw.url("/api/a"), 10).await, vec![200; 10]);
    assert_eq!(conns() - before, 1);
    assert_eq!(up.hits(), 10);
    // Streamed answers read to the end leave the connection fit for the next request.
    assert_eq!(sequential(&gw.url("/api/stream/64"), 3).await, vec![200; 3]);
    assert_eq!(conns() - before, 1);
}

#[tokio::test]
async fn an_upstream_that_drops_idle_connections_silently_is_reconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Answers one request per connection, then closes without `Connection: close`.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let s = served.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                s.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    let gw = Gateway::start(&yaml(&format!("http://{addr}"))).await;
    assert_eq!(sequential(&gw.url("/api/x"), 20).await, vec![200; 20]);
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 20);
    task.abort();
}

/// An absolute-form target with no path (`GET http://host?x=1`) reaches an HTTP/2 upstream as
/// `/?x=1`, the origin form of the same target.
#[tokio::test]
async fn an_absolute_form_target_without_a_path_is_forwarded_as_the_root() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&h2_upstream(&up.url(), "/")).await;
    for target in ["http://gw.test?x=1", "/?x=1"] {
        let (s, b) = crate::matching::raw(gw.listen, "GET", target, &[]).await;
        assert_eq!(s, 200, "{target}: {b}");
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        // HTTP/2 servers see `:scheme` and `:authority` in the URI too.
        assert!(
            v["uri"].as_str().unwrap().ends_with("/?x=1"),
            "{target}: {v}"
        );
        assert_eq!(v["path"], "/", "{target}: {v}");
        assert_eq!(v["version"], "HTTP/2.0", "{target}: {v}");
    }
}
