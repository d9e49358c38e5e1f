#!/usr/bin/env bash
# What a script costs per request (issue 23's target: a ten-line header script within 10 CPU µs
# of the bare route): one release gateway with routes to one nginx upstream — `bare` (no
# plugin), `header` (the `script` plugin running a ten-line on_request that reads and sets
# headers) and `json` (the same with `body: json`, each request POSTing a 1 KiB JSON body that
# the script reads and changes; `jsonbare` is that POST without a script) — each loaded in turn
# by wrk, ROUNDS rounds. It reads the gateway's CPU time from /proc for every run and prints
# CPU µs per request, req/s, and the medians with what the script adds.
#
#   bash bench/script.sh          # ROUNDS=3 DURATION=6s CONNECTIONS=32
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-6s}
CONNECTIONS=${CONNECTIONS:-32}
UP_PORT=${UP_PORT:-18681}
GW_PORT=${GW_PORT:-18691}
ADMIN_PORT=${ADMIN_PORT:-18692}
. bench/common.sh

need wrk wrk
need nginx nginx

cargo build --release --locked --bin switchyard --example hyper_proxy >/dev/null
WORK=$(mktemp -d)
cp "$BIN/switchyard" "$WORK/switchyard"
cleanup() {
  [ -f "$WORK/up/nginx.pid" ] && kill "$(cat "$WORK/up/nginx.pid")" 2>/dev/null || true
  [ -n "${GW_PID:-}" ] && kill "$GW_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

start_nginx "$WORK/up" <<CONF
  server { listen 127.0.0.1:$UP_PORT; location / { default_type text/plain; return 200 "hello, world\n"; } }
CONF
mkdir -p "$WORK/plugins"
cat > "$WORK/plugins/header.rhai" <<'RHAI'
fn on_request(req) {
    let tenant = req.header("x-tenant");
    if tenant == () {
        return respond(400, "X-Tenant is required");
    }
    req.set_header("x-tenant-checked", tenant);
    req.remove_header("x-internal");
    req.set_ctx("tenant", tenant);
    req.set_header("x-route", req.route);
}
RHAI
cat > "$WORK/plugins/json.rhai" <<'RHAI'
fn on_request(req) {
    let b = req.body;
    b.card = "****";
    b.seen = true;
    req.body = b;
}
RHAI
# A 1 KiB JSON body.
python3 - "$WORK" <<'PY'
import json, sys
body = {"card": "4111111111111111", "items": ["x" * 40 for _ in range(20)]}
s = json.dumps(body)
s = s[:-1] + ', "pad": "' + "p" * (1024 - len(s) - 11) + '"}'
open(sys.argv[1] + "/body.json", "w").write(s)
open(sys.argv[1] + "/post.lua", "w").write(
    'wrk.method = "POST"\nwrk.headers["content-type"] = "application/json"\n'
    'local f = io.open("' + sys.argv[1] + '/body.json", "rb"); wrk.body = f:read("*a"); f:close()\n')
PY
cat > "$WORK/routes.yaml" <<YAML
server: { listen: "127.0.0.1:$GW_PORT", admin: "127.0.0.1:$ADMIN_PORT" }
backends:
  up: { type: http, endpoints: ["http://127.0.0.1:$UP_PORT"], breaker: { enabled: false } }
routes:
  - id: bare
    match: { path: "/bare/{*rest}" }
    backend: up
  - id: header
    match: { path: "/header/{*rest}" }
    backend: up
    plugins: [ { script: { file: plugins/header.rhai } } ]
  - id: jsonbare
    match: { path: "/jsonbare/{*rest}" }
    backend: up
  - id: json
    match: { path: "/json/{*rest}" }
    backend: up
    plugins: [ { script: { file: plugins/json.rhai, body: json } } ]
YAML
RUST_LOG=warn "$WORK/switchyard" run --no-watch --config "$WORK/routes.yaml" >"$WORK/gw.log" 2>&1 &
GW_PID=$!
wait_ready "$ADMIN_PORT"
run() { # ROUTE [wrk args...]
  local route=$1 code
  shift
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "x-tenant: acme" -H "content-type: application/json" \
    ${1:+--data-binary @"$WORK/body.json"} "http://127.0.0.1:$GW_PORT/$route/x")
  [ "$code" = 200 ] || { echo "bench: /$route answers $code" >&2; exit 1; }
  cpu_run "$route" "$GW_PID" "$WORK/results" -t2 -c"$CONNECTIONS" -d"$DURATION" -H "x-tenant: acme" "$@" "http://127.0.0.1:$GW_PORT/$route/x"
}

echo "wrk -t2 -c$CONNECTIONS -d$DURATION per run, $ROUNDS round(s); CPU is the gateway's (all threads)"
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r"
  run bare
  run header
  run jsonbare -s "$WORK/post.lua"
  run json -s "$WORK/post.lua"
done

med() { result_median "$WORK/results" "$1" "$2"; }
echo "medians"
for pair in "bare bare" "header bare" "jsonbare jsonbare" "json jsonbare"; do
  set -- $pair
  rps=$(med "$1" 2); us=$(med "$1" 3); brps=$(med "$2" 2); bus=$(med "$2" 3)
  awk -v r="$1" -v b="$2" -v rps="$rps" -v us="$us" -v brps="$brps" -v bus="$bus" 'BEGIN {
    printf "  %-8s %10.0f req/s (%.2f of %s)  %6.2f CPU µs/request (+%.2f over %s)\n", r, rps, rps / brps, b, us, us - bus, b }'
done
