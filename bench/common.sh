# Shared by the bench scripts (sourced): the build cache, tool installs, readiness, medians.

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/switchyard-target}"
BIN="$CARGO_TARGET_DIR/release"

# need COMMAND PACKAGE: installs the Debian package when the command is missing.
need() {
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "bench: installing $2 ($1) with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  fi
}

# wait_ready ADMIN_PORT: until the gateway's /readyz answers 200 (at most 10 s).
wait_ready() {
  for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "bench: the gateway did not become ready" >&2
}

# baseline_bin REV: the path of the release `switchyard` of an earlier commit, built once from a
# worktree of that commit and kept by commit under the build cache (a second run reuses it).
baseline_bin() {
  local rev dir bin
  rev=$(git rev-parse --short "$1")
  bin="$CARGO_TARGET_DIR/baseline/$rev/switchyard"
  if [ ! -x "$bin" ]; then
    dir=$(mktemp -d)
    git worktree add --detach -f "$dir/src" "$rev" >/dev/null
    # With an example, as the bench scripts build, so that the dependencies are built with the
    # same features and the next build of this tree does not rebuild them.
    (cd "$dir/src" && cargo build --release --locked --bin switchyard --example hyper_proxy >/dev/null)
    mkdir -p "$(dirname "$bin")"
    cp "$CARGO_TARGET_DIR/release/switchyard" "$bin"
    git worktree remove --force "$dir/src"
    rm -rf "$dir"
  fi
  echo "$bin"
}

# The median of the numbers on standard input, one per line.
median() { sort -n | awk '{a[NR] = $1} END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

# post_lua DIR SIZE: DIR/body (SIZE bytes) and DIR/post.lua, a wrk script that POSTs it.
post_lua() {
  head -c "$2" /dev/zero | tr '\0' 'x' > "$1/body"
  cat > "$1/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["content-type"] = "application/octet-stream"
local f = io.open("$1/body", "rb"); wrk.body = f:read("*a"); f:close()
LUA
}

# start_nginx WORK: runs nginx on WORK/nginx.conf, made of the preamble every bench shares (two
# workers, pid, logs and temp files under WORK, no access log, long keep-alive) and the lines
# of the http block read from standard input.
start_nginx() {
  mkdir -p "$1/logs"
  {
    cat <<CONF
worker_processes 2;
pid $1/nginx.pid;
error_log $1/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $1/body; proxy_temp_path $1/proxy;
  fastcgi_temp_path $1/fcgi; uwsgi_temp_path $1/uwsgi; scgi_temp_path $1/scgi;
  keepalive_requests 1000000;
CONF
    cat
    echo "}"
  } > "$1/nginx.conf"
  "$(command -v nginx || echo /usr/sbin/nginx)" -c "$1/nginx.conf" -p "$1"
}

# proxy_routes LISTEN_PORT ADMIN_PORT UPSTREAM_PORT [SERVER_KEYS]: the gateway config of the proxy
# benchmarks (proxy.sh, instructions.sh, ab.sh), so that they measure the same routes: `bare`
# (/bare/...) and `full` (/full/...: timeout, per-try timeout, retry with budget, breaker, rate
# limit set high, concurrency limits), both to the HTTP upstream on UPSTREAM_PORT. SERVER_KEYS
# are added to `server:` (`runtime: shared`, `workers: 1`).
proxy_routes() {
  cat <<YAML
server: { listen: "127.0.0.1:$1", admin: "127.0.0.1:$2"${4:+, $4} }
backends:
  up: { type: http, endpoints: ["http://127.0.0.1:$3"], breaker: { enabled: false } }
  guarded:
    type: http
    endpoints: ["http://127.0.0.1:$3"]
    breaker: { consecutive_failures: 5 }
    retry_budget: { ratio: 0.2 }
    concurrency_limit: 100000
routes:
  - id: bare
    match: { method: GET, path: "/bare/{*rest}" }
    backend: up
  - id: full
    match: { method: GET, path: "/full/{*rest}" }
    backend: guarded
    timeout: 10s
    per_try_timeout: 5s
    retry: { attempts: 3, backoff: 10ms }
    rate_limit: { requests: 10000000, per: 1s }
    concurrency_limit: 100000
YAML
}

# to_ms VALUE: wrk's latencies (812.00us / 1.23ms / 1.02s) in milliseconds.
to_ms() { awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n = n; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'; }

# cpu_run NAME PID RESULTS WRK_ARGS...: runs wrk with WRK_ARGS while reading process PID's CPU
# time (utime + stime), prints req/s and CPU µs per request, and appends "NAME req/s µs" to
# RESULTS.
cpu_run() {
  local name=$1 pid=$2 results=$3 out before after n rps us tick
  shift 3
  tick=$((1000000 / $(getconf CLK_TCK)))
  before=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  out=$(wrk "$@")
  after=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  n=$(awk '/requests in/ {print $1}' <<<"$out")
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  us=$(awk -v t=$((after - before)) -v n="$n" -v u="$tick" 'BEGIN { printf "%.2f", t * u / n }')
  echo "$name $rps $us" >> "$results"
  printf '  %-8s %10s req/s  %6s CPU µs/request\n' "$name" "$rps" "$us"
}

# result_median RESULTS NAME COLUMN: the median of COLUMN over RESULTS' lines of NAME.
result_median() { awk -v n="$2" -v c="$3" '$1 == n {print $c}' "$1" | median; }
