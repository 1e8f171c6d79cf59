#!/usr/bin/env bash
# Several replicas behind nginx on one Milvus standalone server, loaded by supportqa-bench.
#
#   scripts/replicas_demo.sh [MILVUS_URI]
#
# Without MILVUS_URI it starts PyPI's milvus 2.3.5 standalone server (installed into a venv
# under the cache folder, as tests/test_replicas.py does). Needs nginx (apt). Everything
# listens on 127.0.0.1 and stops when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done
  [ -f "$work/nginx/nginx.pid" ] && kill "$(cat "$work/nginx/nginx.pid")" 2>/dev/null || true
  sleep 1; for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; done
  # Milvus runs from a copy under its data folder, in a session of its own.
  pkill -TERM -f "$work/milvus/bin/milvus" 2>/dev/null || true; sleep 3
  pkill -KILL -f "$work/milvus/bin/milvus" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

uri=${1:-}
if [ -z "$uri" ]; then
  venv=${XDG_CACHE_HOME:-$HOME/.cache}/supportqa/milvus-2.3.5
  [ -x "$venv/bin/milvus-server" ] || { python3 -m venv "$venv"; "$venv/bin/pip" install -q milvus==2.3.5; }
  args=()
  for flag in --proxy-port --etcd-port --root-coord-port --proxy-internal-port --query-coord-port \
              --query-node-port --index-coord-port --index-node-port --data-coord-port --data-node-port; do
    args+=("$flag" "$(free_port)")
  done
  uri="http://127.0.0.1:${args[1]}"
  setsid "$venv/bin/milvus-server" --data "$work/milvus" "${args[@]}" >"$work/milvus.log" 2>&1 &
  pids+=($!)
  echo "== Milvus 2.3.5 starting on $uri"
  for _ in $(seq 120); do
    $BIN/python -c "from pymilvus import MilvusClient; MilvusClient(uri='$uri').list_collections(timeout=3)" 2>/dev/null && break
    sleep 1
  done
fi

ports=(); metrics=()
for i in 1 2; do
  port=$(free_port); ports+=("$port"); metrics+=("$(free_port)")
  SUPPORTQA_MILVUS_URI=$uri SUPPORTQA_PORT=$port SUPPORTQA_METRICS_PORT=${metrics[-1]} \
  SUPPORTQA_DATA_DIR="$work/replica$i" SUPPORTQA_SPEECH_MODEL= SUPPORTQA_OCR=false \
    setsid $BIN/supportqa-server serve >"$work/replica$i.log" 2>&1 &
  pids+=($!)
done
for port in "${ports[@]}"; do
  $BIN/supportqa --target "127.0.0.1:$port" health --wait 300 >/dev/null
done
echo "== replicas SERVING on ${ports[*]}"

lb=$(free_port)
mkdir -p "$work/nginx"
sed -e "s/127.0.0.1:50061/127.0.0.1:${ports[0]}/" -e "s/127.0.0.1:50062/127.0.0.1:${ports[1]}/" \
    -e "s/127.0.0.1:50051 http2/127.0.0.1:$lb http2/" deploy/nginx.conf >"$work/nginx/nginx.conf"
nginx -c "$work/nginx/nginx.conf" -p "$work/nginx"
echo "== nginx on 127.0.0.1:$lb"

out=$($BIN/supportqa --target "127.0.0.1:$lb" ingest knowledge/sample.jsonl)
echo "== ${out##*$'\n'}"
sleep 2  # both replicas poll supportqa_meta every second
for port in "${ports[@]}" "$lb"; do
  out=$($BIN/supportqa --target "127.0.0.1:$port" ask 'someone nicked my debit card')
  echo "== ask through 127.0.0.1:$port: ${out%%$'\n'*}"
done
printf 'someone nicked my debit card\nI forgot my PIN\nmy transfer has not arrived\nhow do I close my account\n' >"$work/q.txt"
$BIN/supportqa-bench --target "127.0.0.1:$lb" --text "$work/q.txt" -c 8 --duration 10 --warmup 16
for i in 0 1; do
  n=$(curl -fsS "http://127.0.0.1:${metrics[$i]}/metrics" \
      | awk '/^grpc_server_handled_total\{.*grpc_method="Ask"/ {s += $2} END {print s + 0}')
  echo "== replica $((i + 1)) answered $n Asks"
done
