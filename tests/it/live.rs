//! `switchyard validate --live`: every backend tried against the real services (RabbitMQ,
//! Mosquitto, gRPC servers with and without reflection, HTTP endpoints, Redis), each failure
//! reported at its backend or route, and nothing created on the broker.

use std::collections::HashMap;

use lapin::ExchangeKind;
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

use crate::support::amqp::{broker_url, cleanup, unique};
use crate::support::grpc::{EchoServer, GrpcServer, Reflection, proto_dir};
use crate::support::mqtt::PrivateBroker;
use crate::support::{Upstream, free_port};

/// Runs `validate --live --format json` on `yaml`: the exit code and the findings by
/// (subject, check).
async fn live(yaml: &str) -> (Option<i32>, HashMap<(String, String), (String, String)>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["validate", "--live", "--format", "json"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let findings: Vec<serde_json::Value> = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    let by = findings
        .into_iter()
        .map(|f| {
            let s = |k: &str| f[k].as_str().unwrap().to_string();
            ((s("subject"), s("check")), (s("result"), s("detail")))
        })
        .collect();
    (out.status.code(), by)
}

fn result<'a>(
    found: &'a HashMap<(String, String), (String, String)>,
    subject: &str,
    check: &str,
) -> (&'a str, &'a str) {
    let (r, d) = found
        .get(&(subject.to_string(), check.to_string()))
        .unwrap_or_else(|| panic!("no finding for {subject} / {check}: {found:#?}"));
    (r.as_str(), d.as_str())
}

async fn exchange_exists(conn: &lapin::Connection, name: &str) -> bool {
    let ch = conn.create_channel().await.unwrap();
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.exchange_declare(
        name.into(),
        ExchangeKind::Topic,
        passive,
        FieldTable::default(),
    )
    .await
    .is_ok()
}

