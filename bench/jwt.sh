#!/usr/bin/env bash
# JWT verification per request: one release gateway with four routes to one nginx upstream —
# `bare` (no plugin), `rs256` and `es256` (the `jwt` plugin with its cache of verified tokens
# off, so that every request checks a signature; keys from a JWKS file, so that no request
# waits on a fetch) and `es256c` (the same with the cache on, as by default: a client's
# repeated token is checked once) — each loaded in turn by wrk with its own fresh token, ROUNDS
# rounds. For every run it reads the gateway's CPU time (utime + stime
# from /proc) and the requests wrk made, and prints CPU µs per request, req/s, and the medians
# with what verification adds over the bare route.
#
#   bash bench/jwt.sh          # ROUNDS=3 DURATION=6s CONNECTIONS=32
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-6s}
CONNECTIONS=${CONNECTIONS:-32}
UP_PORT=${UP_PORT:-18581}
GW_PORT=${GW_PORT:-18591}
ADMIN_PORT=${ADMIN_PORT:-18592}
. bench/common.sh

need wrk wrk
need nginx nginx

cargo build --release --locked --bin switchyard --example hyper_proxy --example jwt_tokens >/dev/null
WORK=$(mktemp -d)
cp "$BIN/switchyard" "$WORK/switchyard"
cleanup() {
  [ -f "$WORK/up/nginx.pid" ] && kill "$(cat "$WORK/up/nginx.pid")" 2>/dev/null || true
  [ -n "${GW_PID:-}" ] && kill "$GW_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN/examples/jwt_tokens" "$WORK"
start_nginx "$WORK/up" <<CONF
  server { listen 127.0.0.1:$UP_PORT; location / { default_type text/plain; return 200 "hello, world\n"; } }
CONF
cat > "$WORK/routes.yaml" <<YAML
server: { listen: "127.0.0.1:$GW_PORT", admin: "127.0.0.1:$ADMIN_PORT" }
backends:
  up: { type: http, endpoints: ["http://127.0.0.1:$UP_PORT"], breaker: { enabled: false } }
routes:
  - id: bare
    match: { method: GET, path: "/bare/{*rest}" }
    backend: up
  - id: rs256
    match: { method: GET, path: "/rs256/{*rest}" }
    backend: up
    plugins: [ { jwt: { jwks_file: jwks.json, audience: bench, algorithms: [RS256], cache_size: 0 } } ]
  - id: es256
    match: { method: GET, path: "/es256/{*rest}" }
    backend: up
    plugins: [ { jwt: { jwks_file: jwks.json, audience: bench, algorithms: [ES256], cache_size: 0 } } ]
  - id: es256c
    match: { method: GET, path: "/es256c/{*rest}" }
    backend: up
    plugins: [ { jwt: { jwks_file: jwks.json, audience: bench, algorithms: [ES256] } } ]
YAML
RUST_LOG=warn "$WORK/switchyard" run --no-watch --config "$WORK/routes.yaml" >"$WORK/gw.log" 2>&1 &
GW_PID=$!
wait_ready "$ADMIN_PORT"
run() { # ROUTE [TOKEN_FILE]
  local auth=()
  [ -n "${2:-}" ] && auth=(-H "Authorization: Bearer $(cat "$2")")
  # Every request must pass: a refused token would measure the refusal.
  [ "$(curl -s -o /dev/null -w '%{http_code}' "${auth[@]}" "http://127.0.0.1:$GW_PORT/$1/x")" = 200 ] \
    || { echo "bench: /$1 does not answer 200" >&2; exit 1; }
  cpu_run "$1" "$GW_PID" "$WORK/results" -t2 -c"$CONNECTIONS" -d"$DURATION" "${auth[@]}" "http://127.0.0.1:$GW_PORT/$1/x"
}

echo "wrk -t2 -c$CONNECTIONS -d$DURATION per run, $ROUNDS round(s); CPU is the gateway's (all threads)"
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r"
  run bare
  run rs256 "$WORK/rs256.token"
  run es256 "$WORK/es256.token"
  run es256c "$WORK/es256.token"
done

med() { result_median "$WORK/results" "$1" "$2"; }
echo "medians"
B_RPS=$(med bare 2); B_US=$(med bare 3)
for route in bare rs256 es256 es256c; do
  rps=$(med "$route" 2); us=$(med "$route" 3)
  awk -v r="$route" -v rps="$rps" -v us="$us" -v brps="$B_RPS" -v bus="$B_US" 'BEGIN {
    printf "  %-6s %10.0f req/s (%.2f of bare)  %6.2f CPU µs/request (+%.2f over bare)\n", r, rps, rps / brps, us, us - bus }'
done
