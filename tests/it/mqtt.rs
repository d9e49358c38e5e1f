//! The MQTT bridge against a real Mosquitto: publishes arrive with their topic, payload, QoS,
//! retain flag and MQTT 5 properties, answered only after the broker's acknowledgement; topic
//! injection refused; a broker that goes away gets fast 503s; a broker restarted under QoS 1
//! load loses no acknowledged publish.

use std::time::{Duration, Instant};

use http::Method;
use rumqttc::v5::mqttbytes::QoS;

use crate::support::amqp::BrokerProxy;
use crate::support::mqtt::{self as mq, PrivateBroker, Subscriber};
use crate::support::*;

fn unique() -> String {
    format!("sy-test/{}", uuid::Uuid::now_v7().simple())
}

/// A `devices` backend on the broker at `addr` with a client id of its own.
pub(crate) fn devices_backend(addr: &str) -> String {
    format!(
        "backends:\n  devices:\n    type: mqtt\n    url: \"mqtt://{addr}\"\n    client_id: \"gw-{}\"\n",
        uuid::Uuid::now_v7().simple()
    )
}

fn config(addr: &str, prefix: &str) -> String {
    config_with(addr, prefix, "v5")
}

/// [`config`] on MQTT `protocol`.
fn config_with(addr: &str, prefix: &str, protocol: &str) -> String {
    format!(
        r#"
backends:
  devices:
    type: mqtt
    url: "mqtt://{addr}"
    protocol: "{protocol}"
    client_id: "gw-{id}"
    keep_alive: 5s
    max_packet_size: 32KiB
    reconnect: {{ min: 50ms, max: 300ms }}
    breaker: {{ open_for: 200ms }}
routes:
  - id: setpoint
    match: {{ method: PUT, path: "/devices/{{device}}/setpoint" }}
    backend: devices
    mqtt: {{ topic: "{prefix}/{{device}}/setpoint", qos: 1, retain: true, headers: [X-Tenant], message_expiry: 60s }}
  - id: fire
    match: {{ method: POST, path: "/devices/{{device}}/fire" }}
    backend: devices
    mqtt: {{ topic: "{prefix}/{{device}}/fire", qos: 0, status: 200 }}
  - id: exactly
    match: {{ method: POST, path: "/devices/{{device}}/once" }}
    backend: devices
    mqtt: {{ topic: "{prefix}/{{device}}/once", qos: 2 }}
  - id: state
    match: {{ method: GET, path: "/devices/{{device}}/setpoint" }}
    backend: devices
    mqtt: {{ topic: "{prefix}/{{device}}/setpoint", last_value: true, wait: 500ms }}
  - id: zone
    match: {{ method: POST, path: /zones }}
    backend: devices
    mqtt: {{ topic: "{prefix}/zone/{{query.zone}}/{{body.kind}}", multi_level: [query.zone] }}
"#,
        id = uuid::Uuid::now_v7().simple()
    )
}

