#!/usr/bin/env bash
# testssl.sh against trioherd's TLS at one or more git revisions, and the findings compared:
# issue 25 asks that moving TLS onto the worker's own memory-BIO stream leaves what a TLS
# scanner finds unchanged. Each revision is checked out into a temporary worktree and serves
# the built-in demo app over TLS on 127.0.0.1 (a trustme certificate made for the run), with
# that revision's own code; testssl.sh scans it; the findings (id, severity, finding) of the
# first revision are compared with each other's, and the differences printed.
#
#   bash bench/testssl.sh 87717bd HEAD          # exit 0: the same findings
#   SCAN="--protocols --ciphers --std" bash bench/testssl.sh HEAD   # a narrower scan
#
# Needs root for apt-get when testssl.sh is missing (Debian's package testssl.sh). Traffic
# goes to 127.0.0.1 only. SCAN: testssl.sh's options (default: its standard full scan, less
# the vulnerability checks that need a second host: none here).
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$BENCH_DIR/.." && pwd)"
VENV="${BENCH_VENV:-/tmp/trioherd-bench-venv}"
SCAN="${SCAN:-}"
(($# >= 1)) || { echo "usage: bench/testssl.sh REV [REV ...]" >&2; exit 2; }

if ! command -v testssl >/dev/null 2>&1 && ! command -v testssl.sh >/dev/null 2>&1; then
    echo "[testssl] installing Debian's testssl.sh" >&2
    { apt-get update -qq && apt-get install -y -qq testssl.sh; } >/dev/null 2>&1 \
        || { echo "could not install testssl.sh (apt-get, as root)" >&2; exit 1; }
fi
TESTSSL=$(command -v testssl || command -v testssl.sh)
[[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -c "import trio, h11, trustme" 2>/dev/null \
    || "$PY" -m pip install -q trio h11 attrs wsproto trustme >/dev/null

work=$(mktemp -d /tmp/trioherd-testssl.XXXXXX)
revs=("$@")
server=""
cleanup() {
    [[ -n $server ]] && kill -TERM "$server" 2>/dev/null && wait "$server" 2>/dev/null
    for ((i = 0; i < ${#revs[@]}; i++)); do
        git -C "$REPO_ROOT" worktree remove --force "$work/v$i" >/dev/null 2>&1 || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

"$PY" - "$work" <<'PY'
import sys
from pathlib import Path

import trustme

work = Path(sys.argv[1])
ca = trustme.CA()
cert = ca.issue_cert("127.0.0.1", "localhost")
cert.private_key_and_cert_chain_pem.write_to_path(work / "server.pem")
PY

port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
status=0
for ((i = 0; i < ${#revs[@]}; i++)); do
    git -C "$REPO_ROOT" worktree add --detach -q "$work/v$i" "${revs[$i]}"
    echo "[testssl] ${revs[$i]}: serving on https://127.0.0.1:$port" >&2
    (cd "$work/v$i" && exec env PYTHONPATH="$work/v$i" "$PY" -m trioherd serve --workers 1 \
        --bind "127.0.0.1:$port" --certfile "$work/server.pem" --name "testssl-$i" \
        --log-level warning) >"$work/server-$i.log" 2>&1 &
    server=$!
    for _ in $(seq 1 100); do
        curl -sk -o /dev/null "https://127.0.0.1:$port/" && break
        sleep 0.1
    done
    # shellcheck disable=SC2086 # SCAN is a list of options
    "$TESTSSL" --quiet --color 0 --warnings off --jsonfile "$work/scan-$i.json" $SCAN \
        "127.0.0.1:$port" >"$work/scan-$i.txt" 2>&1 || true
    kill -TERM "$server"; wait "$server" 2>/dev/null || true
    server=""
    # the findings, less what changes from one scan to the next (times, the engine, the
    # certificate made for the run)
    "$PY" - "$work/scan-$i.json" >"$work/findings-$i.txt" <<'PY'
import json, sys

volatile = ("scanTime", "engine_problem", "cert_", "intermediate_cert", "pre_128cipher",
            "DNS_CAArecord", "OCSP", "clientsimulation")
for item in json.load(open(sys.argv[1])):
    if item["id"].startswith(volatile):
        continue
    print(f'{item["id"]}\t{item["severity"]}\t{item["finding"]}')
PY
    echo "[testssl] ${revs[$i]}: $(wc -l <"$work/findings-$i.txt") findings" >&2
    if ((i > 0)); then
        if diff -u "$work/findings-0.txt" "$work/findings-$i.txt"; then
            echo "[testssl] ${revs[$i]}: the same findings as ${revs[0]}"
        else
            echo "[testssl] ${revs[$i]}: findings differ from ${revs[0]} (above)"
            status=1
        fi
    fi
done
# the first revision's findings that are not OK or INFO, for the record
echo "[testssl] ${revs[0]}: findings above INFO:"
grep -vP '\t(OK|INFO)\t' "$work/findings-0.txt" || echo "(none)"
exit "$status"
