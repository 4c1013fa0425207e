#!/usr/bin/env bash
# Durable (sqlite) vs in-memory store under the same load: one busy session and 100 sessions.
# Usage: bash bench/store.sh   (builds release binaries; prints one JSON line per run)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q --workspace --bins
PORT=${PORT:-8790}
DATA=$(mktemp -d)
trap 'rm -rf "$DATA"; [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null || true' EXIT
run() { # store rooms clients rate
  rm -rf "$DATA"/*
  # Every client comes from one address: the per-address connection limit is raised above them.
  ./target/release/optiverse-collab --store "$1" --data-dir "$DATA" --port "$PORT" --log-level warn \
    --max-connections-per-ip 1000 >/dev/null 2>&1 &
  PID=$!
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break; sleep 0.1; done
  printf '%s rooms=%s clients=%s rate=%s: ' "$1" "$2" "$3" "$4"
  ./target/release/collab-load --url "ws://127.0.0.1:$PORT" --rooms "$2" --clients "$3" --rate "$4" \
    --duration 8 --warmup 2 --server-pid "$PID" --json --room-prefix "s$RANDOM" 2>/dev/null
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
}
for load in "1 10 100" "1 10 300" "100 5 2" "100 5 10"; do
  for store in memory sqlite; do run $store $load; done
done
