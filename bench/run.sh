#!/usr/bin/env bash
# trioherd benchmark: trioherd against hypercorn -k trio, uvicorn --http h11 and a bare
# trio + h11 loop, all serving the 13-byte bench/hello_app.py, measured with wrk on
# 127.0.0.1 only. See bench/README.md for what is measured and how to read the table.
#
#   bash bench/run.sh                      # DURATION=10 ROUNDS=1
#   DURATION=10 ROUNDS=6 bash bench/run.sh # the DESIGN.md methodology (medians of 6)
#   DURATION=2 SERVERS="trioherd bare" MODES="ka2" bash bench/run.sh
#   SERVERS="trioherd uvicorn-httptools granian" MODES="tls-ka2 tls-close2 tls-pinned1" \
#       DURATION=6 ROUNDS=3 bash bench/run.sh     # over TLS (issue 25)
#
# Environment: DURATION (s per wrk run, 1..600), ROUNDS (1..50), SERVERS (subset of
# "trioherd trioherd-h11 trioherd-shared trioherd-nobatch hypercorn uvicorn bare granian
# uvicorn-httptools gunicorn-asgi gunicorn24-asgi"), MODES (subset of "ka2 close2 pinned1
# tls-ka2 tls-close2 tls-pinned1": the tls- modes are the same over https, with a trustme
# certificate made for the run; bare trio+h11 has no TLS and sits them out),
# BENCH_VENV (venv dir), BENCH_REINSTALL=1 (pip install again), BENCH_LOGDIR (logs),
# RESULTS (markdown output, default bench/results-latest.md).
# asyncio (issue 26): SERVERS trioherd-asyncio (--asyncio) and trioherd-asyncio-shared
# (with --dispatch shared) run the asyncio runtime (uvloop, httptools) on any mode; MODES
# aio-quart, aio-django and aio-fastapi serve bench/asyncio_apps.py's frameworks (2 workers,
# keep-alive) with trioherd-asyncio*, uvicorn-httptools and granian (the others sit out).
# WSGI (issue 27): MODES wsgi2 (Flask hello) and wsgiblock (a Flask view sleeping 10 ms)
# serve bench/wsgi_app.py with SERVERS trioherd, gunicorn-gthread and granian-wsgi (the
# ASGI-only servers sit them out); WSGI_THREADS (trioherd --threads; its default if unset),
# GTHREAD_THREADS (gunicorn --threads, default 8), GRANIAN_THREADS (granian
# --blocking-threads; its default if unset).
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$BENCH_DIR/.." && pwd)"
VENV="${BENCH_VENV:-/tmp/trioherd-bench-venv}"
VENV_G24="$VENV-gunicorn24"  # gunicorn 24 (gunicorn24-asgi) lives apart from the newest
DURATION="${DURATION:-10}"
ROUNDS="${ROUNDS:-1}"
SERVERS="${SERVERS:-trioherd hypercorn uvicorn bare}"
MODES="${MODES:-ka2 close2 pinned1}"
RESULTS="${RESULTS:-$BENCH_DIR/results-latest.md}"
LOGDIR="${BENCH_LOGDIR:-$(mktemp -d /tmp/trioherd-bench.XXXXXX)}"
CONNECTIONS=64
START_TIMEOUT=20   # s until the server must answer
STOP_TIMEOUT=10    # s between SIGTERM and SIGKILL
HELLO="Hello, World!"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

is_int_in() { [[ $1 =~ ^[0-9]+$ ]] && (( $1 >= $2 && $1 <= $3 )); }
is_int_in "$DURATION" 1 600 || die "DURATION must be an integer number of seconds, 1..600"
is_int_in "$ROUNDS" 1 50 || die "ROUNDS must be an integer, 1..50"
for s in $SERVERS; do
    [[ $s =~ ^(trioherd|trioherd-h11|trioherd-shared|trioherd-nobatch|trioherd-asyncio|trioherd-asyncio-shared|hypercorn|uvicorn|bare|granian|uvicorn-httptools|gunicorn-asgi|gunicorn24-asgi|gunicorn-gthread|granian-wsgi)$ ]] \
        || die "unknown server in SERVERS: $s"
done
for m in $MODES; do
    [[ $m =~ ^((tls-)?(ka2|close2|pinned1)|wsgi2|wsgiblock|aio-(quart|django|fastapi))$ ]] \
        || die "unknown mode in MODES: $m"
done
mkdir -p "$LOGDIR"
RAW="$LOGDIR/runs.tsv"
: >"$RAW"

# ---------------------------------------------------------------- process helpers

now_ns() { date +%s%N; }

