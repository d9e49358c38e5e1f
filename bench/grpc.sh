#!/usr/bin/env bash
# gRPC bridge benchmark: unary GetOrder through Switchyard (JSON over h2c → gRPC → JSON) versus
# h2load speaking gRPC directly to the same server with the same message, same concurrency, in
# one run. Prints requests/s and mean latency for both, at load (64 streams) and at low load
# (one connection, one stream), and the ratios.
#
#   bash bench/grpc.sh          # DURATION=15 (seconds) ROUNDS=3
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-15}
ROUNDS=${ROUNDS:-3}
GRPC_PORT=${GRPC_PORT:-18151}
SY_PORT=${SY_PORT:-18153}
SY_ADMIN=${SY_ADMIN:-18154}
. bench/common.sh

need h2load nghttp2-client

cargo build -q --release --locked --bin switchyard --example shop_server
WORK=$(mktemp -d)
cleanup() {
  [ -n "${SERVER_PID:-}" ] && kill "$SERVER_PID" 2>/dev/null || true
  [ -n "${SY_PID:-}" ] && kill "$SY_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

SHOP_ADDR="127.0.0.1:$GRPC_PORT" "$BIN/examples/shop_server" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
cat > "$WORK/routes.yaml" <<YAML
server: { listen: "127.0.0.1:$SY_PORT", admin: "127.0.0.1:$SY_ADMIN" }
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
RUST_LOG=warn "$BIN/switchyard" run --no-watch --config "$WORK/routes.yaml" >"$WORK/switchyard.log" 2>&1 &
SY_PID=$!
for port in "$GRPC_PORT" "$SY_PORT"; do
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
done

# GetOrderRequest { id: "7" } as one gRPC frame: no compression, length 3, field 1 = "7".
printf '\x00\x00\x00\x00\x03\x0a\x01\x37' > "$WORK/get.bin"

direct() { # h2load args...
  h2load "$@" -d "$WORK/get.bin" -H 'content-type: application/grpc' -H 'te: trailers' \
    "http://127.0.0.1:$GRPC_PORT/shop.v1.Orders/GetOrder"
}
via() {
  h2load "$@" "http://127.0.0.1:$SY_PORT/v1/orders/7"
}
rps() { awk '/^finished in/ {for (i = 1; i <= NF; i++) if ($i == "req/s,") print $(i - 1)}'; }
mean_us() { awk '/^time for request:/ {v = $6; if (v ~ /us$/) n = v + 0; else if (v ~ /ms$/) n = (v + 0) * 1000; else n = (v + 0) * 1e6; print n}'; }
ok() { awk '/^requests:/ {print $8, "succeeded,", $10, "failed"}'; }

echo "h2load, ${DURATION}s per target at load (-c 16 -m 4), 2000 requests at low load (-c 1 -m 1), $ROUNDS round(s)"
: > "$WORK/results"
for r in $(seq 1 "$ROUNDS"); do
  d=$(direct -c 16 -m 4 -t 1 -D "$DURATION"); v=$(via -c 16 -m 4 -t 1 -D "$DURATION")
  dl=$(direct -c 1 -m 1 -n 2000); vl=$(via -c 1 -m 1 -n 2000)
  echo "round $r: direct $(rps <<<"$d") req/s ($(ok <<<"$d")), switchyard $(rps <<<"$v") req/s ($(ok <<<"$v")); low load mean: direct $(mean_us <<<"$dl") us, switchyard $(mean_us <<<"$vl") us"
  echo "$(rps <<<"$d") $(rps <<<"$v") $(mean_us <<<"$dl") $(mean_us <<<"$vl")" >> "$WORK/results"
done
D=$(awk '{print $1}' "$WORK/results" | median); V=$(awk '{print $2}' "$WORK/results" | median)
DL=$(awk '{print $3}' "$WORK/results" | median); VL=$(awk '{print $4}' "$WORK/results" | median)
awk -v d="$D" -v v="$V" -v dl="$DL" -v vl="$VL" 'BEGIN {
  printf "medians: direct %.0f req/s, switchyard %.0f req/s; low-load mean latency direct %.0f us, switchyard %.0f us\n", d, v, dl, vl
  printf "ratios: switchyard/direct req/s = %.2f (target >= 0.80); added latency at low load = %.0f us (target < 100 us)\n", v / d, vl - dl
}'
