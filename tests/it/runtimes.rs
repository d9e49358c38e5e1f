//! Both runtimes (`server.runtime`): the suite runs in the default, `per_core` (TLS included);
//! this smoke set runs in each — requests over HTTP/1.1 and HTTP/2 on many connections, a
//! reload, the drain — and checks that no second process joins a per-core port and that each
//! worker keeps its own upstream connections.

use crate::support::*;

fn config(upstream: &str, listen: &str, extra_route: bool) -> String {
    config_for("per_core, workers: 2", upstream, listen, extra_route)
}

fn config_for(runtime: &str, upstream: &str, listen: &str, extra_route: bool) -> String {
    let extra = if extra_route {
        "  - { id: added, match: { path: /added }, backend: up }\n"
    } else {
        ""
    };
    format!(
        r#"server: {{ listen: "{listen}", admin: "127.0.0.1:0", runtime: {runtime} }}
backends:
  up: {{ type: http, endpoints: ["{upstream}"] }}
routes:
{extra}  - id: r
    match: {{ path: "/{{*rest}}" }}
    backend: up
"#
    )
}

#[tokio::test]
async fn per_core_serves_reloads_and_drains() {
    serves_reloads_and_drains("per_core, workers: 2").await;
}

#[tokio::test]
async fn shared_serves_reloads_and_drains() {
    serves_reloads_and_drains("shared").await;
}

async fn serves_reloads_and_drains(runtime: &str) {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config_for(runtime, &up.url(), "127.0.0.1:0", false)).await;
    // Many connections, which the kernel spreads over the workers' sockets, each answered.
    let mut calls = Vec::new();
    for i in 0..24 {
        let url = gw.url(&format!("/count/{i}"));
        calls.push(tokio::spawn(async move {
            let (s, _, _) = send(request(http::Method::GET, &url).body(body("")).unwrap()).await;
            s
        }));
    }
    for c in calls {
        assert_eq!(c.await.unwrap(), 200);
    }
    let req = request(http::Method::GET, &gw.url("/h2"))
        .body(body(""))
        .unwrap();
    let resp = h2c_client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    // A reload reaches every worker: they read the one route table.
    std::fs::write(
        gw.config_path(),
        config_for(runtime, &up.url(), &gw.listen.to_string(), true),
    )
    .unwrap();
    let (s, _) = gw.reload().await;
    assert_eq!(s, 200);
    gw.wait_version(2).await;
    let (_, v) = gw.admin_json("/routes").await;
    assert_eq!(v["routes"][0]["id"], "added", "{v}");
    // The drain: an in-flight request finishes, then nothing is accepted.
    let url = gw.url("/slow/400");
    let hits = up.hits();
    let inflight = tokio::spawn(async move { get(&url).await });
    eventually("the upstream never got the request", || async {
        if up.hits() > hits { Ok(()) } else { Err(()) }
    })
    .await;
    let listen = gw.listen;
    assert!(gw.shutdown().await, "drained within the grace period");
    assert_eq!(inflight.await.unwrap().0, 200);
    assert!(
        tokio::net::TcpStream::connect(listen).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn no_second_process_joins_a_per_core_port() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(&up.url(), "127.0.0.1:0", false)).await;
    let taken = gw.listen.to_string();
    // Neither a shared nor a per-core instance may bind it, although the workers' sockets
    // allow port reuse among themselves.
    for runtime in ["shared", "per_core"] {
        let yaml = config(&up.url(), &taken, false).replace(
            "runtime: per_core, workers: 2",
            &format!("runtime: {runtime}"),
        );
        let err = start_error(&yaml).await;
        assert!(err.contains("cannot listen on"), "{runtime}: {err}");
    }
    assert_eq!(get(&gw.url("/still")).await.0, 200);
}

#[tokio::test]
async fn each_worker_keeps_its_own_upstream_connections() {
    let up = Upstream::start().await;
    let yaml = config(&up.url(), "127.0.0.1:0", false).replace(
        "type: http, endpoints",
        "type: http, probe_interval: 1h, endpoints",
    );
    let gw = Gateway::start(&yaml).await;
    gw.wait_backend("up", true).await;
    let conns = || up.conns.load(std::sync::atomic::Ordering::SeqCst);
    let before = conns();
    // Requests on fresh client connections land on either worker; each worker opens at most
    // one upstream connection for them, one request at a time, and reuses it.
    for i in 0..20 {
        assert_eq!(get(&gw.url(&format!("/n/{i}"))).await.0, 200);
    }
    let opened = conns() - before;
    assert!(
        (1..=2).contains(&opened),
        "{opened} upstream connections for 2 workers"
    );
}
