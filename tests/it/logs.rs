//! The gateway's logs, read from the real binary's output: one access line per request with
//! the fields an operator looks for (route template, latency in whole microseconds, the
//! upstream that answered and its time, tries, bytes both ways, user agent, trace id), each
//! once; trace ids on the lines of a request; no colour codes when the output is not a
//! terminal.

use http::Request;

use crate::support::{Binary, Upstream, body, eventually, free_port, json};

/// Runs the binary on `yaml` with `--log-format FORMAT`, calls `requests` against its listen
/// address, stops it and returns its output.
async fn logs_of<F, Fut>(yaml: &str, format: &str, requests: F) -> String
where
    F: FnOnce(std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let gw = Binary::start(yaml, &["--log-format", format], None).await;
    requests(gw.listen).await;
    gw.stop()
}

#[tokio::test]
async fn the_access_line_says_what_an_operator_asks() {
    let up = Upstream::start().await;
    let dead = free_port().await;
    let yaml = format!(
        r#"
backends:
  up: {{ type: http, endpoints: ["http://{dead}", "{}"], eject_after_failures: 100 }}
routes:
  - id: orders
    match: {{ path: "/orders/{{id}}" }}
    backend: up
    retry: {{ attempts: 3, backoff: 1ms }}
"#,
        up.url()
    );
    let seen = std::sync::Arc::new(std::sync::Mutex::new(serde_json::Value::Null));
    let s = seen.clone();
    let out = logs_of(&yaml, "json", |listen| async move {
        let (status, _, b) = crate::support::send(
            Request::post(format!("http://{listen}/orders/7"))
                .header("user-agent", "ops-check/1.0")
                .header("x-request-id", "log-rid-1")
                .body(body("twelve bytes"))
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200);
        *s.lock().unwrap() = json(&b);
    })
    .await;
    assert!(!out.contains('\u{1b}'), "colour codes in a file:\n{out}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let access = lines
        .iter()
        .find(|l| l["target"] == "switchyard::access" && l["correlation_id"] == "log-rid-1")
        .unwrap_or_else(|| panic!("no access line:\n{out}"));
    assert_eq!(access["route"], "orders");
    assert_eq!(access["template"], "/orders/{id}");
    assert_eq!(access["method"], "POST");
    assert_eq!(access["path"], "/orders/7");
    assert_eq!(access["status"], 200);
    assert!(access["latency_us"].is_u64(), "{access}");
    assert!(access["upstream_us"].is_u64(), "{access}");
    assert_eq!(access["upstream"], up.url());
    // The first endpoint refused the connection; the second try answered.
    assert_eq!(access["tries"], 2, "{access}");
    assert_eq!(access["bytes_in"], 12);
    assert!(access["bytes_out"].as_u64().unwrap() > 0);
    assert_eq!(access["user_agent"], "ops-check/1.0");
    // The trace id is the one the upstream was given.
    let upstream_saw = seen.lock().unwrap()["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(access["trace_id"], upstream_saw[3..35]);
    // The retry's line, inside the request, carries the trace and span ids and the route once.
    let retry = lines
        .iter()
        .find(|l| l["message"] == "Retrying.")
        .unwrap_or_else(|| panic!("no retry line:\n{out}"));
    assert_eq!(retry["span"]["trace_id"], access["trace_id"], "{retry}");
    assert_eq!(retry["span"]["span_id"].as_str().unwrap().len(), 16);
    assert_eq!(retry["span"]["span_id"], upstream_saw[36..52]);
}

#[tokio::test]
async fn a_failed_request_is_logged_with_its_route_once() {
    let dead = free_port().await;
    let yaml = format!(
        r#"
backends:
  gone: {{ type: http, endpoints: ["http://{dead}"] }}
routes:
  - id: gone
    match: {{ path: "/gone" }}
    backend: gone
"#
    );
    let out = logs_of(&yaml, "pretty", |listen| async move {
        let (s, _, _) = crate::support::get(&format!("http://{listen}/gone")).await;
        assert_eq!(s, 503);
    })
    .await;
    assert!(!out.contains('\u{1b}'), "colour codes in a file:\n{out}");
    let failed = out
        .lines()
        .find(|l| l.contains("Request failed."))
        .unwrap_or_else(|| panic!("no failure line:\n{out}"));
    assert_eq!(failed.matches("route=").count(), 1, "{failed}");
    assert!(failed.contains("trace_id="), "{failed}");
}

#[tokio::test]
async fn backend_outages_are_logged_once_whatever_the_protocol() {
    let proxy = crate::support::amqp::BrokerProxy::start().await;
    let dead = free_port().await;
    let gw = Binary::start(
        &format!(
            r#"
backends:
  rabbit: {{ type: amqp, url: "{}", reconnect: {{ min: 10ms, max: 40ms }} }}
  devices: {{ type: mqtt, url: "mqtt://{dead}", client_id: "gw-{}", reconnect: {{ min: 10ms, max: 40ms }} }}
routes: []
"#,
            proxy.url(),
            uuid::Uuid::now_v7().simple()
        ),
        &[],
        Some("info,switchyard::backends::health=debug"),
    )
    .await;
    let lines = |backend: &'static str, what: &'static str| {
        let gw = &gw;
        move || {
            gw.log()
                .lines()
                .filter(|l| l.contains(&format!("backend={backend}")) && l.contains(what))
                .count()
        }
    };
    let count = |backend, what, at_least: usize| {
        let n = lines(backend, what);
        async move {
            eventually(&format!("{at_least}× `{what}` for {backend}"), || async {
                let seen = n();
                if seen >= at_least { Ok(()) } else { Err(seen) }
            })
            .await
        }
    };
    // The MQTT broker is not there: one WARN, however many attempts.
    count("devices", "Backend still unavailable.", 5).await;
    assert_eq!(lines("devices", "Backend unavailable;")(), 1);
    // RabbitMQ is: one INFO.
    count("rabbit", "Backend available.", 1).await;
    // It goes away, and comes back.
    proxy.stop();
    count("rabbit", "Backend still unavailable.", 5).await;
    assert_eq!(lines("rabbit", "Backend unavailable;")(), 1);
    proxy.start_again();
    count("rabbit", "Backend available again.", 1).await;
    let out = gw.stop();
    assert_eq!(
        out.lines().filter(|l| l.contains(" WARN ")).count(),
        2,
        "one WARN per outage:\n{out}"
    );
}

#[tokio::test]
async fn a_transcoded_grpc_call_names_its_upstream() {
    let server = crate::support::grpc::GrpcServer::start().await;
    let yaml = crate::grpc::config(&server.url());
    let out = logs_of(&yaml, "json", |listen| async move {
        let (s, _, b) = crate::support::get(&format!("http://{listen}/v1/orders/7")).await;
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    })
    .await;
    let access = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["target"] == "switchyard::access" && l["route"] == "get-order")
        .unwrap_or_else(|| panic!("no access line:\n{out}"));
    assert_eq!(access["upstream"], server.url(), "{access}");
    assert!(access["upstream_us"].is_u64(), "{access}");
}

#[tokio::test]
async fn failed_answers_count_their_tries_and_broker_publishes_name_the_broker() {
    let dead = free_port().await;
    let amqp = crate::support::amqp::broker_url().await;
    let mqtt = crate::support::mqtt::broker_addr().await;
    let (x, q) = (
        crate::support::amqp::unique("x"),
        crate::support::amqp::unique("q"),
    );
    let yaml = format!(
        r#"{rabbit}
  gone: {{ type: http, endpoints: ["http://{dead}"] }}
  devices: {{ type: mqtt, url: "mqtt://{mqtt}", client_id: "gw-logs-{id}" }}
routes:
  - id: gone
    match: {{ path: "/gone" }}
    backend: gone
    retry: {{ attempts: 3, backoff: 1ms, on: [connect-failure] }}
  - id: publish
    match: {{ method: POST, path: "/publish" }}
    backend: rabbit
    amqp: {{ exchange: "{x}", routing_key: "k" }}
  - id: telemetry
    match: {{ method: POST, path: "/telemetry" }}
    backend: devices
    mqtt: {{ topic: "sy-test/{id}/t", qos: 1 }}
"#,
        rabbit = crate::support::amqp::rabbit_backend(&amqp, &x, &q),
        id = uuid::Uuid::now_v7().simple(),
    );
    let out = logs_of(&yaml, "json", |listen| async move {
        let until_ok = |path: &'static str| async move {
            eventually(path, || async {
                let (s, _, _) = crate::support::send(
                    Request::post(format!("http://{listen}{path}"))
                        .body(body("{}"))
                        .unwrap(),
                )
                .await;
                if s.is_success() { Ok(()) } else { Err(s) }
            })
            .await
        };
        let (s, _, _) = crate::support::get(&format!("http://{listen}/gone")).await;
        assert!(s.is_server_error(), "{s}");
        until_ok("/publish").await;
        until_ok("/telemetry").await;
    })
    .await;
    let lines: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "switchyard::access")
        .collect();
    let of = |route: &str| {
        lines
            .iter()
            .rev()
            .find(|l| l["route"] == route)
            .cloned()
            .unwrap_or_else(|| panic!("no access line of {route}:\n{out}"))
    };
    // Every endpoint refused; the error answer still says it took three tries.
    assert_eq!(of("gone")["tries"], 3, "{out}");
    let host = |url: &str| {
        let u: http::Uri = url.parse().unwrap();
        format!("{}:{}", u.host().unwrap(), u.port_u16().unwrap_or(5672))
    };
    let publish = of("publish");
    assert_eq!(
        publish["upstream"],
        format!("amqp://{}", host(&amqp)),
        "{publish}"
    );
    assert!(publish["upstream_us"].is_u64(), "{publish}");
    let telemetry = of("telemetry");
    assert_eq!(
        telemetry["upstream"],
        format!("mqtt://{mqtt}"),
        "{telemetry}"
    );
    assert!(telemetry["upstream_us"].is_u64(), "{telemetry}");
}
