#!/usr/bin/env bash
# Shows that the Dockerfile builds and runs, with podman, on a machine that reaches package
# registries but no image registry (docs/deployment.md):
#
#   1. a Debian bookworm base is made locally with debootstrap, from the machine's own Debian
#      mirror (read from its apt sources), and imported as the Dockerfile's runtime base;
#   2. the release binary is built on the host (a glibc build for bookworm) and handed to the
#      Dockerfile's `prebuilt` stage (`--build-arg BINARY=prebuilt`), so the Rust build image
#      is not needed;
#   3. the image is built from the repository's Dockerfile, started, and must answer /healthz
#      (and /readyz on its admin port) and `switchyard validate` on its own routes.yaml.
#
#   sudo bash deploy/container-check.sh          # needs podman and debootstrap (Debian packages)
#   KEEP_BASE=1 …                                # keeps the imported base for the next run
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in podman debootstrap; do
  command -v "$tool" >/dev/null || { echo "container-check: install $tool (apt-get install -y $tool)" >&2; exit 69; }
done
BASE=docker.io/library/debian:bookworm-slim
WORK=$(mktemp -d)
NAME="switchyard-check-$$"
cleanup() {
  podman rm -f "$NAME" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# 1. The base image, unless one is there already.
if ! podman image exists "$BASE"; then
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$mirror" ] || { echo "container-check: no Debian mirror in the apt sources" >&2; exit 69; }
  echo "container-check: making a bookworm base with debootstrap"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
  # The same apt sources inside, so that the Dockerfile's `apt-get install` works.
  cp /etc/apt/sources.list.d/*.sources "$WORK/rootfs/etc/apt/sources.list.d/" 2>/dev/null || true
  tar -C "$WORK/rootfs" -c . | podman import - "$BASE" >/dev/null
fi

# 2. The binary, and a build context with what the Dockerfile copies.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/switchyard-target}
cargo build --release --locked --bin switchyard
mkdir -p "$WORK/context/examples"
cp Dockerfile routes.yaml "$WORK/context/"
cp -r plugins "$WORK/context/"
cp -r examples/protos "$WORK/context/examples/"
cp "$CARGO_TARGET_DIR/release/switchyard" "$WORK/context/switchyard-prebuilt"

# 3. Built from the repository's Dockerfile, run, checked.
echo "container-check: building the image"
podman build --format docker --isolation chroot --network host --pull=never --build-arg BINARY=prebuilt -t switchyard:check "$WORK/context"
echo "container-check: running it"
ENV_ARGS=(-e SWITCHYARD_LISTEN=127.0.0.1:18480 -e SWITCHYARD_ADMIN=127.0.0.1:18481)
# In a container with podman (crun); on machines whose sandbox refuses what crun asks for
# (cgroups, setrlimit), in the image's root filesystem with buildah's chroot isolation, which
# runs the image's own files, user and entrypoint without an OCI runtime.
if podman run -d --name "$NAME" --network host "${ENV_ARGS[@]}" switchyard:check >"$WORK/run.log" 2>&1; then
  RUNNER=podman
  in_image() { podman exec "$NAME" "$@"; }
else
  echo "container-check: podman could not start a container here: $(grep -v level= "$WORK/run.log" | tail -1)"
  command -v buildah >/dev/null || { echo "container-check: install buildah to run the image with chroot isolation" >&2; exit 69; }
  RUNNER="buildah (chroot isolation)"
  podman rm -f "$NAME" >/dev/null 2>&1 || true
  CTR=$(buildah from --pull-never --name "$NAME" switchyard:check)
  in_image() { buildah run --isolation chroot --network host "${ENV_ARGS[@]/-e/--env}" "$CTR" -- "$@"; }
  in_image switchyard run >"$WORK/gateway.log" 2>&1 &
  GATEWAY=$!
  trap 'kill $GATEWAY 2>/dev/null || true; buildah rm "$CTR" >/dev/null 2>&1 || true; cleanup' EXIT
fi
for _ in $(seq 1 100); do
  curl -fsS http://127.0.0.1:18481/healthz >/dev/null 2>&1 && break
  sleep 0.2
done
echo "container-check: started with $RUNNER"
echo "container-check: /healthz answered: $(curl -fsS http://127.0.0.1:18481/healthz)"
echo "container-check: /readyz: $(curl -sS -o /dev/null -w '%{http_code}' http://127.0.0.1:18481/readyz) (503 until the example backends it names are up)"
echo "container-check: the image's health check command: $(in_image curl -fsS http://127.0.0.1:18481/healthz)"
echo "container-check: runs as uid $(in_image id -u); $(in_image switchyard validate /etc/switchyard/routes.yaml)"
[ -n "${KEEP_BASE:-}" ] || podman rmi -f switchyard:check >/dev/null 2>&1 || true
echo "container-check: ok"
