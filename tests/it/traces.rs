//! OpenTelemetry traces: a collector receives the gateway's spans over OTLP (gRPC and
//! HTTP/protobuf), with parent and child ids, semantic-convention attributes, events and
//! links, and every backend receives the context of the span that called it.

use std::time::Duration;

use http::Method;

use crate::support::otlp::{Collector, named, trace_of};
use crate::support::*;

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn otlp(collector: &Collector, protocol: &str) -> String {
    let endpoint = match protocol {
        "grpc" => collector.grpc_url(),
        _ => format!("{}/v1/traces", collector.grpc_url()),
    };
    format!(
        r#"
telemetry:
  otlp:
    endpoint: "{endpoint}"
    protocol: {protocol}
    headers: {{ authorization: "Bearer collector-key" }}
    flush_interval: 50ms
    service_name: edge-gw
    resource: {{ deployment.environment.name: test }}
"#
    )
}

async fn traced_get(url: &str) -> (http::StatusCode, serde_json::Value) {
    let (s, _, b) = send(
        request(Method::GET, url)
            .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
            .body(body(""))
            .unwrap(),
    )
    .await;
    (s, serde_json::from_slice(&b).unwrap_or_default())
}

#[tokio::test]
async fn http_requests_are_server_spans_with_a_client_span_per_try() {
    for protocol in ["grpc", "http_protobuf"] {
        let collector = Collector::start().await;
        let up = Upstream::start().await;
        let gw = Gateway::start(&format!(
            r#"{otlp}
backends:
  up: {{ type: http, endpoints: ["{up}"] }}
routes:
  - id: users
    match: {{ method: GET, path: "/users/{{id}}" }}
    backend: up
  - id: flaky
    match: {{ method: GET, path: "/status/{{code}}" }}
    backend: up
    retry: {{ attempts: 2, backoff: 1ms, on: [503] }}
"#,
            otlp = otlp(&collector, protocol),
            up = up.url()
        ))
        .await;

        // The client's trace goes on: the server span is its child, the try the server
        // span's, and the upstream receives the try's context.
        let (s, v) = traced_get(&gw.url("/users/7")).await;
        assert_eq!(s, 200);
        let sent = v["headers"]["traceparent"].as_str().unwrap().to_string();
        assert_eq!(trace_of(&sent), CLIENT_TRACE);
        let spans = collector.trace(CLIENT_TRACE, 2).await;
        let server = named(&spans, "GET /users/{id}");
        assert_eq!(server.kind, "server", "{protocol}");
        assert_eq!(server.parent, CLIENT_SPAN);
        assert_eq!(server.attr("http.route"), "/users/{id}");
        assert_eq!(server.attr("http.request.method"), "GET");
        assert_eq!(server.attr("url.path"), "/users/7");
        assert_eq!(server.attr("http.response.status_code"), "200");
        assert_eq!(server.attr("switchyard.route"), "users");
        assert_eq!(server.resource["service.name"], "edge-gw");
        assert_eq!(server.resource["deployment.environment.name"], "test");
        let client = named(&spans, "GET");
        assert_eq!(client.kind, "client");
        assert_eq!(client.parent, server.span_id);
        assert_eq!(client.attr("server.address"), "127.0.0.1");
        assert_eq!(client.attr("server.port"), up.addr.port().to_string());
        assert_eq!(client.attr("http.response.status_code"), "200");
        assert!(sent.contains(&client.span_id), "{sent} {client:?}");
        // The request is its latency bucket's exemplar.
        let (_, _, metrics) = get(&gw.admin_url("/metrics")).await;
        let metrics = String::from_utf8_lossy(&metrics);
        assert!(
            metrics.lines().any(
                |l| l.starts_with("switchyard_request_duration_seconds_bucket{")
                    && l.contains("route=\"users\"")
                    && l.contains(&format!("# {{trace_id=\"{CLIENT_TRACE}\"}}"))
            ),
            "{metrics}"
        );

        // A retried try: two client spans, the second a resend, a retry event on the server
        // span, and both marked failed.
        let (s, _, _) = get(&gw.url("/status/503")).await;
        assert_eq!(s, 503);
        let server = collector
            .find("GET /status/{code}", |s| s.name == "GET /status/{code}")
            .await;
        let spans = collector.trace(&server.trace_id, 3).await;
        let tries: Vec<_> = spans.iter().filter(|s| s.kind == "client").collect();
        assert_eq!(tries.len(), 2, "{spans:#?}");
        assert!(
            tries
                .iter()
                .all(|t| t.parent == server.span_id && t.status == 2)
        );
        assert!(
            tries
                .iter()
                .any(|t| t.attrs.get("http.request.resend_count").map(String::as_str) == Some("1"))
        );
        let retry = server
            .events
            .iter()
            .find(|(n, _)| n == "retry")
            .expect("a retry event");
        assert_eq!(retry.1["retry.attempt"], "2");
        assert_eq!(server.status, 2, "a 503 answer is an error");
        assert_eq!(server.attr("error.type"), "503");

        let seen = collector.seen.lock().unwrap().clone();
        let path = if protocol == "grpc" { "grpc" } else { "http" };
        assert!(
            seen.iter()
                .all(|(p, auth)| p == path && auth.as_deref() == Some("Bearer collector-key")),
            "{seen:?}"
        );
        drop(gw);
    }
}

