#!/usr/bin/env bash
# Proxy benchmark: the upstream directly, nginx proxying to it, Switchyard proxying to it on a
# bare route, and Switchyard on a route with the full middleware stack (timeout, per-try timeout,
# retry with budget, breaker, rate limit set high, concurrency limits), measured in one run with
# wrk (64 connections, keep-alive, small GET), ROUNDS times each in alternation. Switchyard runs
# twice: in its default runtime (`per_core`) and with `server.runtime: shared`. Also measured:
# the floor of the building blocks, examples/hyper_proxy.rs (a bare hyper + hyper-util proxy) on
# Tokio's work-stealing runtime and on per-core runtimes. Prints requests/s, p50 and p99
# (medians over the rounds), the ratios, and Switchyard's idle RSS.
#
#   bash bench/proxy.sh            # DURATION=15s ROUNDS=3 CONNECTIONS=64 by default
#   BASELINE_REV=<commit> bash bench/proxy.sh
#                                  # also an earlier build of Switchyard, same routes, in the same
#                                  # run: prints this build's ratio to it (no regression: >= 0.95)
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-15s}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
UP_PORT=${UP_PORT:-18081}
NGINX_PORT=${NGINX_PORT:-18082}
SY_PORT=${SY_PORT:-18083}
SY_ADMIN=${SY_ADMIN:-18084}
HY_PORT=${HY_PORT:-18087}
HYPC_PORT=${HYPC_PORT:-18088}
. bench/common.sh

need wrk wrk
need nginx nginx

BASE_BIN=""
if [ -n "${BASELINE_REV:-}" ]; then
  # The earlier build first, kept beside the current one.
  BASE_BIN=$(baseline_bin "$BASELINE_REV")
fi
cargo build --release --locked --bin switchyard --example hyper_proxy >/dev/null
SWITCHYARD="$CARGO_TARGET_DIR/release/switchyard"

WORK=$(mktemp -d)
cleanup() {
  for f in "$WORK/nginx.pid" "$WORK/upstream/nginx.pid"; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  for p in ${SY_PID:-} ${SH_PID:-} ${BASE_PID:-} ${HY_PID:-} ${HYPC_PID:-}; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# Two nginx instances: the upstream (a small fixed answer) and the peer proxy (keep-alive pool
# to the upstream), as separate processes, so the peer's proxied requests cross processes as
# Switchyard's do. Access logs are off for both nginx and Switchyard so the comparison is proxy
# work only.
start_nginx "$WORK/upstream" <<CONF
  server { listen 127.0.0.1:$UP_PORT; location / { default_type text/plain; return 200 "hello, world\n"; } }
CONF
start_nginx "$WORK" <<CONF
  upstream up { server 127.0.0.1:$UP_PORT; keepalive 128; }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$remote_addr;
    }
  }
CONF

proxy_routes "$SY_PORT" "$SY_ADMIN" "$UP_PORT" > "$WORK/routes.yaml"
RUST_LOG="warn" "$SWITCHYARD" run --no-watch --config "$WORK/routes.yaml" >"$WORK/logs/switchyard.log" 2>&1 &
SY_PID=$!
# The same routes on the shared work-stealing runtime (`server.runtime: shared`).
SH_PORT=$((SY_PORT + 20))
proxy_routes "$SH_PORT" $((SY_ADMIN + 20)) "$UP_PORT" "runtime: shared" > "$WORK/shared.yaml"
RUST_LOG="warn" "$SWITCHYARD" run --no-watch --config "$WORK/shared.yaml" >"$WORK/logs/shared.log" 2>&1 &
SH_PID=$!
BASE_PORT=$((SY_PORT + 10))
if [ -n "$BASE_BIN" ]; then
  proxy_routes "$BASE_PORT" $((SY_ADMIN + 10)) "$UP_PORT" > "$WORK/baseline.yaml"
  RUST_LOG="warn" "$BASE_BIN" run --no-watch --config "$WORK/baseline.yaml" >"$WORK/logs/baseline.log" 2>&1 &
  BASE_PID=$!
fi
"$BIN/examples/hyper_proxy" "127.0.0.1:$HY_PORT" "http://127.0.0.1:$UP_PORT" &
HY_PID=$!
MODE=per-core "$BIN/examples/hyper_proxy" "127.0.0.1:$HYPC_PORT" "http://127.0.0.1:$UP_PORT" &
HYPC_PID=$!
for port in "$SY_PORT" "$SH_PORT"; do
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
done
sleep 1
RSS_KB=$(awk '/VmRSS/ {print $2}' "/proc/$SY_PID/status")


