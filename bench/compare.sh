#!/usr/bin/env bash
# This server against the reference y-websocket server, side by side, on this machine, with
# the same load from `collab-load` (bench/src). Installs the reference (@y/websocket-server
# 0.1.1 with yjs 13.6.33) from npm into a temporary folder, builds this server in release, then
# runs every scenario against each server in turn, one fresh server process per scenario:
#
#   saturation  1 room x 50 clients, the edit rate stepped up until p99 > 100 ms or a loss
#               (receivers do not apply updates here: the generator shares the 2 cores)
#   fanout      1 x 50 x 2/s, 1 x 200 x 1/s, 100 x 5 x 2/s: server CPU per delivery, latency
#   join        a preloaded 10,000-item scene, 10 fresh clients one after another
#   idle        5,000 synced idle connections in 1,000 rooms: server RSS per connection
#
# This server runs with one runtime thread (`--workers 1`, override with WORKERS=N): the
# generator needs the other core, and the reference runs its JavaScript on one thread too.
#
# Usage: bash bench/compare.sh [OUT_DIR]   (prints a Markdown table; raw JSON in OUT_DIR)
# Env: SERVERS="reference memory sqlite" (default; `memory+auth`: the memory store with a key,
#      every client carrying a token as `?token=`, README "Securing a server"),
#      `cluster`: this server with --cluster on a redis-server of its own, AOF with
#      appendfsync always; Redis' CPU is printed beside the node's),
#      QUICK=1 (short windows, for a smoke run),
#      SCENARIOS="saturation fanout join idle" (default: all), BIN_DIR=DIR (run the
#      optiverse-collab and collab-load binaries in DIR instead of building this tree: to
#      compare two builds with the same script).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

need() { command -v "$1" >/dev/null 2>&1 || { echo "error: '$1' is required" >&2; exit 1; }; }
need cargo; need node; need npm; need curl; need python3

out=${1:-$(mktemp -d)}
mkdir -p "$out"
results="$out/results.jsonl"
: >"$results"
servers=${SERVERS:-reference memory sqlite}
scenarios=" ${SCENARIOS:-saturation fanout join idle} "
bin=${BIN_DIR:-$repo/target/release}
port=${PORT:-8791}
if [ "${QUICK:-0}" = 1 ]; then window=(--warmup 1 --duration 3 --drain 1); else window=(--warmup 2 --duration 8 --drain 2); fi
# 5,000 connections need as many descriptors in the server and in the generator, and (all
# from one address) the server's connection limits raised above them (flags below).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

ref=$(mktemp -d)
scratch=$(mktemp -d)
pid=
redis_pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null || true
  rm -rf "$ref" "$scratch"
}
trap cleanup EXIT
if [[ " $servers " == *" reference "* ]]; then
  echo "== installing the reference server (npm)" >&2
  echo '{"private": true}' >"$ref/package.json"
  npm install --prefix "$ref" --no-audit --no-fund --loglevel=error \
    @y/websocket-server@0.1.1 yjs@13.6.33 >&2
  ref_server="$ref/node_modules/@y/websocket-server/src/server.js"
  [ -f "$ref_server" ] || { echo "error: $ref_server is missing after npm install" >&2; exit 1; }
fi

if [ -z "${BIN_DIR:-}" ]; then
  echo "== building this server and collab-load (release)" >&2
  cargo build --release -q --workspace --bins
fi
for binary in optiverse-collab collab-load; do
  [ -x "$bin/$binary" ] || { echo "error: $bin/$binary is missing" >&2; exit 1; }
done

