#!/usr/bin/env bash
# Real Optiverse desktop clients (../shared/optiverse-client, both variants, unchanged) against
# this server: builds the server (release) and a Python venv, then runs the scenarios.
#
#   tests/realclient/run.sh              every scenario for every host/joiner variant pair
#   tests/realclient/run.sh -k test_a    extra arguments go to pytest (here: one scenario)
#   tests/realclient/run.sh --matrix     comparison mode: every scenario and pair against this
#                                        server, both clients' Python relays, and this server
#                                        with magnetic snap on; writes
#                                        target/realclient-matrix.md and fails only if the
#                                        harness itself breaks
#
# Logs of every test (server, relays, each client) go to target/realclient-logs/<test>/.
set -euo pipefail
cd "$(dirname "$0")/../.."

fail() { echo "error: $*" >&2; exit 1; }

python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
  || fail "python3 >= 3.10 is required (found: $(python3 --version 2>&1 || echo none))"
[ -d ../shared/optiverse-client/upstream/src ] && [ -d ../shared/optiverse-client/fork/src ] \
  || fail "../shared/optiverse-client is missing (the real clients these tests run)"

venv=target/realclient-venv
req=tests/realclient/requirements.txt
stamp="$venv/.requirements.sha256"
if ! "$venv/bin/python" -c '' 2>/dev/null; then
  echo "== creating $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$(sha256sum "$req")" ]; then
  echo "== pip install -r $req"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
  sha256sum "$req" > "$stamp"
fi

echo "== cargo build --release --bin optiverse-collab"
cargo build --release --quiet --bin optiverse-collab

pytest=("$venv/bin/python" -m pytest -c tests/realclient/pytest.ini tests/realclient)
if [ "${1:-}" = "--matrix" ]; then
  shift
  results=target/realclient-matrix.jsonl
  rm -f "$results"
  status=0
  "${pytest[@]}" -q --backends server,relay-upstream,relay-fork,server-snap \
    --results-json "$results" "$@" || status=$?
  # 1: some scenarios failed, which is what the table is for; anything else is the harness's.
  [ "$status" -le 1 ] || fail "pytest exited $status"
  "$venv/bin/python" tests/realclient/harness/matrix.py "$results" target/realclient-matrix.md
else
  echo "== real clients (tests/realclient)"
  "${pytest[@]}" "$@"
fi
