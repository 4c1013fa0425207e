#!/usr/bin/env bash
# Issue 13's hostile-network attacks against a release build of this server, one attack per
# fresh server process, each bounded in time, with honest clients measured beside it
# (bench/src/bin/collab-hostile.rs says which and how). Prints a Markdown table:
# attack | server RSS (before → peak → end, MiB) | /health p99 during the attack |
# honest desktop ping p99 (its session / a quiet session) | honest updates lost | notes.
#
# The disk attacks (disk-freeze, immutable-store) put the data dir on a loop-mounted ext4
# image, which needs root, losetup, mkfs.ext4, fsfreeze and chattr; where any is missing the
# row says "not measurable here" and why.
#
# Usage: bash bench/hostile.sh [OUT_DIR]   (the table on stdout, logs in OUT_DIR)
# Env:
#   SERVER_ARGS  extra server flags for every run, e.g. "--max-memory 256MiB" once it exists
#   BUDGET_MIB   the memory budget those flags set, to report the RSS peak against
#   ATTACKS      which attacks, in order (default: all, see below)
#   HOLD         seconds an attack is held where it is held (default 20)
#   STORE        the server's --store (default sqlite: the default store, and the disk attacks
#                need it)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

need() { command -v "$1" >/dev/null 2>&1 || { echo "error: '$1' is required" >&2; exit 1; }; }
need cargo; need curl; need python3; need sqlite3

all="slow-headers partial-messages slow-readers big-posts awareness-flood awareness-not-json
awareness-overwrite bad-fields random-gets disk-freeze immutable-store head-upgrade double-decode"
attacks=${ATTACKS:-$all}
hold=${HOLD:-20}
store=${STORE:-sqlite}
read -r -a server_args <<<"${SERVER_ARGS:-}"
budget=()
[ -n "${BUDGET_MIB:-}" ] && budget=(--budget-mib "$BUDGET_MIB")

out=${1:-$(mktemp -d)}
mkdir -p "$out"
scratch=$(mktemp -d)
pid=
mnt=
loopdev=

cleanup() {
  if [ -n "$pid" ]; then kill -9 "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  if [ -n "$mnt" ]; then
    # A frozen or immutable store must not outlive the run.
    fsfreeze -u "$mnt" 2>/dev/null || true
    chattr -R -i "$mnt" 2>/dev/null || true
    umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
  fi
  [ -n "$loopdev" ] && losetup -d "$loopdev" 2>/dev/null || true
  rm -rf "$scratch"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== building the server and collab-hostile (release)" >&2
cargo build --release -q -p optiverse-collab -p collab-load --bins
server="$repo/target/release/optiverse-collab"
driver="$repo/target/release/collab-hostile"
# The driver holds hundreds of sockets at once.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Mounts the ext4 image for the disk attacks, or sets $why to the reason it cannot. Called
# directly, not in $(...): the mount must be known to the cleanup trap.
mount_store() {
  why=
  [ -n "$mnt" ] && return
  [ "$(id -u)" = 0 ] || { why="needs root (loop mount, fsfreeze, chattr)"; return; }
  local t
  for t in losetup mkfs.ext4 mount umount fsfreeze chattr; do
    command -v "$t" >/dev/null 2>&1 || { why="'$t' is missing"; return; }
  done
  truncate -s 512M "$scratch/store.img" || { why="cannot create a disk image"; return; }
  mkfs.ext4 -q -F "$scratch/store.img" >/dev/null 2>&1 || { why="mkfs.ext4 failed"; return; }
  loopdev=$(losetup -f --show "$scratch/store.img" 2>/dev/null) || { loopdev=; why="no loop device (losetup failed)"; return; }
  mkdir -p "$scratch/mnt"
  mount "$loopdev" "$scratch/mnt" 2>/dev/null || { why="mounting a loop device is not allowed"; return; }
  mnt="$scratch/mnt"
}

start_server() { # attack data_dir port
  local attack=$1 data=$2 port=$3
  rm -rf "$data"; mkdir -p "$data"
  (
    # The issue measured the unfinished-request attack with the server at 256 descriptors.
    [ "$attack" = slow-headers ] && ulimit -n 256
    exec "$server" --host 127.0.0.1 --port "$port" --store "$store" --data-dir "$data" \
      --log-level warn "${server_args[@]}"
  ) >"$out/$attack.server.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "error: the server did not start for $attack:" >&2; cat "$out/$attack.server.log" >&2; exit 1
}

stop_server() { # sets $died to a note when the server had already died
  local status=0
  died=
  if kill -0 "$pid" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  else
    wait "$pid" 2>/dev/null || status=$?
    if [ "$status" -gt 128 ]; then
      died="server exit: signal $((status - 128)) ($(kill -l $((status - 128)) 2>/dev/null || echo ?))"
    else
      died="server exit: status $status"
    fi
  fi
  pid=
}

rows=()
for attack in $attacks; do
  echo "== $attack" >&2
  data="$scratch/data"
  mount_args=()
  case "$attack" in
    disk-freeze|immutable-store)
      mount_store
      if [ -n "$why" ]; then
        echo "   not measurable here: $why" >&2
        rows+=("| $attack | not measurable here | – | – | – | $why |")
        continue
      fi
      [ "$store" = sqlite ] || { rows+=("| $attack | not measurable here | – | – | – | needs STORE=sqlite |"); continue; }
      data="$mnt/data"; mount_args=(--mount "$mnt") ;;
  esac
  port=$(free_port)
  start_server "$attack" "$data" "$port"
  errors_before=$(grep -c -E 'ERROR|WARN' "$out/$attack.server.log" || true)
  row=
  if ! row=$(timeout 240 "$driver" --addr "127.0.0.1:$port" --server-pid "$pid" --attack "$attack" \
      --hold "$hold" --data-dir "$data" "${mount_args[@]}" "${budget[@]}" 2>"$out/$attack.driver.log"); then
    row="| $attack | – | – | – | – | driver failed: $(tail -1 "$out/$attack.driver.log" | tr '|' '/') |"
  fi
  stop_server
  extra=$died
  logged=$(( $(grep -c -E 'ERROR|WARN' "$out/$attack.server.log" || true) - errors_before ))
  case "$attack" in
    disk-freeze|immutable-store)
      extra="${extra:+$extra; }server logged $logged warning/error lines"
      # The next run starts from an empty, writable store.
      chattr -R -i "$mnt" 2>/dev/null || true ;;
  esac
  if [ "$attack" = random-gets ] && [ "$store" = sqlite ]; then
    # Rows written at eviction or shutdown show only now.
    extra="${extra:+$extra; }rows in \`sessions\` after shutdown: $(sqlite3 "$data/collab.db" 'SELECT count(*) FROM sessions' 2>&1)"
  fi
  if [ -n "$extra" ]; then row="${row% |}; $extra |"; fi
  echo "   $row" >&2
  rows+=("$row")
done

echo "== machine: $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p' | head -1)), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr); store $store; SERVER_ARGS='${SERVER_ARGS:-}'; logs in $out" >&2
echo "| attack | server RSS MiB: before → **peak** → end | /health p99 (failed/polled) | honest ping p99: its session / quiet session (unanswered/sent) | honest updates lost (of attempted) | notes |"
echo "| --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${rows[@]}"
