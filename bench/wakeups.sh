#!/usr/bin/env bash
# Where a request's CPU goes, and how often the client had to be woken. Keep-alive (the
# default): one worker pinned to CPU 0, wrk pinned to CPU 1. CLOSE=1: a new connection per
# request (wrk -H "Connection: close"), 2 workers, nothing pinned. 127.0.0.1 only. For each
# server, prints req/s, the user and system time per request of the server's top process
# (trioherd's primary) and of its children (the workers) from /proc/PID/stat before and
# after the wrk run, and wrk's voluntary context switches per response (/usr/bin/time): a
# switch is a sleep, and waking a sleeping reader is the sender's cost, the costliest part
# of a small send on a virtual machine.
#
#   bash bench/wakeups.sh                        # trioherd, trioherd --http h11, uvicorn
#   SERVERS="trioherd gunicorn-asgi" ROUNDS=3 DURATION=6 bash bench/wakeups.sh
#   REV=a275dcc bash bench/wakeups.sh            # trioherd as of a git revision
#   CLOSE=1 SERVERS="trioherd trioherd-shared uvicorn-httptools" bash bench/wakeups.sh
#
# Environment: SERVERS (subset of "trioherd trioherd-h11 trioherd-shared uvicorn-httptools
# gunicorn-asgi granian"), CLOSE (1: a new connection per request, 2 workers), ROUNDS (1..20, default 2), DURATION (s per wrk run, 1..60, default 6),
# BENCH_VENV (the venv bench/run.sh made: run that once first), REV (a revision of
# trioherd to measure instead of the working tree, checked out into a temporary worktree).
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$BENCH_DIR/.." && pwd)"
VENV="${BENCH_VENV:-/tmp/trioherd-bench-venv}"
PY="$VENV/bin/python"
SERVERS="${SERVERS:-trioherd trioherd-h11 uvicorn-httptools}"
ROUNDS="${ROUNDS:-2}"
DURATION="${DURATION:-6}"
CLOSE="${CLOSE:-}"
if [[ -n $CLOSE ]]; then
    WORKERS=2 PIN_SERVER=() PIN_WRK=() WRK_EXTRA=(-H "Connection: close")
else
    WORKERS=1 PIN_SERVER=(taskset -c 0) PIN_WRK=(taskset -c 1) WRK_EXTRA=()
fi

die() { echo "wakeups: $*" >&2; exit 2; }
[[ $ROUNDS =~ ^[0-9]+$ ]] && ((ROUNDS >= 1 && ROUNDS <= 20)) || die "ROUNDS: 1..20"
[[ $DURATION =~ ^[0-9]+$ ]] && ((DURATION >= 1 && DURATION <= 60)) || die "DURATION: 1..60"
[[ -x $PY ]] || die "no venv at $VENV: run bench/run.sh once (it makes it)"
command -v wrk >/dev/null || die "wrk is needed (apt-get install wrk)"
[[ -x /usr/bin/time ]] || die "/usr/bin/time is needed (apt-get install time)"
(($(nproc) >= 2)) || die "needs 2 CPUs (the server on one, wrk on the other)"

work=$(mktemp -d /tmp/trioherd-wakeups.XXXXXX)
SRC="$REPO_ROOT"
SERVER_PID=""
cleanup() {
    if [[ -n $SERVER_PID ]]; then
        kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
        sleep 1
        kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
    fi
    if [[ $SRC != "$REPO_ROOT" ]]; then
        git -C "$REPO_ROOT" worktree remove --force "$SRC" >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
if [[ -n ${REV:-} ]]; then
    SRC="$work/src"
    git -C "$REPO_ROOT" worktree add --detach -q "$SRC" "$REV"
fi

command_of() {  # CMD: server NAME, WORKERS workers, on PORT
    local name=$1 port=$2 w=$WORKERS
    case $name in
        trioherd) CMD=("$PY" -m trioherd serve bench.hello_app:app --workers "$w"
                       --bind "127.0.0.1:$port") ;;
        trioherd-h11) CMD=("$PY" -m trioherd serve bench.hello_app:app --workers "$w"
                           --http h11 --bind "127.0.0.1:$port") ;;
        trioherd-shared) CMD=("$PY" -m trioherd serve bench.hello_app:app --workers "$w"
                              --dispatch shared --bind "127.0.0.1:$port") ;;
        uvicorn-httptools) CMD=("$PY" "$BENCH_DIR/uvicorn_nodelay.py" --http httptools
                                --loop uvloop --workers "$w" --host 127.0.0.1 --port "$port"
                                --no-access-log --log-level warning bench.hello_app:app) ;;
        gunicorn-asgi) CMD=("$VENV/bin/gunicorn" -k asgi --asgi-loop asyncio --http-parser python
                            -w "$w" -b "127.0.0.1:$port" --log-level warning bench.hello_app:app) ;;
        granian) CMD=("$VENV/bin/granian" --interface asgi --workers "$w" --host 127.0.0.1
                      --port "$port" --no-ws --log-level warning bench.hello_app:app) ;;
        *) die "unknown server $name" ;;
    esac
}

