#!/usr/bin/env bash
# Abuse run: the attack classes of docs/security.md against a release build of Switchyard with
# the local RabbitMQ and Mosquitto and a loopback HTTP upstream, bounded in time (about a
# minute), loopback only. Prints, per class, whether each attack was refused or served and
# whether other clients were affected. The shared brokers only ever see well-formed traffic
# (unique exchange and topic names); nothing here stops or breaks them.
#
#   bash bench/abuse.sh            # SY_PORT=18311 SY_ADMIN=18312 UP_PORT=18313 by default
set -euo pipefail
cd "$(dirname "$0")/.."

SY_PORT=${SY_PORT:-18311}
SY_ADMIN=${SY_ADMIN:-18312}
UP_PORT=${UP_PORT:-18313}
AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
MQTT_ADDR=${MQTT_ADDR:-127.0.0.1:1883}
. bench/common.sh

cargo build -q --release --locked --bin switchyard --example hyper_proxy
SWITCHYARD="$CARGO_TARGET_DIR/release/switchyard"

WORK=$(mktemp -d)
cleanup() {
  for p in ${SY_PID:-} ${UP_PID:-}; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

python3 bench/abuse.py upstream "$UP_PORT" &
UP_PID=$!

RUN=$$
cat > "$WORK/routes.yaml" <<YAML
server: { listen: "127.0.0.1:$SY_PORT", admin: "127.0.0.1:$SY_ADMIN", shutdown_grace: 30s }
state: { path: "$WORK/state.redb" }
backends:
  up:
    type: http
    endpoints: ["http://127.0.0.1:$UP_PORT", "http://127.0.0.1:$((UP_PORT + 1))"]
    eject_after_failures: 2
    breaker: { consecutive_failures: 3, open_for: 60s }
  rabbit:
    type: amqp
    url: "$AMQP_URL"
    topology:
      exchanges: [{ name: "abuse-$RUN", type: topic, durable: false }]
  devices: { type: mqtt, url: "mqtt://$MQTT_ADDR", client_id: "abuse-$RUN" }
routes:
  - id: echo
    match: { method: [GET, POST], path: "/echo" }
    backend: up
    timeout: 1s
    plugins:
      - headers: { request: { set: { x-gateway: switchyard } } }
  - id: live
    match: { method: GET, path: "/v1/customers/{customer}/orders/live" }
    backend: rabbit
    websocket:
      amqp: { consume: { bind: [{ exchange: "abuse-$RUN", routing_key: "order.{customer}.#" }] } }
  - id: set
    match: { method: PUT, path: "/d/{device}/set" }
    backend: devices
    mqtt: { topic: "abuse-$RUN/{device}/set", qos: 1 }
  - id: events
    match: { method: GET, path: "/d/{device}/events" }
    backend: devices
    mqtt: { topic: "abuse-$RUN/{device}/events", subscribe: true }
  - id: job
    match: { method: POST, path: "/job" }
    backend: up
    mode: async
    async:
      webhook:
        from_header: Callback-Url
        allow: ["http://127.0.0.1:$UP_PORT/cb/"]
        secret: "abuse-run-secret-0123456789"
YAML
cp "$WORK/routes.yaml" "$WORK/routes.good.yaml"
RUST_LOG=warn "$SWITCHYARD" run --config "$WORK/routes.yaml" >"$WORK/switchyard.log" 2>&1 &
SY_PID=$!
wait_ready "$SY_ADMIN"

python3 bench/abuse.py attack "$SY_PORT" "$SY_ADMIN" "$UP_PORT" "$WORK" "$SWITCHYARD" "$SY_PID"
