//! Several gateways as one: cluster-wide rate limits counted in the shared Redis (one bucket
//! for every replica), and what each fallback does while Redis is away.

use http::Method;

use crate::support::amqp::BrokerProxy;
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
