#!/usr/bin/env bash
# A/B of two builds on the bare proxy route only: this build and BASELINE_REV's, side by side
# against one nginx upstream, ROUNDS alternating rounds of wrk (the two take turns going
# first). Prints each round and the medians of req/s and p99, and the ratios. Shorter and
# more rounds than bench/proxy.sh, for a change whose effect is on the front end alone.
#
#   BASELINE_REV=<commit> bash bench/ab.sh     # ROUNDS=5 DURATION=6s CONNECTIONS=64
set -euo pipefail
cd "$(dirname "$0")/.."

: "${BASELINE_REV:?set BASELINE_REV to the commit to compare with}"
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-6s}
CONNECTIONS=${CONNECTIONS:-64}
UP_PORT=${UP_PORT:-18481}
A_PORT=${A_PORT:-18491}
B_PORT=${B_PORT:-18492}
. bench/common.sh

need wrk wrk
need nginx nginx

BASE_BIN=$(baseline_bin "$BASELINE_REV")
cargo build --release --locked --bin switchyard --example hyper_proxy >/dev/null
WORK=$(mktemp -d)
# Copied, so that a later build does not replace the binary under a running gateway.
cp "$BIN/switchyard" "$WORK/this"
cleanup() {
  [ -f "$WORK/up/nginx.pid" ] && kill "$(cat "$WORK/up/nginx.pid")" 2>/dev/null || true
  for p in ${A_PID:-} ${B_PID:-}; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

start_nginx "$WORK/up" <<CONF
  server { listen 127.0.0.1:$UP_PORT; location / { default_type text/plain; return 200 "hello, world\n"; } }
CONF
proxy_routes "$A_PORT" $((A_PORT + 100)) "$UP_PORT" > "$WORK/a.yaml"
proxy_routes "$B_PORT" $((B_PORT + 100)) "$UP_PORT" > "$WORK/b.yaml"
RUST_LOG=warn "$WORK/this" run --no-watch --config "$WORK/a.yaml" >"$WORK/a.log" 2>&1 &
A_PID=$!
RUST_LOG=warn "$BASE_BIN" run --no-watch --config "$WORK/b.yaml" >"$WORK/b.log" 2>&1 &
B_PID=$!
wait_ready $((A_PORT + 100))
wait_ready $((B_PORT + 100))

run() { # NAME PORT
  local out rps p99
  out=$(wrk -t2 -c"$CONNECTIONS" -d"$DURATION" --latency "http://127.0.0.1:$2/bare/bench")
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p99=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
  echo "$1 $rps $p99" >> "$WORK/results"
  printf '  %-9s %10s req/s  p99 %8s ms\n' "$1" "$rps" "$p99"
}
echo "bare route, wrk -t2 -c$CONNECTIONS -d$DURATION, $ROUNDS alternating round(s), this build against $BASELINE_REV"
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r"
  if [ $((r % 2)) -eq 1 ]; then
    run this "$A_PORT"; run baseline "$B_PORT"
  else
    run baseline "$B_PORT"; run this "$A_PORT"
  fi
done
col() { awk -v n="$1" -v c="$2" '$1 == n {print $c}' "$WORK/results" | median; }
awk -v a="$(col this 2)" -v b="$(col baseline 2)" -v ap="$(col this 3)" -v bp="$(col baseline 3)" \
  -v rev="$BASELINE_REV" 'BEGIN {
  printf "medians: this %.0f req/s (p99 %.2f ms), %s %.0f req/s (p99 %.2f ms)\n", a, ap, rev, b, bp
  printf "this/%s: req/s %.2f, p99 %.2f\n", rev, a / b, ap / bp
}'
