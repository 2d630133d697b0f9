#!/usr/bin/env bash
# The cost of --asyncio (trio-asyncio): one trioherd worker pinned to CPU 0 serving the
# 13-byte bench/hello_app.py, with and without --asyncio, interleaved, wrk on CPU 1 with
# 64 keep-alive connections, 127.0.0.1 only. Prints requests/s of each run and the medians.
#
#   bash bench/asyncio_bridge.sh                 # DURATION=5 ROUNDS=3
#   DURATION=10 ROUNDS=6 bash bench/asyncio_bridge.sh
#
# Needs wrk and taskset, and trioherd installed with the asyncio extra in the current Python.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${DURATION:-5}"
ROUNDS="${ROUNDS:-3}"
[[ $DURATION =~ ^[0-9]+$ ]] && (( DURATION >= 1 && DURATION <= 60 )) || { echo "DURATION: 1..60" >&2; exit 2; }
[[ $ROUNDS =~ ^[0-9]+$ ]] && (( ROUNDS >= 1 && ROUNDS <= 20 )) || { echo "ROUNDS: 1..20" >&2; exit 2; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT

run_once() {  # $1: extra flag ("" or --asyncio); prints requests/s
    : >"$log"
    taskset -c 0 python -m trioherd serve bench.hello_app:app --workers 1 --bind 127.0.0.1:0 \
        --name "bridge-bench-$$" $1 2>"$log" &
    local pid=$! url="" i
    for i in $(seq 200); do
        url=$(sed -n 's/^trioherd: listening on //p' "$log" | head -1)
        [[ -n $url ]] && break
        kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
        sleep 0.05
    done
    [[ -n $url ]] || { kill "$pid"; cat "$log" >&2; exit 1; }
    taskset -c 1 wrk -t1 -c64 -d1s "$url/" >/dev/null  # warm-up
    taskset -c 1 wrk -t1 -c64 -d"${DURATION}s" "$url/" | awk '/Requests\/sec/ {print int($2)}'
    kill -TERM "$pid"
    wait "$pid" || true
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2)}'; }

plain=() bridged=()
for round in $(seq "$ROUNDS"); do
    plain+=("$(run_once "")")
    bridged+=("$(run_once --asyncio)")
    echo "round $round: plain ${plain[-1]} req/s, --asyncio ${bridged[-1]} req/s"
done
p=$(printf '%s\n' "${plain[@]}" | median)
b=$(printf '%s\n' "${bridged[@]}" | median)
echo "median: plain $p req/s, --asyncio $b req/s ($(( 100 * b / p ))% of plain)"