#[tokio::test]
async fn a_transcoded_grpc_call_is_a_client_span_whose_context_the_server_receives() {
    let collector = Collector::start().await;
    let server = crate::support::grpc::GrpcServer::start().await;
    let gw = Gateway::start(&format!(
        "{}{}",
        otlp(&collector, "grpc"),
        crate::grpc::config(&server.url())
    ))
    .await;
    let (s, h, _) = send(
        request(Method::GET, &gw.url("/v1/orders/7"))
            .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
            .body(body(""))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200);
    let seen = h["grpc-metadata-x-traceparent-seen"]
        .to_str()
        .unwrap()
        .to_string();
    let spans = collector.trace(CLIENT_TRACE, 2).await;
    let server_span = named(&spans, "GET /v1/orders/{id}");
    let call = named(&spans, "shop.v1.Orders/GetOrder");
    assert_eq!(call.kind, "client");
    assert_eq!(call.parent, server_span.span_id);
    assert_eq!(call.attr("rpc.system.name"), "grpc");
    assert_eq!(call.attr("rpc.method"), "shop.v1.Orders/GetOrder");
    assert_eq!(call.attr("rpc.response.status_code"), "OK");
    assert_eq!(call.attr("server.address"), "127.0.0.1");
    assert_eq!(call.attr("server.port"), server.addr.port().to_string());
    assert_eq!(seen, format!("00-{CLIENT_TRACE}-{}-01", call.span_id));

    // A status other than OK fails the call's span with the status's name.
    let (s, _, _) = get(&gw.url("/v1/orders/missing")).await;
    assert_eq!(s, 404);
    let failed = collector
        .find("a NOT_FOUND call", |s| {
            s.attrs.get("rpc.response.status_code").map(String::as_str) == Some("NOT_FOUND")
        })
        .await;
    assert_eq!(failed.status, 2);
    assert_eq!(failed.attr("error.type"), "NOT_FOUND");
}

