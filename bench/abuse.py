"""Attack driver of bench/abuse.sh (standard library only).

  python3 bench/abuse.py upstream PORT        an HTTP upstream on PORT and PORT+1 that echoes
                                              each request's headers as JSON
  python3 bench/abuse.py attack SY ADMIN UP WORK BIN PID
                                              runs every attack class against the gateway and
                                              prints one line per attack
"""

import http.server
import json
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request


# ---------------------------------------------------------------- the upstream


class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in one write: with Nagle's algorithm and delayed ACKs, two small
    # writes per answer stall each keep-alive request by about 40 ms.
    wbufsize = -1

    def setup(self):
        super().setup()
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _answer(self, with_body=True):
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)
        self.wfile.flush()

    def do_GET(self):
        self._answer()

    def do_POST(self):
        self._answer()

    def do_HEAD(self):
        self._answer(False)

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        pass  # clients that break off (the cut bodies) are expected


def upstream(port):
    servers = [Server(("127.0.0.1", p), Echo) for p in (port, port + 1)]
    for s in servers[1:]:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    servers[0].serve_forever()


# ---------------------------------------------------------------- helpers

SY = ADMIN = UP = PID = 0
ROUTES = int(os.environ.get("ROUTES", "150000"))
WORK = BIN = ""
ROWS = []


def report(cls, attack, outcome, others):
    ROWS.append((cls, attack, outcome, others))
    print(f"  {cls:<16} {attack:<46} {outcome:<10} {others}", flush=True)


