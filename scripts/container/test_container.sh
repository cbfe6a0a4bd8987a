#!/usr/bin/env bash
# Builds the CPU image and runs it with podman/buildah (`podman build --isolation=chroot` where no
# Docker engine runs), then checks it from outside through its ports: health, a
# generated PNG, /metrics, and a clean exit 0 on SIGTERM. Needs a host build of dmdctl
# (scripts/build.sh). Takes ~15 min the first time (the image compiles dmdserve).
#   scripts/container/test_container.sh [image-tag]
set -euo pipefail
cd "$(dirname "$0")/../.."
IMAGE=${1:-dmdserve:cpu}
DMDCTL=${DMDCTL:-build/client/dmdctl}
BASE=docker.io/library/debian:bookworm-slim
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

command -v podman >/dev/null && command -v buildah >/dev/null && command -v debootstrap >/dev/null \
  || { apt-get update -q && apt-get install -y -q podman buildah debootstrap; }

# Base images cannot be pulled here: build debian:bookworm-slim from Debian's archive.
if ! podman image exists "$BASE"; then
  rootfs=$(mktemp -d)
  debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >/dev/null
  tar -C "$rootfs" -c . | podman import - "$BASE" >/dev/null
  rm -rf "$rootfs"
fi

podman build --isolation=chroot --network=host --pull=never --format docker -t "$IMAGE" -f Dockerfile .

free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
METRICS_PORT=$(free_port)
ctr=$(buildah from "$IMAGE")
log=$(mktemp)
cleanup() { buildah rm "$ctr" >/dev/null 2>&1 || true; rm -f "$log"; }
trap cleanup EXIT

# The image's USER (non-root), ENV and entrypoint binary, on loopback ports of the host network.
buildah run --isolation=chroot --network=host "$ctr" -- /usr/local/bin/dmdserve \
  --listen_host=127.0.0.1 --port="$PORT" --metrics_port="$METRICS_PORT" --http_port=0 >"$log" 2>&1 &
runner=$!
for _ in $(seq 1 120); do
  grep -q "serving port=" "$log" && break
  kill -0 "$runner" 2>/dev/null || { cat "$log"; echo "FAIL: server exited" >&2; exit 1; }
  sleep 1
done
grep -q "serving port=" "$log" || { cat "$log"; echo "FAIL: server not ready" >&2; exit 1; }

server_pid=$(pgrep -f "^/usr/local/bin/dmdserve --listen_host=127.0.0.1 --port=$PORT" | head -1)
[ "$(stat -c %u /proc/"$server_pid")" = 10001 ] || { echo "FAIL: server is not running as uid 10001" >&2; exit 1; }
[ "$("$DMDCTL" --target=127.0.0.1:"$PORT" health)" = SERVING ]
out=$(mktemp -d)
"$DMDCTL" --target=127.0.0.1:"$PORT" generate --seed 1 --out_dir "$out" "a photo of a sneaker" >/dev/null
head -c 8 "$out"/*.png | od -An -c | grep -q "P   N   G" || { echo "FAIL: no PNG" >&2; exit 1; }
rm -rf "$out"
metrics=$(curl -fsS "http://127.0.0.1:$METRICS_PORT/metrics")
grep -q 'dmdserve_model_ready{model="fashion-dmd"} 1' <<<"$metrics" \
  || { echo "FAIL: /metrics does not report the model ready" >&2; exit 1; }

kill -TERM "$server_pid"
wait "$runner" && status=0 || status=$?
grep -q "stopped" "$log" || { cat "$log"; echo "FAIL: no clean drain" >&2; exit 1; }
[ "$status" = 0 ] || { cat "$log"; echo "FAIL: exit status $status" >&2; exit 1; }
echo "container test passed: $IMAGE (non-root, health, generate, metrics, SIGTERM exit 0)"
