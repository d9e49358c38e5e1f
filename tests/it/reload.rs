//! Hot reload: by file rewrite, rename-over, symlink swap (editor and Kubernetes style),
//! SIGHUP and `POST /reload`; rejected reloads keep serving; traffic during many reloads sees
//! no failure; unchanged backends keep their connections.

use std::os::unix::fs::symlink;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::support::*;

/// A config whose route `r` exists in every version and route `extra` only when `extra` is set.
fn config(upstream: &str, tag: &str, extra: bool) -> String {
    let mut s = format!(
        r#"server: {{ listen: "127.0.0.1:0", admin: "127.0.0.1:0" }}
backends:
  up: {{ type: http, endpoints: ["{upstream}"] }}
routes:
  - id: r
    match: {{ path: "/r/{{*rest}}" }}
    backend: up
    plugins: [ {{ headers: {{ response: {{ set: {{ x-tag: "{tag}" }} }} }} }} ]
"#
    );
    if extra {
        s.push_str("  - id: extra\n    match: { path: /extra }\n    backend: up\n");
    }
    s
}

async fn tag(gw: &Gateway) -> String {
    let (s, h, _) = get(&gw.url("/r/x")).await;
    assert_eq!(s, 200);
    h["x-tag"].to_str().unwrap().to_string()
}

#[tokio::test]
async fn reload_by_rewriting_the_file() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(&up.url(), "one", false)).await;
    assert_eq!(tag(&gw).await, "one");
    std::fs::write(gw.config_path(), config(&up.url(), "two", true)).unwrap();
    gw.wait_version(2).await;
    assert_eq!(tag(&gw).await, "two");
    let (s, _, _) = get(&gw.url("/extra")).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn reload_by_rename_over() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(&up.url(), "one", false)).await;
    let tmp = gw.dir.path().join(".routes.yaml.swp");
    std::fs::write(&tmp, config(&up.url(), "two", false)).unwrap();
    std::fs::rename(&tmp, gw.config_path()).unwrap();
    gw.wait_version(2).await;
    assert_eq!(tag(&gw).await, "two");
}

#[tokio::test]
async fn reload_by_symlink_swap() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("v1.yaml"), config(&up.url(), "one", false)).unwrap();
    std::fs::write(dir.path().join("v2.yaml"), config(&up.url(), "two", false)).unwrap();
    let link = dir.path().join("routes.yaml");
    symlink(dir.path().join("v1.yaml"), &link).unwrap();
    let gw = Gateway::start_at(dir, link.clone(), true).await;
    assert_eq!(tag(&gw).await, "one");
    let tmp = gw.dir.path().join("routes.yaml.new");
    symlink(gw.dir.path().join("v2.yaml"), &tmp).unwrap();
    std::fs::rename(&tmp, &link).unwrap();
    gw.wait_version(2).await;
    assert_eq!(tag(&gw).await, "two");
}

#[tokio::test]
async fn reload_by_kubernetes_configmap_swap() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("..2026_a")).unwrap();
    std::fs::write(
        d.join("..2026_a/routes.yaml"),
        config(&up.url(), "one", false),
    )
    .unwrap();
    symlink("..2026_a", d.join("..data")).unwrap();
    symlink("..data/routes.yaml", d.join("routes.yaml")).unwrap();
    let config_path = d.join("routes.yaml");
    let gw = Gateway::start_at(dir, config_path, true).await;
    assert_eq!(tag(&gw).await, "one");
    let d = gw.dir.path();
    std::fs::create_dir(d.join("..2026_b")).unwrap();
    std::fs::write(
        d.join("..2026_b/routes.yaml"),
        config(&up.url(), "two", false),
    )
    .unwrap();
    symlink("..2026_b", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    gw.wait_version(2).await;
    assert_eq!(tag(&gw).await, "two");
}

