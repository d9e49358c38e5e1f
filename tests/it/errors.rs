//! Errors from the edge: problem+json for 400/404/405/413/431/503/504, and a backend that
//! appears after start-up.

use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

fn assert_problem(status: http::StatusCode, h: &http::HeaderMap, b: &bytes::Bytes, want: u16) {
    assert_eq!(status, want, "{}", String::from_utf8_lossy(b));
    assert_eq!(h["content-type"], "application/problem+json");
    let v = json(b);
    assert_eq!(v["status"], want);
    for k in ["type", "title", "detail", "correlation_id"] {
        assert!(v[k].is_string(), "missing {k} in {v}");
    }
    assert_eq!(v["correlation_id"], h["x-request-id"].to_str().unwrap());
    let text = v.to_string();
    assert!(
        !text.contains("0x") && !text.contains("src/"),
        "leaks internals: {text}"
    );
}

fn yaml(upstream: &str) -> String {
    format!(
        r#"
defaults: {{ timeout: 300ms }}
backends:
  up: {{ type: http, endpoints: ["{upstream}"] }}
routes:
  - id: r
    match: {{ method: [GET, POST], path: "/r/{{*rest}}" }}
    backend: up
    http: {{ strip_prefix: /r }}
    max_body_size: 1KiB
"#
    )
}

#[tokio::test]
async fn not_found_and_method_not_allowed() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&yaml(&up.url())).await;
    let (s, h, b) = get(&gw.url("/missing")).await;
    assert_problem(s, &h, &b, 404);
    let (s, h, b) = send(
        request(Method::DELETE, &gw.url("/r/x"))
            .body(body(""))
            .unwrap(),
    )
    .await;
    assert_problem(s, &h, &b, 405);
    assert_eq!(h["allow"], "GET, HEAD, POST");
}

#[tokio::test]
async fn payload_too_large_by_length_and_by_stream() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&yaml(&up.url())).await;
    let (s, h, b) = send(
        request(Method::POST, &gw.url("/r/x"))
            .body(body(vec![b'a'; 4096]))
            .unwrap(),
    )
    .await;
    assert_problem(s, &h, &b, 413);
    assert_eq!(
        up.hits(),
        0,
        "a body declared too large never reaches the upstream"
    );

    // Chunked: no Content-Length, the limit trips while streaming.
    use http_body_util::BodyExt;
    let chunks = futures_util::stream::iter((0..8).map(|_| {
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from(vec![
            b'a';
            512
        ])))
    }));
    let req = request(Method::POST, &gw.url("/r/x"))
        .body(http_body_util::StreamBody::new(chunks).boxed())
        .unwrap();
    let (s, h, b) = send(req).await;
    assert_problem(s, &h, &b, 413);

    let (s, _, _) = send(
        request(Method::POST, &gw.url("/r/x"))
            .body(body(vec![b'a'; 1000]))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&yaml(&up.url())).await;
    let req = request(Method::GET, &gw.url("/r/x"))
        .header("x-big", "a".repeat(64 * 1024))
        .body(body(""))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 431);
    // The gateway keeps serving.
    let (s, _, _) = get(&gw.url("/r/x")).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn traversal_and_bad_escapes_get_400() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&yaml(&up.url())).await;
    for path in [
        "/r/../../etc/passwd",
        "/r/%2e%2e/%2e%2e/x",
        "/r/a%zz",
        "/r/a%00b",
    ] {
        let mut s = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 400"), "{path}: {out}");
        assert!(out.contains("application/problem+json"), "{path}: {out}");
    }
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn upstream_timeout_gets_504() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&yaml(&up.url())).await;
    let (s, h, b) = get(&gw.url("/r/slow/2000")).await;
    assert_problem(s, &h, &b, 504);
}

#[tokio::test]
async fn backend_down_at_start_gets_503_then_serves_when_it_appears() {
    let addr = free_port().await;
    let gw = Gateway::start(&format!(
        r#"
backends:
  later: {{ type: http, endpoints: ["http://{addr}"], probe_interval: 50ms, eject_for: 50ms }}
routes:
  - id: r
    match: {{ path: "/{{*rest}}" }}
    backend: later
"#
    ))
    .await;
    let (s, h, b) = get(&gw.url("/x")).await;
    assert_problem(s, &h, &b, 503);
    assert!(h.contains_key("retry-after"));
    let (s, v) = gw.admin_json("/readyz").await;
    assert_eq!(s, 503);
    assert_eq!(v["backends"]["later"]["ready"], false);

    let _up = Upstream::start_on(addr).await;
    eventually("backend never became ready", || async {
        match gw.admin_json("/readyz").await {
            (s, _) if s == 200 => Ok(()),
            (_, v) => Err(v),
        }
    })
    .await;
    let (s, _, _) = get(&gw.url("/x")).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn the_admin_api_answers_its_errors_as_problem_json() {
    let gw = Gateway::start("routes: []\n").await;
    let (s, h, b) = send(
        request(Method::DELETE, &gw.admin_url("/readyz"))
            .body(body(""))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 405);
    assert_eq!(h["content-type"], "application/problem+json");
    assert_eq!(h["allow"], "GET");
    assert_eq!(
        json(&b)["type"],
        "urn:switchyard:problem:method-not-allowed"
    );
    let (s, h, b) = get(&gw.admin_url("/nope")).await;
    assert_eq!(s, 404);
    assert_eq!(h["content-type"], "application/problem+json");
    let v = json(&b);
    assert_eq!(v["type"], "urn:switchyard:problem:not-found");
    assert!(v["detail"].as_str().unwrap().contains("/nope"), "{v}");
    // No route uses the state store: the dead letters are not there.
    let (s, h, _) = get(&gw.admin_url("/dead-letters")).await;
    assert_eq!(s, 404);
    assert_eq!(h["content-type"], "application/problem+json");
    let (s, _, b) = get(&gw.admin_url("/readyz")).await;
    assert_eq!(s, 200);
    assert_eq!(json(&b)["ready"], true);
}