def raw(data, port=None, half_close=False, timeout=10.0):
    """Sends raw bytes, returns the answer (up to the connection's close or the timeout)."""
    s = socket.create_connection(("127.0.0.1", port or SY), timeout=timeout)
    s.sendall(data)
    if half_close:
        s.shutdown(socket.SHUT_WR)
    out = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out:
                head, _, body = out.partition(b"\r\n\r\n")
                length = [l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
                if length and len(body) >= int(length[0].split(b":")[1]):
                    break
    except socket.timeout:
        pass
    s.close()
    return out


def status(answer):
    try:
        return int(answer.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def request(method, path, body=None, headers=None, port=None, timeout=10):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port or SY}{path}", data=body, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def admin(path):
    return request("GET", path, port=ADMIN)[1]


def metric(prefix):
    for line in admin("/metrics").decode().splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


DISCONNECTS = 'switchyard_broker_events_total{backend="devices",event="disconnected"}'


def websocket(path):
    return status(
        raw(
            f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
            "sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode(),
            timeout=3,
        )
    )


class Victim:
    """A well-behaved client publishing while an attack runs: counts its failures."""

    def __init__(self, method, path, ok):
        self.method, self.path, self.ok = method, path, ok
        self.sent = self.failed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            s, _ = request(self.method, self.path, body=b"1" if self.method != "GET" else None)
            self.sent += 1
            self.failed += s != self.ok

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def verdict(self):
        return f"others: {self.failed}/{self.sent} failed"


# ---------------------------------------------------------------- the classes


def amqp_binding():
    for v in ["*", "%2A", "%23", "a.b", "%01"]:
        s = websocket(f"/v1/customers/{v}/orders/live")
        report("amqp-binding", f"bind order.{{customer}}.# with {v}", "refused" if s == 400 else f"served {s}",
               f"c1 still opens: {websocket('/v1/customers/c1/orders/live') == 101}")


def mqtt_topic():
    before = metric(DISCONNECTS)
    bad = ["%01", "%1B", "%7F", "%C2%80", "%FF", "%FE", "%2B", "%23"]
    refused = served = 0
    stop = time.time() + 3

    def attacker():
        nonlocal refused, served
        while time.time() < stop:
            for v in bad:
                s, _ = request("PUT", f"/d/{v}/set", b"1")
                s2 = status(raw(f"GET /d/{v}/events HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode(), timeout=2))
                for x in (s, s2):
                    refused += x == 400
                    served += x != 400

    with Victim("PUT", "/d/ok/set", 202) as victim:
        threads = [threading.Thread(target=attacker) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    drops = metric(DISCONNECTS) - before
    report("mqtt-topic", f"3 looping clients, {len(bad)} unfit values", "refused" if served == 0 else f"served {served}",
           f"{victim.verdict()}, broker drops {drops:.0f}")


def client_body():
    answers = []
    for _ in range(6):
        answers.append(status(raw(b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n")))
        answers.append(status(raw(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nhello", half_close=True)))
    slow = [status(raw(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nhel")) for _ in range(4)]
    breaker = metric('switchyard_breaker_state{backend="up"}')
    errors = "switchyard_backend_errors_total{" in admin("/metrics").decode()
    ok = request("GET", "/echo")[0]
    report("client-body", "malformed chunks, cut bodies (12)",
           "400s" if set(answers) <= {400, 0} else f"answered {sorted(set(answers))}",
           f"breaker {breaker:.0f}, backend errors counted {errors}, GET {ok}")
    report("client-body", "bodies too slow (4)", "408s" if set(slow) == {408} else f"answered {sorted(set(slow))}",
           f"breaker {breaker:.0f}")


def webhook_escape():
    base = f"http://127.0.0.1:{UP}/cb/"
    for url in [base + "../../admin", base + "%2e%2e/admin", base + "..%2fadmin", base + "a%2Fb",
                base.replace("http://", "http://user:pw@")]:
        s, _ = request("POST", "/job", b"{}", {"callback-url": url})
        report("webhook-escape", url.replace(f"127.0.0.1:{UP}", "up")[:46], "refused" if s == 400 else f"served {s}", "")


def connection_strip():
    answer = raw(b"GET /echo HTTP/1.1\r\nhost: x\r\nx-request-id: mine\r\nconnection: close, x-request-id, traceparent, x-gateway\r\n\r\n")
    body = answer.partition(b"\r\n\r\n")[2]
    try:
        seen = json.loads(body)
    except ValueError:
        seen = {}
    kept = "x-gateway" in seen and "traceparent" in seen and seen.get("x-request-id") != "mine"
    report("connection", "Connection: x-request-id, traceparent, x-gateway", "refused" if kept else "served",
           "gateway headers reach the upstream" if kept else f"upstream saw {sorted(seen)}")


def big_config():
    path = os.path.join(WORK, "routes.yaml")
    with open(os.path.join(WORK, "routes.good.yaml")) as f:
        good = f.read()
    with open(path, "w") as f:
        f.write(good + "# " + "x" * (17 * 1024 * 1024) + "\n")
    s, b = request("POST", "/reload", port=ADMIN)
    report("big-config", "a 17 MiB file", "refused" if s == 422 and b"limit" in b else f"answered {s}", "")
    lines = [good]
    for i in range(ROUTES):
        lines.append(f'  - {{ id: gen{i}, match: {{ path: "/gen/{i}/{{x}}" }}, backend: up }}\n')
    with open(path, "w") as f:
        f.write("".join(lines))
    size = os.path.getsize(path)
    conn = socket.create_connection(("127.0.0.1", SY))

    def get_echo():
        conn.sendall(b"GET /echo HTTP/1.1\r\nhost: x\r\n\r\n")
        buf = b""
        while not buf.endswith(b"}"):
            buf += conn.recv(65536)

    def during_reload():
        """Requests on one keep-alive connection while a reload runs: rate, slowest, status."""
        result = {}

        def reload():
            result["status"] = request("POST", "/reload", port=ADMIN, timeout=600)[0]

        t = threading.Thread(target=reload)
        served, worst, started = 0, 0.0, time.time()
        t.start()
        while t.is_alive():
            t0 = time.time()
            get_echo()
            worst = max(worst, time.time() - t0)
            served += 1
        return result.get("status"), served / (time.time() - started), worst, time.time() - started

    base, t0 = 0, time.time()
    while time.time() - t0 < 2:
        get_echo()
        base += 1
    status, rate, worst, took = during_reload()
    with open(f"/proc/{PID}/status") as f:
        peak = [l.split()[1] for l in f if l.startswith("VmHWM")][0]
    report("big-config", f"reload of {size / 1e6:.1f} MB ({ROUTES:,} routes)", f"applied {status}",
           f"{rate:.0f} req/s during its {took:.1f}s ({base / 2:.0f} before), "
           f"slowest {worst * 1000:.0f} ms, peak RSS {int(peak) // 1024} MiB")
    shutil.copy(os.path.join(WORK, "routes.good.yaml"), path)
    status, rate, worst, took = during_reload()
    report("big-config", "back to the small config (the big table freed)", f"applied {status}",
           f"slowest request {worst * 1000:.0f} ms during its {took:.2f}s")
    conn.close()


def secrets():
    path = os.path.join(WORK, "routes.yaml")
    with open(os.path.join(WORK, "routes.good.yaml")) as f:
        good = f.read()
    with open(path, "w") as f:
        f.write(good.replace(f'"http://127.0.0.1:{UP}"', '"http://admin:s3cr3t-pw@127.0.0.1:1"', 1)
                .replace('state: { path: ', 'state: { store: redis, redis: { url: "http://:s3cr3t-pw@127.0.0.1:6379" }, path: '))
    s, b = request("POST", "/reload", port=ADMIN)
    leaked = b"s3cr3t" in b or b"s3cr3t" in admin("/config")
    report("secrets", "credentials in a rejected reload", "refused" if s == 422 else f"answered {s}",
           "leaked" if leaked else "nothing leaked")
    shutil.copy(os.path.join(WORK, "routes.good.yaml"), path)
    # The watcher sees the file back at the running content: the stale error goes.
    deadline = time.time() + 5
    while time.time() < deadline and json.loads(admin("/config")).get("last_error"):
        time.sleep(0.05)
    report("stale-error", "file reverted to the running content", "cleared" if not json.loads(admin("/config")).get("last_error") else "kept", "")


def env_injection():
    path = os.path.join(WORK, "inject.yaml")
    with open(path, "w") as f:
        f.write('routes:\n  - id: "${ABUSE_ID}"\n    match: { path: /a }\n    backend: up\n'
                'backends:\n  up: { type: http, endpoints: ["http://127.0.0.1:9"] }\n')
    env = dict(os.environ, ABUSE_ID='a", backend: evil, x: "')
    out = subprocess.run([BIN, "validate", path], env=env, capture_output=True, text=True)
    report("env-injection", "${VAR} holding `\", backend: evil`", "contained" if out.returncode == 0 else "injected",
           (out.stdout + out.stderr).strip().splitlines()[-1].replace(WORK, "")[:60])


def http_parsing():
    s = status(raw(b"GET /echo HTTP/1.1\r\nhost: a\r\nhost: b\r\nconnection: close\r\n\r\n"))
    report("http-parsing", "two Host headers", "refused" if s == 400 else f"served {s}", "")
    s = status(raw(b"POST /echo HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip, chunked\r\nconnection: close\r\n\r\n0\r\n\r\n"))
    report("http-parsing", "Transfer-Encoding: gzip, chunked", "refused" if s in (400, 501) else f"served {s}", f"status {s}")
    path = os.path.join(WORK, "dup.yaml")
    with open(path, "w") as f:
        f.write("routes: []\nbackends: {}\nroutes: []\n")
    out = subprocess.run([BIN, "validate", path], capture_output=True, text=True)
    report("http-parsing", "duplicate YAML key", "refused" if out.returncode == 64 else "accepted",
           out.stderr.strip().splitlines()[0].replace(WORK, "")[:60] if out.stderr else "")
    answer = raw(b"HEAD /echo HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
    report("http-parsing", "HEAD on a GET route", f"served {status(answer)}", "no body" if answer.endswith(b"\r\n\r\n") else "a body")


def second_instance():
    before = metric(DISCONNECTS)
    t0 = time.time()
    out = subprocess.run([BIN, "run", "--no-watch", "--config", os.path.join(WORK, "routes.good.yaml")],
                         capture_output=True, text=True, timeout=30, env=dict(os.environ, RUST_LOG="error"))
    time.sleep(1)
    drops = metric(DISCONNECTS) - before
    report("second-instance", "same config started again", f"exit {out.returncode} in {time.time() - t0:.1f}s",
           f"broker drops of the first {drops:.0f}, first serves {request('PUT', '/d/ok/set', b'1')[0]}")


def sse_shutdown(pid):
    s = socket.create_connection(("127.0.0.1", SY))
    s.sendall(b"GET /d/k/events HTTP/1.1\r\nhost: x\r\n\r\n")
    s.settimeout(5)
    head = s.recv(65536)
    t0 = time.time()
    os.kill(pid, signal.SIGTERM)
    got = head
    s.settimeout(30)
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    except socket.timeout:
        pass
    for _ in range(300):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    report("sse-shutdown", "SIGTERM with an open event stream", f"exited in {time.time() - t0:.1f}s",
           "final event sent" if b"event: shutdown" in got else "no final event")


def attack(argv):
    global SY, ADMIN, UP, WORK, BIN, PID
    SY, ADMIN, UP = int(argv[0]), int(argv[1]), int(argv[2])
    WORK, BIN, PID = argv[3], argv[4], int(argv[5])
    print(f"  {'class':<16} {'attack':<46} {'outcome':<10} other clients")
    for run in (amqp_binding, mqtt_topic, client_body, webhook_escape, connection_strip,
                http_parsing, env_injection, secrets, big_config, second_instance):
        run()
    sse_shutdown(PID)


if __name__ == "__main__":
    if sys.argv[1] == "upstream":
        upstream(int(sys.argv[2]))
    else:
        attack(sys.argv[2:])