# True while PID exists and is not a zombie.
alive() {
    local st
    st=$(sed -E 's/^.*\) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [[ -n $st && $st != Z ]]
}

# PID and all its descendants (one snapshot of the process table), one per line.
tree_pids() {
    ps -e -o pid=,ppid= | awk -v root="$1" '
        { kids[$2] = kids[$2] " " $1; seen[$1] = 1 }
        END {
            if (!(root in seen)) exit
            n = 1; q[1] = root
            for (i = 1; i <= n && i <= 10000; i++) {
                print q[i]
                m = split(kids[q[i]], k, " ")
                for (j = 1; j <= m; j++) q[++n] = k[j]
            }
        }'
}

# "KB COUNT": summed RSS of PID and all its descendants, and how many processes.
tree_rss_kb() {
    ps -e -o pid=,ppid=,rss= | awk -v root="$1" '
        { kids[$2] = kids[$2] " " $1; rss[$1] = $3 }
        END {
            total = 0; cnt = 0
            if (root in rss) {
                n = 1; q[1] = root
                for (i = 1; i <= n && i <= 10000; i++) {
                    total += rss[q[i]]; cnt++
                    m = split(kids[q[i]], k, " ")
                    for (j = 1; j <= m; j++) q[++n] = k[j]
                }
            }
            print total, cnt
        }'
}

# utime+stime of PID in clock ticks (fields 14 and 15 of /proc/PID/stat).
cpu_ticks() {
    sed -E 's/^.*\) //' "/proc/$1/stat" 2>/dev/null | awk '{ print $12 + $13 }'
}
CLK_TCK=$(getconf CLK_TCK)

# utime+stime of PID and all its descendants, in clock ticks.
tree_cpu_ticks() {
    local total=0 p t
    for p in $(tree_pids "$1"); do
        t=$(cpu_ticks "$p" || true)
        total=$((total + ${t:-0}))
    done
    echo "$total"
}

# Processes of process group PGID that are still running (not zombies).
group_members() {
    ps -e -o pid=,pgid=,stat= | awk -v g="$1" '$2 == g && $3 !~ /^Z/ { print $1 }'
}

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

CURRENT_PID=""   # the server being measured (also its process group id, via setsid)
CURRENT_WRK=""

# Stop server PID: SIGTERM, wait up to STOP_TIMEOUT s for it and every process of its
# tree and process group, then SIGKILL whatever is left. Sets STOP_RC and STOP_NOTE.
stop_server() {
    local pid=$1 i left rc=0
    STOP_NOTE=""
    local members
    members=$(tree_pids "$pid" | tr '\n' ' ')
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_TIMEOUT * 20; i++)); do
        left=""
        for p in $members; do alive "$p" && left+="$p "; done
        left+=$(group_members "$pid" | tr '\n' ' ')
        [[ -z ${left// /} ]] && break
        sleep 0.05
    done
    if [[ -n ${left// /} ]]; then
        left=$(tr ' ' '\n' <<<"$left" | sort -un | tr '\n' ' ')
        left=${left# }
        if alive "$pid"; then
            STOP_NOTE="still running ${STOP_TIMEOUT}s after SIGTERM, SIGKILLed"
        else
            STOP_NOTE="left processes behind (${left% }), SIGKILLed"
        fi
        kill -KILL -- "-$pid" 2>/dev/null || true
        for p in $left; do kill -KILL "$p" 2>/dev/null || true; done
        for ((i = 0; i < 40; i++)); do
            left=""
            for p in $members; do alive "$p" && left+="$p "; done
            [[ -z $left ]] && break
            sleep 0.05
        done
        [[ -n $left ]] && STOP_NOTE+="; STILL ALIVE: $left"
        log "  WARNING: $STOP_NOTE"
    fi
    wait "$pid" 2>/dev/null || rc=$?
    STOP_RC=$rc
}

cleanup() {
    local rc=$?
    if [[ -n $CURRENT_WRK ]]; then kill "$CURRENT_WRK" 2>/dev/null || true; fi
    if [[ -n $CURRENT_PID ]]; then
        log "interrupted: stopping server pid $CURRENT_PID"
        STOP_TIMEOUT=3 stop_server "$CURRENT_PID" || true
    fi
    return $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- setup

ensure_wrk() {
    if ! command -v wrk >/dev/null 2>&1; then
        log "wrk not found: apt-get install -y wrk"
        { apt-get update -qq && apt-get install -y -qq wrk; } >"$LOGDIR/apt-wrk.log" 2>&1 \
            || die "could not install wrk (see $LOGDIR/apt-wrk.log)"
    fi
    command -v taskset >/dev/null 2>&1 || die "taskset (util-linux) is needed"
    command -v curl >/dev/null 2>&1 || die "curl is needed"
}

declare -A HAVE=()  # peers installed in the venv
SKIPPED_NOTES=()

setup_venv() {
    if [[ ! -x $VENV/bin/python ]]; then
        log "creating venv $VENV"
        python3 -m venv "$VENV" || die "could not create venv $VENV"
    fi
    PY="$VENV/bin/python"
    local pip=("$PY" -m pip install -q)
    if [[ -n ${BENCH_REINSTALL:-} ]] || ! "$PY" -m pip show -q trioherd >/dev/null 2>&1; then
        log "pip install -e $REPO_ROOT[httptools]"
        if ! "${pip[@]}" -e "$REPO_ROOT[httptools]" >"$LOGDIR/pip-trioherd.log" 2>&1; then
            log "WARNING: pip install -e $REPO_ROOT failed (tail of $LOGDIR/pip-trioherd.log below);"
            log "         installing trio h11 attrs directly; trioherd still runs from the repo root"
            tail -n 3 "$LOGDIR/pip-trioherd.log" | sed 's/^/    /' >&2
            "${pip[@]}" trio h11 attrs >>"$LOGDIR/pip-trioherd.log" 2>&1 \
                || die "could not install trio and h11 (see $LOGDIR/pip-trioherd.log)"
        fi
    fi
    "$PY" -c 'import trio, h11' 2>/dev/null || die "trio/h11 not importable in $VENV"
    # peer: the pip packages it needs, and a module to import that proves them there
    declare -A PACKAGES=([hypercorn]="hypercorn" [uvicorn]="uvicorn"
        [granian]="granian" [uvicorn-httptools]="uvicorn httptools uvloop"
        [gunicorn-asgi]="gunicorn>=24" [gunicorn-gthread]="gunicorn>=24 flask"
        [granian-wsgi]="granian flask")
    declare -A PROBE=([hypercorn]="hypercorn" [uvicorn]="uvicorn" [granian]="granian"
        [uvicorn-httptools]="uvicorn, httptools, uvloop" [gunicorn-asgi]="gunicorn.workers.gasgi"
        [gunicorn-gthread]="gunicorn.workers.gthread, flask" [granian-wsgi]="granian, flask")
    local peer
    for peer in hypercorn uvicorn granian uvicorn-httptools gunicorn-asgi gunicorn-gthread \
            granian-wsgi; do
        [[ " $SERVERS " == *" $peer "* ]] || continue
        if [[ -n ${BENCH_REINSTALL:-} ]] || ! "$PY" -c "import ${PROBE[$peer]}" 2>/dev/null; then
            log "pip install ${PACKAGES[$peer]}"
            # shellcheck disable=SC2086 # a list of packages
            if ! "${pip[@]}" ${PACKAGES[$peer]} >"$LOGDIR/pip-$peer.log" 2>&1; then
                log "WARNING: pip install $peer failed: skipping $peer (see $LOGDIR/pip-$peer.log)"
                SKIPPED_NOTES+=("$peer: pip install failed, skipped")
                continue
            fi
        fi
        HAVE[$peer]=1
    done
    # the asyncio modes' frameworks (Quart, Django, FastAPI), for every server
    if [[ " $MODES " == *" aio-"* ]] && ! "$PY" -c "import quart, django, fastapi" 2>/dev/null; then
        log "pip install quart django fastapi"
        "${pip[@]}" quart django fastapi >"$LOGDIR/pip-aio.log" 2>&1 \
            || die "could not install the asyncio frameworks (see $LOGDIR/pip-aio.log)"
    fi
    # the WSGI modes' Flask views, for trioherd too
    if [[ " $MODES " == *" wsgi"* ]] && ! "$PY" -c "import flask" 2>/dev/null; then
        log "pip install flask"
        "${pip[@]}" flask >"$LOGDIR/pip-flask.log" 2>&1 \
            || die "could not install flask for the WSGI modes (see $LOGDIR/pip-flask.log)"
    fi
    # gunicorn 24, issue 13's baseline, in a venv of its own (the main one has the newest)
    if [[ " $SERVERS " == *" gunicorn24-asgi "* ]]; then
        if [[ ! -x $VENV_G24/bin/gunicorn || -n ${BENCH_REINSTALL:-} ]]; then
            log "creating $VENV_G24 with gunicorn==24.0.0"
            if ! { python3 -m venv "$VENV_G24" &&
                   "$VENV_G24/bin/python" -m pip install -q "gunicorn==24.0.0"; } \
                    >"$LOGDIR/pip-gunicorn24.log" 2>&1; then
                log "WARNING: gunicorn 24 install failed: skipping it (see $LOGDIR/pip-gunicorn24.log)"
                SKIPPED_NOTES+=("gunicorn24-asgi: pip install failed, skipped")
                return 0
            fi
        fi
        HAVE[gunicorn24-asgi]=1
    fi
}

# A trustme CA and a certificate for 127.0.0.1 signed by it, for the tls- modes: ca.pem,
# cert.pem, key.pem (PKCS#8, which granian needs) in $TLS_DIR.
TLS_DIR=""
setup_tls() {
    [[ " $MODES " == *" tls-"* ]] || return 0
    if ! "$PY" -c "import trustme" 2>/dev/null; then
        log "pip install trustme (certificates for the tls- modes)"
        "$PY" -m pip install -q trustme >"$LOGDIR/pip-trustme.log" 2>&1 \
            || die "could not install trustme (see $LOGDIR/pip-trustme.log)"
    fi
    TLS_DIR="$LOGDIR/tls"
    mkdir -p "$TLS_DIR"
    "$PY" - "$TLS_DIR" <<'PY' || die "could not make the TLS certificates"
import sys
from pathlib import Path

import trustme
from cryptography.hazmat.primitives import serialization

directory = Path(sys.argv[1])
ca = trustme.CA()
cert = ca.issue_cert("127.0.0.1", "localhost")
ca.cert_pem.write_to_path(directory / "ca.pem")
(directory / "cert.pem").write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), password=None)
(directory / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
PY
}

# ---------------------------------------------------------------- one measurement

declare -A SERVER_LABELS=([trioherd]="trioherd (--http auto: httptools)"
    [trioherd-h11]="trioherd --http h11" [trioherd-shared]="trioherd --dispatch shared"
    [trioherd-nobatch]="trioherd --no-batch-primary"
    [trioherd-asyncio]="trioherd --asyncio (uvloop, httptools)"
    [trioherd-asyncio-shared]="trioherd --asyncio --dispatch shared"
    [hypercorn]="hypercorn -k trio"
    [gunicorn-asgi]="gunicorn -k asgi (its Python parser, asyncio loop)"
    [gunicorn24-asgi]="gunicorn 24.0.0 -k asgi (issue 13's baseline, asyncio loop)"
    [uvicorn]="uvicorn --http h11 (+TCP_NODELAY)" [bare]="bare trio+h11"
    [granian]="granian (Rust)" [uvicorn-httptools]="uvicorn --http httptools, uvloop (+TCP_NODELAY)"
    [gunicorn-gthread]="gunicorn -k gthread" [granian-wsgi]="granian --interface wsgi (Rust)")

# Sets CMD to the command line of server NAME with WORKERS workers on PORT; over TLS
# (TLS=1) with the certificate in $TLS_DIR.
server_cmd() {
    local name=$1 workers=$2 port=$3 tls=()
    if [[ $TLS == 1 ]]; then
        case $name in
            uvicorn*) tls=(--ssl-certfile "$TLS_DIR/cert.pem" --ssl-keyfile "$TLS_DIR/key.pem") ;;
            granian) tls=(--ssl-certificate "$TLS_DIR/cert.pem" --ssl-keyfile "$TLS_DIR/key.pem") ;;
            *) tls=(--certfile "$TLS_DIR/cert.pem" --keyfile "$TLS_DIR/key.pem") ;;
        esac
    fi
    case $name in
        trioherd*)  # trioherd, and its variants with one option more
            local extra=()
            case $name in
                trioherd-h11) extra=(--http h11) ;;
                trioherd-shared) extra=(--dispatch shared) ;;
                trioherd-nobatch) extra=(--no-batch-primary) ;;
                trioherd-asyncio) extra=(--asyncio) ;;
                trioherd-asyncio-shared) extra=(--asyncio --dispatch shared) ;;
            esac
            if [[ $APP == bench.wsgi_app:* && -n ${WSGI_THREADS:-} ]]; then
                extra+=(--threads "$WSGI_THREADS")
            fi
            CMD=("$PY" -m trioherd serve "$APP" --workers "$workers"
                 "${extra[@]}" --bind "127.0.0.1:$port" --name "bench-$port") ;;
        gunicorn-gthread) CMD=("$VENV/bin/gunicorn" -k gthread --threads "${GTHREAD_THREADS:-8}"
                               -w "$workers" -b "127.0.0.1:$port" --log-level warning "$APP") ;;
        granian-wsgi)
            local threads=()
            [[ -n ${GRANIAN_THREADS:-} ]] && threads=(--blocking-threads "$GRANIAN_THREADS")
            CMD=("$VENV/bin/granian" --interface wsgi --workers "$workers" "${threads[@]}"
                 --host 127.0.0.1 --port "$port" --log-level warning "$APP") ;;
        gunicorn-asgi) CMD=("$VENV/bin/gunicorn" -k asgi --asgi-loop asyncio --http-parser python
                            -w "$workers" -b "127.0.0.1:$port" --log-level warning
                            bench.hello_app:app) ;;
        gunicorn24-asgi) CMD=("$VENV_G24/bin/gunicorn" -k asgi --asgi-loop asyncio
                              -w "$workers" -b "127.0.0.1:$port" --log-level warning
                              bench.hello_app:app) ;;
        hypercorn) CMD=("$VENV/bin/hypercorn" -k trio -w "$workers" -b "127.0.0.1:$port"
                        bench.hello_app:app) ;;
        uvicorn) CMD=("$PY" "$BENCH_DIR/uvicorn_nodelay.py" --http h11 --workers "$workers"
                      --host 127.0.0.1 --port "$port" --no-access-log --log-level warning
                      bench.hello_app:app) ;;
        bare) CMD=("$PY" "$BENCH_DIR/bare_trio_h11.py" --workers "$workers" --host 127.0.0.1
                   --port "$port") ;;
        granian) CMD=("$VENV/bin/granian" --interface asgi --workers "$workers"
                      --host 127.0.0.1 --port "$port" --no-ws --log-level warning
                      "$APP") ;;
        uvicorn-httptools) CMD=("$PY" "$BENCH_DIR/uvicorn_nodelay.py" --http httptools
                                --loop uvloop --workers "$workers" --host 127.0.0.1
                                --port "$port" --no-access-log --log-level warning
                                "$APP") ;;
    esac
    CMD+=("${tls[@]}")
}

