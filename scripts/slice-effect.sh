#!/usr/bin/env bash
# What a big room's broadcasts cost the other rooms: one room of BIG members (one sender at
# BIG_RATE msg/s, loadgen rooms `big-0`) beside SMALL clients in SMALL_ROOMS rooms (2 senders
# per room at 5 msg/s, rooms `small-*`), on one server with `--fanout-slice` SLICE (the default
# 256: broadcasts yield every 256 members) and 0 (never yields), interleaved, a fresh server
# per run. Prints the small rooms' latency and loss as their loadgen measured it.
#
#   bash scripts/slice-effect.sh                      # RUNS=3, server --threads 1 on cpu0
#   THREADS=2 bash scripts/slice-effect.sh            # the default two-worker runtime
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

RUNS=${RUNS:-3}
BIG=${BIG:-15000}
BIG_RATE=${BIG_RATE:-2}
SMALL=${SMALL:-2000}
SMALL_ROOMS=${SMALL_ROOMS:-20}
THREADS=${THREADS:-1}
SLICES=${SLICES:-256 0}
SERVER_CPU=${SERVER_CPU:-0}
LOADGEN_CPU=${LOADGEN_CPU:-1}
PORT=${PORT:-18800}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"

cargo build --release -q -p roomcast -p loadgen

connections() {
    curl -s "http://127.0.0.1:$PORT/healthz" | python3 -c 'import json,sys; print(json.load(sys.stdin)["connections"])'
}

for run in $(seq 1 "$RUNS"); do
    for slice in $SLICES; do
        taskset -c "$SERVER_CPU" target/release/roomcast --listen "127.0.0.1:$PORT" --log warn \
            --threads "$THREADS" --fanout-slice "$slice" --inbound-fanout-per-sec 0 &
        server=$!
        wait_for_port 127.0.0.1 "$PORT" 10
        taskset -c "$LOADGEN_CPU" target/release/loadgen --url "ws://127.0.0.1:$PORT" \
            --room-prefix big- --clients "$BIG" --rooms 1 --senders-per-room 1 \
            --rate "$BIG_RATE" --duration 120 -q >"$OUT/big-$slice-$run.txt" 2>&1 &
        big=$!
        for _ in $(seq 1 600); do
            [ "$(connections)" -ge "$BIG" ] && break
            sleep 0.1
        done
        sleep 4 # the big loadgen's readiness probes and warmup: its sender is running by now
        taskset -c "$LOADGEN_CPU" target/release/loadgen --url "ws://127.0.0.1:$PORT" \
            --room-prefix small- --clients "$SMALL" --rooms "$SMALL_ROOMS" --senders-per-room 2 \
            --rate 5 --duration 20 --server-pid "$server" -q >"$OUT/small-$slice-$run.txt" 2>&1 || true
        yields=$(curl -s "http://127.0.0.1:$PORT/healthz" | python3 -c 'import json,sys; print(json.load(sys.stdin)["fanout_yields"])')
        kill "$big" 2>/dev/null || true
        wait "$big" 2>/dev/null || true
        kill "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
        echo "slice=$slice run=$run fanout_yields=$yields"
        grep -E "^  (latency|lost) " "$OUT/small-$slice-$run.txt" || true
        PORT=$((PORT + 1))
    done
done | tee "$OUT/summary.txt"

python3 - "$OUT" "$RUNS" "$SLICES" <<'PY'
import re, statistics, sys
out, runs, slices = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
print(f"{'slice':>6} {'small rooms p99 ms, median (range)':>36} {'p50 ms':>8} {'lost':>6}")
for s in slices:
    p99, p50, lost = [], [], 0
    for run in range(1, runs + 1):
        text = open(f"{out}/small-{s}-{run}.txt").read()
        m = re.search(r"latency\s+p50 ([\d.]+) / p90 [\d.]+ / p99 ([\d.]+)", text)
        if m:
            p50.append(float(m[1])); p99.append(float(m[2]))
        m = re.search(r"lost\s+(\d+)", text)
        lost += int(m[1]) if m else 0
    if p99:
        print(f"{s:>6} {statistics.median(p99):>22.1f} ({min(p99):.1f}-{max(p99):.1f}) {statistics.median(p50):>8.2f} {lost:>6}")
PY
echo "raw output in $OUT"
