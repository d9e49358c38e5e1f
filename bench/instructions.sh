#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind: Switchyard proxying a small GET to
# nginx on a bare route and on a route with the full middleware stack (the routes of
# bench/proxy.sh), so that what the middleware costs is a count, not a noisy rate; and a
# transcoded gRPC call (`GET /v1/orders/7` → `shop.v1.Orders/GetOrder`, bench/grpc.sh's route). Callgrind
# counts instructions whatever else the machine is doing, so two builds can be compared on a
# shared machine: run this once per build (or with BASELINE_REV, both in one go).
#
#   bash bench/instructions.sh                    # REQUESTS=4000
#   BASELINE_REV=<commit> bash bench/instructions.sh
#   TOP=25 bash bench/instructions.sh             # also the full route's costliest functions
#   KEEP=<dir> bash bench/instructions.sh          # keeps the callgrind files there
#
# The gateway runs with its default runtime (per core) and one worker, so that every request
# is counted on one thread. Counters are zeroed after a warm-up, then REQUESTS requests are
# sent by h2load over 4 keep-alive connections (HTTP/1.1 to the proxy routes, h2c with 4
# streams each to the gRPC route), and the count is dumped.
set -euo pipefail
cd "$(dirname "$0")/.."

REQUESTS=${REQUESTS:-4000}
UP_PORT=${UP_PORT:-18181}
SY_PORT=${SY_PORT:-18183}
SY_ADMIN=${SY_ADMIN:-18184}
GRPC_PORT=${GRPC_PORT:-18185}
TOP=${TOP:-0}
. bench/common.sh

need h2load nghttp2-client
need nginx nginx
need valgrind valgrind

BASE_BIN=""
if [ -n "${BASELINE_REV:-}" ]; then
  BASE_BIN=$(baseline_bin "$BASELINE_REV")
fi
# The same build as bench/proxy.sh's (an example turns the dev-dependencies' features on), so
# that running one after the other does not rebuild.
cargo build --release --locked --bin switchyard --example hyper_proxy --example shop_server >/dev/null

WORK=$(mktemp -d)
cleanup() {
  [ -f "$WORK/upstream/nginx.pid" ] && kill "$(cat "$WORK/upstream/nginx.pid")" 2>/dev/null || true
  [ -n "${VG_PID:-}" ] && kill "$VG_PID" 2>/dev/null || true
  [ -n "${SHOP_PID:-}" ] && kill "$SHOP_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

start_nginx "$WORK/upstream" <<CONF
  server { listen 127.0.0.1:$UP_PORT; location / { default_type text/plain; return 200 "hello, world\n"; } }
CONF
SHOP_ADDR="127.0.0.1:$GRPC_PORT" "$BIN/examples/shop_server" >"$WORK/shop.log" 2>&1 &
SHOP_PID=$!
proxy_routes "$SY_PORT" "$SY_ADMIN" "$UP_PORT" "workers: 1" \
  | awk -v port="$GRPC_PORT" -v protos="$PWD/examples/protos" '
    { print }
    /^backends:/ {
      print "  shop:"
      print "    type: grpc"
      print "    endpoints: [\"http://127.0.0.1:" port "\"]"
      print "    protos: [\"" protos "/shop.proto\"]"
      print "    import_paths: [\"" protos "\"]"
    }
    END {
      print "  - id: grpc"
      print "    match: { method: GET, path: \"/v1/orders/{id}\" }"
      print "    backend: shop"
      print "    grpc: { method: shop.v1.Orders/GetOrder }"
    }' > "$WORK/routes.yaml"

# count BIN NAME: instructions per request on each route of the gateway BIN.
count() {
  local bin=$1 name=$2 out="$WORK/cg.$2"
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out.%p" \
    "$bin" run --no-watch --config "$WORK/routes.yaml" >"$WORK/$name.log" 2>&1 &
  VG_PID=$!
  for _ in $(seq 1 600); do
    curl -fsS "http://127.0.0.1:$SY_ADMIN/readyz" >/dev/null 2>&1 && break
    sleep 0.2
  done
  for route in bare full grpc; do
    local load=(--h1 -c 4) url="http://127.0.0.1:$SY_PORT/$route/bench"
    if [ "$route" = grpc ]; then
      load=(-c 4 -m 4) url="http://127.0.0.1:$SY_PORT/v1/orders/7"
    fi
    h2load "${load[@]}" -n 400 "$url" >/dev/null
    callgrind_control -z "$VG_PID" >/dev/null
    h2load "${load[@]}" -n "$REQUESTS" "$url" | awk '/^requests:/ {print "  " $0}'
    callgrind_control -d "$VG_PID" >/dev/null
    local file ir
    file=$(ls -t "$out".* | head -1)
    ir=$(awk '/^summary:|^totals:/ {print $2; exit}' "$file")
    echo "$name $route $ir" >> "$WORK/results"
    printf '  %-10s %-5s %12s instructions/request\n' "$name" "$route" "$((ir / REQUESTS))"
    cp "$file" "$WORK/$name.$route.out"
  done
  kill "$VG_PID" 2>/dev/null || true
  wait "$VG_PID" 2>/dev/null || true
  VG_PID=""
}

echo "callgrind, $REQUESTS requests per route (h2load --h1, 4 connections), one worker"
count "$BIN/switchyard" this
[ -n "$BASE_BIN" ] && count "$BASE_BIN" baseline

ir() { awk -v n="$1" -v r="$2" '$1 == n && $2 == r {print $3}' "$WORK/results"; }
echo
awk -v b="$(ir this bare)" -v f="$(ir this full)" -v g="$(ir this grpc)" -v n="$REQUESTS" 'BEGIN {
  printf "this build: bare %d, full %d instructions/request; the middleware adds %d (%.1f %%)\n",
    b / n, f / n, (f - b) / n, 100 * (f - b) / b
  printf "this build: transcoded gRPC %d instructions/request\n", g / n }'
if [ -n "$BASE_BIN" ]; then
  awk -v b="$(ir baseline bare)" -v f="$(ir baseline full)" -v tb="$(ir this bare)" \
    -v tf="$(ir this full)" -v n="$REQUESTS" -v rev="$BASELINE_REV" 'BEGIN {
    printf "%s: bare %d, full %d instructions/request; the middleware adds %d (%.1f %%)\n",
      rev, b / n, f / n, (f - b) / n, 100 * (f - b) / b
    printf "this/%s instructions: bare %.3f, full %.3f\n", rev, tb / b, tf / f }'
  awk -v b="$(ir baseline grpc)" -v t="$(ir this grpc)" -v n="$REQUESTS" -v rev="$BASELINE_REV" 'BEGIN {
    printf "%s: transcoded gRPC %d instructions/request; this/%s %.3f\n", rev, b / n, rev, t / b }'
fi
if [ "$TOP" -gt 0 ]; then
  echo
  echo "the full route's top $TOP functions by instructions (self), this build:"
  callgrind_annotate --inclusive=no "$WORK/this.full.out" 2>/dev/null \
    | awk '/file:function/ {on = 1; getline; next} on && NF' | head -n "$TOP" | cut -c1-160
fi
if [ -n "${KEEP:-}" ]; then
  mkdir -p "$KEEP" && cp "$WORK"/*.out "$KEEP"/
fi