#[tokio::test]
async fn publishes_arrive_with_qos_retain_and_properties() {
    let addr = mq::broker_addr().await;
    let prefix = unique();
    let mut sub = Subscriber::start(
        &addr,
        &format!("sub-{}", uuid::Uuid::now_v7().simple()),
        &format!("{prefix}/#"),
    )
    .await;
    let gw = Gateway::start(&config(&addr, &prefix)).await;
    gw.wait_backend("devices", true).await;

    let req = request(Method::PUT, &gw.url("/devices/d1/setpoint"))
        .header("content-type", "application/json")
        .header("x-request-id", "rid-1")
        .header("x-tenant", "acme")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body(body(r#"{"celsius":21.5}"#))
        .unwrap();
    let (s, _, b) = send(req).await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["topic"], format!("{prefix}/d1/setpoint"));
    let m = sub.next().await;
    assert_eq!(&m.topic[..], format!("{prefix}/d1/setpoint").as_bytes());
    assert_eq!(&m.payload[..], br#"{"celsius":21.5}"#);
    assert_eq!(m.qos, QoS::AtLeastOnce);
    assert!(m.retain, "retain as published");
    let p = m.properties.expect("MQTT 5 properties");
    assert_eq!(p.content_type.as_deref(), Some("application/json"));
    assert_eq!(p.correlation_data.as_deref(), Some(&b"rid-1"[..]));
    assert_eq!(p.payload_format_indicator, Some(1));
    assert!(p.message_expiry_interval.is_some_and(|e| e <= 60 && e > 50));
    assert!(
        p.user_properties
            .contains(&("x-tenant".into(), "acme".into()))
    );
    assert!(
        p.user_properties
            .iter()
            .any(|(k, v)| k == "traceparent"
                && v.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"))
    );

    // QoS 0 and QoS 2.
    let (s, _, _) = send(
        request(Method::POST, &gw.url("/devices/d2/fire"))
            .body(body("f"))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200);
    let m = sub.next().await;
    assert_eq!((m.qos, &m.payload[..]), (QoS::AtMostOnce, &b"f"[..]));
    let (s, _, _) = send(
        request(Method::POST, &gw.url("/devices/d3/once"))
            .body(body("o"))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 202);
    let m = sub.next().await;
    assert_eq!((m.qos, &m.payload[..]), (QoS::ExactlyOnce, &b"o"[..]));

    // Topic levels from the request cannot inject wildcards or extra levels.
    for (path, payload, field) in [
        ("/devices/a+b/fire", "x", "device"),
        ("/devices/a%23/fire", "x", "device"),
        ("/devices/a%2Fb/fire", "x", "device"),
    ] {
        let (s, _, b) = send(
            request(Method::POST, &gw.url(path))
                .body(body(payload))
                .unwrap(),
        )
        .await;
        assert_eq!(s, 400, "{path}: {}", String::from_utf8_lossy(&b));
        assert_eq!(json(&b)["field"], field, "{path}");
    }
    let zone = |q: &str, b: &'static str| {
        request(Method::POST, &gw.url(&format!("/zones?zone={q}")))
            .body(body(b))
            .unwrap()
    };
    let (s, _, b) = send(zone("eu/west", r#"{"kind":"alarm"}"#)).await;
    assert_eq!(
        s,
        202,
        "a multi-level value may span levels: {}",
        String::from_utf8_lossy(&b)
    );
    assert_eq!(
        &sub.next().await.topic[..],
        format!("{prefix}/zone/eu/west/alarm").as_bytes()
    );
    let (s, _, b) = send(zone("eu", r#"{"kind":"a/b"}"#)).await;
    assert_eq!(s, 400);
    assert_eq!(json(&b)["field"], "body.kind");
    let (s, _, b) = send(zone("eu%2B", r#"{"kind":"x"}"#)).await;
    assert_eq!(s, 400);
    assert_eq!(json(&b)["field"], "query.zone");
    let (s, _, b) = send(zone("eu", "not json")).await;
    assert_eq!(
        (s.as_u16(), json(&b)["field"].as_str()),
        (400, Some("body"))
    );
}

#[tokio::test]
async fn a_broker_that_goes_away_gets_fast_503s_and_is_reconnected() {
    broker_goes_away_and_comes_back("v5").await;
}

#[tokio::test]
async fn a_broker_that_goes_away_gets_fast_503s_and_is_reconnected_on_mqtt_3_1_1() {
    broker_goes_away_and_comes_back("v3.1.1").await;
}

/// The connection is cut (the broker keeps the session): fast 503s, then a reconnect.
async fn broker_goes_away_and_comes_back(protocol: &str) {
    let addr = mq::broker_addr().await;
    let proxy = BrokerProxy::start_to(addr.clone()).await;
    let prefix = unique();
    let gw = Gateway::start(&config_with(&proxy.addr.to_string(), &prefix, protocol)).await;
    gw.wait_backend("devices", true).await;
    let put = || {
        request(Method::PUT, &gw.url("/devices/d/setpoint"))
            .body(body("1"))
            .unwrap()
    };
    assert_eq!(send(put()).await.0, 202);
    proxy.stop();
    gw.wait_backend("devices", false).await;
    let started = Instant::now();
    let (s, h, b) = send(put()).await;
    assert_eq!(s, 503, "{}", String::from_utf8_lossy(&b));
    assert!(h.contains_key("retry-after"));
    assert!(started.elapsed() < Duration::from_secs(1));
    proxy.start_again();
    gw.wait_backend("devices", true).await;
    assert_eq!(send(put()).await.0, 202);
}

#[tokio::test]
async fn no_acknowledged_qos1_publish_is_lost_when_the_broker_restarts() {
    qos1_publishes_survive_a_broker_restart("v5").await;
}

#[tokio::test]
async fn no_acknowledged_qos1_publish_is_lost_when_the_broker_restarts_on_mqtt_3_1_1() {
    qos1_publishes_survive_a_broker_restart("v3.1.1").await;
}

async fn qos1_publishes_survive_a_broker_restart(protocol: &str) {
    // A broker of the test's own, restarted without the sessions: the gateway must publish
    // again what was not acknowledged. It reaches the broker through a proxy, held closed until
    // the subscriber has subscribed again, so the subscriber misses nothing.
    let mut broker = PrivateBroker::start().await;
    let proxy = BrokerProxy::start_to(broker.addr()).await;
    let prefix = unique();
    let mut sub = Subscriber::start(&broker.addr(), "persistent-sub", &format!("{prefix}/#")).await;
    let gw = std::sync::Arc::new(
        Gateway::start(&config_with(&proxy.addr.to_string(), &prefix, protocol)).await,
    );
    gw.wait_backend("devices", true).await;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::<usize>::new()));
    let counter = std::sync::Arc::new(AtomicUsize::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (gw, accepted, counter, stop) =
                (gw.clone(), accepted.clone(), counter.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(SeqCst) {
                    let n = counter.fetch_add(1, SeqCst);
                    let req = request(Method::PUT, &gw.url("/devices/load/setpoint"))
                        .body(body(n.to_string()))
                        .unwrap();
                    let (s, _, _) = send(req).await;
                    match s.as_u16() {
                        202 => accepted.lock().unwrap().push(n),
                        503 => tokio::time::sleep(Duration::from_millis(10)).await,
                        other => panic!("unexpected {other}"),
                    }
                }
            })
        })
        .collect();
    eventually("the first 100 publishes were not accepted", || async {
        if accepted.lock().unwrap().len() < 100 {
            Err(())
        } else {
            Ok(())
        }
    })
    .await;
    proxy.stop();
    broker.stop();
    broker.start_again().await;
    eventually("the subscriber never subscribed again", || async {
        match sub.subscribed.load(SeqCst) {
            n if n >= 2 => Ok(()),
            n => Err(n),
        }
    })
    .await;
    proxy.start_again();
    gw.wait_backend("devices", true).await;
    let target = accepted.lock().unwrap().len() + 100;
    eventually("publishing did not resume after the restart", || async {
        let n = accepted.lock().unwrap().len();
        if n >= target {
            Ok(())
        } else {
            Err((n, gw.admin_json("/readyz").await.1))
        }
    })
    .await;
    stop.store(true, SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    // Every acknowledged publish reaches the persistent subscriber (duplicates allowed).
    let want: std::collections::BTreeSet<usize> =
        accepted.lock().unwrap().iter().copied().collect();
    let mut got = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !want.is_subset(&got) {
        assert!(
            Instant::now() < deadline,
            "missing {:?} of {} accepted; got {} (max {:?}), accepted max {:?}",
            want.difference(&got).take(10).collect::<Vec<_>>(),
            want.len(),
            got.len(),
            got.last(),
            want.last()
        );
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(1), sub.rx.recv()).await {
            got.insert(
                String::from_utf8_lossy(&m.payload)
                    .parse::<usize>()
                    .unwrap(),
            );
        }
    }
    assert!(want.len() <= got.len());
}

#[tokio::test]
async fn mqtt_3_1_1_publishes_at_every_qos_and_reads_the_retained_value() {
    let addr = mq::broker_addr().await;
    let prefix = unique();
    let mut sub = Subscriber::start(
        &addr,
        &format!("sub-{}", uuid::Uuid::now_v7().simple()),
        &format!("{prefix}/#"),
    )
    .await;
    let gw = Gateway::start(&config_with(&addr, &prefix, "v3.1.1")).await;
    gw.wait_backend("devices", true).await;
    for (method, path, want) in [
        (Method::PUT, "/devices/a/setpoint", 202),
        (Method::POST, "/devices/a/fire", 200),
        (Method::POST, "/devices/a/once", 202),
    ] {
        let (s, _, b) = send(request(method, &gw.url(path)).body(body("21.5")).unwrap()).await;
        assert_eq!(s, want, "{path}: {}", String::from_utf8_lossy(&b));
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        let m = sub.next().await;
        got.push((
            String::from_utf8_lossy(&m.topic).into_owned(),
            m.qos as u8,
            m.retain,
        ));
        assert_eq!(&m.payload[..], b"21.5");
    }
    got.sort();
    assert_eq!(
        got,
        [
            (format!("{prefix}/a/fire"), 0, false),
            (format!("{prefix}/a/once"), 2, false),
            (format!("{prefix}/a/setpoint"), 1, true),
        ]
    );
    // Retained, and read back through a 3.1.1 subscription.
    let (s, _, b) = get(&gw.url("/devices/a/setpoint")).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(&b[..], b"21.5");
}

#[tokio::test]
async fn a_last_value_read_answers_with_the_retained_message() {
    let addr = mq::broker_addr().await;
    let prefix = unique();
    let gw = Gateway::start(&config(&addr, &prefix)).await;
    gw.wait_backend("devices", true).await;
    let req = request(Method::PUT, &gw.url("/devices/t1/setpoint"))
        .header("content-type", "application/json")
        .body(body(r#"{"celsius":19}"#))
        .unwrap();
    assert_eq!(send(req).await.0, 202);
    // Several readers at once all get the retained value.
    let reads = futures_util::future::join_all(
        (0..5).map(|_| async { get(&gw.url("/devices/t1/setpoint")).await }),
    )
    .await;
    for (s, h, b) in reads {
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(&b[..], br#"{"celsius":19}"#);
    }
    let started = Instant::now();
    let (s, _, b) = get(&gw.url("/devices/never/setpoint")).await;
    assert_eq!(s, 404, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["type"], "urn:switchyard:problem:no-value");
    assert!(started.elapsed() < Duration::from_secs(3));
    let (s, _, b) = get(&gw.url("/devices/a+b/setpoint")).await;
    assert_eq!(
        (s.as_u16(), json(&b)["field"].as_str()),
        (400, Some("device"))
    );
}

#[tokio::test]
async fn request_response_with_the_example_device() {
    let addr = mq::broker_addr().await;
    let prefix = unique();
    let gw = Gateway::start(&format!(
        r#"{}
routes:
  - id: command
    match: {{ method: POST, path: "/devices/{{device}}/commands" }}
    backend: devices
    timeout: 2s
    mqtt: {{ topic: "{prefix}/{{device}}/cmd", response: {{}} }}
  - id: telemetry
    match: {{ method: GET, path: "/devices/{{device}}/telemetry" }}
    backend: devices
    mqtt: {{ topic: "{prefix}/{{device}}/telemetry", last_value: true, wait: 2s }}
"#,
        devices_backend(&addr)
    ))
    .await;
    gw.wait_backend("devices", true).await;
    let _device = crate::support::device::Device::start(
        &addr,
        &prefix,
        "kitchen",
        Duration::from_millis(100),
    )
    .await;
    let cmd = |device: &str, b: &'static str| {
        request(
            Method::POST,
            &gw.url(&format!("/devices/{device}/commands")),
        )
        .body(body(b))
        .unwrap()
    };
    let (s, h, b) = send(cmd("kitchen", r#"{"setpoint":21}"#)).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(json(&b)["accepted"], true);
    // The status comes from the response's user property.
    let (s, _, b) = send(cmd("kitchen", r#"{"setpoint":99}"#)).await;
    assert_eq!(s, 422, "{}", String::from_utf8_lossy(&b));
    // Concurrent commands each get their own response.
    let answers =
        futures_util::future::join_all((0..10).map(|_| send(cmd("kitchen", r#"{"setpoint":20}"#))))
            .await;
    assert!(answers.iter().all(|(s, _, _)| *s == 200));
    // Nobody answers for another device: 504 at the route's deadline.
    let started = Instant::now();
    let (s, _, _) = send(cmd("garage", r#"{"setpoint":20}"#)).await;
    assert_eq!(s, 504);
    assert!(started.elapsed() < Duration::from_secs(5));
    // The telemetry the device retains is readable.
    let (s, _, b) = get(&gw.url("/devices/kitchen/telemetry")).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["device"], "kitchen");
}

/// Reads SSE events from `body` until `pred` is satisfied or it ends; returns the `data:` lines.
async fn read_events(
    body: &mut hyper::body::Incoming,
    mut until: impl FnMut(&[serde_json::Value]) -> bool,
) -> (Vec<serde_json::Value>, bool) {
    use http_body_util::BodyExt;
    let mut buf = String::new();
    let mut events = Vec::new();
    loop {
        if until(&events) {
            return (events, false);
        }
        let Some(frame) = tokio::time::timeout(Duration::from_secs(20), body.frame())
            .await
            .expect("an SSE frame within 20 s")
        else {
            return (events, true);
        };
        if let Ok(data) = frame.unwrap().into_data() {
            buf.push_str(&String::from_utf8_lossy(&data));
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                let kind = event
                    .lines()
                    .find_map(|l| l.strip_prefix("event: "))
                    .unwrap_or("");
                if let Some(d) = event.lines().find_map(|l| l.strip_prefix("data: ")) {
                    let mut v: serde_json::Value = serde_json::from_str(d).unwrap();
                    v["_event"] = kind.into();
                    events.push(v);
                }
            }
        }
    }
}

#[tokio::test]
async fn live_subscriptions_fan_out_over_sse_and_cut_off_a_stalled_client() {
    use rumqttc::v5::{AsyncClient, MqttOptions};
    let addr = mq::broker_addr().await;
    let prefix = unique();
    let id = uuid::Uuid::now_v7().simple();
    let gw = Gateway::start(&format!(
        r#"{}
routes:
  - id: events
    match: {{ method: GET, path: "/devices/{{device}}/events" }}
    backend: devices
    mqtt: {{ topic: "{prefix}/{{device}}/#", subscribe: true, buffer: 32 }}
"#,
        devices_backend(&addr)
    ))
    .await;
    gw.wait_backend("devices", true).await;
    let open = || async {
        let req = request(Method::GET, &gw.url("/devices/d/events"))
            .body(body(""))
            .unwrap();
        let resp = client().request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        resp.into_body()
    };
    let (mut a, mut b, mut stalled) = (open().await, open().await, open().await);
    let (_, _, m) = get(&gw.admin_url("/metrics")).await;
    assert!(
        String::from_utf8_lossy(&m).contains("switchyard_open_streams{backend=\"devices\"} 3"),
        "{}",
        String::from_utf8_lossy(&m)
    );

    let (host, port) = addr.rsplit_once(':').unwrap();
    let (publisher, mut el) = AsyncClient::new(
        MqttOptions::new(format!("pub-{id}"), host, port.parse().unwrap()),
        1000,
    );
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    // Until the shared broker subscription is active, probes may be missed.
    let probe_topic = format!("{prefix}/d/probe");
    let prober = {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            loop {
                let _ = publisher
                    .publish(probe_topic.clone(), QoS::AtLeastOnce, false, "probe")
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let got_probe = |e: &[serde_json::Value]| e.iter().any(|v| v["payload"] == "probe");
    read_events(&mut a, got_probe).await;
    read_events(&mut b, got_probe).await;
    prober.abort();

    // In order, to both, as JSON when the payload is JSON.
    for i in 0..20 {
        publisher
            .publish(
                format!("{prefix}/d/t"),
                QoS::AtLeastOnce,
                false,
                format!("{{\"n\":{i}}}"),
            )
            .await
            .unwrap();
    }
    for body in [&mut a, &mut b] {
        let (events, ended) = read_events(body, |e| {
            e.iter()
                .filter(|v| v["topic"].as_str().is_some_and(|t| t.ends_with("/t")))
                .count()
                == 20
        })
        .await;
        let ns: Vec<i64> = events
            .iter()
            .filter(|v| v["topic"].as_str().is_some_and(|t| t.ends_with("/t")))
            .map(|v| v["payload"]["n"].as_i64().unwrap())
            .collect();
        assert_eq!(ns, (0..20).collect::<Vec<_>>(), "ended={ended} {events:?}");
    }

    // A client that stops reading falls behind and is cut off; the others get everything.
    let big = "x".repeat(64 * 1024);
    // The reader reports its progress and the publisher stays at most 8 messages ahead of it
    // (the route's buffer is 32): a client that reads is never cut off, however the threads
    // are scheduled, while the stalled one falls behind once its socket buffers are full.
    let (seen_tx, mut seen) = tokio::sync::watch::channel(0usize);
    let reader = tokio::spawn(async move {
        let (events, _) = read_events(&mut a, |e| {
            let n = e
                .iter()
                .filter(|v| v["topic"].as_str().is_some_and(|t| t.ends_with("/big")))
                .count();
            let _ = seen_tx.send(n);
            n == 300
        })
        .await;
        events.iter().filter(|v| v["_event"] == "error").count()
    });
    for i in 0..300 {
        while i >= *seen.borrow() + 8 {
            seen.changed().await.expect("the reader is still reading");
        }
        publisher
            .publish(
                format!("{prefix}/d/big"),
                QoS::AtLeastOnce,
                false,
                big.clone(),
            )
            .await
            .unwrap();
    }
    assert_eq!(
        reader.await.unwrap(),
        0,
        "the reading client missed nothing"
    );
    let (events, ended) = read_events(&mut stalled, |_| false).await;
    assert!(ended, "the stalled client's stream ended");
    let last = events.last().unwrap();
    assert_eq!(
        (last["_event"].as_str(), last["error"].as_str()),
        (Some("error"), Some("slow-consumer"))
    );
    drop(b);
}

#[tokio::test]
async fn tls_to_the_broker_with_a_private_ca() {
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let broker = PrivateBroker::start_tls(&ck.cert.pem(), &ck.signing_key.serialize_pem()).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ck.cert.pem()).unwrap();
    let prefix = unique();
    let yaml = |ca: &std::path::Path| {
        format!(
            "backends:\n  devices:\n    type: mqtt\n    url: \"mqtts://{}\"\n    client_id: \"gw-{}\"\n    tls: {{ ca: \"{}\" }}\nroutes:\n  - id: p\n    match: {{ method: PUT, path: /p }}\n    backend: devices\n    mqtt: {{ topic: \"{prefix}/p\" }}\n",
            broker.addr(),
            uuid::Uuid::now_v7().simple(),
            ca.display()
        )
    };
    let gw = Gateway::start(&yaml(&dir.path().join("ca.pem"))).await;
    gw.wait_backend("devices", true).await;
    let (s, _, b) = send(
        request(Method::PUT, &gw.url("/p"))
            .body(body("tls"))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    // A CA that did not sign the broker's certificate: never connected, never cleartext.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    std::fs::write(dir.path().join("other.pem"), other.cert.pem()).unwrap();
    let gw = Gateway::start(&yaml(&dir.path().join("other.pem"))).await;
    let problem = eventually("the TLS failure was never reported", || async {
        let (_, v) = gw.admin_json("/readyz").await;
        assert_eq!(v["backends"]["devices"]["ready"], false, "{v}");
        let p = v["backends"]["devices"]["problem"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if p.starts_with("not connected") {
            Ok(p)
        } else {
            Err(p)
        }
    })
    .await;
    assert!(
        problem.to_lowercase().contains("certificate") || problem.contains("Tls"),
        "{problem}"
    );
    let (s, _, _) = send(request(Method::PUT, &gw.url("/p")).body(body("x")).unwrap()).await;
    assert_eq!(s, 503);
}

#[tokio::test]
async fn subscriptions_the_broker_refuses_are_answered_with_its_refusal() {
    subscriptions_refused("v5").await;
}

#[tokio::test]
async fn subscriptions_the_broker_refuses_are_answered_with_its_refusal_on_mqtt_3_1_1() {
    subscriptions_refused("v3.1.1").await;
}

/// A broker that lets the gateway subscribe to `open/#` only: a live subscription or a last-value
/// read elsewhere is answered 502 `subscription-refused` naming the filter, at once (after the
/// SUBACK), not with a silent stream or a 404 after the wait; `open/#` streams as before.
async fn subscriptions_refused(protocol: &str) {
    use rumqttc::v5::{AsyncClient, MqttOptions};
    let broker = PrivateBroker::start_with_subscribe_acl(&["open/#", "switchyard/#"]).await;
    let gw = Gateway::start(&format!(
        r#"{}    protocol: "{protocol}"
    max_packet_size: 1KiB
routes:
  - id: watch
    match: {{ method: GET, path: "/watch/{{area}}/{{device}}" }}
    backend: devices
    mqtt: {{ topic: "{{area}}/{{device}}/#", subscribe: true }}
  - id: last
    match: {{ method: GET, path: "/last/{{area}}/{{device}}" }}
    backend: devices
    mqtt: {{ topic: "{{area}}/{{device}}", last_value: true, wait: 5s }}
"#,
        devices_backend(&broker.addr())
    ))
    .await;
    gw.wait_backend("devices", true).await;

    // Answered at once (a silent stream would hold this GET open).
    let answer = |path: String| {
        let url = gw.url(&path);
        async move {
            tokio::time::timeout(Duration::from_secs(10), get(&url))
                .await
                .expect("answered, not streamed")
        }
    };
    for _ in 0..2 {
        let (s, h, b) = answer("/watch/closed/d1".into()).await;
        assert_eq!(s, 502, "{}", String::from_utf8_lossy(&b));
        assert_eq!(h["content-type"], "application/problem+json");
        let v = json(&b);
        assert_eq!(v["type"], "urn:switchyard:problem:subscription-refused");
        assert!(
            v["detail"].as_str().unwrap().contains("`closed/d1/#`"),
            "{v}"
        );
    }
    let started = Instant::now();
    let (s, _, b) = answer("/last/closed/d1".into()).await;
    assert_eq!(s, 502, "{}", String::from_utf8_lossy(&b));
    assert_eq!(
        json(&b)["type"],
        "urn:switchyard:problem:subscription-refused"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "answered at once, not after the wait"
    );

    // A filter too long for the packet limit is the client's to fix, before any SUBSCRIBE.
    let (s, _, b) = answer(format!("/watch/open/{}", "x".repeat(1100))).await;
    assert_eq!(s, 400, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["field"], "topic");

    // A filter the broker allows streams, and a message published after the answer arrives.
    let resp = client()
        .request(
            request(Method::GET, &gw.url("/watch/open/d1"))
                .body(body(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut events = resp.into_body();
    let (publisher, mut el) = AsyncClient::new(
        MqttOptions::new(
            format!("pub-{}", uuid::Uuid::now_v7().simple()),
            "127.0.0.1",
            broker.port,
        ),
        10,
    );
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    publisher
        .publish("open/d1/temp", QoS::AtLeastOnce, false, "21.5")
        .await
        .unwrap();
    let (got, _) = read_events(&mut events, |e| !e.is_empty()).await;
    assert_eq!(got[0]["topic"], "open/d1/temp");
    assert_eq!(got[0]["payload"], 21.5);
}

/// An MQTT 3.1.1 broker refuses a message over its `max_packet_size` by closing the
/// connection (3.1.1 has no reason codes, and no CONNACK property tells the limit). The
/// message is not sent forever: after three connections closed on it, it is answered as
/// refused, and the messages behind it go through.
#[tokio::test]
async fn a_message_a_3_1_1_broker_refuses_by_disconnecting_is_answered_and_dropped() {
    let broker = PrivateBroker::start_with("max_packet_size 2048\n").await;
    let prefix = unique();
    let gw = Gateway::start(&config_with(&broker.addr(), &prefix, "v3.1.1")).await;
    gw.wait_backend("devices", true).await;
    let mut watcher = Subscriber::start(
        &broker.addr(),
        &format!("w-{}", uuid::Uuid::now_v7().simple()),
        &format!("{prefix}/#"),
    )
    .await;
    let put = |payload: String| {
        request(Method::PUT, &gw.url("/devices/d/setpoint"))
            .body(body(payload))
            .unwrap()
    };
    let started = Instant::now();
    let (s, _, b) = send(put("x".repeat(4000))).await;
    assert_eq!(s, 400, "{}", String::from_utf8_lossy(&b));
    let v = json(&b);
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("closed the connection each of the 3 times"),
        "{v}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    // The connection is back, and the next message is delivered.
    gw.wait_backend("devices", true).await;
    let (s, _, b) = send(put("small".into())).await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    let got = watcher.next().await;
    assert_eq!(&got.payload[..], b"small");
}