start() { # server
  case "$1" in
    reference)
      HOST=127.0.0.1 PORT=$port node "$ref_server" >"$scratch/server.log" 2>&1 &
      pid=$!; path='/{room}'; probe="http://127.0.0.1:$port/" ;;
    memory|sqlite|memory+auth|cluster)
      rm -rf "$scratch/data"
      # Builds before the connection limits (BIN_DIR) have no such flags.
      limits=()
      if "$bin/optiverse-collab" --help | grep -q -- --max-connections-per-ip; then
        limits=(--max-connections 20000 --max-connections-per-ip 10000)
      fi
      path='/yjs/{room}'
      if [ "$1" = memory+auth ]; then
        export COLLAB_AUTH_KEY=compare-sh-benchmark-key-of-32-bytes-or-more
        # One edit token for every room, minted with the server's own command.
        local token
        token=$("$bin/optiverse-collab" token --session '*' --role edit --ttl 1d | sed -n 2p | tr -d ' ')
        path="/yjs/{room}?token=$token"
      else
        unset COLLAB_AUTH_KEY
      fi
      store=(--store "${1%+auth}")
      if [ "$1" = cluster ]; then
        need redis-server
        mkdir -p "$scratch/redis"
        redis-server --port $((port + 1)) --bind 127.0.0.1 --dir "$scratch/redis" \
          --appendonly yes --appendfsync always --save '' --logfile '' >"$scratch/redis.log" 2>&1 &
        redis_pid=$!
        for _ in $(seq 100); do
          grep -q "Ready to accept connections" "$scratch/redis.log" && break
          sleep 0.1
        done
        store=(--cluster "redis://127.0.0.1:$((port + 1))")
      fi
      "$bin/optiverse-collab" --host 127.0.0.1 --port "$port" "${store[@]}" \
        --data-dir "$scratch/data" --workers "${WORKERS:-1}" --log-level warn \
        "${limits[@]}" >"$scratch/server.log" 2>&1 &
      pid=$!; probe="http://127.0.0.1:$port/health" ;;
    *) echo "error: unknown server $1" >&2; exit 1 ;;
  esac
  for _ in $(seq 100); do
    curl -sf "$probe" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "error: $1 did not start:" >&2; cat "$scratch/server.log" >&2; exit 1
}

stop() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  pid=
  if [ -n "$redis_pid" ]; then
    # The report measures the node; Redis' own CPU is printed beside it.
    echo "    redis-server CPU over the run: $(awk '{printf "%.2f s", ($14 + $15) / 100}' "/proc/$redis_pid/stat")" >&2
    kill "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
    redis_pid=
    rm -rf "$scratch/redis"
  fi
}

load() { # server label args...
  local server=$1 label=$2; shift 2
  start "$server"
  local line
  if ! line=$("$bin/collab-load" --url "ws://127.0.0.1:$port" --path-template "$path" \
      --server-pid "$pid" --room-prefix "r$RANDOM" --json "$@" 2>"$scratch/load.log"); then
    echo "error: collab-load failed against $server ($label):" >&2; cat "$scratch/load.log" >&2; exit 1
  fi
  stop
  echo "{\"server\": \"$server\", \"label\": \"$label\", \"report\": $line}" >>"$results"
  printf '  %-9s %-22s %s\n' "$server" "$label" "$(python3 "$repo/bench/compare_table.py" --brief <<<"$line")" >&2
  last=$line
}

for server in $servers; do
  echo "== $server" >&2
  if [[ $scenarios == *" saturation "* ]]; then
    for rate in 2 5 10 20 40 80; do
      load "$server" "saturation@$rate" --rooms 1 --clients 50 --rate "$rate" --no-apply "${window[@]}"
      if ! python3 -c 'import json,sys; r=json.loads(sys.argv[1]); sys.exit(0 if r["lost"] == 0 and r["client_failures"] == 0 and r["latency_ms"]["p99"] <= 100 else 1)' "$last"; then
        break
      fi
    done
  fi
  if [[ $scenarios == *" fanout "* ]]; then
    load "$server" "fanout 1x50x2" --rooms 1 --clients 50 --rate 2 "${window[@]}"
    load "$server" "fanout 1x200x1" --rooms 1 --clients 200 --rate 1 "${window[@]}"
    load "$server" "fanout 100x5x2" --rooms 100 --clients 5 --rate 2 "${window[@]}"
  fi
  if [[ $scenarios == *" join "* ]]; then
    load "$server" "join 10000" --scenario join --items 10000 --joiners 10
  fi
  if [[ $scenarios == *" idle "* ]]; then
    load "$server" "idle 1000x5" --scenario idle --rooms 1000 --clients 5 --warmup 2
  fi
done

echo "== machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr); raw results: $results" >&2
python3 "$repo/bench/compare_table.py" "$results"