times_of() {  # "UTIME STIME" in clock ticks, summed over the PIDs given
    local p total_u=0 total_s=0 u s
    for p in "$@"; do
        read -r u s < <(sed -E 's/^.*\) //' "/proc/$p/stat" 2>/dev/null | awk '{ print $12, $13 }') \
            || continue
        total_u=$((total_u + ${u:-0}))
        total_s=$((total_s + ${s:-0}))
    done
    echo "$total_u $total_s"
}

tree_times() {  # "TOP_UTIME TOP_STIME CHILDREN_UTIME CHILDREN_STIME" of PID, in clock ticks
    local children
    children=$(pgrep -P "$1" | tr '\n' ' ' || true)
    # shellcheck disable=SC2086 # a list of pids
    echo "$(times_of "$1") $(times_of $children)"
}

measure() {
    local name=$1 port i before after
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    command_of "$name" "$port"
    (cd "$SRC" && exec setsid "${PIN_SERVER[@]}" "${CMD[@]}" </dev/null >"$work/$name.log" 2>&1) &
    SERVER_PID=$!
    for ((i = 0; i < 200; i++)); do
        curl -fs "http://127.0.0.1:$port/" >/dev/null 2>&1 && break
        sleep 0.1
    done
    ((i < 200)) || die "$name did not answer within 20 s (see $work/$name.log)"
    sleep 0.5  # the workers are up
    before=$(tree_times "$SERVER_PID")
    "${PIN_WRK[@]}" /usr/bin/time -f "%w" -o "$work/time" \
        wrk -t1 -c64 -d"${DURATION}s" "${WRK_EXTRA[@]}" "http://127.0.0.1:$port/" \
        >"$work/wrk" 2>&1
    after=$(tree_times "$SERVER_PID")
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
    "$PY" - "$name" "$before" "$after" "$work/wrk" "$work/time" "$(getconf CLK_TCK)" <<'PY'
import re, sys
name, before, after, wrk_path, time_path, tck = sys.argv[1:]
wrk = open(wrk_path).read()
found = re.search(r"(\d+) requests in ([\d.]+)s", wrk)
if not found:
    sys.exit(f"{name}: no result from wrk:\n{wrk}")
n, seconds = int(found[1]), float(found[2])
b, a = list(map(int, before.split())), list(map(int, after.split()))
per = 1e6 / int(tck) / n
d = [(a[i] - b[i]) * per for i in range(4)]
sleeps = int(open(time_path).read().split()[-1])
print(f"| {name} | {n / seconds:,.0f} | {d[0] + d[2]:.1f} µs | {d[1] + d[3]:.1f} µs "
      f"| {d[0]:.1f} + {d[1]:.1f} µs | {sleeps / n:.2f} |")
PY
}

echo "trioherd from: ${REV:-the working tree} ($(git -C "$SRC" rev-parse --short HEAD))"
echo
mode="1 worker pinned, keep-alive"
[[ -n $CLOSE ]] && mode="2 workers, a new connection per request"
echo "| server ($mode) | req/s | user / request | system / request | of which the top process, user + system | wrk sleeps / response |"
echo "|---|---:|---:|---:|---:|---:|"
read -r -a list <<<"$SERVERS"
for ((round = 1; round <= ROUNDS; round++)); do
    for ((k = 0; k < ${#list[@]}; k++)); do
        measure "${list[$(((k + round - 1) % ${#list[@]}))]}"
    done
done
