#!/usr/bin/env bash
# Issue 16: what several nodes cost. The fanout loads 1 x 50 x 2/s and 100 x 5 x 2/s against
# 1, 2 and 3 nodes (`--cluster`) sharing one redis-server (AOF, `appendfsync always`, no RDB),
# and the same loads against one node without `--cluster` (`--store sqlite` and `memory`).
# `collab-load` spreads its clients over the nodes round-robin (`--url` per node) and sums the
# CPU of every node (`--server-pid` per node), so "CPU us/delivery" is the whole cluster's;
# Redis' CPU over the same window is printed beside it. Fresh processes (and a fresh Redis)
# for every run. Each node runs one runtime thread (`--workers 1`, override with WORKERS=N).
#
# Usage: bash bench/cluster.sh [OUT_DIR]   (prints a Markdown table; raw JSON in OUT_DIR)
# Env: NODES="1 2 3" (cluster sizes), QUICK=1 (short windows, for a smoke run),
#      BIN_DIR=DIR (run the binaries in DIR instead of building this tree), PORT=8801 (the
#      first port: Redis on it, the nodes on the next ones).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

need() { command -v "$1" >/dev/null 2>&1 || { echo "error: '$1' is required" >&2; exit 1; }; }
need cargo; need curl; need python3; need redis-server

out=${1:-$(mktemp -d)}
mkdir -p "$out"
results="$out/results.jsonl"
: >"$results"
bin=${BIN_DIR:-$repo/target/release}
port=${PORT:-8801}
if [ "${QUICK:-0}" = 1 ]; then window=(--warmup 1 --duration 3 --drain 1); else window=(--warmup 2 --duration 8 --drain 2); fi

scratch=$(mktemp -d)
pids=()
redis_pid=
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null || true
  rm -rf "$scratch"
}
trap cleanup EXIT

if [ -z "${BIN_DIR:-}" ]; then
  echo "== building this server and collab-load (release)" >&2
  cargo build --release -q --workspace --bins
fi
for binary in optiverse-collab collab-load; do
  [ -x "$bin/$binary" ] || { echo "error: $bin/$binary is missing" >&2; exit 1; }
done

start_redis() {
  mkdir -p "$scratch/redis"
  redis-server --port "$port" --bind 127.0.0.1 --dir "$scratch/redis" \
    --appendonly yes --appendfsync always --save '' --logfile '' >"$scratch/redis.log" 2>&1 &
  redis_pid=$!
  for _ in $(seq 100); do
    grep -q "Ready to accept connections" "$scratch/redis.log" && return 0
    sleep 0.1
  done
  echo "error: redis-server did not start:" >&2; cat "$scratch/redis.log" >&2; exit 1
}

start_node() { # index store-args...
  local index=$1; shift
  local node_port=$((port + 1 + index))
  rm -rf "$scratch/data$index"
  "$bin/optiverse-collab" --host 127.0.0.1 --port "$node_port" "$@" \
    --data-dir "$scratch/data$index" --workers "${WORKERS:-1}" --log-level warn \
    --max-connections 20000 --max-connections-per-ip 10000 >"$scratch/node$index.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$node_port/health" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "error: node $index did not start:" >&2; cat "$scratch/node$index.log" >&2; exit 1
}

stop_all() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  pids=()
  if [ -n "$redis_pid" ]; then
    kill "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
    redis_pid=
    rm -rf "$scratch/redis"
  fi
}

run() { # setup label collab-load-args...   (setup: "memory", "sqlite" or "cluster N")
  local setup=$1 label=$2; shift 2
  local nodes=1 load_args=()
  case "$setup" in
    memory|sqlite) start_node 0 --store "$setup" ;;
    cluster*)
      nodes=${setup#cluster }
      start_redis
      for i in $(seq 0 $((nodes - 1))); do start_node "$i" --cluster "redis://127.0.0.1:$port"; done
      load_args+=(--redis-pid "$redis_pid") ;;
  esac
  for i in $(seq 0 $((nodes - 1))); do
    load_args+=(--url "ws://127.0.0.1:$((port + 1 + i))" --server-pid "${pids[$i]}")
  done
  local line
  if ! line=$("$bin/collab-load" "${load_args[@]}" --path-template '/yjs/{room}' \
      --room-prefix "c$RANDOM" --json "$@" 2>"$scratch/load.log"); then
    echo "error: collab-load failed against $setup ($label):" >&2; cat "$scratch/load.log" >&2; exit 1
  fi
  stop_all
  echo "{\"setup\": \"$setup\", \"label\": \"$label\", \"report\": $line}" >>"$results"
  printf '  %-10s %-15s %s\n' "$setup" "$label" "$(python3 "$repo/bench/compare_table.py" --brief <<<"$line")" >&2
}

setups=("memory" "sqlite")
for n in ${NODES:-1 2 3}; do setups+=("cluster $n"); done
for setup in "${setups[@]}"; do
  echo "== $setup" >&2
  run "$setup" "fanout 1x50x2" --rooms 1 --clients 50 --rate 2 "${window[@]}"
  run "$setup" "fanout 100x5x2" --rooms 100 --clients 5 --rate 2 "${window[@]}"
done

echo "== machine: $(nproc) cores, $(uname -sr); raw results: $results" >&2
python3 - "$results" <<'PY'
import json, sys

def fmt(v, digits=2):
    return "n/a" if v is None else f"{v:,.{digits}f}" if isinstance(v, float) else f"{v:,}"

print("| load | setup | nodes' CPU µs/delivery | Redis CPU µs/delivery | p50 ms | p99 ms | lost | failures |")
print("|---|---|---|---|---|---|---|---|")
runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
for run in sorted(runs, key=lambda r: r["label"]):
    r = run["report"]
    print(f"| {run['label']} | {run['setup']} | {fmt(r.get('server_cpu_us_per_delivery'))} | "
          f"{fmt(r.get('redis_cpu_us_per_delivery'))} | {fmt(r['latency_ms']['p50'])} | "
          f"{fmt(r['latency_ms']['p99'])} | {r['lost']} | {r['client_failures']} |")
PY
