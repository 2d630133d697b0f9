#!/usr/bin/env bash
# Compare trioherd at several git revisions, interleaved in one session (the machines
# drift: only a same-session ratio means anything). Each revision is checked out into a
# temporary worktree and measured with that revision's own bench/run.sh (trioherd only),
# rounds rotating the order; prints the median req/s per revision and mode, and the ratio
# of each revision to the first.
#
#   bash bench/versions.sh 0d84a40 8b63c2c HEAD            # ROUNDS=3 DURATION=10
#   ROUNDS=5 MODES="ka2 close2 pinned1" bash bench/versions.sh v1 v2
#
# Environment: ROUNDS (1..20, default 3), DURATION (s per wrk run, default 10), MODES
# (default "ka2 close2"), BENCH_VENV as for bench/run.sh. Traffic goes to 127.0.0.1 only.
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$BENCH_DIR/.." && pwd)"
ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-10}"
MODES="${MODES:-ka2 close2}"
(($# >= 1)) || { echo "usage: bench/versions.sh REV [REV ...]" >&2; exit 2; }
[[ $ROUNDS =~ ^[0-9]+$ ]] && ((ROUNDS >= 1 && ROUNDS <= 20)) || { echo "ROUNDS: 1..20" >&2; exit 2; }

work=$(mktemp -d /tmp/trioherd-versions.XXXXXX)
revs=("$@")
cleanup() {
    for ((i = 0; i < ${#revs[@]}; i++)); do
        git -C "$REPO_ROOT" worktree remove --force "$work/v$i" >/dev/null 2>&1 || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

for ((i = 0; i < ${#revs[@]}; i++)); do
    git -C "$REPO_ROOT" worktree add --detach -q "$work/v$i" "${revs[$i]}"
done

n=${#revs[@]}
for ((round = 1; round <= ROUNDS; round++)); do
    for ((k = 0; k < n; k++)); do
        i=$(((k + round - 1) % n))
        echo "[versions] round $round: ${revs[$i]}" >&2
        (cd "$work/v$i" && DURATION=$DURATION ROUNDS=1 SERVERS=trioherd MODES="$MODES" \
            RESULTS="$work/r$round-v$i.md" BENCH_LOGDIR="$work/log-r$round-v$i" \
            bash bench/run.sh >/dev/null 2>"$work/r$round-v$i.err") \
            || echo "[versions] run failed: see $work/r$round-v$i.err" >&2
    done
done

# Every run's raw table (runs.tsv: round mode server status rps p99 ... cpu/request), medians
# per revision: req/s, then p99 latency and the server's CPU per request.
python3 - "$work" "$ROUNDS" "${revs[@]}" <<'PY'
import glob, statistics, sys

work, rounds, revs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
rates: dict[tuple[int, str], list[float]] = {}
p99s: dict[tuple[int, str], list[float]] = {}
cpus: dict[tuple[int, str], list[float]] = {}
for i in range(len(revs)):
    for path in glob.glob(f"{work}/log-r*-v{i}/runs.tsv"):
        for line in open(path):
            f = line.rstrip("\n").split("\t")
            if len(f) > 4 and f[3] == "ok" and f[4]:
                rates.setdefault((i, f[1]), []).append(float(f[4]))
                if len(f) > 5 and f[5]:
                    p99s.setdefault((i, f[1]), []).append(float(f[5]))
                if len(f) > 12 and f[12]:
                    cpus.setdefault((i, f[1]), []).append(float(f[12]))
modes = sorted({mode for _, mode in rates})
print("| revision | " + " | ".join(f"{m} req/s (median)" for m in modes) + " | ratio to first |")
print("|---|" + "---:|" * (len(modes) + 1))
base = {m: statistics.median(rates.get((0, m), [0]) or [0]) for m in modes}
for i, rev in enumerate(revs):
    meds = {m: statistics.median(rates[(i, m)]) if rates.get((i, m)) else 0.0 for m in modes}
    ratio = ", ".join(f"{m} {meds[m] / base[m]:.2f}x" if base[m] else f"{m} -" for m in modes)
    cells = " | ".join(
        f"{meds[m]:,.0f} (runs: {', '.join(f'{r:,.0f}' for r in rates.get((i, m), []))})"
        for m in modes
    )
    print(f"| {rev} | {cells} | {ratio} |")
print()
print("| revision | " + " | ".join(f"{m} p99 / server CPU per request (medians)" for m in modes) + " |")
print("|---|" + "---:|" * len(modes))
for i, rev in enumerate(revs):
    cells = " | ".join(
        (f"{statistics.median(p99s[(i, m)]):.2f} ms" if p99s.get((i, m)) else "-")
        + " / "
        + (f"{statistics.median(cpus[(i, m)]):.1f} µs" if cpus.get((i, m)) else "-")
        for m in modes
    )
    print(f"| {rev} | {cells} |")
PY
