#!/usr/bin/env bash
# Build the container image for real and pass one session through it (docs/deploy.md, "Building the image").
#
#   scripts/image-check.sh          (or `make image`; tests/test_image.py runs it in `make test`)
#
# No Docker engine and no image registry here, so: a Debian bookworm base made with debootstrap and
# imported as a local image, the Dockerfile built on it with buildah (chroot isolation, vfs storage, the
# base passed as PYTHON_IMAGE), then `sidecar serve` run from the image with podman (runc, host network,
# read-only root filesystem) against the bundled fake provider. One session goes through with the official
# openai SDK (examples/transcribe.py); the transcript must come back, and SIGTERM must stop the container
# with exit code 0. Everything listens on 127.0.0.1 only; pip in the build reaches PyPI.
#
# Idempotent: tools are installed once, the base image and the built image are cached in IMAGE_CHECK_CACHE
# (default /var/tmp/realtime-sidecar-image, outside the repository), the build is redone only when the build
# context changes (or with IMAGE_CHECK_REBUILD=1). Runs are serialized with a lock. Each step is bounded by a
# timeout and prints one line; a failing step prints its command's error and the script exits 1.
# Needs root (apt-get, debootstrap, buildah and podman as root).
#
# Environment: IMAGE_CHECK_CACHE, IMAGE_CHECK_REBUILD=1, IMAGE_CONTEXT (build context, default the repository),
# PYTHON (for the fake provider and the client, default .venv/bin/python).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${IMAGE_CHECK_CACHE:-/var/tmp/realtime-sidecar-image}
CONTEXT=$(cd "${IMAGE_CONTEXT:-$REPO}" && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
SUITE=bookworm
# Bump the tag when the base's package list changes, so cached bases are rebuilt.
BASE_IMAGE=localhost/realtime-sidecar-base:$SUITE-1
BASE_PACKAGES=python3,python3-venv,python3-pip,python-is-python3,ca-certificates
IMAGE_REPO=localhost/realtime-sidecar
CONTAINER=realtime-sidecar-image-check
TOOLS=(buildah podman runc debootstrap)
STORAGE=(--root "$CACHE/storage" --runroot "$CACHE/run" --storage-driver vfs)
PODMAN=(podman "${STORAGE[@]}" --cgroup-manager cgroupfs --events-backend file)
BUILDAH=(buildah "${STORAGE[@]}")

log() { echo "image-check: $*"; }

if [ "$(id -u)" != 0 ]; then
  log "FAILED: needs root (apt-get, debootstrap, buildah and podman run as root here)" >&2
  exit 1
fi
mkdir -p "$CACHE"
exec 9>"$CACHE/lock"
flock -w 1800 9 || { log "FAILED: another image check holds $CACHE/lock" >&2; exit 1; }
WORK=$(mktemp -d "$CACHE/work.XXXXXX")

cleanup() {
  "${PODMAN[@]}" rm -f -t 0 "$CONTAINER" >/dev/null 2>&1 || true
  if [ -s "$WORK/provider.pid" ]; then
    kill "$(cat "$WORK/provider.pid")" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# run_step NAME FUNCTION: runs FUNCTION with `set -e` in a subshell, its output in a log; one line on success,
# the failing command and the log's tail on failure. Steps pass values on through files in $WORK.
STEP=0
run_step() {
  local name=$1 started rc
  STEP=$((STEP + 1))
  started=$(date +%s)
  log "[$STEP/7] $name ..."
  set +e
  (
    set -eEuo pipefail
    trap 'echo "failed ($?): $BASH_COMMAND" >&2' ERR
    "$2"
  ) >"$WORK/step.log" 2>&1
  rc=$?
  set -e
  if [ "$rc" != 0 ]; then
    log "FAILED at [$STEP/7] $name (exit $rc):" >&2
    tail -n 40 "$WORK/step.log" >&2
    exit 1
  fi
  log "[$STEP/7] $name ok ($(($(date +%s) - started))s)$(cat "$WORK/note" 2>/dev/null || true)"
  rm -f "$WORK/note"
}
note() { echo " $*" >"$WORK/note"; }

install_tools() {
  local missing=()
  for tool in "${TOOLS[@]}"; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  if [ "${#missing[@]}" = 0 ]; then
    note "already installed"
    return
  fi
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -qq
  timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}"
  note "installed ${missing[*]}"
}

# The apt mirror this machine already uses for Debian (not -security), else deb.debian.org.
debian_mirror() {
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | grep -E '^[[:space:]]*(URIs:|deb[[:space:]])' | tr -s '[:blank:]' '\n' \
    | grep -E '^https?://.*/debian/?$' | head -n 1 || true
}

make_base() {
  if "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
    note "cached $BASE_IMAGE"
    return
  fi
  local mirror rootfs=$CACHE/rootfs
  mirror=$(debian_mirror)
  mirror=${mirror:-http://deb.debian.org/debian}
  rm -rf "$rootfs"
  timeout 900 debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$mirror"
  # pip in the build must trust what this machine trusts (here an egress proxy re-signs TLS). Only this
  # local base gets these CAs; real builds start from python:3.11-slim.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates
  fi
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | timeout 300 "${PODMAN[@]}" import - "$BASE_IMAGE"
  rm -rf "$rootfs"
  note "debootstrap from $mirror, imported as $BASE_IMAGE"
}

# A digest of the build context as the Dockerfile sees it (the files .dockerignore keeps) and of the base.
context_digest() {
  (
    cd "$CONTEXT"
    "${PODMAN[@]}" image inspect --format '{{.Id}}' "$BASE_IMAGE"
    find Dockerfile .dockerignore pyproject.toml README.md sidecar -type f \
      ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum
  ) | sha256sum | cut -c1-16
}

build_image() {
  local tag
  tag=$IMAGE_REPO:ctx-$(context_digest)
  echo "$tag" >"$WORK/image"
  if [ "${IMAGE_CHECK_REBUILD:-0}" != 1 ] && "${PODMAN[@]}" image exists "$tag"; then
    note "cached $tag"
    return
  fi
  timeout 1200 "${BUILDAH[@]}" bud --isolation chroot --pull-never --layers=false --force-rm \
    --build-arg PYTHON_IMAGE="$BASE_IMAGE" -t "$tag" -f "$CONTEXT/Dockerfile" "$CONTEXT"
  # Keep only this build: vfs stores every image in full (about 700 MB each).
  local old
  for old in $("${PODMAN[@]}" images --format '{{.Repository}}:{{.Tag}}'); do
    if [[ $old == "$IMAGE_REPO:ctx-"* && $old != "$tag" ]]; then
      "${PODMAN[@]}" rmi -f "$old"
    fi
  done
  "${PODMAN[@]}" image prune -f
  note "built $tag"
}

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_provider() {
  test -x "$PYTHON" || { echo "no $PYTHON: run make venv" >&2; exit 1; }
  (cd "$REPO" && exec "$PYTHON" -m sidecar.testing.fake_provider --host 127.0.0.1 --port 0 \
    --api-key sk-image-check-provider) >"$WORK/provider.log" 2>&1 &
  echo $! >"$WORK/provider.pid"
  for _ in $(seq 100); do
    if grep -q '^ws://' "$WORK/provider.log"; then break; fi
    kill -0 "$(cat "$WORK/provider.pid")" || { cat "$WORK/provider.log"; exit 1; }
    sleep 0.1
  done
  local url
  url=$(grep -m1 '^ws://' "$WORK/provider.log")
  cat >"$WORK/config.yaml" <<EOF
model_list:
  - model_name: gpt-realtime-whisper
    litellm_params:
      model: openai/gpt-realtime-whisper
      api_base: $url
      api_key: sk-image-check-provider
general_settings:
  master_key: sk-image-check-master
EOF
  note "$url"
}

# The ulimits: podman asks for nofile 1048576 by default, above this sandbox's hard limit (setrlimit
# refused: "OCI permission denied"); runc, because crun 1.8 refuses this host's hybrid cgroup layout.
run_image() {
  local port
  port=$(free_port)
  echo "$port" >"$WORK/port"
  "${PODMAN[@]}" rm -f -t 0 "$CONTAINER" >/dev/null 2>&1 || true
  timeout 300 "${PODMAN[@]}" run -d --name "$CONTAINER" --runtime runc --network host \
    --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 \
    --read-only --tmpfs /tmp --mount type=tmpfs,destination=/var/lib/sidecar/spool,U=true \
    -v "$WORK/config.yaml:/etc/litellm/config.yaml:ro" \
    -e SIDECAR_LITELLM_CONFIG=/etc/litellm/config.yaml \
    -e SIDECAR_DATABASE_URL=sqlite:////tmp/billing.db \
    -e SIDECAR_HOST=127.0.0.1 -e SIDECAR_PORT="$port" \
    "$(cat "$WORK/image")"
  for _ in $(seq 120); do
    if curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then
      note "ready on 127.0.0.1:$port as uid $("${PODMAN[@]}" exec "$CONTAINER" id -u)"
      return
    fi
    if [ "$("${PODMAN[@]}" inspect --format '{{.State.Running}}' "$CONTAINER")" != true ]; then
      "${PODMAN[@]}" logs "$CONTAINER"
      echo "the container exited" >&2
      exit 1
    fi
    sleep 0.5
  done
  "${PODMAN[@]}" logs "$CONTAINER"
  echo "no /readyz answer in 60 s" >&2
  exit 1
}

pass_session() {
  local port out
  port=$(cat "$WORK/port")
  if ! out=$(cd "$REPO" && SIDECAR_URL="http://127.0.0.1:$port/v1" SIDECAR_KEY=sk-image-check-master \
    timeout 60 "$PYTHON" examples/transcribe.py examples/audio/speech_24k_pcm16.wav 2>&1); then
    echo "$out"
    echo "--- sidecar log:"
    "${PODMAN[@]}" logs "$CONTAINER" 2>&1 | tail -n 20
    exit 1
  fi
  echo "$out"
  grep -Eq '^transcript: .+' <<<"$out" || { echo "no transcript in the client's output" >&2; exit 1; }
  note "\"$(grep -m1 '^transcript: ' <<<"$out" | cut -c13-60)...\""
}

stop_on_sigterm() {
  local code
  # podman stop sends SIGTERM (the image's stop signal) and SIGKILL only after 30 s.
  timeout 60 "${PODMAN[@]}" stop -t 30 "$CONTAINER"
  code=$("${PODMAN[@]}" inspect --format '{{.State.ExitCode}}' "$CONTAINER")
  "${PODMAN[@]}" logs "$CONTAINER" 2>&1 | tail -n 5
  [ "$code" = 0 ] || { echo "exit code $code after SIGTERM, expected 0" >&2; exit 1; }
  note "exit code 0"
}

started=$(date +%s)
run_step "tools (${TOOLS[*]})" install_tools
run_step "base image $BASE_IMAGE" make_base
run_step "build the Dockerfile on it (buildah, chroot isolation, vfs)" build_image
run_step "fake provider on 127.0.0.1" start_provider
run_step "podman run sidecar serve" run_image
run_step "one session with the openai SDK" pass_session
run_step "SIGTERM" stop_on_sigterm
log "ok in $(($(date +%s) - started))s"
