#!/usr/bin/env bash
# Builds the image and proves it from outside: health SERVING, an Ask answered, /metrics
# scraped, and `docker stop` ending the server (exit 0) within its grace period.
#
#   scripts/docker_smoke.sh                 # BASE_IMAGE: python:3.11-slim-bookworm, else a
#                                           # Debian base made here with debootstrap
#   BASE_IMAGE=my/debian:12 scripts/docker_smoke.sh
#
# Needs docker (a running daemon) and, without Docker Hub, debootstrap. Traffic stays on
# 127.0.0.1. The build context is a copy of what the image needs, plus pip's CA bundle
# (`PIP_CERT` / `global.cert`, for a proxy that re-signs TLS) as pip-ca.pem, which only the
# build stage reads; pip's local wheel folder (`global.find-links`, the torch CPU wheel) is
# served to the build over loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-supportqa:smoke}
NAME=supportqa-smoke-$$
GRACE=5  # SUPPORTQA_GRACE_SECONDS in the container
CLIENT=${CLIENT:-.venv/bin/supportqa}
work=$(mktemp -d)
cleanup() {
  docker rm -f "$NAME" >/dev/null 2>&1 || true
  [ -n "${http_pid:-}" ] && kill "$http_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
say() { printf '== %s\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

docker info >/dev/null 2>&1 || { echo "docker daemon not running (start dockerd)"; exit 2; }

if [ -z "${BASE_IMAGE:-}" ]; then
  if docker image inspect python:3.11-slim-bookworm >/dev/null 2>&1 \
     || timeout 60 docker pull -q python:3.11-slim-bookworm >/dev/null 2>&1; then
    BASE_IMAGE=python:3.11-slim-bookworm
  else
    BASE_IMAGE=supportqa-base:bookworm
    if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
      say "no Docker Hub: making $BASE_IMAGE with debootstrap"
      debootstrap --variant=minbase bookworm "$work/rootfs" http://deb.debian.org/debian >/dev/null
      tar -C "$work/rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null
      rm -rf "$work/rootfs"
    fi
  fi
fi

build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
pip_setting() {  # $1: pip's environment variable, $2: its config key
  local v=${!1:-}
  [ -n "$v" ] || v=$(pip config list 2>/dev/null | sed -n "s/^global\.$2='\(.*\)'\$/\1/p" | head -1)
  printf '%s' "$v"
}
links=$(pip_setting PIP_FIND_LINKS find-links)
if [ -n "$links" ] && [ -d "$links" ]; then
  port=$(free_port)
  python3 -m http.server "$port" --bind 127.0.0.1 --directory "$links" >/dev/null 2>&1 &
  http_pid=$!
  build_args+=(--build-arg "PIP_FIND_LINKS=http://127.0.0.1:$port/" --build-arg "TORCH_PIP_ARGS=")
fi
context="$work/context"
mkdir -p "$context/knowledge"
cp -a pyproject.toml README.md protos clients server tools "$context/"  # -a: keep mtimes, so the layer cache holds
cp -a knowledge/sample.jsonl "$context/knowledge/"
find "$context" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
cert=$(pip_setting PIP_CERT cert)
if [ -n "$cert" ] && [ -f "$cert" ]; then
  cp "$cert" "$context/pip-ca.pem"
fi

say "building $IMAGE on $BASE_IMAGE"
t0=$(date +%s)
docker build -q --network host "${build_args[@]}" -t "$IMAGE" -f Dockerfile "$context" >/dev/null
say "built in $(( $(date +%s) - t0 )) s, $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"

grpc_port=$(free_port); metrics_port=$(free_port)
docker run -d --name "$NAME" -e "SUPPORTQA_GRACE_SECONDS=$GRACE" \
  -p "127.0.0.1:$grpc_port:50051" -p "127.0.0.1:$metrics_port:9464" "$IMAGE" >/dev/null
user=$(docker exec "$NAME" id -u)
[ "$user" != 0 ] || { echo "FAIL: runs as root"; exit 1; }

say "waiting for SERVING"
t0=$(date +%s)
until "$CLIENT" --target "127.0.0.1:$grpc_port" health --wait 5 >/dev/null 2>&1; do
  if [ "$(docker inspect -f '{{.State.Running}}' "$NAME")" != true ] || (( $(date +%s) - t0 > 600 )); then
    docker logs "$NAME" | tail -20; echo "FAIL: never SERVING"; exit 1
  fi
  sleep 3
done
say "SERVING after $(( $(date +%s) - t0 )) s (uid $user)"

out=$("$CLIENT" --target "127.0.0.1:$grpc_port" ask "someone nicked my debit card")
answer=${out%%$'\n'*}  # the first line (no `| head`: under pipefail the closed pipe fails)
say "ask: $answer"
[[ "$answer" == "1. ["* ]] || { echo "FAIL: no answer"; exit 1; }

metrics=$(curl -fsS "http://127.0.0.1:$metrics_port/metrics")
handled=$(grep '^grpc_server_handled_total{.*grpc_method="Ask"' <<<"$metrics" | grep 'grpc_code="OK"' || true)
say "metrics: ${handled:-none}"
[ -n "$handled" ] || { echo "FAIL: no Ask in /metrics"; exit 1; }
grep -q '^supportqa_questions_total{.*outcome="answered"' <<<"$metrics" \
  || { echo "FAIL: no supportqa_questions_total"; exit 1; }
docker logs "$NAME" 2>&1 | grep -q '"method": "Ask"' || { echo "FAIL: no JSON request log"; exit 1; }

health=$(docker inspect -f '{{.State.Health.Status}}' "$NAME")
say "docker health: $health"

t0=$(date +%s.%N)
docker stop -t 30 "$NAME" >/dev/null
took=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$t0" "$(date +%s.%N)")
code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
say "docker stop: exit $code after $took s (grace $GRACE s)"
[ "$code" = 0 ] || { echo "FAIL: exit code $code"; exit 1; }
python3 -c "import sys; sys.exit(float(sys.argv[1]) > float(sys.argv[2]) + 3)" "$took" "$GRACE" \
  || { echo "FAIL: stop took longer than the grace period"; exit 1; }
say "PASS"
