//! Peers for the WebSocket benchmark (`bench/websocket.sh`).
//!
//! - `ws_bench gateway`: opens `CLIENTS` WebSockets on `WS_URL/<i>` (a fixed-topic route that
//!   subscribes each to `<TOPIC>/<i>`), samples the gateway's resident memory (`GATEWAY_PID`)
//!   before and with the idle sockets open, then publishes `MESSAGES` messages to every
//!   client's topic and prints the end-to-end deliveries per second.
//! - `ws_bench direct`: the same clients as rumqttc subscribers straight on the broker (one
//!   connection each, QoS 1), the same publisher, the same count; prints deliveries per second
//!   and the broker's memory per connection (`BROKER_PID`) for reference.
//!
//! Settings from the environment: MQTT_ADDR (host:port), WS_URL, TOPIC, CLIENTS, MESSAGES,
//! SIZE, GATEWAY_PID, BROKER_PID.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio_tungstenite::tungstenite::Message;

#[path = "common/mod.rs"]
mod common;
use common::{env, rss_kib};

fn options(id: &str) -> MqttOptions {
    let addr: String = env("MQTT_ADDR", "127.0.0.1:1883".to_string());
    let (host, port) = addr.rsplit_once(':').expect("MQTT_ADDR is host:port");
    let mut o = MqttOptions::new(id, host, port.parse().expect("port"));
    o.set_max_packet_size(Some(1024 * 1024))
        .set_keep_alive(Duration::from_secs(60));
    o
}

/// Publishes `messages` rounds of one QoS 1 message to each of `clients` topics, 100
/// unacknowledged at most, and returns when all were acknowledged.
async fn publish_all(topic: &str, clients: usize, messages: usize, size: usize) {
    let mut o = options(&format!("ws-bench-pub-{}", std::process::id()));
    o.set_outgoing_inflight_upper_limit(100);
    let (c, mut el) = AsyncClient::new(o, 100);
    let total = clients * messages;
    let topic = topic.to_string();
    let payload = vec![b'x'; size];
    tokio::spawn(async move {
        for _ in 0..messages {
            for i in 0..clients {
                if c.publish(
                    format!("{topic}/{i}"),
                    QoS::AtLeastOnce,
                    false,
                    payload.clone(),
                )
                .await
                .is_err()
                {
                    return;
                }
            }
        }
    });
    let mut acked = 0;
    while acked < total {
        match el.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
            Ok(_) => {}
            Err(e) => panic!("publisher failed: {e}"),
        }
    }
}

/// Waits until `count` reaches `want` (or 60 s pass); the time it took from `start`.
async fn wait_for(count: &AtomicU64, want: u64, start: Instant) -> (u64, Duration) {
    let deadline = start + Duration::from_secs(60);
    loop {
        let n = count.load(Ordering::Relaxed);
        if n >= want || Instant::now() > deadline {
            return (n, start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A WebSocket client on `url` counting the data frames it gets in `got`.
fn spawn_socket(url: String, got: Arc<AtomicU64>, ready: Arc<AtomicU64>) {
    tokio::spawn(async move {
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("WebSocket handshake");
        ready.fetch_add(1, Ordering::Relaxed);
        while let Some(Ok(m)) = ws.next().await {
            if matches!(m, Message::Text(_) | Message::Binary(_)) {
                got.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
}

/// A rumqttc subscriber of its own on `topic` counting the messages it gets in `got`.
fn spawn_subscriber(id: String, topic: String, got: Arc<AtomicU64>, ready: Arc<AtomicU64>) {
    let mut o = options(&id);
    o.set_clean_start(true);
    let (c, mut el) = AsyncClient::new(o, 10);
    tokio::spawn(async move {
        c.subscribe_many(vec![Filter::new(topic, QoS::AtLeastOnce)])
            .await
            .expect("subscribe");
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    ready.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    got.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
}

#[tokio::main]
async fn main() {
    let clients: usize = env("CLIENTS", 1000);
    let messages: usize = env("MESSAGES", 20);
    let size: usize = env("SIZE", 64);
    let topic: String = env("TOPIC", format!("bench/ws-{}", std::process::id()));
    let got = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(AtomicU64::new(0));
    let side = std::env::args().nth(1).unwrap_or_default();
    let (pid, whose): (u32, &str) = match side.as_str() {
        "gateway" => (env("GATEWAY_PID", 0), "gateway"),
        "direct" => (env("BROKER_PID", 0), "broker"),
        _ => {
            eprintln!("usage: ws_bench gateway|direct (settings from the environment)");
            return;
        }
    };
    let url: String = env("WS_URL", "ws://127.0.0.1:18175/ws".to_string());
    let before = rss_kib(pid);
    for i in 0..clients {
        let (got, up) = (got.clone(), ready.clone());
        if side == "gateway" {
            spawn_socket(format!("{url}/{i}"), got, up);
        } else {
            let id = format!("ws-bench-sub-{}-{i}", std::process::id());
            spawn_subscriber(id, format!("{topic}/{i}"), got, up);
        }
        if i % 100 == 99 {
            // Connections in waves of 100, as a fleet of devices would reconnect.
            wait_for(&ready, i as u64 + 1, Instant::now()).await;
        }
    }
    wait_for(&ready, clients as u64, Instant::now()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_kib(pid);
    let start = Instant::now();
    publish_all(&topic, clients, messages, size).await;
    let (n, took) = wait_for(&got, (clients * messages) as u64, start).await;
    println!(
        "{side}: {n}/{} delivered in {:.2} s = {:.0} msg/s; {whose} RSS {before} KiB before, {idle} KiB with {clients} idle clients = {:.1} KiB per connection",
        clients * messages,
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        idle.saturating_sub(before) as f64 / clients as f64
    );
}
