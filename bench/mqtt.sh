#!/usr/bin/env bash
# MQTT bridge benchmark, one run:
#  1. HTTP PUT → QoS 1 publish through Switchyard (wrk, INFLIGHT connections, one request in
#     flight each) versus a direct rumqttc publisher with INFLIGHT unacknowledged publishes, same
#     payload size, same local Mosquitto, in alternation; and the same gateway proxying the same
#     PUT to nginx (its own HTTP-proxy rate, same wrk settings). Prints msg/s and the ratios.
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
need nginx nginx
ulimit -n 65536 2>/dev/null || true

cargo build -q --release --locked --bin switchyard --example mqtt_bench
WORK=$(mktemp -d)
UP_PORT=$((SY_PORT + 2))
cleanup() {
  [ -n "${SY_PID:-}" ] && kill "$SY_PID" 2>/dev/null || true
  [ -f "$WORK/up/nginx.pid" ] && kill "$(cat "$WORK/up/nginx.pid")" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

start_nginx "$WORK/up" <<CONF
  server { listen 127.0.0.1:$UP_PORT; location / { default_type text/plain; return 200 "ok\n"; } }
CONF
cat > "$WORK/routes.yaml" <<YAML
server: { listen: "127.0.0.1:$SY_PORT", admin: "127.0.0.1:$SY_ADMIN", limits: { max_connections: 20000 } }
backends:
  broker:
    type: mqtt
    url: "mqtt://$MQTT_ADDR"
    client_id: "switchyard-bench-$$"
    inflight: $INFLIGHT
  up: { type: http, endpoints: ["http://127.0.0.1:$UP_PORT"] }
routes:
  - id: proxy
    match: { method: PUT, path: /proxy }
    backend: up
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
  p=$(wrk -t 2 -c "$INFLIGHT" -d "${DURATION}s" --latency -s "$WORK/put.lua" "http://127.0.0.1:$SY_PORT/proxy")
  drate=$(sed -n 's/.*= \([0-9]*\) msg\/s.*/\1/p' <<<"$d")
  vrate=$(awk '/^Requests\/sec:/ {print $2}' <<<"$v")
  prate=$(awk '/^Requests\/sec:/ {print $2}' <<<"$p")
  non2xx=$(printf '%s\n%s\n' "$v" "$p" | awk '/Non-2xx/ {n += $NF} END {print n + 0}')
  echo "round $r: direct $drate msg/s; switchyard $vrate req/s; switchyard HTTP proxy $prate req/s (non-2xx $non2xx)"
  echo "$drate $vrate $prate" >> "$WORK/results"
done
D=$(awk '{print $1}' "$WORK/results" | median); V=$(awk '{print $2}' "$WORK/results" | median)
P=$(awk '{print $3}' "$WORK/results" | median)
awk -v d="$D" -v v="$V" -v p="$P" 'BEGIN { printf "medians: direct %.0f msg/s, switchyard %.0f msg/s, switchyard HTTP proxy %.0f req/s; switchyard/direct %.2f (target >= 0.80), MQTT QoS 1/HTTP proxy %.2f (target >= 1.00)\n", d, v, p, v / d, v / p }'

MQTT_ADDR="$MQTT_ADDR" TOPIC=bench/fanout CLIENTS="$CLIENTS" SSE_URL="http://127.0.0.1:$SY_PORT/events" \
  GATEWAY_PID="$SY_PID" "$BIN/examples/mqtt_bench" fanout
