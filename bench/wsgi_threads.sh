#!/usr/bin/env bash
# Thread counts of the WSGI servers (issue 27): each (server, threads) pair is one
# bench/run.sh run of MODE, the pairs rotated each round (interleaved), medians printed as
# a markdown table. It is how trioherd's --threads default and each peer's best thread
# count in docs/performance.md were chosen.
#
#   MODE=wsgiblock THREADS="8 16 32 64" ROUNDS=3 DURATION=5 bash bench/wsgi_threads.sh
#   MODE=wsgi2 SERVERS="trioherd gunicorn-gthread granian-wsgi" bash bench/wsgi_threads.sh
#
# Environment: MODE (wsgi2 or wsgiblock, default wsgiblock), SERVERS (default "trioherd
# gunicorn-gthread"), THREADS (default "1 4 8 16 32 64": trioherd --threads, gunicorn
# --threads, granian --blocking-threads), ROUNDS (default 3), DURATION (s, default 5),
# and what bench/run.sh reads (BENCH_VENV...). Logs in a new /tmp/trioherd-wsgi-threads.*.
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODE="${MODE:-wsgiblock}"
SERVERS="${SERVERS:-trioherd gunicorn-gthread}"
THREADS="${THREADS:-1 4 8 16 32 64}"
ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-5}"
OUT="$(mktemp -d /tmp/trioherd-wsgi-threads.XXXXXX)"
[[ $MODE =~ ^(wsgi2|wsgiblock)$ ]] || { echo "MODE must be wsgi2 or wsgiblock" >&2; exit 2; }

configs=()
for server in $SERVERS; do
    for threads in $THREADS; do configs+=("$server:$threads"); done
done
n=${#configs[@]}
: >"$OUT/all.tsv"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg); logs in $OUT" >&2
for ((round = 1; round <= ROUNDS; round++)); do
    for ((k = 0; k < n; k++)); do
        config=${configs[$(((k + round - 1) % n))]}
        server=${config%%:*} threads=${config##*:}
        dir="$OUT/r$round-$server-$threads"
        WSGI_THREADS=$threads GTHREAD_THREADS=$threads GRANIAN_THREADS=$threads \
            SERVERS=$server MODES=$MODE ROUNDS=1 DURATION=$DURATION \
            BENCH_LOGDIR="$dir" RESULTS="$dir/results.md" \
            bash "$BENCH_DIR/run.sh" >/dev/null 2>"$dir.log" || true
        # runs.tsv: round mode server status rps p99 rss cpu ready errors exit note cpureq
        awk -F'\t' -v t="$threads" '$4 == "ok" { print $3 "\t" t "\t" $5 "\t" $6 "\t" $13 }' \
            "$dir/runs.tsv" >>"$OUT/all.tsv"
        echo "round $round $server threads=$threads: $(tail -n 1 "$OUT/all.tsv")" >&2
    done
done

python3 - "$OUT/all.tsv" "$MODE" "$DURATION" "$ROUNDS" <<'PY'
import collections, statistics, sys

path, mode, duration, rounds = sys.argv[1:]
runs = collections.defaultdict(list)
for line in open(path):
    server, threads, rps, p99, cpu = line.rstrip("\n").split("\t")
    runs[(server, int(threads))].append((float(rps), float(p99), float(cpu or "nan")))
print(f"{mode}, wrk -t1 -c64 -d{duration}s, medians of {rounds} interleaved rounds\n")
print("| server | threads per worker | req/s | p99 ms | server CPU µs/request | runs |")
print("|---|---:|---:|---:|---:|---:|")
for (server, threads), values in sorted(runs.items()):
    rps, p99, cpu = (statistics.median(v[i] for v in values) for i in range(3))
    print(f"| {server} | {threads} | {rps:,.0f} | {p99:.1f} | {cpu:.0f} | {len(values)} |")
PY
