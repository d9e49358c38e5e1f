//! Resilience middleware against misbehaving real upstreams: breakers, retries (safe ones
//! only, within the budget), per-try timeouts, rate limits and load shedding.

use std::time::Duration;

use http::Method;

use crate::support::*;

/// A config with one HTTP backend `up` pointing at `up` and the given route entries.
fn with_upstream(up: &Upstream, routes: &str) -> String {
    format!(
        "backends:\n  up: {{ type: http, endpoints: [\"{}\"] }}\nroutes:{routes}",
        up.url()
    )
}

async fn metrics(gw: &Gateway) -> String {
    let (_, _, b) = get(&gw.admin_url("/metrics")).await;
    String::from_utf8_lossy(&b).to_string()
}

#[tokio::test]
async fn a_failing_backend_trips_its_breaker_and_other_routes_keep_serving() {
    let bad = Upstream::fixed(503).await;
    let good = Upstream::start().await;
    let gw = Gateway::start(&format!(
        r#"
backends:
  bad: {{ type: http, endpoints: ["{}"], breaker: {{ consecutive_failures: 3, open_for: 30s }} }}
  good: {{ type: http, endpoints: ["{}"] }}
routes:
  - {{ id: bad, match: {{ path: "/bad" }}, backend: bad }}
  - {{ id: good, match: {{ path: "/good" }}, backend: good }}
"#,
        bad.url(),
        good.url()
    ))
    .await;
    for _ in 0..3 {
        let (s, _, _) = get(&gw.url("/bad")).await;
        assert_eq!(s, 503);
    }
    assert_eq!(bad.hits(), 3);
    // Open: answered at once by the gateway, the upstream is not called.
    let (s, h, b) = get(&gw.url("/bad")).await;
    assert_eq!(s, 503);
    assert_eq!(json(&b)["type"], "urn:switchyard:problem:circuit-open");
    let retry_after: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    assert_eq!(bad.hits(), 3);
    // The other backend's route is unaffected.
    for _ in 0..20 {
        let (s, _, _) = get(&gw.url("/good")).await;
        assert_eq!(s, 200);
    }
    let m = metrics(&gw).await;
    assert!(
        m.contains(r#"switchyard_breaker_state{backend="bad"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"switchyard_breaker_state{backend="good"} 0"#),
        "{m}"
    );
    let (_, v) = gw.admin_json("/readyz").await;
    assert_eq!(v["backends"]["bad"]["breaker"], "open");

    // A reload that leaves the backend unchanged keeps the breaker's state.
    let text = std::fs::read_to_string(gw.config_path())
        .unwrap()
        .replace("/good", "/fine");
    std::fs::write(gw.config_path(), text).unwrap();
    gw.wait_version(2).await;
    let (s, _, b) = get(&gw.url("/bad")).await;
    assert_eq!(
        (s.as_u16(), json(&b)["type"].as_str()),
        (503, Some("urn:switchyard:problem:circuit-open"))
    );
}

#[tokio::test]
async fn the_breaker_closes_again_after_a_successful_probe() {
    let addr = free_port().await;
    let gw = Gateway::start(&format!(
        r#"
backends:
  b: {{ type: http, endpoints: ["http://{addr}"], breaker: {{ consecutive_failures: 2, open_for: 200ms }}, eject_for: 10ms }}
routes:
  - {{ id: r, match: {{ path: "/{{*rest}}" }}, backend: b }}
"#
    ))
    .await;
    for _ in 0..2 {
        let (s, _, b) = get(&gw.url("/x")).await;
        assert_eq!(
            json(&b)["type"],
            "urn:switchyard:problem:backend-unavailable",
            "{s}"
        );
    }
    let (_, _, b) = get(&gw.url("/x")).await;
    assert_eq!(json(&b)["type"], "urn:switchyard:problem:circuit-open");
    let _up = Upstream::start_on(addr).await;
    eventually("breaker never closed", || async {
        match get(&gw.url("/x")).await {
            (s, _, _) if s == 200 => Ok(()),
            (s, _, b) => Err((s, b)),
        }
    })
    .await;
    let (_, v) = gw.admin_json("/readyz").await;
    assert_eq!(v["backends"]["b"]["breaker"], "closed");
}

fn two_endpoints(first: &str, second: &str, extra: &str) -> String {
    format!(
        r#"
backends:
  b: {{ type: http, endpoints: ["{first}", "{second}"], breaker: {{ enabled: false }} }}
routes:
  - id: r
    match: {{ path: "/{{*rest}}" }}
    backend: b
    retry: {{ attempts: 2, backoff: 1ms, on: [connect-failure, reset, timeout, 503] }}
{extra}"#
    )
}

#[tokio::test]
async fn an_idempotent_request_is_retried_on_the_second_endpoint() {
    let bad = Upstream::fixed(503).await;
    let good = Upstream::start().await;
    let gw = Gateway::start(&two_endpoints(&bad.url(), &good.url(), "")).await;
    for _ in 0..10 {
        let (s, _, _) = get(&gw.url("/x")).await;
        assert_eq!(s, 200);
    }
    assert!(bad.hits() >= 1, "the failing endpoint was tried");
    assert_eq!(good.hits(), 10);
    let m = metrics(&gw).await;
    assert!(
        m.contains(r#"switchyard_retries_total{route="r",reason="status-503"}"#),
        "{m}"
    );
}

#[tokio::test]
async fn a_post_is_not_retried_after_the_upstream_received_it() {
    let bad = Upstream::fixed(503).await;
    let good = Upstream::start().await;
    let gw = Gateway::start(&two_endpoints(&bad.url(), &good.url(), "")).await;
    // Round robin starts at the first endpoint.
    let (s, _, _) = send(
        request(Method::POST, &gw.url("/x"))
            .body(body("order"))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 503);
    assert_eq!((bad.hits(), good.hits()), (1, 0));

    // A reset after sending is not retried either.
    let reset = Upstream::resetting().await;
    let gw = Gateway::start(&two_endpoints(&reset.url(), &good.url(), "")).await;
    let (s, _, b) = send(
        request(Method::POST, &gw.url("/x"))
            .body(body("order"))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 502, "{}", String::from_utf8_lossy(&b));
    assert_eq!(good.hits(), 0);
    // But a GET is.
    let (s, _, _) = get(&gw.url("/x")).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn a_post_is_retried_when_the_backend_was_never_reached() {
    let dead = free_port().await;
    let good = Upstream::start().await;
    let gw = Gateway::start(&two_endpoints(&format!("http://{dead}"), &good.url(), "")).await;
    let (s, _, b) = send(
        request(Method::POST, &gw.url("/x"))
            .body(body("order"))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(json(&b)["body_len"], 5, "the buffered body is sent again");
    assert_eq!(good.hits(), 1);
}

#[tokio::test]
async fn a_hung_try_is_cut_by_the_per_try_timeout_and_retried() {
    let hung = Upstream::hanging().await;
    let good = Upstream::start().await;
    let gw = Gateway::start(&two_endpoints(
        &hung.url(),
        &good.url(),
        "    per_try_timeout: 200ms\n    timeout: 5s\n",
    ))
    .await;
    let (s, _, _) = get(&gw.url("/x")).await;
    assert_eq!(s, 200);
    assert_eq!((hung.hits(), good.hits()), (1, 1));
}

#[tokio::test]
async fn a_burst_beyond_the_budget_adds_at_most_the_budgeted_retries() {
    let bad = Upstream::fixed(503).await;
    let gw = Gateway::start(&format!(
        r#"
backends:
  b:
    type: http
    endpoints: ["{}"]
    breaker: {{ enabled: false }}
    retry_budget: {{ ratio: 0.1, min_per_second: 1, ttl: 1s }}
routes:
  - id: r
    match: {{ path: "/{{*rest}}" }}
    backend: b
    retry: {{ attempts: 3, backoff: 1ms, on: [503] }}
"#,
        bad.url()
    ))
    .await;
    let n = 50;
    for _ in 0..n {
        let (s, _, _) = get(&gw.url("/x")).await;
        assert_eq!(s, 503);
    }
    // Without a budget this would be 150 upstream requests. The budget allows 10 % of the
    // requests plus a reserve of one retry per second of ttl.
    let extra = bad.hits() - n;
    assert!(extra >= 1, "some retries were made");
    assert!(extra <= n / 10 + 2, "{extra} retries for {n} requests");
    let m = metrics(&gw).await;
    assert!(
        m.contains(r#"switchyard_retry_budget_exhausted_total{backend="b"}"#),
        "{m}"
    );
}

#[tokio::test]
async fn rate_limit_answers_429_with_ratelimit_headers() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&with_upstream(
        &up,
        r#"
  - id: global
    match: { path: "/g" }
    backend: up
    rate_limit: { requests: 2, per: 10s }
  - id: keyed
    match: { path: "/k" }
    backend: up
    rate_limit: { requests: 1, per: 10s, key: { header: x-api-key } }
"#,
    ))
    .await;
    let (s, h, _) = get(&gw.url("/g")).await;
    assert_eq!(s, 200);
    assert_eq!(h["ratelimit-policy"], "\"default\";q=2;w=10");
    assert_eq!(h["ratelimit"], "\"default\";r=1;t=10");
    let (s, h, _) = get(&gw.url("/g")).await;
    assert_eq!(s, 200);
    assert_eq!(h["ratelimit"], "\"default\";r=0;t=10");
    let (s, h, b) = get(&gw.url("/g")).await;
    assert_eq!(s, 429);
    assert_eq!(json(&b)["type"], "urn:switchyard:problem:rate-limited");
    let retry_after: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=10).contains(&retry_after), "{retry_after}");
    assert_eq!(h["ratelimit-policy"], "\"default\";q=2;w=10");
    assert_eq!(h["ratelimit"], format!("\"default\";r=0;t={retry_after}"));
    assert_eq!(up.hits(), 2);

    // Keyed by header: each key has its own bucket.
    for key in ["a", "b"] {
        let req = request(Method::GET, &gw.url("/k"))
            .header("x-api-key", key)
            .body(body(""))
            .unwrap();
        assert_eq!(send(req).await.0, 200);
    }
    let req = request(Method::GET, &gw.url("/k"))
        .header("x-api-key", "a")
        .body(body(""))
        .unwrap();
    assert_eq!(send(req).await.0, 429);
    let m = metrics(&gw).await;
    assert!(
        m.contains(r#"switchyard_rate_limited_total{route="global"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn a_route_concurrency_limit_sheds_load_at_once() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&with_upstream(
        &up,
        r#"
  - id: r
    match: { path: "/{*rest}" }
    backend: up
    concurrency_limit: 1
"#,
    ))
    .await;
    let url = gw.url("/slow/800");
    let slow = tokio::spawn(async move { get(&url).await });
    eventually("the upstream never got the request", || async {
        if up.hits() == 0 { Err(()) } else { Ok(()) }
    })
    .await;
    let (s, h, b) = get(&gw.url("/x")).await;
    assert_eq!(s, 503);
    assert_eq!(json(&b)["type"], "urn:switchyard:problem:overloaded");
    assert!(h.contains_key("retry-after"));
    assert_eq!(slow.await.unwrap().0, 200);
    let (s, _, _) = get(&gw.url("/x")).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn a_hanging_backend_trips_the_breaker_through_the_deadline_but_leaving_clients_do_not() {
    let hung = Upstream::hanging().await;
    let gw = Gateway::start(&format!(
        r#"
backends:
  b: {{ type: http, endpoints: ["{}"], breaker: {{ consecutive_failures: 2, open_for: 30s }} }}
routes:
  - {{ id: r, match: {{ path: "/{{*rest}}" }}, backend: b, timeout: 300ms }}
"#,
        hung.url()
    ))
    .await;
    // Clients that give up before the deadline say nothing about the backend.
    for _ in 0..3 {
        let url = gw.url("/x");
        let r =
            tokio::time::timeout(Duration::from_millis(50), async move { get(&url).await }).await;
        assert!(r.is_err());
    }
    let (_, v) = gw.admin_json("/readyz").await;
    assert_eq!(v["backends"]["b"]["breaker"], "closed");
    // Calls that reach the deadline do.
    for _ in 0..2 {
        let (s, _, b) = get(&gw.url("/x")).await;
        assert_eq!(s, 504, "{}", String::from_utf8_lossy(&b));
    }
    let (s, _, b) = get(&gw.url("/x")).await;
    assert_eq!(s, 503);
    assert_eq!(json(&b)["type"], "urn:switchyard:problem:circuit-open");
}
