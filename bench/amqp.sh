#!/usr/bin/env bash
# AMQP bridge benchmark: HTTP POST → confirmed persistent publish through Switchyard (wrk, one
# request in flight per connection) versus a direct lapin publisher with confirms
# (examples/amqp_direct.rs), same message (body and the properties the gateway sets), same number
# of messages in flight, same broker, in alternation in one run. Prints messages/s and latency
# percentiles, then the ratios. The direct publisher also runs with minimal properties (delivery
# mode and content type only), printed for reference: "direct-min". Each round also gives the CPU
# time per message of the publisher (the direct one, or the gateway) and of the broker's Erlang
# VM, read from /proc, so that where the two paths differ is a count, not a guess.
#
#   bash bench/amqp.sh          # DURATION=10 (seconds) ROUNDS=3 INFLIGHT=32 SIZE=256
#                               # SY_WORKERS=N: the gateway's Tokio worker threads
#                               # RUNTIME=shared: server.runtime (default per_core)
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
INFLIGHT=${INFLIGHT:-32}
SIZE=${SIZE:-256}
RUNTIME=${RUNTIME:-per_core}
SY_PORT=${SY_PORT:-18163}
SY_ADMIN=${SY_ADMIN:-18164}
AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
. bench/common.sh

need wrk wrk

cargo build -q --release --locked --bin switchyard --example amqp_direct
WORK=$(mktemp -d)
cleanup() {
  [ -n "${SY_PID:-}" ] && kill "$SY_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# A queue that keeps at most 10 000 messages (the oldest are dropped), so runs do not fill the disk.
cat > "$WORK/routes.yaml" <<YAML
server: { listen: "127.0.0.1:$SY_PORT", admin: "127.0.0.1:$SY_ADMIN", runtime: $RUNTIME }
backends:
  rabbit:
    type: amqp
    url: "$AMQP_URL"
    channels: $INFLIGHT
    topology:
      exchanges: [{ name: bench.x, type: direct }]
      queues: [{ name: bench.q, max_length: 10000 }]
      bindings: [{ queue: bench.q, exchange: bench.x, routing_key: bench }]
routes:
  - id: publish
    match: { method: POST, path: /bench }
    backend: rabbit
    amqp: { exchange: bench.x, routing_key: bench }
YAML
env ${SY_WORKERS:+TOKIO_WORKER_THREADS=$SY_WORKERS} RUST_LOG=warn "$BIN/switchyard" run --no-watch --config "$WORK/routes.yaml" >"$WORK/switchyard.log" 2>&1 &
SY_PID=$!
wait_ready "$SY_ADMIN"

post_lua "$WORK" "$SIZE"

direct() { # PROPERTIES
  PROPERTIES="$1" AMQP_URL="$AMQP_URL" EXCHANGE=bench.x ROUTING_KEY=bench SIZE="$SIZE" CONCURRENCY="$INFLIGHT" \
    DURATION="$DURATION" "$BIN/examples/amqp_direct"
}
via() {
  wrk -t 2 -c "$INFLIGHT" -d "${DURATION}s" --latency -s "$WORK/post.lua" "http://127.0.0.1:$SY_PORT/bench"
}
us() { awk '{v = $1; if (v ~ /us$/) print v + 0; else if (v ~ /ms$/) print (v + 0) * 1000; else print (v + 0) * 1e6}'; }
# ticks PID...: the CPU time (user + system, clock ticks) the processes have used so far.
ticks() { for p in "$@"; do awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0; done | awk '{s += $1} END {print s + 0}'; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))
# The broker's processes (the Erlang VM), whose CPU per message is compared on both paths.
BROKER_PIDS=$(pgrep -f beam.smp || true)
per_msg() { awk -v t="$1" -v n="$2" -v u="$TICK_US" 'BEGIN { if (n > 0) printf "%.1f", t * u / n; else print 0 }'; }

echo "${DURATION}s per target, $INFLIGHT messages in flight, $SIZE-byte persistent messages, $ROUNDS round(s)"
: > "$WORK/results"
for r in $(seq 1 "$ROUNDS"); do
  b0=$(ticks $BROKER_PIDS)
  d=$(direct gateway)
  b1=$(ticks $BROKER_PIDS)
  m=$(direct minimal)
  b2=$(ticks $BROKER_PIDS); g2=$(ticks "$SY_PID")
  v=$(via)
  b3=$(ticks $BROKER_PIDS); g3=$(ticks "$SY_PID")
  dn=$(sed -n 's/.*direct: \([0-9]*\) messages.*/\1/p' <<<"$d")
  vn=$(awk '/requests in/ {print $1}' <<<"$v")
  dcpu=$(per_msg "$(sed -n 's/.*cpu_ticks \([0-9]*\).*/\1/p' <<<"$d")" "$dn")
  dbroker=$(per_msg $((b1 - b0)) "$dn")
  vcpu=$(per_msg $((g3 - g2)) "$vn")
  vbroker=$(per_msg $((b3 - b2)) "$vn")
  mrate=$(sed -n 's/.*= \([0-9]*\) msg\/s.*/\1/p' <<<"$m")
  drate=$(sed -n 's/.*= \([0-9]*\) msg\/s.*/\1/p' <<<"$d")
  dp50=$(sed -n 's/.*p50 \([0-9]*\) us.*/\1/p' <<<"$d"); dp99=$(sed -n 's/.*p99 \([0-9]*\) us.*/\1/p' <<<"$d")
  vrate=$(awk '/^Requests\/sec:/ {print $2}' <<<"$v")
  vp50=$(awk '$1 == "50%" {print $2}' <<<"$v" | us); vp99=$(awk '$1 == "99%" {print $2}' <<<"$v" | us)
  non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$v"); non2xx=${non2xx:-0}
  echo "round $r: direct $drate msg/s (p50 $dp50 us, p99 $dp99 us); direct-min $mrate msg/s; switchyard $vrate req/s (p50 $vp50 us, p99 $vp99 us, non-2xx $non2xx)"
  echo "         CPU µs per message: direct publisher $dcpu, broker $dbroker; gateway $vcpu, broker $vbroker"
  echo "$drate $vrate $dp50 $vp50 $dp99 $vp99 $mrate $dcpu $dbroker $vcpu $vbroker" >> "$WORK/results"
done
col() { awk -v c="$1" '{print $c}' "$WORK/results" | median; }
awk -v d="$(col 1)" -v m="$(col 7)" -v v="$(col 2)" -v dp50="$(col 3)" -v vp50="$(col 4)" -v dp99="$(col 5)" -v vp99="$(col 6)" 'BEGIN {
  printf "medians: direct %.0f msg/s (p50 %.0f us, p99 %.0f us), switchyard %.0f msg/s (p50 %.0f us, p99 %.0f us)\n", d, dp50, dp99, v, vp50, vp99
  printf "ratios: switchyard/direct msg/s = %.2f (target >= 0.85); added latency p50 %.0f us, p99 %.0f us\n", v / d, vp50 - dp50, vp99 - dp99
  printf "        for reference: direct-min %.0f msg/s, switchyard/direct-min = %.2f\n", m, v / m
}'
awk -v dc="$(col 8)" -v db="$(col 9)" -v vc="$(col 10)" -v vb="$(col 11)" 'BEGIN {
  printf "CPU µs per message (medians): direct publisher %.1f + broker %.1f; gateway %.1f + broker %.1f (wrk not counted)\n", dc, db, vc, vb
}'
