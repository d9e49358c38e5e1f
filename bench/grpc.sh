#!/usr/bin/env bash
# gRPC bridge benchmark: unary GetOrder through Switchyard (JSON over h2c → gRPC → JSON) versus
# h2load speaking gRPC directly to the same server with the same message, same concurrency, in
# one run. A peer proxy runs beside them: nginx passing the same gRPC call through (grpc_pass,
# no transcoding), which shows what any proxy costs on these shared cores. Prints requests/s and
# mean latency for each, at load (64 streams) and at low load (one connection, one stream), and
# the ratios.
#
#   bash bench/grpc.sh          # DURATION=15 (seconds) ROUNDS=3
#   BASELINE_REV=<commit> bash bench/grpc.sh
#
# With BASELINE_REV, that commit's build runs beside this one (same config, its own port) and is
# measured in the same rounds, the two taking turns going first, and the ratio this/baseline is
# printed.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-15}
ROUNDS=${ROUNDS:-3}
GRPC_PORT=${GRPC_PORT:-18151}
SY_PORT=${SY_PORT:-18153}
SY_ADMIN=${SY_ADMIN:-18154}
NGINX_PORT=${NGINX_PORT:-18155}
BASE_PORT=${BASE_PORT:-18156}
BASE_ADMIN=${BASE_ADMIN:-18157}
PC_PORT=${PC_PORT:-18158}
PC_ADMIN=${PC_ADMIN:-18159}
. bench/common.sh

need h2load nghttp2-client
need nginx nginx

BASE_BIN=""
if [ -n "${BASELINE_REV:-}" ]; then
  BASE_BIN=$(baseline_bin "$BASELINE_REV")