# record ROUND MODE SERVER STATUS RPS P99MS RSSMB CPU READY ERRORS EXIT NOTE CPU_US_PER_REQUEST
record() {
    local IFS=$'\t'
    printf '%s\n' "$*" >>"$RAW"
}

run_one() {
    local round=$1 mode=$2 server=$3
    local workers=2 pin_server=() pin_wrk=() wrk_extra=() scheme=http curl_tls=()
    TLS=0
    if [[ $mode == tls-* ]]; then
        TLS=1; scheme=https; curl_tls=(--cacert "$TLS_DIR/ca.pem")
    fi
    case ${mode#tls-} in
        ka2) ;;
        close2) wrk_extra=(-H "Connection: close") ;;
        pinned1) workers=1; pin_server=(taskset -c 0); pin_wrk=(taskset -c 1) ;;
        wsgi2 | wsgiblock | aio-*) ;;
    esac
    # the app of the mode; a server that cannot serve it sits the mode out (no row)
    APP=bench.hello_app:app
    case $mode in
        wsgi2) APP=bench.wsgi_app:hello ;;
        wsgiblock) APP=bench.wsgi_app:blocking ;;
        aio-*) APP=bench.asyncio_apps:${mode#aio-}_app ;;
    esac
    case $mode:$server in
        wsgi*:trioherd | wsgi*:trioherd-h11 | wsgi*:gunicorn-gthread | wsgi*:granian-wsgi) ;;
        aio-*:trioherd-asyncio* | aio-*:uvicorn-httptools | aio-*:granian) ;;
        wsgi*:* | aio-*:* | *:gunicorn-gthread | *:granian-wsgi) return 0 ;;
    esac
    local tag="r$round-$mode-$server"
    local slog="$LOGDIR/$tag.server.log" wlog="$LOGDIR/$tag.wrk.txt"
    if [[ $server != trioherd* && $server != bare && -z ${HAVE[$server]:-} ]]; then
        record "$round" "$mode" "$server" skipped "" "" "" "" "" "" "" "not installed"
        return 0
    fi
    if [[ $TLS == 1 && $server == bare ]]; then
        record "$round" "$mode" "$server" skipped "" "" "" "" "" "" "" "no TLS"
        return 0
    fi
    local port
    port=$(free_port)
    server_cmd "$server" "$workers" "$port"
    log "round $round, $mode, ${SERVER_LABELS[$server]} on $scheme://127.0.0.1:$port"

    local t0 pid
    t0=$(now_ns)
    # setsid: own process group (its id is the server's pid), so that nothing it
    # starts can outlive it. setsid and taskset exec, so $! is the server itself.
    (cd "$REPO_ROOT" && exec setsid "${pin_server[@]}" "${CMD[@]}" </dev/null >"$slog" 2>&1) &
    pid=$!
    CURRENT_PID=$pid

    # Wait until it answers, at most START_TIMEOUT s.
    local i body="" ready=0 reason=""
    for ((i = 0; i < START_TIMEOUT * 20; i++)); do
        if ! alive "$pid"; then reason="exited before answering"; break; fi
        if body=$(curl -s --max-time 1 "${curl_tls[@]}" "$scheme://127.0.0.1:$port/" 2>/dev/null); then
            ready=1; break
        fi
        (( $(now_ns) - t0 >= START_TIMEOUT * 1000000000 )) && break
        sleep 0.05
    done
    local ready_s
    ready_s=$(awk -v a="$t0" -v b="$(now_ns)" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
    if (( ready == 0 )) || [[ $body != "$HELLO" ]]; then
        if (( ready == 1 )); then
            reason="wrong body: ${body:0:40}"
        elif [[ -z $reason ]]; then
            reason="no answer within ${START_TIMEOUT}s"
        fi
        stop_server "$pid"; CURRENT_PID=""
        [[ $reason == "exited before answering" ]] && reason="exited with code $STOP_RC before answering"
        log "  FAILED: $reason; last lines of $slog:"
        tail -n 5 "$slog" | sed 's/^/    | /' >&2
        record "$round" "$mode" "$server" failed "" "" "" "" "" "" "$STOP_RC" "$reason"
        return 0
    fi
    log "  answering after ${ready_s}s; wrk -t1 -c$CONNECTIONS -d${DURATION}s ${wrk_extra[*]}"

    # Load it; sample the tree's RSS halfway through and at the end; read the top
    # process's CPU time around the run.
    local c0 c1 w0 w1 wrc=0 rss_mid rss_end
    c0=$(cpu_ticks "$pid" || true)
    local t0_tree t1_tree
    t0_tree=$(tree_cpu_ticks "$pid")
    w0=$(now_ns)
    timeout $((DURATION + 30)) "${pin_wrk[@]}" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" \
        --latency "${wrk_extra[@]}" "$scheme://127.0.0.1:$port/" >"$wlog" 2>&1 &
    CURRENT_WRK=$!
    sleep "$(awk -v d="$DURATION" 'BEGIN { print d / 2 }')"
    rss_mid=$(tree_rss_kb "$pid")
    wait "$CURRENT_WRK" || wrc=$?
    CURRENT_WRK=""
    w1=$(now_ns)
    c1=$(cpu_ticks "$pid" || true)
    t1_tree=$(tree_cpu_ticks "$pid")
    rss_end=$(tree_rss_kb "$pid")
    local still_alive=1
    alive "$pid" || still_alive=0

    local rps p99 errors cpu rss_mb nprocs
    rps=$(awk '/^Requests\/sec:/ { print $2 }' "$wlog")
    p99=$(awk '$1 == "99%" {
        v = $2
        if (v ~ /us$/) { sub(/us$/, "", v); v = v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); v = v + 0 }
        else if (v ~ /m$/) { sub(/m$/, "", v); v = v * 60000 }
        else if (v ~ /s$/) { sub(/s$/, "", v); v = v * 1000 }
        printf "%.3f", v }' "$wlog")
    errors=$(awk '/Socket errors:/ { gsub(",", ""); s += $4 + $6 + $8 + $10 }
                  /Non-2xx or 3xx responses:/ { s += $5 }
                  END { print s + 0 }' "$wlog")
    read -r rss_a nprocs <<<"$rss_mid"
    read -r rss_b _ <<<"$rss_end"
    rss_mb=$(awk -v a="$rss_a" -v b="$rss_b" 'BEGIN { m = (a > b ? a : b); printf "%.1f", m / 1024 }')
    cpu=""
    if [[ -n $c0 && -n $c1 ]]; then
        cpu=$(awk -v a="$c0" -v b="$c1" -v t="$CLK_TCK" -v w0="$w0" -v w1="$w1" \
            'BEGIN { printf "%.2f", 100 * (b - a) / t / ((w1 - w0) / 1e9) }')
    fi

    stop_server "$pid"; CURRENT_PID=""
    local note="$STOP_NOTE"
    if [[ -z $rps ]] || (( wrc != 0 )) || (( still_alive == 0 )); then
        local why="wrk exit $wrc, no req/s in output"
        (( still_alive == 0 )) && why="server died under load (exit $STOP_RC)"
        log "  FAILED: $why; $wlog / $slog"
        tail -n 3 "$wlog" | sed 's/^/    | /' >&2
        record "$round" "$mode" "$server" failed "" "" "" "" "$ready_s" "" "$STOP_RC" "$why${note:+; $note}"
        return 0
    fi
    # CPU of the whole server (every process of its tree) per request served: steadier
    # than req/s on a noisy machine, and what the load costs whoever pays for the cores
    local requests cpu_req
    requests=$(awk '/ requests in / { print $1 }' "$wlog")
    cpu_req=$(awk -v a="$t0_tree" -v b="$t1_tree" -v t="$CLK_TCK" -v n="${requests:-0}" \
        'BEGIN { if (n > 0) printf "%.1f", (b - a) / t * 1e6 / n }')
    log "  $rps req/s, p99 ${p99} ms, RSS ${rss_mb} MB in $nprocs processes, top pid CPU ${cpu}%," \
        "server CPU ${cpu_req} us/request, errors $errors, exit code $STOP_RC"
    record "$round" "$mode" "$server" ok "$rps" "$p99" "$rss_mb" "$cpu" "$ready_s" "$errors" \
        "$STOP_RC" "$note" "$cpu_req"
}

