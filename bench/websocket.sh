#!/usr/bin/env bash
# WebSocket ↔ MQTT benchmark, one run: CLIENTS WebSockets, each on a fixed-topic route that
# subscribes it to a topic of its own, versus the same number of rumqttc subscribers straight
# on the same local Mosquitto. One publisher sends MESSAGES QoS 1 messages to every topic; each
# side prints end-to-end deliveries per second, in alternation, ROUNDS times. The gateway's
# RSS per idle bridged connection is sampled before the load (target <= 64 KiB).
#
# Both sides use a private Mosquitto configured as a gateway's broker should be: the gateway's
# one connection carries every client's messages, and Mosquitto's defaults (20 in flight, 1000
# queued per client) would make it drop QoS 1 messages to that connection under this load (its
# log says "Outgoing messages are being dropped"). Set MQTT_ADDR to use another broker instead.
#
#   bash bench/websocket.sh      # CLIENTS=1000 MESSAGES=20 SIZE=64 ROUNDS=3
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-1000}
MESSAGES=${MESSAGES:-20}
SIZE=${SIZE:-64}
ROUNDS=${ROUNDS:-3}
SY_PORT=${SY_PORT:-18175}
SY_ADMIN=${SY_ADMIN:-18176}
MQTT_PORT=${MQTT_PORT:-18177}
. bench/common.sh
need mosquitto mosquitto

ulimit -n 65536 2>/dev/null || true
cargo build -q --release --locked --bin switchyard --example ws_bench
WORK=$(mktemp -d)
cleanup() {
  [ -n "${SY_PID:-}" ] && kill "$SY_PID" 2>/dev/null || true
  [ -n "${MQ_PID:-}" ] && kill "$MQ_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

if [ -z "${MQTT_ADDR:-}" ]; then
  MQTT_ADDR="127.0.0.1:$MQTT_PORT"
  cat > "$WORK/mosquitto.conf" <<CONF
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
persistence false
max_inflight_messages 1000
max_queued_messages 100000
CONF
  mosquitto -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
  MQ_PID=$!
  for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$MQTT_PORT") 2>/dev/null && break; sleep 0.1; done
fi

cat > "$WORK/routes.yaml" <<YAML
server: { listen: "127.0.0.1:$SY_PORT", admin: "127.0.0.1:$SY_ADMIN", limits: { max_connections: 20000 } }
backends:
  broker:
    type: mqtt
    url: "mqtt://$MQTT_ADDR"
    client_id: "switchyard-ws-bench-$$"
routes:
  - id: ws
    match: { method: GET, path: "/ws/{n}" }
    backend: broker
    websocket:
      mqtt: { subscribe: ["bench/ws-$$/{n}"] }
YAML
BROKER_PID=${MQ_PID:-0}

echo "$CLIENTS clients, $MESSAGES messages of $SIZE bytes to each, QoS 1, $ROUNDS round(s)"
: > "$WORK/results"
for r in $(seq 1 "$ROUNDS"); do
  d=$(MQTT_ADDR="$MQTT_ADDR" TOPIC="bench/direct-$$-$r" CLIENTS="$CLIENTS" MESSAGES="$MESSAGES" SIZE="$SIZE" \
      BROKER_PID="${BROKER_PID:-0}" "$BIN/examples/ws_bench" direct)
  # A fresh gateway each round, so its RSS before the sockets is a true baseline.
  RUST_LOG=warn "$BIN/switchyard" run --no-watch --config "$WORK/routes.yaml" >"$WORK/switchyard.log" 2>&1 &
  SY_PID=$!
  wait_ready "$SY_ADMIN"
  g=$(MQTT_ADDR="$MQTT_ADDR" TOPIC="bench/ws-$$" CLIENTS="$CLIENTS" MESSAGES="$MESSAGES" SIZE="$SIZE" \
      WS_URL="ws://127.0.0.1:$SY_PORT/ws" GATEWAY_PID="$SY_PID" "$BIN/examples/ws_bench" gateway)
  kill "$SY_PID"; wait "$SY_PID" 2>/dev/null || true; SY_PID=
  echo "round $r: $d"
  echo "round $r: $g"
  drate=$(sed -n 's/.* = \([0-9]*\) msg\/s.*/\1/p' <<<"$d")
  grate=$(sed -n 's/.* = \([0-9]*\) msg\/s.*/\1/p' <<<"$g")
  per=$(sed -n 's/.* = \([0-9.]*\) KiB per connection.*/\1/p' <<<"$g")
  echo "$drate $grate $per" >> "$WORK/results"
done
D=$(awk '{print $1}' "$WORK/results" | median)
G=$(awk '{print $2}' "$WORK/results" | median)
P=$(awk '{print $3}' "$WORK/results" | median)
awk -v d="$D" -v g="$G" -v p="$P" 'BEGIN { printf "medians: direct %.0f msg/s, switchyard %.0f msg/s; ratio %.2f; gateway RSS per idle connection %.1f KiB (target <= 64)\n", d, g, g / d, p }'
