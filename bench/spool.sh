#!/usr/bin/env bash
# Spool benchmark, in one run, side by side:
#   1. direct: a lapin publisher with confirms (examples/amqp_direct.rs);
#   2. live: HTTP POST → confirmed persistent publish through Switchyard, broker up;
#   3. spooled: the same route with `spool: true` while its broker is unreachable — every 202
#      is a record fsynced to the local spool (group commits);
#   4. drain: the gateway restarted with the broker reachable forwards what step 3 spooled
#      (confirmed publishes, in order); messages/s from the first to the last.
# Prints messages/s for each and the ratios, as medians over ROUNDS.
#
#   bash bench/spool.sh         # DURATION=10 (seconds) ROUNDS=3 INFLIGHT=32 SIZE=256
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
INFLIGHT=${INFLIGHT:-32}
SIZE=${SIZE:-256}
SY_PORT=${SY_PORT:-18173}
SY_ADMIN=${SY_ADMIN:-18174}
AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
. bench/common.sh

need wrk wrk
need curl curl

cargo build -q --release --locked --bin switchyard --example amqp_direct
WORK=$(mktemp -d)
cleanup() {
  [ -n "${SY_PID:-}" ] && kill "$SY_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# A port nothing listens on: the "down" broker.
DOWN_URL="amqp://guest:guest@127.0.0.1:1/%2f"

# write_config URL: the route publishes to bench.x with the spool on; the queue keeps at most
# 200 000 messages so that runs do not fill the disk.
write_config() {
  cat > "$WORK/routes.yaml" <<YAML
server: { listen: "127.0.0.1:$SY_PORT", admin: "127.0.0.1:$SY_ADMIN" }
state:
  path: "$WORK/state.redb"
  spool: { max_messages: 5000000, max_bytes: 4GiB, retry: { min: 20ms, max: 200ms } }
backends:
  rabbit:
    type: amqp
    url: "$1"
    channels: $INFLIGHT
    connect_timeout: 1s
    topology:
      exchanges: [{ name: bench.sx, type: direct }]
      queues: [{ name: bench.sq, max_length: 200000 }]
      bindings: [{ queue: bench.sq, exchange: bench.sx, routing_key: bench }]
routes:
  - id: publish
    match: { method: POST, path: /bench }
    backend: rabbit
    spool: true
    amqp: { exchange: bench.sx, routing_key: bench }
YAML
}
start() {
  RUST_LOG=warn "$BIN/switchyard" run --no-watch --config "$WORK/routes.yaml" >>"$WORK/switchyard.log" 2>&1 &
  SY_PID=$!
  for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$SY_ADMIN/healthz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "bench: the gateway did not start" >&2; cat "$WORK/switchyard.log" >&2; exit 1
}
stop() { kill "$SY_PID"; wait "$SY_PID" 2>/dev/null || true; SY_PID=; }
spooled_count() { curl -fsS "http://127.0.0.1:$SY_ADMIN/spool" | sed -n 's/.*"messages":\([0-9]*\).*/\1/p'; }

post_lua "$WORK" "$SIZE"
via() {
  wrk -t 2 -c "$INFLIGHT" -d "${DURATION}s" -s "$WORK/post.lua" "http://127.0.0.1:$SY_PORT/bench"
}
direct() {
  AMQP_URL="$AMQP_URL" EXCHANGE=bench.sx ROUTING_KEY=bench SIZE="$SIZE" CONCURRENCY="$INFLIGHT" \
    DURATION="$DURATION" "$BIN/examples/amqp_direct" | sed -n 's/.*= \([0-9]*\) msg\/s.*/\1/p'
}
rate() { awk '/^Requests\/sec:/ {print $2}'; }
non2xx() { local n; n=$(awk '/Non-2xx/ {print $NF}'); echo "${n:-0}"; }

echo "${DURATION}s per target, $INFLIGHT messages in flight, $SIZE-byte persistent messages, $ROUNDS round(s)"
: > "$WORK/results"
for r in $(seq 1 "$ROUNDS"); do
  rm -f "$WORK/state.redb"
  write_config "$AMQP_URL"; start; wait_ready "$SY_ADMIN"
  d=$(direct)
  out=$(via); live=$(rate <<<"$out"); live_bad=$(non2xx <<<"$out")
  stop

  write_config "$DOWN_URL"; start
  out=$(via); spool=$(rate <<<"$out"); spool_bad=$(non2xx <<<"$out")
  n=$(spooled_count)
  stop

  write_config "$AMQP_URL"
  t0=$(date +%s.%N); start
  while [ "$(spooled_count)" != "0" ]; do sleep 0.05; done
  t1=$(date +%s.%N)
  stop
  drain=$(awk -v n="$n" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", n / (b - a) }')
  echo "round $r: direct $d msg/s; live $live req/s (non-2xx $live_bad); spooled $spool req/s (non-2xx $spool_bad, $n in the spool); drained $n in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')s = $drain msg/s"
  echo "$d $live $spool $drain" >> "$WORK/results"
done
col() { awk -v c="$1" '{print $c}' "$WORK/results" | median; }
awk -v d="$(col 1)" -v l="$(col 2)" -v s="$(col 3)" -v dr="$(col 4)" 'BEGIN {
  printf "medians: direct %.0f msg/s, live %.0f msg/s, spooled %.0f msg/s, drain %.0f msg/s\n", d, l, s, dr
  printf "ratios: spooled/live = %.2f, spooled/direct = %.2f, drain/live = %.2f, drain/direct = %.2f\n", s / l, s / d, dr / l, dr / d
}'