# ---------------------------------------------------------------- main

ensure_wrk
setup_venv
setup_tls
if [[ " $MODES " == *"pinned1 "* ]] && (( $(nproc) < 2 )); then
    log "only $(nproc) CPU: skipping the pinned modes (need CPUs 0 and 1)"
    SKIPPED_NOTES+=("pinned1, tls-pinned1: need 2 CPUs, skipped")
    MODES=${MODES//tls-pinned1/}
    MODES=${MODES//pinned1/}
fi
read -r -a server_list <<<"$SERVERS"
read -r -a mode_list <<<"$MODES"
log "logs in $LOGDIR; DURATION=${DURATION}s ROUNDS=$ROUNDS servers: $SERVERS; modes: $MODES"
[[ -n ${HAVE[uvicorn]:-}${HAVE[uvicorn-httptools]:-} ]] && log "note: uvicorn runs through bench/uvicorn_nodelay.py, which sets TCP_NODELAY on accepted sockets (its --workers mode leaves it off: ~1,400 req/s keep-alive otherwise)"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)

n=${#server_list[@]}
for ((round = 1; round <= ROUNDS; round++)); do
    for mode in "${mode_list[@]}"; do
        # Rotate the order every round so that no server always runs first or last.
        for ((k = 0; k < n; k++)); do
            run_one "$round" "$mode" "${server_list[$(((k + round - 1) % n))]}"
        done
    done
done

# ---------------------------------------------------------------- report

versions=$("$PY" - <<'PY'
from importlib.metadata import PackageNotFoundError, version
out = []
for name in ("trioherd", "trio", "h11", "hypercorn", "uvicorn", "granian", "httptools", "gunicorn"):
    try:
        out.append(f"{name} {version(name)}")
    except PackageNotFoundError:
        out.append(f"{name} -")
print(", ".join(out))
PY
)
wrk_version=$(wrk -v 2>&1 | head -n 1 | awk '{ print $1, $2 }' || true)

BENCH_SERVERS="$SERVERS" BENCH_MODES="$MODES" BENCH_STARTED="$STARTED" \
BENCH_WRK="wrk -t1 -c$CONNECTIONS -d${DURATION}s --latency" \
BENCH_MACHINE="$(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" \
BENCH_LOAD="$LOAD_START" BENCH_VERSIONS="$("$PY" -V 2>&1), $versions, $wrk_version" \
BENCH_SKIPPED="$(printf '%s\n' "${SKIPPED_NOTES[@]+"${SKIPPED_NOTES[@]}"}")" \
    "$PY" - "$RAW" "$RESULTS" <<'PY'
import os, statistics, sys

env = os.environ
raw_path, out_path = sys.argv[1], sys.argv[2]
servers = env["BENCH_SERVERS"].split()
modes = env["BENCH_MODES"].split()
skipped_notes = env["BENCH_SKIPPED"].split("\n")
labels = {
    "trioherd": "trioherd (--http auto: httptools)",
    "trioherd-h11": "trioherd --http h11",
    "trioherd-shared": "trioherd --dispatch shared",
    "trioherd-nobatch": "trioherd --no-batch-primary",
    "trioherd-asyncio": "trioherd --asyncio (uvloop, httptools)",
    "trioherd-asyncio-shared": "trioherd --asyncio --dispatch shared",
    "gunicorn-asgi": "gunicorn -k asgi (its Python parser, asyncio loop)",
    "gunicorn24-asgi": "gunicorn 24.0.0 -k asgi (issue 13's baseline, asyncio loop)",
    "hypercorn": "hypercorn -k trio",
    "uvicorn": "uvicorn --http h11 (+TCP_NODELAY)",
    "bare": "bare trio+h11 (no ASGI)",
    "granian": "granian (Rust)",
    "uvicorn-httptools": "uvicorn --http httptools, uvloop (+TCP_NODELAY)",
    "gunicorn-gthread": "gunicorn -k gthread",
    "granian-wsgi": "granian --interface wsgi (Rust)",
}
mode_labels = {
    "ka2": "2 workers, keep-alive",
    "close2": "2 workers, new connection per request",
    "pinned1": "1 worker pinned to CPU 0 (wrk on CPU 1), keep-alive",
    "wsgi2": "WSGI: Flask hello, 2 workers, keep-alive",
    "wsgiblock": "WSGI: Flask view blocking 10 ms, 2 workers, keep-alive",
    "aio-quart": "asyncio: Quart hello, 2 workers, keep-alive",
    "aio-django": "asyncio: Django async view hello, 2 workers, keep-alive",
    "aio-fastapi": "asyncio: FastAPI awaiting asyncio.sleep(0), 2 workers, keep-alive",
}
for _mode, _label in list(mode_labels.items()):
    mode_labels["tls-" + _mode] = "HTTPS: " + _label
fields = ["round", "mode", "server", "status", "rps", "p99", "rss", "cpu", "ready", "errors",
          "exit", "note", "cpureq"]
runs = []
with open(raw_path) as f:
    for line in f:
        values = line.rstrip("\n").split("\t")
        values += [""] * (len(fields) - len(values))
        runs.append(dict(zip(fields, values)))


def med(server, mode, key):
    vals = [float(r[key]) for r in runs
            if r["server"] == server and r["mode"] == mode and r["status"] == "ok" and r[key]]
    return statistics.median(vals) if vals else None


def cell_status(server, mode):
    rs = [r for r in runs if r["server"] == server and r["mode"] == mode]
    ok = sum(r["status"] == "ok" for r in rs)
    if any(r["status"] == "skipped" for r in rs):
        return f"skipped ({rs[0]['note'] or 'not installed'})"
    if ok == 0:
        reasons = sorted({r["note"] for r in rs if r["status"] == "failed"})
        return "FAILED: " + "; ".join(reasons)[:80]
    return None


lines = []
lines.append("# trioherd benchmark, latest run")
lines.append("")
lines.append(f"- started {env['BENCH_STARTED']}, {len({r['round'] for r in runs})} round(s) "
             f"of `{env['BENCH_WRK']}`, medians over rounds")
lines.append(f"- machine: {env['BENCH_MACHINE']}, load average at start {env['BENCH_LOAD']}")
lines.append(f"- {env['BENCH_VERSIONS']}")
if "uvicorn" in servers:
    lines.append("- uvicorn runs through bench/uvicorn_nodelay.py: TCP_NODELAY set on accepted "
                 "sockets (uvicorn --workers leaves it off and stalls at ~1,400 req/s "
                 "keep-alive); --no-access-log")
for note in skipped_notes:
    if note:
        lines.append(f"- {note}")
lines.append("")
lines.append("| server | mode | req/s | p99 | RSS MB | server CPU µs/request | vs uvicorn h11 | vs bare trio+h11 | vs uvicorn httptools | ok runs |")
lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for mode in modes:
    ref_u = med("uvicorn", mode, "rps")
    ref_b = med("bare", mode, "rps")
    ref_x = med("uvicorn-httptools", mode, "rps")
    for server in servers:
        status = cell_status(server, mode)
        rs = [r for r in runs if r["server"] == server and r["mode"] == mode]
        if not rs:  # the server sits this mode out (an ASGI server in a WSGI mode)
            continue
        ok = sum(r["status"] == "ok" for r in rs)
        if status:
            lines.append(f"| {labels[server]} | {mode_labels[mode]} | {status} | | | | | | | {ok}/{len(rs)} |")
            continue
        rps = med(server, mode, "rps")
        p99 = med(server, mode, "p99")
        rss = med(server, mode, "rss")
        cpureq = med(server, mode, "cpureq")
        cpu_cell = f"{cpureq:.1f}" if cpureq is not None else ""
        ru = f"{rps / ref_u:.2f}x" if ref_u else "n/a"
        rb = f"{rps / ref_b:.2f}x" if ref_b else "n/a"
        rx = f"{rps / ref_x:.2f}x" if ref_x else "n/a"
        lines.append(f"| {labels[server]} | {mode_labels[mode]} | {rps:,.0f} | {p99:.2f} ms | "
                     f"{rss:.1f} | {cpu_cell} | {ru} | {rb} | {rx} | {ok}/{len(rs)} |")
lines.append("")

cpu = med("trioherd", "ka2", "cpu")
if cpu is not None:
    lines.append(f"trioherd primary's own CPU during the 2-worker keep-alive run: {cpu:.2f} % "
                 "(utime+stime of the primary pid over the wrk run, median)")
    lines.append("")

# The DESIGN.md targets, each against peers of this same session.
def ratio(mode, ref, ours="trioherd"):
    t, r = med(ours, mode, "rps"), med(ref, mode, "rps")
    return (t / r) if (t and r) else None

checks = [
    ("per core keep-alive >= 1.5x uvicorn h11", ratio("pinned1", "uvicorn"), 1.5),
    ("per core keep-alive >= 1.3x bare trio+h11", ratio("pinned1", "bare"), 1.3),
    ("per core keep-alive >= 5x hypercorn -k trio", ratio("pinned1", "hypercorn"), 5.0),
    ("2 workers keep-alive >= 1.3x uvicorn h11", ratio("ka2", "uvicorn"), 1.3),
    ("2 workers new connection >= 1.0x uvicorn h11", ratio("close2", "uvicorn"), 1.0),
    # issue 13
    ("2 workers keep-alive >= 1.0x granian", ratio("ka2", "granian"), 1.0),
    ("2 workers keep-alive >= 1.1x uvicorn+httptools", ratio("ka2", "uvicorn-httptools"), 1.1),
    ("2 workers new connection >= 1.0x uvicorn+httptools",
     ratio("close2", "uvicorn-httptools"), 1.0),
    ("per core with h11 >= 1.0x gunicorn -k asgi",
     ratio("pinned1", "gunicorn-asgi", "trioherd-h11"), 1.0),
    ("per core with h11 >= 1.0x gunicorn 24 -k asgi (the issue's baseline)",
     ratio("pinned1", "gunicorn24-asgi", "trioherd-h11"), 1.0),
    # issue 27 (granian's ratio is published, not a target)
    ("WSGI Flask hello >= 1.0x gunicorn -k gthread", ratio("wsgi2", "gunicorn-gthread"), 1.0),
    ("WSGI Flask hello vs granian --interface wsgi", ratio("wsgi2", "granian-wsgi"), 0.0),
    ("WSGI Flask 10 ms view >= 1.0x gunicorn -k gthread",
     ratio("wsgiblock", "gunicorn-gthread"), 1.0),
    ("WSGI Flask 10 ms view vs granian --interface wsgi",
     ratio("wsgiblock", "granian-wsgi"), 0.0),
    # issue 25: TLS (granian's ratios are published, not targets)
    ("HTTPS 2 workers keep-alive >= 1.2x uvicorn+httptools",
     ratio("tls-ka2", "uvicorn-httptools"), 1.2),
    ("HTTPS 2 workers keep-alive vs granian", ratio("tls-ka2", "granian"), 0.0),
    ("HTTPS 2 workers new connection >= 1.0x uvicorn+httptools",
     ratio("tls-close2", "uvicorn-httptools"), 1.0),
    ("HTTPS 2 workers new connection vs granian", ratio("tls-close2", "granian"), 0.0),
    ("HTTPS per core keep-alive >= 1.2x uvicorn+httptools",
     ratio("tls-pinned1", "uvicorn-httptools"), 1.2),
    ("HTTPS per core keep-alive vs granian", ratio("tls-pinned1", "granian"), 0.0),
    # issue 26: the asyncio runtime (granian's ratios are published, not targets)
    *[
        check
        for mode in ("ka2", "aio-quart", "aio-django", "aio-fastapi")
        for check in (
            (f"--asyncio, {mode_labels[mode]} >= 1.0x uvicorn+httptools",
             ratio(mode, "uvicorn-httptools", "trioherd-asyncio"), 1.0),
            (f"--asyncio, {mode_labels[mode]} vs granian",
             ratio(mode, "granian", "trioherd-asyncio"), 0.0),
        )
    ],
    ("--asyncio --dispatch shared, new connection >= 1.0x uvicorn+httptools",
     ratio("close2", "uvicorn-httptools", "trioherd-asyncio-shared"), 1.0),
]
target_lines = []
for name, value, goal in checks:
    if value is not None:
        verdict = "published" if not goal else "met" if value >= goal else "NOT met"
        target_lines.append(f"| {name} | {value:.2f}x | {verdict} |")
# issue 25: the server's CPU per HTTPS request at most uvicorn+httptools'; issue 26: the
# asyncio runtime's per request at most uvicorn+httptools'
for mode, ours_name in (("tls-pinned1", "trioherd"), ("tls-close2", "trioherd"),
                        ("ka2", "trioherd-asyncio"), ("pinned1", "trioherd-asyncio"),
                        ("aio-fastapi", "trioherd-asyncio")):
    ours, theirs = med(ours_name, mode, "cpureq"), med("uvicorn-httptools", mode, "cpureq")
    if ours is not None and theirs is not None:
        target_lines.append(f"| {mode_labels[mode]}: {labels[ours_name]}'s server CPU per "
                            f"request <= uvicorn+httptools' "
                            f"({theirs:.1f} µs) | {ours:.1f} µs | "
                            f"{'met' if ours <= theirs else 'NOT met'} |")
if cpu is not None:
    target_lines.append(f"| primary CPU < 2 % (2 workers, keep-alive) | {cpu:.2f} % | "
                        f"{'met' if cpu < 2 else 'NOT met'} |")
rss2 = med("trioherd", "ka2", "rss")
if rss2 is not None:
    target_lines.append(f"| RSS of primary + 2 workers < 75 MB | {rss2:.1f} MB | "
                        f"{'met' if rss2 < 75 else 'NOT met'} |")
ready2 = med("trioherd", "ka2", "ready")
if ready2 is not None:
    target_lines.append(f"| answering within 1 s of start (2 workers; includes curl polling) | "
                        f"{ready2:.2f} s | {'met' if ready2 < 1 else 'NOT met'} |")
if target_lines:
    lines.append("Targets (DESIGN.md; issue 13) for trioherd, against this session's peers:")
    lines.append("")
    lines.append("| target | measured | |")
    lines.append("|---|---:|---|")
    lines.extend(target_lines)
    lines.append("")

table_text = "\n".join(lines)
raw_lines = ["## Every run", "",
             "| round | mode | server | status | req/s | p99 ms | RSS MB | top pid CPU % | "
             "ready s | wrk errors | exit | note | server CPU µs/request |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
for r in runs:
    raw_lines.append("| " + " | ".join(r[k] for k in fields) + " |")
with open(out_path, "w") as f:
    f.write(table_text + "\n" + "\n".join(raw_lines) + "\n")
print(table_text)
PY
log "written to $RESULTS; raw runs and logs in $LOGDIR"
