//! The `script` plugin: Rhai scripts run on a route's requests and answers against a real
//! upstream and broker; compile errors placed at the script's line and column, at start and
//! on reload (the old scripts keep serving); an edit applied without restart; each sandbox
//! limit hit and answered 500 naming the route and the script.

use std::path::Path;

use http::Method;

use crate::support::*;

/// A gateway in a fresh directory holding `scripts` (name, source) under `plugins/`.
async fn with_scripts(yaml: &str, scripts: &[(&str, &str)]) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    write_scripts(dir.path(), scripts);
    let config = dir.path().join("routes.yaml");
    std::fs::write(&config, with_ephemeral_server(yaml)).unwrap();
    Gateway::start_at(dir, config, true).await
}

/// Why a config of `yaml` with `scripts` does not load (it must not).
async fn load_error(yaml: &str, scripts: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    write_scripts(dir.path(), scripts);
    let config = dir.path().join("routes.yaml");
    std::fs::write(&config, with_ephemeral_server(yaml)).unwrap();
    match switchyard::app::start(switchyard::app::Options {
        config,
        watch: false,
        sighup: false,
        max_config_size: switchyard::config::DEFAULT_MAX_FILE_SIZE,
    })
    .await
    {
        Ok(_) => panic!("this config must not load:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

fn write_scripts(dir: &Path, scripts: &[(&str, &str)]) {
    std::fs::create_dir_all(dir.join("plugins")).unwrap();
    for (name, src) in scripts {
        std::fs::write(dir.join("plugins").join(name), src).unwrap();
    }
}

/// The tenant example of the repository's `plugins/`.
const TENANT: &str = include_str!("../../plugins/tenant.rhai");

/// A backend `up` at `up` and a route `POST {path}` to it with the script plugin `script`.
fn post_route(up: &str, path: &str, script: &str) -> String {
    format!(
        r#"
backends:
  up: {{ type: http, endpoints: ["{up}"] }}
routes:
  - id: scripted
    match: {{ method: POST, path: {path} }}
    backend: up
    plugins:
      - script: {script}
"#
    )
}

fn route(up: &str, extra: &str) -> String {
    format!(
        r#"
backends:
  up: {{ type: http, endpoints: ["{up}"] }}
routes:
  - id: tenants
    match: {{ path: "/{{*rest}}" }}
    backend: up
    plugins:
      - script: {{ file: plugins/tenant.rhai, config: {{ tenants: [acme, globex] }}{extra} }}
"#
    )
}

#[tokio::test]
async fn a_script_checks_rewrites_and_answers_requests() {
    let up = Upstream::start().await;
    let gw = with_scripts(&route(&up.url(), ""), &[("tenant.rhai", TENANT)]).await;
    let call = |path: &str, tenant: Option<&str>| {
        let mut r = request(Method::GET, &gw.url(path)).header("x-internal", "secret");
        if let Some(t) = tenant {
            r = r.header("x-tenant", t);
        }
        send(r.body(body("")).unwrap())
    };
    let (s, h, b) = call("/old/items/1", Some("acme")).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let v = json(&b);
    assert_eq!(v["path"], "/new/items/1", "the path it rewrote");
    assert_eq!(v["headers"]["x-tenant-checked"], "yes");
    assert!(
        v["headers"].get("x-internal").is_none(),
        "the header it removed"
    );
    assert_eq!(h["x-served-by"], "script");

    // Ending the request: its status, and problem+json with the script's detail.
    let (s, h, b) = call("/items", None).await;
    assert_eq!(s, 400);
    assert_eq!(h["content-type"], "application/problem+json");
    assert_eq!(json(&b)["detail"], "X-Tenant is required");
    let (s, _, b) = call("/items", Some("initech")).await;
    assert_eq!(
        (s.as_u16(), json(&b)["detail"].as_str()),
        (403, Some("tenant initech is not served here"))
    );
    assert_eq!(up.hits(), 1, "refused requests never reach the upstream");

    // A path it makes of request values may not climb out: the script fails (500).
    let (s, _, b) = call("/old/..%2F..%2Fadmin", Some("acme")).await;
    assert_eq!(s, 500, "{}", String::from_utf8_lossy(&b));
    assert_eq!(up.hits(), 1);

    // The answer's hook: a status it changed.
    let (s, _, _) = call("/status/404", Some("globex")).await;
    assert_eq!(s, 410);
}

#[tokio::test]
async fn values_a_script_sets_fill_templates() {
    let addr = crate::support::mqtt::broker_addr().await;
    let (prefix, mut sub) = crate::support::mqtt::Subscriber::on_fresh_prefix(&addr).await;
    let gw = with_scripts(
        &format!(
            r#"{backend}
routes:
  - id: telemetry
    match: {{ method: POST, path: /telemetry }}
    backend: devices
    mqtt: {{ topic: "{prefix}/{{ctx.tenant}}/telemetry", qos: 1 }}
    plugins:
      - script: {{ file: plugins/tenant.rhai, config: {{ tenants: [acme] }} }}
"#,
            backend = crate::mqtt::devices_backend(&addr)
        ),
        &[("tenant.rhai", TENANT)],
    )
    .await;
    gw.wait_backend("devices", true).await;
    let (s, _, b) = send(
        request(Method::POST, &gw.url("/telemetry"))
            .header("x-tenant", "acme")
            .body(body("21.5"))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    let m = sub.next().await;
    assert_eq!(&m.topic[..], format!("{prefix}/acme/telemetry").as_bytes());

    // `{ctx.…}` without a script on the route is a config error.
    let err = start_error(&format!(
        r#"{backend}
routes:
  - id: telemetry
    match: {{ method: POST, path: /telemetry }}
    backend: devices
    mqtt: {{ topic: "{prefix}/{{ctx.tenant}}" }}
"#,
        backend = crate::mqtt::devices_backend(&addr)
    ))
    .await;
    assert!(
        err.contains("only a `script` plugin on the route sets"),
        "{err}"
    );
}

#[tokio::test]
async fn json_bodies_are_reshaped_both_ways() {
    let up = Upstream::start().await;
    let script = include_str!("../../plugins/redact.rhai");
    let gw = with_scripts(
        &post_route(
            &up.url(),
            "/pay",
            "{ file: plugins/redact.rhai, body: json, config: { hide: [headers, uri] } }",
        ),
        &[("redact.rhai", script)],
    )
    .await;
    let sent = r#"{"card":"4111111111111111","amount":5}"#;
    let (s, _, b) = send(
        request(Method::POST, &gw.url("/pay"))
            .header("content-type", "application/json")
            .body(body(sent))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let v = json(&b);
    assert_eq!(v["path"], "/pay");
    assert!(
        v.get("headers").is_none() && v.get("uri").is_none(),
        "hidden: {v}"
    );
    let redacted =
        serde_json::to_vec(&serde_json::json!({"amount": 5, "card": "****1111"})).unwrap();
    assert_eq!(
        v["body_len"],
        redacted.len(),
        "the upstream got the redacted body: {v}"
    );
    // A body that is not JSON is the client's fault.
    let (s, _, b) = send(
        request(Method::POST, &gw.url("/pay"))
            .body(body("card=4111"))
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s.as_u16(), json(&b)["field"].as_str()),
        (400, Some("body"))
    );
}

#[tokio::test]
async fn a_card_number_is_redacted_before_the_amqp_publish() {
    use crate::support::amqp as rabbit;
    let url = rabbit::broker_url().await;
    let (x, q) = (rabbit::unique("x"), rabbit::unique("q"));
    let gw = with_scripts(
        &format!(
            r#"{}
routes:
  - id: payments
    match: {{ method: POST, path: /payments }}
    backend: rabbit
    amqp: {{ exchange: "{x}", routing_key: payments.new }}
    plugins:
      - script: {{ file: plugins/redact.rhai, body: json }}
"#,
            rabbit::rabbit_backend(&url, &x, &q)
        ),
        &[("redact.rhai", include_str!("../../plugins/redact.rhai"))],
    )
    .await;
    gw.wait_backend("rabbit", true).await;
    let (s, _, b) = send(
        request(Method::POST, &gw.url("/payments"))
            .header("content-type", "application/json")
            .body(body(r#"{"card":"4111111111111111","amount":5}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    let conn = rabbit::client().await;
    let m = take(&conn, &q).await;
    let v: serde_json::Value = serde_json::from_slice(&m.delivery.data).unwrap();
    assert_eq!(v, serde_json::json!({"card": "****1111", "amount": 5}));
    rabbit::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn every_sandbox_limit_is_answered_500_naming_the_route_and_the_script() {
    let up = Upstream::start().await;
    let scripts = [
        (
            "loop.rhai",
            "fn on_request(req) { let n = 0; loop { n += 1; } }",
        ),
        (
            "slow.rhai",
            "fn on_request(req) { let s = 0; for i in 0..100000000 { s += i; } }",
        ),
        (
            "deep.rhai",
            "fn f(n) { f(n + 1) } fn on_request(req) { f(0) }",
        ),
        (
            "big.rhai",
            "fn on_request(req) { let s = \"x\"; loop { s += s; } }",
        ),
        ("throws.rhai", "fn on_request(req) { throw \"no\"; }"),
        (
            "wide.rhai",
            "fn on_request(req) { let a = []; loop { a.push(1); } }",
        ),
    ];
    let routes: String = scripts
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            let limits = if *name == "slow.rhai" {
                ", limits: { operations: 1000000000, time: 50ms }"
            } else {
                ""
            };
            format!(
                "  - id: r{i}\n    match: {{ path: /r{i} }}\n    backend: up\n    plugins:\n      - script: {{ file: plugins/{name}{limits} }}\n"
            )
        })
        .collect();
    let gw = with_scripts(
        &format!(
            "backends:\n  up: {{ type: http, endpoints: [\"{}\"] }}\nroutes:\n{routes}",
            up.url()
        ),
        &scripts,
    )
    .await;
    for (i, (name, _)) in scripts.iter().enumerate() {
        let started = std::time::Instant::now();
        let (s, _, b) = get(&gw.url(&format!("/r{i}"))).await;
        assert_eq!(s, 500, "{name}: {}", String::from_utf8_lossy(&b));
        let v = json(&b);
        assert_eq!(
            v["detail"],
            format!("The script plugins/{name} of route `r{i}` failed in `on_request`."),
            "{name}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{name} ran for {:?}",
            started.elapsed()
        );
    }
    assert_eq!(up.hits(), 0);
    let (_, _, m) = get(&gw.admin_url("/metrics")).await;
    let m = String::from_utf8_lossy(&m);
    assert!(
        m.contains(r#"switchyard_script_failures_total{route="r0",script="plugins/loop.rhai"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn compile_errors_name_the_scripts_line_and_column_and_edits_apply_without_restart() {
    let up = Upstream::start().await;
    // At start: the config does not load. `eval` (code the script did not hold) is refused
    // the same way.
    let yaml = route(&up.url(), "");
    let err = load_error(
        &yaml,
        &[("tenant.rhai", "fn on_request(req) {\n  let x = ;\n}\n")],
    )
    .await;
    assert!(err.contains("plugins/tenant.rhai:2:11:"), "{err}");
    let err = load_error(
        &yaml,
        &[("tenant.rhai", "fn on_request(req) { eval(\"1\") }")],
    )
    .await;
    assert!(
        err.contains("plugins/tenant.rhai:1:22: reserved keyword 'eval' is disabled"),
        "{err}"
    );
    let err = load_error(&yaml, &[("tenant.rhai", "fn helper(x) { x }")]).await;
    assert!(err.contains("defines none of"), "{err}");

    // Serving: a broken edit is refused and the old script keeps serving; a good one applies.
    let gw = with_scripts(&route(&up.url(), ""), &[("tenant.rhai", TENANT)]).await;
    let tenant_call = || {
        send(
            request(Method::GET, &gw.url("/x"))
                .header("x-tenant", "acme")
                .body(body(""))
                .unwrap(),
        )
    };
    assert_eq!(tenant_call().await.0, 200);
    let path = gw.dir.path().join("plugins/tenant.rhai");
    std::fs::write(
        &path,
        "fn on_request(req) {\n    req.set_header(\"x\", \n}\n",
    )
    .unwrap();
    let (s, b) = gw.reload().await;
    assert_eq!(s, 422, "{}", String::from_utf8_lossy(&b));
    assert!(
        String::from_utf8_lossy(&b).contains("plugins/tenant.rhai:3:1:"),
        "{}",
        String::from_utf8_lossy(&b)
    );
    assert_eq!(tenant_call().await.0, 200, "the old script still serves");
    let v = gw.version().await;
    std::fs::write(
        &path,
        "fn on_request(req) { return respond(418, \"edited\"); }",
    )
    .unwrap();
    gw.wait_version(v + 1).await;
    let (s, _, b) = tenant_call().await;
    assert_eq!(
        (s.as_u16(), json(&b)["detail"].as_str()),
        (418, Some("edited"))
    );
}

const SORT: &str = r#"
// Sorts messages by their kind, marks them, and keeps a secret out of the broker.
fn on_message(msg) {
    let b = msg.body;
    if msg.exchange != "" {
        msg.routing_key = "orders." + b.kind;
    } else {
        msg.topic = msg.topic + "/" + b.kind;
    }
    msg.set_header("x-script", "on_message");
    b.remove("secret");
    msg.body = b;
}
"#;

/// The next message in queue `q`, which must hold one.
async fn take(conn: &lapin::Connection, q: &str) -> lapin::message::BasicGetMessage {
    let ch = conn.create_channel().await.unwrap();
    ch.basic_get(q.into(), lapin::options::BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the message")
}

/// The next message in queue `q` is the order as `SORT` left it.
async fn assert_sorted_amqp(conn: &lapin::Connection, q: &str) {
    let m = take(conn, q).await;
    assert_eq!(m.delivery.routing_key.as_str(), "orders.book");
    assert_eq!(
        crate::support::amqp::header_str(&m.delivery.properties, "x-script").as_deref(),
        Some("on_message")
    );
    let v: serde_json::Value = serde_json::from_slice(&m.delivery.data).unwrap();
    assert_eq!(v, serde_json::json!({"kind": "book", "n": 1}));
}

/// An MQTT publish is the order as `SORT` left it, on its topic under `prefix`.
fn assert_sorted_mqtt(p: &rumqttc::v5::mqttbytes::v5::Publish, prefix: &str) {
    assert_eq!(&p.topic[..], format!("{prefix}/events/book").as_bytes());
    let props = p.properties.as_ref().unwrap();
    assert!(
        props
            .user_properties
            .iter()
            .any(|(k, v)| k == "x-script" && v == "on_message")
    );
    assert!(!String::from_utf8_lossy(&p.payload).contains("s3cr3t"));
}

/// A gateway with the backends `rabbit` (exchange `x`, its queue `q` bound to every key) and
/// `devices` (MQTT), up, with the routes `routes(x, prefix)` writes under `routes:` (`prefix`
/// a fresh topic prefix, which `sub` watches) and `scripts` under `plugins/`.
struct Brokers {
    gw: Gateway,
    x: String,
    q: String,
    prefix: String,
    sub: crate::support::mqtt::Subscriber,
}

async fn on_brokers(routes: impl Fn(&str, &str) -> String, scripts: &[(&str, &str)]) -> Brokers {
    use crate::support::amqp as rabbit;
    let url = rabbit::broker_url().await;
    let (x, q) = (rabbit::unique("x"), rabbit::unique("q"));
    let addr = crate::support::mqtt::broker_addr().await;
    let (prefix, sub) = crate::support::mqtt::Subscriber::on_fresh_prefix(&addr).await;
    let gw = with_scripts(
        &format!(
            "{}{}routes:\n{}",
            rabbit::rabbit_backend(&url, &x, &q),
            crate::mqtt::devices_backend(&addr).trim_start_matches("backends:\n"),
            routes(&x, &prefix)
        ),
        scripts,
    )
    .await;
    gw.wait_backend("rabbit", true).await;
    gw.wait_backend("devices", true).await;
    Brokers {
        gw,
        x,
        q,
        prefix,
        sub,
    }
}

/// Routes `POST /orders` (an AMQP publish with routing key `key` to exchange `x`) and `POST
/// /events` (an MQTT publish to `{prefix}/events`), both with the script `script`.
fn publish_routes(x: &str, prefix: &str, key: &str, script: &str) -> String {
    format!(
        r#"  - id: orders
    match: {{ method: POST, path: /orders }}
    backend: rabbit
    amqp: {{ exchange: "{x}", routing_key: {key} }}
    plugins:
      - script: {{ file: plugins/{script}, body: json }}
  - id: events
    match: {{ method: POST, path: /events }}
    backend: devices
    mqtt: {{ topic: "{prefix}/events", qos: 1 }}
    plugins:
      - script: {{ file: plugins/{script}, body: json }}
"#
    )
}

#[tokio::test]
async fn on_message_changes_amqp_and_mqtt_messages_before_they_are_published() {
    use crate::support::amqp as rabbit;
    let Brokers {
        gw,
        x,
        q,
        prefix,
        mut sub,
    } = on_brokers(
        |x, prefix| publish_routes(x, prefix, "orders.unsorted", "sort.rhai"),
        &[("sort.rhai", SORT)],
    )
    .await;
    let post = |path: &str| {
        send(
            request(Method::POST, &gw.url(path))
                .header("content-type", "application/json")
                .body(body(r#"{"kind":"book","secret":"s3cr3t","n":1}"#))
                .unwrap(),
        )
    };
    let (s, _, b) = post("/orders").await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    assert_eq!(
        json(&b)["routing_key"],
        "orders.book",
        "the answer names where it went"
    );
    let conn = rabbit::client().await;
    assert_sorted_amqp(&conn, &q).await;

    let (s, _, b) = post("/events").await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    assert_sorted_mqtt(&sub.next().await, &prefix);
    rabbit::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn a_webhook_signature_is_checked_over_the_exact_body() {
    use hmac::{KeyInit, Mac};
    let up = Upstream::start().await;
    let gw = with_scripts(
        &post_route(
            &up.url(),
            "/hooks",
            r#"{ file: plugins/webhook_hmac.rhai, body: text, config: { secret: "s3cret" } }"#,
        ),
        &[(
            "webhook_hmac.rhai",
            include_str!("../../plugins/webhook_hmac.rhai"),
        )],
    )
    .await;
    let payload = r#"{"event":"paid","id":7}"#;
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(b"s3cret").unwrap();
    mac.update(payload.as_bytes());
    let sig: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let post = |sig: Option<String>, b: &'static str| {
        let mut r = request(Method::POST, &gw.url("/hooks"));
        if let Some(s) = sig {
            r = r.header("x-signature", s);
        }
        send(r.body(body(b)).unwrap())
    };
    let (s, _, b) = post(Some(format!("sha256={sig}")), payload).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let v = json(&b);
    assert_eq!(v["body_len"], payload.len(), "the body went on as it was");
    assert!(v["headers"].get("x-signature").is_none());
    let (s, _, _) = post(Some(format!("sha256={sig}")), r#"{"event":"paid","id":8}"#).await;
    assert_eq!(s, 401);
    let (s, _, b) = post(None, payload).await;
    assert_eq!(
        (s.as_u16(), json(&b)["detail"].as_str()),
        (401, Some("X-Signature is required"))
    );
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn a_transcoded_grpc_answer_is_reshaped() {
    let server = crate::support::grpc::GrpcServer::start().await;
    let yaml = crate::grpc::config(&server.url()).replace(
        "    grpc: { method: shop.v1.Orders/GetOrder }",
        r#"    grpc: { method: shop.v1.Orders/GetOrder }
    plugins:
      - script:
          file: plugins/reshape.rhai
          body: json
          config: { fields: { order: id, where: region, tags: "tags#", lost: no.such.path } }"#,
    );
    assert!(yaml.contains("reshape.rhai"));
    let gw = with_scripts(
        &yaml,
        &[("reshape.rhai", include_str!("../../plugins/reshape.rhai"))],
    )
    .await;
    let (s, _, b) = get(&gw.url("/v1/orders/7")).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(
        json(&b),
        serde_json::json!({"order": "7", "where": "eu", "tags": 2, "lost": null})
    );
    // An error answer is the gateway's problem+json, left as it is.
    let (s, h, _) = get(&gw.url("/v1/orders/missing")).await;
    assert!(s.is_client_error() || s.is_server_error(), "{s}");
    assert_eq!(h["content-type"], "application/problem+json");
}

const CHECK_REPLY: &str = r#"
// Marks every reply before it becomes the answer, and overrides its status.
fn on_reply(msg) {
    msg.set_header(config.status_key, "203");
    msg.body = msg.body + " (checked " + msg.header("x-original") + ")";
}
"#;

#[tokio::test]
async fn on_reply_changes_amqp_replies_and_mqtt_responses_before_they_are_answered() {
    use crate::support::amqp as rabbit;
    let url = rabbit::broker_url().await;
    let (x, q) = (rabbit::unique("x"), rabbit::unique("q"));
    let addr = crate::support::mqtt::broker_addr().await;
    let prefix = format!("sy-test/{}", uuid::Uuid::now_v7().simple());
    let mqtt = crate::mqtt::devices_backend(&addr);
    let gw = with_scripts(
        &format!(
            r#"{rabbit}{devices}
routes:
  - id: ask
    match: {{ method: POST, path: /ask }}
    backend: rabbit
    timeout: 5s
    amqp: {{ exchange: "{x}", routing_key: rpc, reply: {{}} }}
    plugins:
      - script: {{ file: plugins/reply.rhai, config: {{ status_key: x-status }} }}
  - id: command
    match: {{ method: POST, path: "/devices/{{device}}/commands" }}
    backend: devices
    timeout: 5s
    mqtt: {{ topic: "{prefix}/{{device}}/cmd", response: {{}} }}
    plugins:
      - script: {{ file: plugins/reply.rhai, config: {{ status_key: status }} }}
"#,
            rabbit = rabbit::rabbit_backend(&url, &x, &q),
            devices = mqtt.trim_start_matches("backends:\n"),
        ),
        &[("reply.rhai", CHECK_REPLY)],
    )
    .await;
    gw.wait_backend("rabbit", true).await;
    gw.wait_backend("devices", true).await;
    let _responder = rabbit::responder(q.clone()).await;
    let (s, _, b) = send(
        request(Method::POST, &gw.url("/ask"))
            .header("x-want", "200")
            .body(body("hello"))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 203, "{}", String::from_utf8_lossy(&b));
    assert_eq!(&b[..], b"re: hello (checked )".as_slice());

    let _device = crate::support::device::Device::start(
        &addr,
        &prefix,
        "kitchen",
        std::time::Duration::from_secs(60),
    )
    .await;
    let (s, _, b) = send(
        request(Method::POST, &gw.url("/devices/kitchen/commands"))
            .body(body(r#"{"setpoint":21}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 203, "{}", String::from_utf8_lossy(&b));
    assert!(
        String::from_utf8_lossy(&b).ends_with(" (checked )"),
        "{}",
        String::from_utf8_lossy(&b)
    );
}

#[tokio::test]
async fn a_scripts_log_lines_carry_the_requests_correlation_id() {
    let up = Upstream::start().await;
    let gw = Binary::start_with_files(
        &route(&up.url(), ""),
        &[("plugins/tenant.rhai", TENANT)],
        &["--log-format", "json"],
        None,
    )
    .await;
    let (s, _, _) = send(
        request(Method::GET, &format!("http://{}/items", gw.listen))
            .header("x-tenant", "acme")
            .header("x-request-id", "script-log-1")
            .body(body(""))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200);
    let out = gw.stop();
    let line = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["target"] == "switchyard::script")
        .unwrap_or_else(|| panic!("no script line:\n{out}"));
    assert_eq!(line["message"], "tenant acme on tenants");
    assert_eq!(line["span"]["correlation_id"], "script-log-1", "{line}");
    assert_eq!(line["span"]["route"], "tenants", "{line}");
}

/// The canary example of the repository's `plugins/`.
const CANARY: &str = include_str!("../../plugins/canary.rhai");

/// A route `GET /orders/{id}` to `main`, with `canary` as its alternative and the canary
/// script choosing between them; `extra` follows the canary backend's endpoints.
fn canary_routes(main: &str, canary: &str, extra: &str) -> String {
    format!(
        r#"
backends:
  main: {{ type: http, endpoints: ["{main}"] }}
  canary: {{ type: http, endpoints: ["{canary}"]{extra} }}
routes:
  - id: orders
    match: {{ method: GET, path: "/orders/{{id}}" }}
    backend: main
    alternatives: [canary]
    plugins:
      - script:
          file: plugins/canary.rhai
          config: {{ backend: canary, header: x-canary, sticky: x-user, percent: 30 }}
"#
    )
}

fn order(
    gw: &Gateway,
    headers: &[(&str, &str)],
) -> impl std::future::Future<Output = (http::StatusCode, http::HeaderMap, bytes::Bytes)> {
    let mut r = request(Method::GET, &gw.url("/orders/7"));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    send(r.body(body("")).unwrap())
}

#[tokio::test]
async fn a_header_or_a_stable_share_of_users_goes_to_the_canary_backend() {
    let (main, canary) = (Upstream::start().await, Upstream::start().await);
    let gw = with_scripts(
        &canary_routes(&main.url(), &canary.url(), ""),
        &[("canary.rhai", CANARY)],
    )
    .await;
    let (s, _, b) = order(&gw, &[("x-canary", "on")]).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!((main.hits(), canary.hits()), (0, 1), "asked for the canary");
    assert_eq!(json(&b)["path"], "/orders/7");
    order(&gw, &[("x-canary", "off"), ("x-user", "u1")]).await;
    order(&gw, &[]).await;
    assert_eq!(
        (main.hits(), canary.hits()),
        (2, 1),
        "asked for the main one, or no user"
    );

    // Users by their id: about 30 in 100 on the canary, each one always on the same side.
    let before = canary.hits();
    let mut on_canary = Vec::new();
    for i in 0..200 {
        let user = format!("user-{i}");
        let hits = canary.hits();
        let (s, _, _) = order(&gw, &[("x-user", &user)]).await;
        assert_eq!(s, 200);
        on_canary.push(canary.hits() > hits);
    }
    let share = on_canary.iter().filter(|c| **c).count();
    assert!(
        (30..=90).contains(&share),
        "{share} of 200 users on the canary, for 30 %"
    );
    for i in (0..200).step_by(7) {
        let hits = canary.hits();
        order(&gw, &[("x-user", &format!("user-{i}"))]).await;
        assert_eq!(canary.hits() > hits, on_canary[i], "user-{i} moved");
    }
    assert!(canary.hits() > before);
}

#[tokio::test]
async fn a_failing_canary_opens_its_own_breaker_and_the_main_backend_keeps_serving() {
    let main = Upstream::start().await;
    let canary = Upstream::fixed(503).await;
    let gw = with_scripts(
        &canary_routes(
            &main.url(),
            &canary.url(),
            ", breaker: { consecutive_failures: 2, open_for: 60s }",
        ),
        &[("canary.rhai", CANARY)],
    )
    .await;
    for _ in 0..2 {
        let (s, _, _) = order(&gw, &[("x-canary", "on")]).await;
        assert_eq!(s, 503);
    }
    let (s, _, b) = order(&gw, &[("x-canary", "on")]).await;
    assert_eq!(s, 503);
    assert!(
        json(&b)["type"]
            .as_str()
            .unwrap_or("")
            .ends_with("circuit-open"),
        "{}",
        String::from_utf8_lossy(&b)
    );
    assert_eq!(
        canary.hits(),
        2,
        "the open breaker keeps requests off the canary"
    );
    for _ in 0..3 {
        let (s, _, _) = order(&gw, &[]).await;
        assert_eq!(s, 200, "the route's main backend has a breaker of its own");
    }
    assert_eq!(main.hits(), 3);
}

#[tokio::test]
async fn a_backend_the_route_does_not_list_fails_the_script() {
    let (main, canary) = (Upstream::start().await, Upstream::start().await);
    let yaml = canary_routes(&main.url(), &canary.url(), "");
    let gw = with_scripts(
        &yaml,
        &[(
            "canary.rhai",
            "fn on_request(req) { req.backend = \"elsewhere\"; }",
        )],
    )
    .await;
    let (s, _, b) = order(&gw, &[]).await;
    assert_eq!(s, 500, "{}", String::from_utf8_lossy(&b));
    assert_eq!(
        json(&b)["detail"],
        "The script plugins/canary.rhai of route `orders` failed in `on_request`."
    );
    assert_eq!((main.hits(), canary.hits()), (0, 0));
}

#[tokio::test]
async fn alternatives_are_checked_when_the_config_loads() {
    let yaml = canary_routes("http://127.0.0.1:9", "http://127.0.0.1:9", "");
    let scripts = [("canary.rhai", CANARY)];
    let cases = [
        (yaml.replace("[canary]", "[nowhere]"), "backend `nowhere` is not defined"),
        (yaml.replace("[canary]", "[main]"), "`main` is the route's `backend`"),
        (yaml.replace("[canary]", "[canary, canary]"), "`canary` is listed twice"),
        (
            yaml.replace(
                "  canary: { type: http,",
                "  canary: { type: mqtt, url: \"mqtt://127.0.0.1:1883\", client_id: gw-canary }\n  unused: { type: http,",
            ),
            "`canary` is a mqtt backend and `main` a http",
        ),
        (
            yaml.replace("      - script:", "      - headers: { request: { set: { x-a: b } } }\n      - unused:"),
            "only a `script` plugin on the route chooses among `alternatives`",
        ),
    ];
    for (yaml, says) in cases {
        let e = load_error(&yaml, &scripts).await;
        assert!(e.contains(says), "want {says:?} in:\n{e}");
    }
}

/// The next text frame of a WebSocket as JSON (pings skipped).
async fn ws_json<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> serde_json::Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    loop {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
            .await
            .expect("a frame within 10 s")
            .expect("the socket is open")
            .expect("a frame");
        if let tokio_tungstenite::tungstenite::Message::Text(t) = frame {
            return serde_json::from_str(&t).expect("a JSON frame");
        }
    }
}

/// A WebSocket to `url` (a route `route` with `SORT`), whose first frame the script fails on:
/// answered with an `error` frame for `seq` 1 naming the script; the socket stays open.
async fn failing_frame_first(
    url: &str,
    route: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    use futures_util::SinkExt;
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(tokio_tungstenite::tungstenite::Message::text("not json"))
        .await
        .unwrap();
    let err = ws_json(&mut ws).await;
    assert_eq!(
        (err["op"].as_str(), err["seq"].as_u64()),
        (Some("error"), Some(1)),
        "{err}"
    );
    assert_eq!(
        err["detail"],
        format!("The script plugins/sort.rhai of route `{route}` failed in `on_message`.")
    );
    ws
}

#[tokio::test]
async fn on_message_changes_the_messages_of_websocket_frames() {
    use crate::support::amqp as rabbit;
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message as Frame;
    let Brokers {
        gw,
        x,
        q,
        prefix,
        mut sub,
    } = on_brokers(
        |x, prefix| {
            format!(
                r#"  - id: orders-ws
    match: {{ method: GET, path: /ws/orders }}
    backend: rabbit
    websocket:
      amqp: {{ exchange: "{x}", routing_key: orders.unsorted, acks: true }}
    plugins:
      - script: {{ file: plugins/sort.rhai, body: json }}
  - id: events-ws
    match: {{ method: GET, path: /ws/events }}
    backend: devices
    websocket:
      mqtt: {{ publish: "{prefix}/events", qos: 1, acks: true }}
    plugins:
      - script: {{ file: plugins/sort.rhai, body: json }}
"#
            )
        },
        &[("sort.rhai", SORT)],
    )
    .await;
    let order = r#"{"kind":"book","secret":"s3cr3t","n":1}"#;

    // AMQP: each frame's message as the script left it; a frame it fails on gets an error
    // frame naming the script, and the socket carries on.
    let ws_url = |path: &str| format!("ws://{}{path}", gw.listen);
    let mut ws = failing_frame_first(&ws_url("/ws/orders"), "orders-ws").await;
    ws.send(Frame::text(order)).await.unwrap();
    assert_eq!(
        ws_json(&mut ws).await,
        serde_json::json!({"op": "ack", "seq": 2})
    );
    let conn = rabbit::client().await;
    assert_sorted_amqp(&conn, &q).await;

    // MQTT: the same, on the topic the script made.
    let mut ws = failing_frame_first(&ws_url("/ws/events"), "events-ws").await;
    ws.send(Frame::text(order)).await.unwrap();
    let ack = ws_json(&mut ws).await;
    assert_eq!(ack["seq"], 2, "{ack}");
    assert_eq!(ack["topic"], format!("{prefix}/events/book"));
    assert_sorted_mqtt(&sub.next().await, &prefix);
    rabbit::cleanup(&conn, &[&x], &[&q]).await;
}

/// Puts the tenant in `{ctx.tenant}` and a message's kind at the end of its routing key.
const TENANT_KIND: &str = r#"
fn on_request(req) {
    req.set_ctx("tenant", req.header("x-tenant"));
}
fn on_message(msg) {
    msg.routing_key = msg.routing_key + "." + msg.body.kind;
    msg.set_header("x-script", "on_message");
}
"#;

#[tokio::test]
async fn what_the_spool_and_jobs_send_later_keeps_the_scripts_values_and_passes_on_message() {
    use crate::support::amqp::{self as rabbit, BrokerProxy};
    let proxy = BrokerProxy::start().await;
    proxy.stop();
    let (x, q) = (rabbit::unique("x"), rabbit::unique("q"));
    let backend = rabbit::rabbit_backend(&proxy.url(), &x, &q).replace(
        "    type: amqp\n",
        "    type: amqp\n    connect_timeout: 1s\n    reconnect: { min: 50ms, max: 300ms }\n    breaker: { open_for: 300ms }\n",
    );
    let gw = with_scripts(
        &format!(
            r#"
state: {{ spool: {{ retry: {{ min: 50ms, max: 300ms }} }} }}
{backend}
routes:
  - id: spooled
    match: {{ method: POST, path: /spooled }}
    backend: rabbit
    spool: true
    amqp: {{ exchange: "{x}", routing_key: "s.{{ctx.tenant}}" }}
    plugins:
      - script: {{ file: plugins/tk.rhai, body: json }}
  - id: jobbed
    match: {{ method: POST, path: /jobbed }}
    backend: rabbit
    mode: async
    amqp: {{ exchange: "{x}", routing_key: "j.{{ctx.tenant}}" }}
    plugins:
      - script: {{ file: plugins/tk.rhai, body: json }}
"#
        ),
        &[("tk.rhai", TENANT_KIND)],
    )
    .await;
    let post = |path: &str| {
        send(
            request(Method::POST, &gw.url(path))
                .header("content-type", "application/json")
                .header("x-tenant", "acme")
                .body(body(r#"{"kind":"book"}"#))
                .unwrap(),
        )
    };
    // Spooled while the broker is away, sent once it is back: the tenant the script set and
    // its on_message, both applied to the message sent later.
    let (s, h, b) = post("/spooled").await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    assert_eq!(h["switchyard-spooled"], "true");
    proxy.start_again();
    // Connected again, the gateway has declared the queue.
    gw.wait_backend("rabbit", true).await;
    let conn = rabbit::client().await;
    let ch = conn.create_channel().await.unwrap();
    let next = || async {
        eventually("a message in the queue", || async {
            ch.basic_get(
                q.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
            .ok_or("none yet")
        })
        .await
    };
    let m = next().await;
    assert_eq!(m.delivery.routing_key.as_str(), "s.acme.book");
    assert_eq!(
        rabbit::header_str(&m.delivery.properties, "x-script").as_deref(),
        Some("on_message")
    );

    // A job runs later, from what was kept of the request: the same.
    let (s, h, b) = post("/jobbed").await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    let (s, _, v) = crate::jobs::settle(&crate::jobs::location(&gw, &h)).await;
    assert_eq!(
        (s, &v["response"]["status"]),
        (200, &serde_json::json!(202)),
        "{v}"
    );
    let m = next().await;
    assert_eq!(m.delivery.routing_key.as_str(), "j.acme.book");
    assert_eq!(
        rabbit::header_str(&m.delivery.properties, "x-script").as_deref(),
        Some("on_message")
    );
    rabbit::cleanup(&conn, &[&x], &[&q]).await;
}

/// Runs on every kind of route: refuses what asks to be denied, sets a value for the route's
/// templates and a header on the way in, and marks the answer.
const HOOKED: &str = r#"
fn on_request(req) {
    if req.header("x-deny") != () {
        return respond(403, "denied on " + req.route);
    }
    req.set_ctx("who", "script");
    req.set_header("x-hooked", "on_request");
}
fn on_response(res) {
    res.set_header("x-hooked", "on_response");
}
"#;

#[tokio::test]
async fn on_request_and_on_response_run_on_every_kind_of_route() {
    use crate::support::amqp as rabbit;
    let up = Upstream::start().await;
    let grpc = crate::support::grpc::GrpcServer::start().await;
    let url = rabbit::broker_url().await;
    let (x, q) = (rabbit::unique("x"), rabbit::unique("q"));
    let addr = crate::support::mqtt::broker_addr().await;
    let (prefix, mut sub) = crate::support::mqtt::Subscriber::on_fresh_prefix(&addr).await;
    let plugin = "    plugins:\n      - script: { file: plugins/hooked.rhai }\n";
    let gw = with_scripts(
        &format!(
            r#"{rabbit}{devices}{shop}  up: {{ type: http, endpoints: ["{up}"] }}
routes:
  - id: http
    match: {{ method: GET, path: /http }}
    backend: up
{plugin}  - id: grpc
    match: {{ method: GET, path: "/v1/orders/{{id}}" }}
    backend: shop
    grpc: {{ method: shop.v1.Orders/GetOrder }}
{plugin}  - id: amqp
    match: {{ method: POST, path: /amqp }}
    backend: rabbit
    amqp: {{ exchange: "{x}", routing_key: "hooked.{{ctx.who}}" }}
{plugin}  - id: mqtt
    match: {{ method: POST, path: /mqtt }}
    backend: devices
    mqtt: {{ topic: "{prefix}/{{ctx.who}}", qos: 1 }}
{plugin}  - id: websocket
    match: {{ method: GET, path: /ws }}
    backend: devices
    websocket:
      mqtt: {{ publish: "{prefix}/ws/{{ctx.who}}", qos: 1, acks: true }}
{plugin}"#,
            rabbit = rabbit::rabbit_backend(&url, &x, &q),
            devices = crate::mqtt::devices_backend(&addr).trim_start_matches("backends:\n"),
            shop = crate::grpc::shop_backend(&grpc.url(), "").trim_start_matches("\nbackends:\n"),
            up = up.url(),
        ),
        &[("hooked.rhai", HOOKED)],
    )
    .await;
    gw.wait_backend("rabbit", true).await;
    gw.wait_backend("devices", true).await;
    let call = |method: Method, path: &str, deny: bool| {
        let b = if method == Method::POST {
            "{\"n\":1}"
        } else {
            ""
        };
        let mut r = request(method, &gw.url(path)).header("content-type", "application/json");
        if deny {
            r = r.header("x-deny", "1");
        }
        send(r.body(body(b)).unwrap())
    };
    for (method, path, route, ok) in [
        (Method::GET, "/http", "http", 200),
        (Method::GET, "/v1/orders/7", "grpc", 200),
        (Method::POST, "/amqp", "amqp", 202),
        (Method::POST, "/mqtt", "mqtt", 202),
    ] {
        let (s, _, b) = call(method.clone(), path, true).await;
        assert_eq!(
            (s.as_u16(), json(&b)["detail"].as_str()),
            (403, Some(format!("denied on {route}").as_str())),
            "{route}"
        );
        let (s, h, b) = call(method, path, false).await;
        assert_eq!(s, ok, "{route}: {}", String::from_utf8_lossy(&b));
        assert_eq!(h["x-hooked"], "on_response", "{route}");
        if route == "http" {
            assert_eq!(json(&b)["headers"]["x-hooked"], "on_request");
        }
    }
    // The values on_request set made the routing key and the topic.
    let conn = rabbit::client().await;
    let m = take(&conn, &q).await;
    assert_eq!(m.delivery.routing_key.as_str(), "hooked.script");
    assert_eq!(
        &sub.next().await.topic[..],
        format!("{prefix}/script").as_bytes()
    );

    // A WebSocket route: the hooks see its handshake.
    let ws_url = format!("ws://{}/ws", gw.listen);
    let refused = tokio_tungstenite::connect_async(
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(&ws_url)
            .map(|mut r| {
                r.headers_mut().insert("x-deny", "1".parse().unwrap());
                r
            })
            .unwrap(),
    )
    .await
    .unwrap_err();
    match refused {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 403),
        other => panic!("expected a 403 answer, got {other}"),
    }
    let (mut ws, resp) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    assert_eq!(resp.headers()["x-hooked"], "on_response");
    futures_util::SinkExt::send(&mut ws, tokio_tungstenite::tungstenite::Message::text("hi"))
        .await
        .unwrap();
    let ack = ws_json(&mut ws).await;
    assert_eq!(ack["topic"], format!("{prefix}/ws/script"), "{ack}");
    rabbit::cleanup(&conn, &[&x], &[&q]).await;
}

/// Sets the protocols' own properties, and one that must be refused when asked to.
const PROPS: &str = r#"
fn on_message(msg) {
    let p = msg.properties;
    if msg.exchange != "" {
        msg.set_property("priority", 7);
        msg.set_property("expiration", "60000");
        msg.set_property("type", "order.created");
        msg.set_header("x-message-id", p.message_id);
    } else {
        msg.set_property("content_type", "application/vnd.order+json");
        msg.set_property("message_expiry_interval", 120);
        msg.set_header("x-qos", p.qos);
    }
    let bad = msg.body.bad;
    if bad == "expiration" {
        msg.set_property("expiration", "soon");
    } else if bad == "message_id" {
        msg.set_property("message_id", "mine");
    }
}
"#;

#[tokio::test]
async fn on_message_sets_amqp_and_mqtt_properties_within_what_the_broker_takes() {
    use crate::support::amqp as rabbit;
    let Brokers {
        gw,
        x,
        q,
        prefix: _,
        mut sub,
    } = on_brokers(
        |x, prefix| publish_routes(x, prefix, "orders.new", "props.rhai"),
        &[("props.rhai", PROPS)],
    )
    .await;
    let post = |path: &str, b: &'static str| {
        send(
            request(Method::POST, &gw.url(path))
                .header("content-type", "application/json")
                .body(body(b))
                .unwrap(),
        )
    };
    // Values the broker would refuse, or the gateway's own ids: the script fails, nothing is
    // published, and the shared channel is untouched.
    for bad in [r#"{"bad":"expiration"}"#, r#"{"bad":"message_id"}"#] {
        let (s, _, b) = post("/orders", bad).await;
        assert_eq!(s, 500, "{}", String::from_utf8_lossy(&b));
        assert_eq!(
            json(&b)["detail"],
            "The script plugins/props.rhai of route `orders` failed in `on_message`."
        );
    }
    let (s, _, b) = post("/orders", r#"{"n":1}"#).await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    let conn = rabbit::client().await;
    let m = take(&conn, &q).await;
    let props = &m.delivery.properties;
    assert_eq!(*props.priority(), Some(7));
    assert_eq!(
        props.expiration().as_ref().map(|e| e.as_str()),
        Some("60000")
    );
    assert_eq!(
        props.kind().as_ref().map(|e| e.as_str()),
        Some("order.created")
    );
    assert_eq!(
        rabbit::header_str(props, "x-message-id"),
        props.message_id().as_ref().map(|m| m.to_string()),
        "the message id, read by the script"
    );
    assert_eq!(
        rabbit::depth(&conn, &q).await,
        0,
        "only that message was published"
    );

    let (s, _, b) = post("/events", r#"{"n":2}"#).await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    let p = sub.next().await;
    let props = p.properties.unwrap();
    assert_eq!(
        props.content_type.as_deref(),
        Some("application/vnd.order+json")
    );
    assert!(
        props
            .message_expiry_interval
            .is_some_and(|e| (100..=120).contains(&e)),
        "{:?}",
        props.message_expiry_interval
    );
    assert!(
        props
            .user_properties
            .iter()
            .any(|(k, v)| k == "x-qos" && v == "1")
    );
    rabbit::cleanup(&conn, &[&x], &[&q]).await;
}
