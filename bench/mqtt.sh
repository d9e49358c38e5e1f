#!/usr/bin/env bash
# MQTT bridge benchmark, one run:
#  1. HTTP PUT → QoS 1 publish through Switchyard (wrk, INFLIGHT connections, one request in
#     flight each) versus a direct rumqttc publisher with INFLIGHT unacknowledged publishes, same
#     payload size, same local Mosquitto, in alternation; prints msg/s and the ratio.
#  2. SSE fan-out: CLIENTS concurrent Server-Sent-Events streams on one topic, one message
#     published; prints the time until all had it and the gateway's RSS per client.
#
#   bash bench/mqtt.sh          # DURATION=10 ROUNDS=3 INFLIGHT=32 SIZE=256 CLIENTS=1000
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
INFLIGHT=${INFLIGHT:-32}
SIZE=${SIZE:-256}
CLIENTS=${CLIENTS:-1000}
SY_PORT=${SY_PORT:-18173}
SY_ADMIN=${SY_ADMIN:-18174}
MQTT_ADDR=${MQTT_ADDR:-127.0.0.1:1883}
. bench/common.sh

need wrk wrk
ulimit -n 65536 2>/dev/null || true

cargo build -q --release --locked --bin switchyard --example mqtt_bench
WORK=$(mktemp -d)
cleanup() {
  [ -n "${SY_PID:-}" ] && kill "$SY_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

cat > "$WORK/routes.yaml" <<YAML
server: { listen: "127.0.0.1:$SY_PORT", admin: "127.0.0.1:$SY_ADMIN", limits: { max_connections: 20000 } }
backends:
  broker:
    type: mqtt
    url: "mqtt://$MQTT_ADDR"
    client_id: "switchyard-bench-$$"
    inflight: $INFLIGHT
routes:
  - id: publish
    match: { method: PUT, path: /bench }
    backend: broker
    mqtt: { topic: bench/via, qos: 1 }
  - id: events
    match: { method: GET, path: /events }
    backend: broker
    timeout: 1h
    mqtt: { topic: bench/fanout, subscribe: true }
YAML
RUST_LOG=warn "$BIN/switchyard" run --no-watch --config "$WORK/routes.yaml" >"$WORK/switchyard.log" 2>&1 &
SY_PID=$!
wait_ready "$SY_ADMIN"

head -c "$SIZE" /dev/zero | tr '\0' 'x' > "$WORK/body"
cat > "$WORK/put.lua" <<LUA
wrk.method = "PUT"
local f = io.open("$WORK/body", "rb"); wrk.body = f:read("*a"); f:close()
LUA

echo "${DURATION}s per target, $INFLIGHT in flight, $SIZE-byte QoS 1 messages, $ROUNDS round(s)"
: > "$WORK/results"
for r in $(seq 1 "$ROUNDS"); do
  d=$(MQTT_ADDR="$MQTT_ADDR" TOPIC=bench/direct SIZE="$SIZE" INFLIGHT="$INFLIGHT" DURATION="$DURATION" "$BIN/examples/mqtt_bench" direct)
  v=$(wrk -t 2 -c "$INFLIGHT" -d "${DURATION}s" --latency -s "$WORK/put.lua" "http://127.0.0.1:$SY_PORT/bench")
  drate=$(sed -n 's/.*= \([0-9]*\) msg\/s.*/\1/p' <<<"$d")
  vrate=$(awk '/^Requests\/sec:/ {print $2}' <<<"$v")
  non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$v"); non2xx=${non2xx:-0}
  echo "round $r: direct $drate msg/s; switchyard $vrate req/s (non-2xx $non2xx)"
  echo "$drate $vrate" >> "$WORK/results"
done
D=$(awk '{print $1}' "$WORK/results" | median); V=$(awk '{print $2}' "$WORK/results" | median)
awk -v d="$D" -v v="$V" 'BEGIN { printf "medians: direct %.0f msg/s, switchyard %.0f msg/s; ratio %.2f (target >= 0.80)\n", d, v, v / d }'

MQTT_ADDR="$MQTT_ADDR" TOPIC=bench/fanout CLIENTS="$CLIENTS" SSE_URL="http://127.0.0.1:$SY_PORT/events" \
  GATEWAY_PID="$SY_PID" "$BIN/examples/mqtt_bench" fanout