fi
cargo build -q --release --locked --bin switchyard --example shop_server
WORK=$(mktemp -d)
cleanup() {
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  for p in ${SERVER_PID:-} ${SY_PID:-} ${PC_PID:-} ${BASE_PID:-}; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

SHOP_ADDR="127.0.0.1:$GRPC_PORT" "$BIN/examples/shop_server" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
# nginx as a plain gRPC proxy (h2c in, keep-alive h2c pool out), one worker per core as usual.
start_nginx "$WORK" <<CONF
  upstream shop { server 127.0.0.1:$GRPC_PORT; keepalive 64; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$NGINX_PORT http2;
    location / { grpc_pass grpc://shop; }
  }
CONF
routes() { # LISTEN_PORT ADMIN_PORT [RUNTIME]
  cat <<YAML
server: { listen: "127.0.0.1:$1", admin: "127.0.0.1:$2", runtime: ${3:-shared} }
backends:
  shop:
    type: grpc
    endpoints: ["http://127.0.0.1:$GRPC_PORT"]
    protos: ["$PWD/examples/protos/shop.proto"]
    import_paths: ["$PWD/examples/protos"]
routes:
  - id: get-order
    match: { method: GET, path: "/v1/orders/{id}" }
    backend: shop
    grpc: { method: shop.v1.Orders/GetOrder }
YAML
}
routes "$SY_PORT" "$SY_ADMIN" > "$WORK/routes.yaml"
RUST_LOG=warn "$BIN/switchyard" run --no-watch --config "$WORK/routes.yaml" >"$WORK/switchyard.log" 2>&1 &
SY_PID=$!
# The same gateway serving per core (`server.runtime: per_core`).
routes "$PC_PORT" "$PC_ADMIN" per_core > "$WORK/percore.yaml"
RUST_LOG=warn "$BIN/switchyard" run --no-watch --config "$WORK/percore.yaml" >"$WORK/percore.log" 2>&1 &
PC_PID=$!
PORTS="$GRPC_PORT $SY_PORT $PC_PORT"
if [ -n "$BASE_BIN" ]; then
  routes "$BASE_PORT" "$BASE_ADMIN" > "$WORK/base.yaml"
  RUST_LOG=warn "$BASE_BIN" run --no-watch --config "$WORK/base.yaml" >"$WORK/base.log" 2>&1 &
  BASE_PID=$!
  PORTS="$PORTS $BASE_PORT"
fi
for port in $PORTS; do
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
done

# GetOrderRequest { id: "7" } as one gRPC frame: no compression, length 3, field 1 = "7".
printf '\x00\x00\x00\x00\x03\x0a\x01\x37' > "$WORK/get.bin"

grpc_call() { # PORT h2load args...
  local port=$1; shift
  h2load "$@" -d "$WORK/get.bin" -H 'content-type: application/grpc' -H 'te: trailers' \
    "http://127.0.0.1:$port/shop.v1.Orders/GetOrder"
}
direct() { grpc_call "$GRPC_PORT" "$@"; }
peer() { grpc_call "$NGINX_PORT" "$@"; }
via() {
  h2load "$@" "http://127.0.0.1:$SY_PORT/v1/orders/7"
}
via_pc() {
  h2load "$@" "http://127.0.0.1:$PC_PORT/v1/orders/7"
}
via_base() {
  h2load "$@" "http://127.0.0.1:$BASE_PORT/v1/orders/7"
}
rps() { awk '/^finished in/ {for (i = 1; i <= NF; i++) if ($i == "req/s,") print $(i - 1)}'; }
mean_us() { awk '/^time for request:/ {v = $6; if (v ~ /us$/) n = v + 0; else if (v ~ /ms$/) n = (v + 0) * 1000; else n = (v + 0) * 1e6; print n}'; }
ok() { awk '/^requests:/ {print $8, "succeeded,", $10, "failed"}'; }

echo "h2load, ${DURATION}s per target at load (-c 16 -m 4), 2000 requests at low load (-c 1 -m 1), $ROUNDS round(s)"
: > "$WORK/results"
for r in $(seq 1 "$ROUNDS"); do
  d=$(direct -c 16 -m 4 -t 1 -D "$DURATION"); n=$(peer -c 16 -m 4 -t 1 -D "$DURATION")
  # With a baseline, the two builds take turns going first, so neither always follows the other.
  if [ -n "$BASE_BIN" ] && [ $((r % 2)) -eq 0 ]; then
    bo=$(via_base -c 16 -m 4 -t 1 -D "$DURATION"); v=$(via -c 16 -m 4 -t 1 -D "$DURATION")
  else
    v=$(via -c 16 -m 4 -t 1 -D "$DURATION")
    [ -n "$BASE_BIN" ] && bo=$(via_base -c 16 -m 4 -t 1 -D "$DURATION")
  fi
  dl=$(direct -c 1 -m 1 -n 2000); nl=$(peer -c 1 -m 1 -n 2000)
  if [ -n "$BASE_BIN" ] && [ $((r % 2)) -eq 0 ]; then
    bol=$(via_base -c 1 -m 1 -n 2000); vl=$(via -c 1 -m 1 -n 2000)
  else
    vl=$(via -c 1 -m 1 -n 2000)
    [ -n "$BASE_BIN" ] && bol=$(via_base -c 1 -m 1 -n 2000)
  fi
  echo "round $r: direct $(rps <<<"$d") req/s ($(ok <<<"$d")), nginx grpc_pass $(rps <<<"$n") req/s ($(ok <<<"$n")), switchyard $(rps <<<"$v") req/s ($(ok <<<"$v"))"
  echo "         low load mean: direct $(mean_us <<<"$dl") us, nginx $(mean_us <<<"$nl") us, switchyard $(mean_us <<<"$vl") us"
  p=$(via_pc -c 16 -m 4 -t 1 -D "$DURATION"); pl=$(via_pc -c 1 -m 1 -n 2000)
  echo "         per core: $(rps <<<"$p") req/s ($(ok <<<"$p")), low load mean $(mean_us <<<"$pl") us"
  b=0; bl=0
  if [ -n "$BASE_BIN" ]; then
    b=$(rps <<<"$bo"); bl=$(mean_us <<<"$bol")
    echo "         baseline $BASELINE_REV: $b req/s ($(ok <<<"$bo")), low load mean $bl us"
  fi
  echo "$(rps <<<"$d") $(rps <<<"$v") $(mean_us <<<"$dl") $(mean_us <<<"$vl") $(rps <<<"$n") $(mean_us <<<"$nl") $b $bl $(rps <<<"$p") $(mean_us <<<"$pl")" >> "$WORK/results"
done
col() { awk -v c="$1" '{print $c}' "$WORK/results" | median; }
D=$(col 1); V=$(col 2); DL=$(col 3); VL=$(col 4); N=$(col 5); NL=$(col 6); B=$(col 7); BL=$(col 8)
P=$(col 9); PL=$(col 10)
awk -v d="$D" -v v="$V" -v dl="$DL" -v vl="$VL" -v n="$N" -v nl="$NL" 'BEGIN {
  printf "medians: direct %.0f req/s, nginx grpc_pass %.0f req/s, switchyard %.0f req/s\n", d, n, v
  printf "         low-load mean latency direct %.0f us, nginx %.0f us, switchyard %.0f us\n", dl, nl, vl
  printf "ratios: switchyard/direct req/s = %.2f (target >= 0.80); added latency at low load = %.0f us (target < 100 us)\n", v / d, vl - dl
  printf "        nginx grpc_pass/direct req/s = %.2f, added %.0f us (a pass-through proxy, no transcoding); switchyard/nginx req/s = %.2f\n", n / d, nl - dl, v / n
}'
awk -v p="$P" -v pl="$PL" -v v="$V" -v n="$N" -v d="$D" 'BEGIN {
  printf "per core: %.0f req/s, low-load mean %.0f us; per_core/shared req/s = %.2f, per_core/nginx = %.2f (target >= 1.20), per_core/direct = %.2f\n", p, pl, p / v, p / n, p / d
}'
if [ -n "$BASE_BIN" ]; then
  awk -v v="$V" -v vl="$VL" -v b="$B" -v bl="$BL" -v rev="$BASELINE_REV" 'BEGIN {
    printf "this build/%s: req/s %.2f, low-load mean latency %.2f (medians %.0f/%.0f req/s, %.0f/%.0f us)\n", rev, v / b, vl / bl, v, b, vl, bl
  }'
fi
