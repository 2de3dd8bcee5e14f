#!/usr/bin/env bash
# Envelope mode with history and resume against version 1 without, under the same workload,
# interleaved (bare, envelope, bare, envelope, ...), a fresh server per run, pinned apart.
# FRACTION of the non-sender clients close, stay away AWAY, and reconnect every EVERY: with
# --resume they come back with their last offset and are checked for loss and duplicates
# across their reconnects; in the bare runs they just rejoin (counted, not checked).
#
#   bash scripts/resume.sh                 # 10,000 clients, 50 rooms, 2 msg/s, history 1,000
#   RUNS=1 CLIENTS=2000 bash scripts/resume.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

RUNS=${RUNS:-3}
CLIENTS=${CLIENTS:-10000}
ROOMS=${ROOMS:-50}
RATE=${RATE:-2}
DURATION=${DURATION:-20}
HISTORY=${HISTORY:-1000}
FRACTION=${FRACTION:-0.05}
EVERY=${EVERY:-5s}
AWAY=${AWAY:-1s}
SERVER_CPU=${SERVER_CPU:-0}
LOADGEN_CPU=${LOADGEN_CPU:-1}
PORT=${PORT:-18700}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"

cargo build --release -q -p roomcast -p loadgen
for run in $(seq 1 "$RUNS"); do
    for side in bare envelope; do
        server_args=() loadgen_args=()
        if [ "$side" = envelope ]; then
            server_args=(--history-size "$HISTORY")
            loadgen_args=(--envelope --resume)
        fi
        taskset -c "$SERVER_CPU" target/release/roomcast --listen "127.0.0.1:$PORT" --log warn \
            "${server_args[@]}" &
        pid=$!
        wait_for_port 127.0.0.1 "$PORT" 10
        taskset -c "$LOADGEN_CPU" target/release/loadgen --url "ws://127.0.0.1:$PORT" \
            --clients "$CLIENTS" --rooms "$ROOMS" --senders-per-room 2 --rate "$RATE" \
            --duration "$DURATION" --reconnect-fraction "$FRACTION" --reconnect-every "$EVERY" \
            --reconnect-away "$AWAY" --server-pid "$pid" --json "$OUT/$side-$run.json" -q \
            "${loadgen_args[@]}" >"$OUT/$side-$run.txt" 2>&1 || true
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        PORT=$((PORT + 1))
    done
done

python3 - "$OUT" "$RUNS" <<'PY'
import json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
print(f"{'side':<9} {'run':>3} {'us/deliv':>9} {'p99 ms':>7} {'lost':>5} {'dups':>5} "
      f"{'resume: reconnects':>18} {'lost':>5} {'dups':>5} {'replayed':>8} {'rec:false':>9}")
for side in ("bare", "envelope"):
    cpu, p99 = [], []
    for run in range(1, runs + 1):
        d = json.load(open(f"{out}/{side}-{run}.json"))
        t, r = d["totals"], d.get("resume") or {}
        m = d["measured"]
        c = m["server_cpu_us_per_delivery"]
        p = m["latency"]["p99_us"] / 1000
        cpu.append(c); p99.append(p)
        reconnects = d["roles"]["reconnecting"]["reconnects"]
        print(f"{side:<9} {run:>3} {c:>9.2f} {p:>7.2f} {t['lost']:>5} {t['duplicates']:>5} "
              f"{reconnects:>18} {r.get('lost', '-'):>5} {r.get('duplicates', '-'):>5} "
              f"{r.get('replayed', '-'):>8} {r.get('recovered_false', '-'):>9}")
    print(f"{side}: server CPU {statistics.median(cpu):.2f} us/delivery ({min(cpu):.2f}-{max(cpu):.2f}), "
          f"p99 {statistics.median(p99):.2f} ms ({min(p99):.2f}-{max(p99):.2f}), median of {runs}")
PY
echo "raw output: $OUT"