#[tokio::test]
async fn every_backend_is_tried_and_each_failure_is_named_without_creating_anything() {
    let url = broker_url().await;
    let conn = crate::support::amqp::client().await;
    let ch = conn.create_channel().await.unwrap();
    // Declared as the topology says; declared as fanout where it says topic; not declared.
    let (same, other, absent, named, missing) = (
        unique("live-same"),
        unique("live-other"),
        unique("live-absent"),
        unique("live-named"),
        unique("live-missing"),
    );
    let queue = unique("live-q");
    for (x, kind) in [
        (&same, ExchangeKind::Topic),
        (&other, ExchangeKind::Fanout),
        (&named, ExchangeKind::Direct),
    ] {
        ch.exchange_declare(
            x.as_str().into(),
            kind,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mqtt = PrivateBroker::start_with_subscribe_acl(&["open/#"]).await;
    let up = Upstream::fixed(204).await;
    let closed = free_port().await;
    let reflecting = GrpcServer::start_with_reflection(Reflection::V1).await;
    // A server without reflection that serves none of the shop's methods.
    let bare = EchoServer::start(prost_reflect::DescriptorPool::new()).await;
    let dir = proto_dir();
    let yaml = format!(
        r#"
backends:
  rabbit:
    type: amqp
    url: "{url}"
    topology:
      exchanges:
        - {{ name: "{same}", type: topic, durable: false }}
        - {{ name: "{other}", type: topic, durable: false }}
        - {{ name: "{absent}", type: topic, durable: false }}
      queues: [{{ name: "{queue}", durable: false }}]
  devices: {{ type: mqtt, url: "mqtt://{mqtt}" }}
  web: {{ type: http, endpoints: ["{up}", "http://{closed}"] }}
  shop: {{ type: grpc, endpoints: ["{reflecting}"], protos: ["{proto}"], import_paths: ["{dir}"] }}
  bare: {{ type: grpc, endpoints: ["{bare}"], protos: ["{proto}"], import_paths: ["{dir}"] }}
routes:
  - id: to-named
    match: {{ method: POST, path: /named }}
    backend: rabbit
    amqp: {{ exchange: "{named}", routing_key: a }}
  - id: to-missing
    match: {{ method: POST, path: /missing }}
    backend: rabbit
    amqp: {{ exchange: "{missing}", routing_key: a }}
  - id: to-any
    match: {{ method: POST, path: "/any/{{x}}" }}
    backend: rabbit
    amqp: {{ exchange: "e-{{x}}", routing_key: a }}
  - id: open
    match: {{ method: GET, path: /open }}
    backend: devices
    mqtt: {{ topic: "open/a/#", subscribe: true }}
  - id: secret
    match: {{ method: GET, path: /secret }}
    backend: devices
    mqtt: {{ topic: "secret/a", last_value: true }}
  - id: web
    match: {{ method: GET, path: /web }}
    backend: web
  - id: order
    match: {{ method: GET, path: "/orders/{{id}}" }}
    backend: shop
    grpc: {{ method: shop.v1.Orders/GetOrder }}
  - id: bare-order
    match: {{ method: GET, path: "/bare/{{id}}" }}
    backend: bare
    grpc: {{ method: shop.v1.Orders/GetOrder }}
  - id: bare-import
    match: {{ method: POST, path: "/bare-import" }}
    backend: bare
    grpc: {{ method: shop.v1.Orders/ImportOrders }}
"#,
        mqtt = mqtt.addr(),
        up = up.url(),
        reflecting = reflecting.url(),
        bare = bare.url(),
        proto = dir.join("shop.proto").display(),
        dir = dir.display(),
    );
    let (code, found) = live(&yaml).await;
    assert_eq!(code, Some(69), "{found:#?}");
    let rabbit = "backend rabbit";
    assert_eq!(result(&found, rabbit, "connect").0, "ok");
    let (r, d) = result(&found, rabbit, &format!("exchange {same} (topic)"));
    assert_eq!((r, d), ("ok", "exists as declared"));
    let (r, d) = result(&found, rabbit, &format!("exchange {other} (topic)"));
    assert_eq!(r, "fail");
    assert!(d.contains("differs") && d.contains("inequivalent"), "{d}");
    let (r, d) = result(&found, rabbit, &format!("exchange {absent} (topic)"));
    assert_eq!(r, "warn");
    assert!(d.contains("declares it when it connects"), "{d}");
    assert!(
        result(&found, rabbit, &format!("queue {queue}"))
            .1
            .starts_with("exists as declared")
    );
    assert_eq!(
        result(&found, "route to-named", &format!("exchange {named}")).0,
        "ok"
    );
    let (r, d) = result(&found, "route to-missing", &format!("exchange {missing}"));
    assert_eq!(r, "fail");
    assert!(d.contains("does not exist"), "{d}");
    assert_eq!(result(&found, "route to-any", "exchange e-{x}").0, "warn");
    // The MQTT broker's access rules, per route.
    assert_eq!(result(&found, "backend devices", "connect").0, "ok");
    assert_eq!(result(&found, "route open", "subscribe open/a/#").0, "ok");
    let (r, d) = result(&found, "route secret", "subscribe secret/a");
    assert_eq!(r, "fail");
    assert!(d.contains("refused"), "{d}");
    // HTTP: one endpoint answers, one is closed.
    let (r, d) = result(&found, "backend web", &format!("endpoint {}", up.url()));
    assert_eq!(r, "ok");
    assert!(d.contains("204"), "{d}");
    let (r, d) = result(&found, "backend web", &format!("endpoint http://{closed}"));
    assert_eq!(r, "fail");
    assert!(d.contains("onnect"), "{d}");
    // gRPC by reflection, and without it.
    let (r, d) = result(&found, "route order", "method shop.v1.Orders/GetOrder");
    assert_eq!(r, "ok");
    assert!(
        d.contains("shop.v1.GetOrderRequest -> shop.v1.Order"),
        "{d}"
    );
    let (r, d) = result(&found, "route bare-order", "method shop.v1.Orders/GetOrder");
    assert_eq!(r, "fail");
    assert!(d.contains("UNIMPLEMENTED"), "{d}");
    assert_eq!(
        result(
            &found,
            "route bare-import",
            "method shop.v1.Orders/ImportOrders"
        )
        .0,
        "warn"
    );
    // Nothing was created: neither the topology's missing exchange nor the routes'.
    assert!(!exchange_exists(&conn, &absent).await);
    assert!(!exchange_exists(&conn, &missing).await);
    cleanup(&conn, &[&same, &other, &named], &[&queue]).await;
}

#[tokio::test]
async fn a_config_that_works_exits_0_with_a_table() {
    let url = broker_url().await;
    let x = unique("live-ok");
    let up = Upstream::fixed(200).await;
    let server = GrpcServer::start().await;
    let dir = proto_dir();
    let redis = crate::support::redis::url().await;
    let yaml = format!(
        r#"
state: {{ store: redis, redis: {{ url: "{redis}" }} }}
backends:
  rabbit:
    type: amqp
    url: "{url}"
    topology: {{ exchanges: [{{ name: "{x}", durable: false, auto_delete: true }}] }}
  web: {{ type: http, endpoints: ["{up}"] }}
  shop: {{ type: grpc, endpoints: ["{server}"], protos: ["{proto}"], import_paths: ["{dir}"] }}
routes:
  - id: publish
    match: {{ method: POST, path: /p }}
    backend: rabbit
    amqp: {{ exchange: "{x}", routing_key: a }}
    idempotency: {{}}
  - id: order
    match: {{ method: GET, path: "/orders/{{id}}" }}
    backend: shop
    grpc: {{ method: shop.v1.Orders/GetOrder }}
  - id: web
    match: {{ method: GET, path: /web }}
    backend: web
"#,
        up = up.url(),
        server = server.url(),
        proto = dir.join("shop.proto").display(),
        dir = dir.display(),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["validate", "--live"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{table}");
    // Without reflection, the unary method is asked with an empty call the server refuses.
    assert!(
        table
            .lines()
            .any(|l| l.contains("route order") && l.contains("served (an empty call")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("state") && l.contains("PONG")),
        "{table}"
    );
    assert!(table.contains("0 failed"), "{table}");
}