#[tokio::test]
async fn reload_by_admin_post_and_rejected_reload_keeps_serving() {
    let up = Upstream::start().await;
    let gw = Gateway::start_with(&config(&up.url(), "one", false), false).await;
    std::fs::write(gw.config_path(), config(&up.url(), "two", false)).unwrap();
    let (s, b) = gw.reload().await;
    assert_eq!(s, 200);
    assert_eq!(json(&b)["version"], 2);
    assert_eq!(tag(&gw).await, "two");

    // A broken file is rejected with positions; the old routes keep serving.
    let broken = config(&up.url(), "three", false).replace("backend: up", "backend: nope");
    std::fs::write(gw.config_path(), broken).unwrap();
    let (s, b) = gw.reload().await;
    assert_eq!(s, 422);
    let errors = json(&b)["errors"].to_string();
    assert!(
        errors.contains("routes.yaml:7:14") && errors.contains("`nope` is not defined"),
        "{errors}"
    );
    assert_eq!(tag(&gw).await, "two");
    let (_, v) = gw.admin_json("/config").await;
    assert_eq!(v["version"], 2);
    assert!(v["last_error"].as_str().unwrap().contains("nope"));
    let (_, _, m) = get(&gw.admin_url("/metrics")).await;
    let m = String::from_utf8_lossy(&m);
    assert!(
        m.contains(r#"switchyard_config_reloads_total{result="rejected"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn in_flight_requests_finish_on_their_table() {
    let up = Upstream::start().await;
    let gw = Gateway::start_with(&config(&up.url(), "one", false), false).await;
    let url = gw.url("/r/slow/400");
    let slow = tokio::spawn(async move { get(&url).await });
    eventually("the upstream never got the request", || async {
        if up.hits() == 0 { Err(()) } else { Ok(()) }
    })
    .await;
    // The new config no longer has route `r`.
    let next = config(&up.url(), "two", true).replace("/r/{*rest}", "/gone/{*rest}");
    std::fs::write(gw.config_path(), next).unwrap();
    let (s, _) = gw.reload().await;
    assert_eq!(s, 200);
    let (s, h, _) = slow.await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(h["x-tag"], "one");
    let (s, _, _) = get(&gw.url("/r/x")).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn continuous_traffic_sees_no_failure_across_many_reloads() {
    let up = Upstream::start().await;
    let gw = Gateway::start_with(&config(&up.url(), "v0", false), true).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), gw.url("/r/x"));
        clients.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                let r = c
                    .request(http::Request::get(&url).body(body("")).unwrap())
                    .await;
                match r {
                    Ok(resp) if resp.status() == 200 => {
                        use http_body_util::BodyExt;
                        if resp.into_body().collect().await.is_ok() {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for i in 1..=40u64 {
        std::fs::write(
            gw.config_path(),
            config(&up.url(), &format!("v{i}"), i % 2 == 0),
        )
        .unwrap();
        let (s, b) = gw.reload().await;
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "{} ok",
        ok.load(Ordering::Relaxed)
    );
    assert!(ok.load(Ordering::Relaxed) > 40);
    assert_eq!(tag(&gw).await, "v40");
    // The backend spec never changed, so its connection pool was kept: a handful of upstream
    // connections served thousands of requests across 40 reloads.
    assert!(
        up.conns.load(Ordering::SeqCst) <= 8,
        "{} upstream connections",
        up.conns.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn reload_by_sighup_in_the_real_binary() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (free_port().await, free_port().await);
    let write = |tag: &str| {
        let c = config(&up.url(), tag, false).replace(
            r#"server: { listen: "127.0.0.1:0", admin: "127.0.0.1:0" }"#,
            &format!(r#"server: {{ listen: "{listen}", admin: "{admin}" }}"#),
        );
        std::fs::write(dir.path().join("routes.yaml"), c).unwrap();
    };
    write("one");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "--no-watch", "--config"])
        .arg(dir.path().join("routes.yaml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let config_version = || async move {
        let c = client();
        let r = c
            .request(
                http::Request::get(format!("http://{admin}/config"))
                    .body(body(""))
                    .unwrap(),
            )
            .await
            .ok()?;
        use http_body_util::BodyExt;
        let b = r.into_body().collect().await.ok()?.to_bytes();
        json(&b)["version"].as_u64()
    };
    let wait_for = |want: u64| async move {
        eventually(&format!("version {want} never reached"), || async {
            if config_version().await != Some(want) {
                Err(())
            } else {
                Ok(())
            }
        })
        .await;
    };
    wait_for(1).await;
    write("two");
    let pid = child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    wait_for(2).await;
    let (_, h, _) = get(&format!("http://{listen}/r/x")).await;
    assert_eq!(h["x-tag"], "two");
    // SIGTERM drains and exits cleanly.
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn an_edited_proto_reloads_the_config() {
    let server = crate::support::grpc::GrpcServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proto = dir.path().join("protos").join("shop.proto");
    std::fs::create_dir(dir.path().join("protos")).unwrap();
    let original =
        std::fs::read_to_string(crate::support::grpc::proto_dir().join("shop.proto")).unwrap();
    std::fs::write(&proto, &original).unwrap();
    let config = dir.path().join("routes.yaml");
    std::fs::write(
        &config,
        with_ephemeral_server(&format!(
            "backends:\n  shop: {{ type: grpc, endpoints: [\"{}\"], protos: [protos/shop.proto], annotated_routes: true }}\nroutes: []\n",
            server.url()
        )),
    )
    .unwrap();
    let gw = Gateway::start_at(dir, config, true).await;
    let import = |path: &str| {
        request(http::Method::POST, &gw.url(path))
            .header("content-type", "application/x-ndjson")
            .body(body("{\"id\":\"a\"}\n"))
            .unwrap()
    };
    assert_eq!(send(import("/v2/orders:import")).await.0, 200);
    assert_eq!(send(import("/v3/orders:import")).await.0, 404);
    // Only the proto changes; routes.yaml is untouched.
    std::fs::write(
        &proto,
        original.replace("/v2/orders:import", "/v3/orders:import"),
    )
    .unwrap();
    gw.wait_version(2).await;
    assert_eq!(send(import("/v3/orders:import")).await.0, 200);
    assert_eq!(send(import("/v2/orders:import")).await.0, 404);
}

#[tokio::test]
async fn a_rejected_reload_opens_no_connection() {
    let up = Upstream::start().await;
    let proxy = crate::support::amqp::BrokerProxy::start().await;
    let gw = Gateway::start_with(&config(&up.url(), "one", false), false).await;
    let proto = crate::support::grpc::proto_dir().join("shop.proto");
    let with_rabbit = |method: &str| {
        format!(
            r#"server: {{ listen: "127.0.0.1:0", admin: "127.0.0.1:0" }}
backends:
  rabbit: {{ type: amqp, url: "{}" }}
  shop: {{ type: grpc, endpoints: ["http://127.0.0.1:9"], protos: ["{}"], import_paths: ["{}"] }}
routes:
  - {{ id: publish, match: {{ method: POST, path: /p }}, backend: rabbit, amqp: {{ routing_key: k }} }}
  - {{ id: call, match: {{ path: /c }}, backend: shop, grpc: {{ method: "{method}" }} }}
"#,
            proxy.url(),
            proto.display(),
            proto.parent().unwrap().display()
        )
    };
    // Valid YAML, rejected by the build (no such gRPC method): the AMQP backend it made is
    // never started.
    std::fs::write(gw.config_path(), with_rabbit("shop.v1.Orders/NoSuchMethod")).unwrap();
    let (s, b) = gw.reload().await;
    assert_eq!(s, 422, "{}", String::from_utf8_lossy(&b));
    let errors = String::from_utf8_lossy(&b);
    assert!(errors.contains("NoSuchMethod"), "{errors}");
    // A problem the build finds is placed like a validation error: at the route's setting.
    assert!(
        errors.contains("routes.yaml:7:69: route `call`"),
        "{errors}"
    );
    // The same backend in a config that is applied connects once: the first session is its.
    std::fs::write(gw.config_path(), with_rabbit("shop.v1.Orders/GetOrder")).unwrap();
    let (s, b) = gw.reload().await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    gw.wait_backend("rabbit", true).await;
    assert_eq!(
        proxy.sessions(),
        1,
        "the rejected build connected to the broker"
    );
}