#[tokio::test]
async fn amqp_publishes_are_producer_spans_and_replies_link_to_their_sender() {
    use crate::support::amqp as mq;
    let collector = Collector::start().await;
    let url = mq::broker_url().await;
    let (x, q, rq) = (mq::unique("x"), mq::unique("q"), mq::unique("rpc"));
    let mut yaml = format!(
        "{}{}",
        otlp(&collector, "grpc"),
        mq::rabbit_backend(&url, &x, &q)
    );
    yaml = yaml.replace(
        &format!("queues: [{{ name: \"{q}\", durable: false }}]"),
        &format!(
            "queues: [{{ name: \"{q}\", durable: false }}, {{ name: \"{rq}\", durable: false }}]"
        ),
    );
    yaml = yaml.replace(
        &format!("bindings: [{{ queue: \"{q}\", exchange: \"{x}\", routing_key: \"#\" }}]"),
        &format!("bindings: [{{ queue: \"{q}\", exchange: \"{x}\", routing_key: \"event.#\" }}, {{ queue: \"{rq}\", exchange: \"{x}\", routing_key: rpc }}]"),
    );
    yaml.push_str(&format!(
        r#"
routes:
  - id: emit
    match: {{ method: POST, path: "/events/{{kind}}" }}
    backend: rabbit
    amqp: {{ exchange: "{x}", routing_key: "event.{{kind}}" }}
  - id: ask
    match: {{ method: POST, path: /ask }}
    backend: rabbit
    timeout: 5s
    amqp: {{ exchange: "{x}", routing_key: rpc, reply: {{}} }}
"#
    ));
    let gw = Gateway::start(&yaml).await;
    gw.wait_backend("rabbit", true).await;
    let _responder = mq::responder(rq.clone()).await;
    let traced = |path: &str| {
        request(Method::POST, &gw.url(path))
            .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
            .body(body("hello"))
            .unwrap()
    };

    // A publish: the message carries the producer span's context.
    let (s, _, b) = send(traced("/events/created")).await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    let message_id = json(&b)["message_id"].as_str().unwrap().to_string();
    let conn = mq::client().await;
    let ch = conn.create_channel().await.unwrap();
    let got = ch
        .basic_get(
            q.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("the message is in the queue");
    let carried = mq::header_str(&got.delivery.properties, "traceparent").unwrap();
    let spans = collector.trace(CLIENT_TRACE, 2).await;
    let server = named(&spans, "POST /events/{kind}");
    let publish = named(&spans, &format!("publish {x}"));
    assert_eq!(publish.kind, "producer");
    assert_eq!(publish.parent, server.span_id);
    assert_eq!(publish.attr("messaging.system"), "rabbitmq");
    assert_eq!(publish.attr("messaging.operation.type"), "send");
    assert_eq!(publish.attr("messaging.destination.name"), x);
    assert_eq!(
        publish.attr("messaging.rabbitmq.destination.routing_key"),
        "event.created"
    );
    assert_eq!(publish.attr("messaging.message.id"), message_id);
    assert_eq!(publish.attr("messaging.message.body.size"), "5");
    assert_eq!(carried, format!("00-{CLIENT_TRACE}-{}-01", publish.span_id));

    // Request/reply: the reply's receipt is linked to the span that sent the reply.
    let (s, _, b) = send(traced("/ask")).await;
    assert_eq!((s.as_u16(), &b[..]), (200, &b"re: hello"[..]));
    let spans = collector.trace(CLIENT_TRACE, 5).await;
    let server = named(&spans, "POST /ask");
    let receive = named(&spans, "receive amq.rabbitmq.reply-to");
    assert_eq!(receive.kind, "consumer");
    assert_eq!(receive.parent, server.span_id);
    assert_eq!(
        receive.links,
        vec![(CLIENT_TRACE.to_string(), mq::REPLIER_SPAN.to_string())]
    );
    let ask = spans
        .iter()
        .find(|s| s.kind == "producer" && s.parent == server.span_id)
        .expect("the request's publish");
    assert_eq!(
        ask.attr("messaging.rabbitmq.destination.routing_key"),
        "rpc"
    );
}

#[tokio::test]
async fn mqtt_publishes_are_producer_spans_and_responses_link_to_their_sender() {
    use crate::support::mqtt as mq;
    let collector = Collector::start().await;
    let addr = mq::broker_addr().await;
    let (prefix, mut sub) = mq::Subscriber::on_fresh_prefix(&addr).await;
    let gw = Gateway::start(&format!(
        r#"{otlp}{backend}
routes:
  - id: emit
    match: {{ method: POST, path: "/rooms/{{room}}/events" }}
    backend: devices
    mqtt: {{ topic: "{prefix}/{{room}}/events", qos: 1 }}
  - id: command
    match: {{ method: POST, path: "/devices/{{device}}/commands" }}
    backend: devices
    timeout: 5s
    mqtt: {{ topic: "{prefix}/{{device}}/cmd", response: {{}} }}
"#,
        otlp = otlp(&collector, "http_protobuf"),
        backend = crate::mqtt::devices_backend(&addr),
    ))
    .await;
    gw.wait_backend("devices", true).await;
    let traced = |path: &str, b: &'static str| {
        request(Method::POST, &gw.url(path))
            .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
            .body(body(b))
            .unwrap()
    };

    // A publish: the message's user properties carry the producer span's context.
    let (s, _, b) = send(traced("/rooms/hall/events", "on")).await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    let got = sub.next().await;
    let user = got.properties.unwrap().user_properties;
    let carried = user
        .iter()
        .find(|(k, _)| k == "traceparent")
        .map(|(_, v)| v.clone())
        .expect("a traceparent user property");
    let spans = collector.trace(CLIENT_TRACE, 2).await;
    let server = named(&spans, "POST /rooms/{room}/events");
    let topic = format!("{prefix}/hall/events");
    let publish = named(&spans, &format!("publish {topic}"));
    assert_eq!(publish.kind, "producer");
    assert_eq!(publish.parent, server.span_id);
    assert_eq!(publish.attr("messaging.system"), "mqtt");
    assert_eq!(publish.attr("messaging.destination.name"), topic);
    assert_eq!(publish.attr("messaging.mqtt.qos"), "1");
    assert_eq!(carried, format!("00-{CLIENT_TRACE}-{}-01", publish.span_id));

    // Request/response: the response's receipt is linked to the device's span.
    let _device =
        crate::support::device::Device::start(&addr, &prefix, "kitchen", Duration::from_secs(60))
            .await;
    let (s, _, b) = send(traced("/devices/kitchen/commands", r#"{"setpoint":21}"#)).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let spans = collector.trace(CLIENT_TRACE, 5).await;
    let server = named(&spans, "POST /devices/{device}/commands");
    let receive = spans
        .iter()
        .find(|s| s.kind == "consumer" && s.parent == server.span_id)
        .expect("the response's receipt");
    assert!(receive.name.starts_with("receive "), "{receive:?}");
    assert_eq!(receive.links.len(), 1, "{receive:?}");
    assert_eq!(receive.links[0].0, CLIENT_TRACE);
    let command = spans
        .iter()
        .find(|s| s.kind == "producer" && s.parent == server.span_id)
        .expect("the command's publish");
    assert_ne!(receive.links[0].1, command.span_id);
    assert!(
        command
            .attrs
            .contains_key("messaging.message.conversation_id")
    );
}

#[tokio::test]
async fn a_spooled_message_is_forwarded_in_a_span_linked_to_the_request() {
    use crate::support::amqp::{self as mq, BrokerProxy};
    let collector = Collector::start().await;
    let proxy = BrokerProxy::start().await;
    proxy.stop();
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let gw = Gateway::start(&format!(
        "{}{}",
        otlp(&collector, "grpc"),
        crate::spool::config(&proxy.url(), &x, &q, "", "")
    ))
    .await;
    let (s, h, _) = send(
        request(Method::POST, &gw.url("/orders/1"))
            .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
            .header("content-type", "application/json")
            .body(body(r#"{"seq":1}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s.as_u16(), h.get("switchyard-spooled").is_some()),
        (202, true)
    );
    let server = collector
        .find("the spooling request", |s| s.name == "POST /orders/{n}")
        .await;
    assert_eq!(server.trace_id, CLIENT_TRACE);
    let spooled = server
        .events
        .iter()
        .find(|(n, _)| n == "spooled")
        .expect("a spooled event");
    assert!(spooled.1.contains_key("messaging.message.id"));

    proxy.start_again();
    let conn = mq::client().await;
    let got = eventually("the forwarded message never arrived", || async {
        // A fresh channel each time: a get before the queue exists closes its channel.
        let ch = conn.create_channel().await.unwrap();
        match ch
            .basic_get(
                q.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
        {
            Ok(Some(m)) => Ok(m),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let carried = mq::header_str(&got.delivery.properties, "traceparent").unwrap();
    let (trace, span) = (
        trace_of(&carried),
        carried.split('-').nth(2).unwrap().to_string(),
    );
    assert_ne!(trace, CLIENT_TRACE, "the forward is a trace of its own");
    let spans = collector.trace(&trace, 2).await;
    let forward = named(&spans, "forward orders");
    assert_eq!(forward.kind, "consumer");
    assert_eq!(
        forward.links,
        vec![(CLIENT_TRACE.to_string(), server.span_id.clone())]
    );
    let publish = spans
        .iter()
        .find(|s| s.span_id == span)
        .expect("the publish span");
    assert_eq!(publish.name, format!("publish {x}"));
    assert_eq!(publish.parent, forward.span_id);
    mq::cleanup(&conn, &[&x], &[&q]).await;
}

#[tokio::test]
async fn a_job_run_and_its_webhook_are_spans_linked_to_the_request() {
    use crate::jobs::{Receiver, webhook_config};
    let collector = Collector::start().await;
    let up = Upstream::start().await;
    let rx = Receiver::start(vec![503]).await;
    let gw = Gateway::start(&format!(
        "{}{}",
        otlp(&collector, "grpc"),
        webhook_config(
            &up.url(),
            &format!("url: \"{}\", attempts: 3", rx.url("/hook"))
        )
    ))
    .await;
    let (s, _, b) = send(
        request(Method::POST, &gw.url("/work"))
            .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
            .body(body("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    let job_id = json(&b)["id"].as_str().unwrap().to_string();
    let got = rx.wait_for(2).await;
    let server = collector
        .find("the accepting request", |s| s.name == "POST /{*rest}")
        .await;
    let request_link = vec![(CLIENT_TRACE.to_string(), server.span_id.clone())];

    let run = collector
        .find("the job's run", |s| s.name == "job hooked")
        .await;
    assert_eq!(run.links, request_link);
    assert_eq!(run.attr("switchyard.job.id"), job_id);
    assert_eq!(run.attr("switchyard.job.status"), "succeeded");
    let spans = collector.trace(&run.trace_id, 2).await;
    let call = spans
        .iter()
        .find(|s| s.kind == "client" && s.parent == run.span_id)
        .expect("the job's HTTP call");
    assert_eq!(call.attr("http.response.status_code"), "200");

    let hook = collector
        .find("the webhook", |s| s.name == "webhook job.succeeded")
        .await;
    assert_eq!(hook.links, request_link);
    let spans = collector.trace(&hook.trace_id, 3).await;
    let mut posts: Vec<_> = spans
        .iter()
        .filter(|s| s.kind == "client" && s.parent == hook.span_id)
        .collect();
    posts.sort_by_key(|s| s.attrs.get("http.response.status_code").cloned());
    assert_eq!(posts.len(), 2, "{spans:#?}");
    assert_eq!(posts[0].attr("http.response.status_code"), "200");
    assert_eq!(posts[1].attr("http.response.status_code"), "503");
    assert_eq!(posts[1].status, 2);
    // Each delivery carried its own attempt's context.
    for (headers, _) in &got {
        let tp = headers["traceparent"].to_str().unwrap();
        assert!(
            posts
                .iter()
                .any(|p| tp == format!("00-{}-{}-01", hook.trace_id, p.span_id)),
            "{tp}"
        );
    }
}

#[tokio::test]
async fn the_exporter_follows_reloads_and_sampling_follows_the_parent() {
    let (first, second) = (Collector::start().await, Collector::start().await);
    let up = Upstream::start().await;
    let routes = users_route(&up.url());
    let gw = Gateway::start(&format!("{}{routes}", otlp(&first, "grpc"))).await;
    let (s, _) = traced_get(&gw.url("/users/1")).await;
    assert_eq!(s, 200);
    first.trace(CLIENT_TRACE, 2).await;

    // Another collector, and sampling off for new traces: a sampled client's trace is still
    // recorded (parent-based), a new one is not.
    let yaml = std::fs::read_to_string(gw.config_path()).unwrap();
    let yaml = yaml.replace(&first.grpc_url(), &second.grpc_url()).replace(
        "service_name: edge-gw",
        "service_name: edge-gw-2\n    sampling: 0",
    );
    let v = gw.version().await;
    std::fs::write(gw.config_path(), yaml).unwrap();
    gw.wait_version(v + 1).await;
    let (s, _) = traced_get(&gw.url("/users/2")).await;
    assert_eq!(s, 200);
    let (s, _, b) = get(&gw.url("/users/3")).await;
    assert_eq!(s, 200);
    let unsampled = trace_of(json(&b)["headers"]["traceparent"].as_str().unwrap());
    let spans = second.trace(CLIENT_TRACE, 2).await;
    assert!(
        spans
            .iter()
            .all(|s| s.resource["service.name"] == "edge-gw-2")
    );
    assert!(
        spans
            .iter()
            .any(|s| s.attrs.get("url.path").map(String::as_str) == Some("/users/2"))
    );
    let before = first.spans().len();

    // Off again: nothing is exported, and the context still goes on.
    let yaml = std::fs::read_to_string(gw.config_path()).unwrap();
    let cut = yaml.find("telemetry:").unwrap();
    let end = yaml.find("backends:").unwrap();
    let v = gw.version().await;
    std::fs::write(
        gw.config_path(),
        format!("{}{}", &yaml[..cut], &yaml[end..]),
    )
    .unwrap();
    gw.wait_version(v + 1).await;
    let (s, v) = traced_get(&gw.url("/users/4")).await;
    assert_eq!(s, 200);
    let sent = v["headers"]["traceparent"].as_str().unwrap();
    assert_eq!(trace_of(sent), CLIENT_TRACE);
    assert!(!sent.contains(CLIENT_SPAN));
    // Give a (wrongly) running exporter time to send before looking.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let all: Vec<_> = first.spans().into_iter().chain(second.spans()).collect();
    assert!(
        !all.iter().any(|s| s.trace_id == unsampled),
        "an unsampled trace was exported"
    );
    assert!(
        !all.iter()
            .any(|s| s.attrs.get("url.path").map(String::as_str) == Some("/users/4"))
    );
    assert_eq!(first.spans().len(), before, "the first exporter stopped");
}

#[tokio::test]
async fn an_unreachable_collector_is_logged_once_and_again_when_it_answers() {
    let addr = free_port().await;
    let up = Upstream::start().await;
    let gw = Binary::start(
        &format!(
            r#"
telemetry:
  otlp: {{ endpoint: "http://{addr}", flush_interval: 50ms, timeout: 300ms }}
{}"#,
            users_route(&up.url())
        ),
        &[],
        None,
    )
    .await;
    let url = |p: &str| format!("http://{}{p}", gw.listen);
    // Exports are retried within `timeout`; this outage outlasts several of them.
    for i in 0..12 {
        let (s, _, _) = get(&url(&format!("/users/{i}"))).await;
        assert_eq!(s, 200, "tracing never holds a request");
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    let collector = Collector::start_on(addr).await;
    eventually("the export never recovered", || async {
        let (s, _, _) = get(&url("/users/again")).await;
        assert_eq!(s, 200);
        if collector.spans().is_empty() {
            Err(())
        } else {
            Ok(())
        }
    })
    .await;
    eventually("the recovery was never logged", || async {
        let log = gw.log();
        if log.contains("Trace export works again.") {
            Ok(())
        } else {
            Err(log)
        }
    })
    .await;
    let log = gw.stop();
    assert_eq!(
        log.matches("Trace export failing").count(),
        1,
        "one WARN for the outage: {log}"
    );
    assert_eq!(log.matches("Trace export works again.").count(), 1, "{log}");
}

#[tokio::test]
async fn a_native_grpc_call_passed_through_is_a_client_span_too() {
    use switchyard::backends::grpc::codec::DynamicCodec;
    let collector = Collector::start().await;
    let server = crate::support::grpc::GrpcServer::start().await;
    let gw = Gateway::start(&format!(
        "{}{}\nroutes: []\n",
        otlp(&collector, "grpc"),
        crate::grpc::shop_backend(&server.url(), "native_routes: true")
    ))
    .await;
    let channel = tonic::transport::Endpoint::from_shared(gw.url(""))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let msg = crate::grpc::shop_msg("GetOrderRequest", &[("id", "5")]);
    let out = {
        use prost_reflect::ReflectMessage;
        crate::grpc::shop_msg("Order", &[]).descriptor()
    };
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")
            .parse()
            .unwrap(),
    );
    let resp = grpc
        .unary(
            req,
            "/shop.v1.Orders/GetOrder".parse().unwrap(),
            DynamicCodec::new(out),
        )
        .await
        .unwrap();
    let seen = resp
        .metadata()
        .get("x-traceparent-seen")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let spans = collector.trace(CLIENT_TRACE, 2).await;
    let call = named(&spans, "shop.v1.Orders/GetOrder");
    let server_span = spans.iter().find(|s| s.kind == "server").unwrap();
    assert_eq!(call.kind, "client");
    assert_eq!(call.parent, server_span.span_id);
    assert_eq!(call.attr("server.port"), server.addr.port().to_string());
    assert_eq!(seen, format!("00-{CLIENT_TRACE}-{}-01", call.span_id));
}

#[tokio::test]
async fn each_websocket_frame_published_is_a_producer_span_of_the_session() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let collector = Collector::start().await;
    let addr = crate::support::mqtt::broker_addr().await;
    let (prefix, mut sub) = crate::support::mqtt::Subscriber::on_fresh_prefix(&addr).await;
    let gw = Gateway::start(&format!(
        r#"{otlp}{backend}
routes:
  - id: socket
    match: {{ method: GET, path: "/ws/{{device}}" }}
    backend: devices
    websocket:
      mqtt: {{ publish: "{prefix}/{{device}}/cmd", qos: 1, acks: true }}
"#,
        otlp = otlp(&collector, "grpc"),
        backend = crate::mqtt::devices_backend(&addr),
    ))
    .await;
    gw.wait_backend("devices", true).await;
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{}/ws/d1", gw.listen),
    )
    .unwrap();
    req.headers_mut().insert(
        "traceparent",
        format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")
            .parse()
            .unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    for frame in ["one", "two"] {
        ws.send(Message::text(frame)).await.unwrap();
        loop {
            match ws.next().await.unwrap().unwrap() {
                Message::Text(t) if t.contains("\"ack\"") => break,
                _ => {}
            }
        }
    }
    let topic = format!("{prefix}/d1/cmd");
    let spans = collector.trace(CLIENT_TRACE, 3).await;
    let upgrade = spans
        .iter()
        .find(|s| s.kind == "server")
        .expect("the upgrade's span");
    let frames: Vec<_> = spans
        .iter()
        .filter(|s| s.name == format!("publish {topic}"))
        .collect();
    assert_eq!(frames.len(), 2, "{spans:#?}");
    for f in &frames {
        assert_eq!(
            (f.kind.as_str(), f.parent.as_str()),
            ("producer", upgrade.span_id.as_str())
        );
        assert_eq!(f.attr("messaging.system"), "mqtt");
    }
    // Each message carries its own frame's context.
    for _ in 0..2 {
        let m = sub.next().await;
        let tp = m
            .properties
            .unwrap()
            .user_properties
            .into_iter()
            .find(|(k, _)| k == "traceparent")
            .map(|(_, v)| v)
            .expect("a traceparent");
        assert!(
            frames
                .iter()
                .any(|f| tp == format!("00-{CLIENT_TRACE}-{}-01", f.span_id)),
            "{tp}"
        );
    }
}