run() { # name url
  local out
  out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$2")
  local rps p50 p99 errs
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")
  p99=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
  errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  echo "$1 $rps $p50 $p99" >> "$WORK/results"
  printf '  %-13s %10s req/s  p50 %8s ms  p99 %8s ms  %s\n' "$1" "$rps" "$p50" "$p99" "$errs"
}

echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency, $ROUNDS round(s), $(nproc) cores"
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r"
  run direct "http://127.0.0.1:$UP_PORT/bench"
  run nginx "http://127.0.0.1:$NGINX_PORT/bench"
  # With a baseline, each route is measured right beside its baseline, in turns, so that
  # the machine's drift falls on both alike.
  if [ -n "$BASE_BIN" ] && [ $((r % 2)) -eq 0 ]; then
    run baseline "http://127.0.0.1:$BASE_PORT/bare/bench"
    run switchyard "http://127.0.0.1:$SY_PORT/bare/bench"
    run base-full-mw "http://127.0.0.1:$BASE_PORT/full/bench"
    run sy-full-mw "http://127.0.0.1:$SY_PORT/full/bench"
  elif [ -n "$BASE_BIN" ]; then
    run switchyard "http://127.0.0.1:$SY_PORT/bare/bench"
    run baseline "http://127.0.0.1:$BASE_PORT/bare/bench"
    run sy-full-mw "http://127.0.0.1:$SY_PORT/full/bench"
    run base-full-mw "http://127.0.0.1:$BASE_PORT/full/bench"
  else
    run switchyard "http://127.0.0.1:$SY_PORT/bare/bench"
    run sy-full-mw "http://127.0.0.1:$SY_PORT/full/bench"
  fi
  run sy-shared "http://127.0.0.1:$SH_PORT/bare/bench"
  run shared-full-mw "http://127.0.0.1:$SH_PORT/full/bench"
  run hyper-floor "http://127.0.0.1:$HY_PORT/bench"
  run hyper-percore "http://127.0.0.1:$HYPC_PORT/bench"
done

col() { awk -v n="$1" -v c="$2" '$1 == n {print $c}' "$WORK/results" | median; }

echo
echo "medians over $ROUNDS round(s):"
printf '  %-13s %12s %10s %10s\n' target "req/s" "p50 ms" "p99 ms"
TARGETS="direct nginx switchyard sy-full-mw sy-shared shared-full-mw hyper-floor hyper-percore"
[ -n "$BASE_BIN" ] && TARGETS="$TARGETS baseline base-full-mw"
for t in $TARGETS; do
  printf '  %-13s %12s %10s %10s\n' "$t" "$(col $t 2)" "$(col $t 3)" "$(col $t 4)"
done
SY_RPS=$(col switchyard 2); NG_RPS=$(col nginx 2); UP_RPS=$(col direct 2)
SY_P99=$(col switchyard 4); NG_P99=$(col nginx 4); MW_RPS=$(col sy-full-mw 2)
HY_RPS=$(col hyper-floor 2); HC_RPS=$(col hyper-percore 2)
awk -v s="$SY_RPS" -v n="$NG_RPS" -v u="$UP_RPS" -v sp="$SY_P99" -v np="$NG_P99" -v m="$MW_RPS" \
  -v hy="$HY_RPS" -v hc="$HC_RPS" 'BEGIN {
  printf "ratios: switchyard/nginx req/s = %.2f, switchyard/direct req/s = %.2f\n", s / n, s / u
  printf "        full middleware/bare route req/s = %.2f (target >= 0.95)\n", m / s
  printf "        switchyard/hyper-percore req/s = %.2f (target >= 0.90), p99 switchyard/nginx = %.2f (target <= 1.20); hyper floor/nginx req/s = %.2f (work-stealing), %.2f (per-core)\n", s / hc, sp / np, hy / n, hc / n
}'
awk -v sh="$(col sy-shared 2)" -v shm="$(col shared-full-mw 2)" -v hy="$HY_RPS" -v s="$SY_RPS" 'BEGIN {
  printf "shared runtime: per_core/shared req/s = %.2f, shared/hyper-floor (work-stealing) = %.2f, full middleware/bare = %.2f\n", s / sh, sh / hy, shm / sh
}'
if [ -n "$BASE_BIN" ]; then
  awk -v s="$SY_RPS" -v b="$(col baseline 2)" -v m="$MW_RPS" -v bm="$(col base-full-mw 2)" \
    -v sp="$SY_P99" -v bp="$(col baseline 4)" -v rev="$BASELINE_REV" 'BEGIN {
    printf "this build/%s: bare route req/s = %.2f, full middleware req/s = %.2f, bare p99 = %.2f (no regression: req/s >= 0.95)\n", rev, s / b, m / bm, sp / bp
  }'
fi
echo "switchyard idle RSS: $((RSS_KB / 1024)) MiB ($RSS_KB KiB; target <= 20 MiB)"
