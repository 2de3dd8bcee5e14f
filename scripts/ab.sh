#!/usr/bin/env bash
# Two roomcast builds under the same loadgen workload, interleaved (A, B, A, B, ...), a fresh
# server per run, pinned apart; prints each run's server CPU per delivery and p99, then medians.
#
#   bash scripts/ab.sh /tmp/roomcast-old target/release/roomcast
#   RUNS=5 RATE=5 bash scripts/ab.sh A_BIN B_BIN -- --dialect join   # extra loadgen flags after --
#   SERVER_ARGS="--inbound-frames-per-sec 0 --inbound-fanout-per-sec 0" RATE=160 bash scripts/ab.sh A B
#   B_ARGS="--tls-cert c.pem --tls-key k.pem" B_SCHEME=wss B_LOADGEN="--tls-ca c.pem" \
#     bash scripts/ab.sh BIN BIN                    # one side over TLS (per-side server args,
#                                                   # URL scheme and loadgen args: A_*, B_*)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

A=$1
B=$2
shift 2
[ "${1:-}" = "--" ] && shift
RUNS=${RUNS:-3}
RATE=${RATE:-5}
CLIENTS=${CLIENTS:-10000}
ROOMS=${ROOMS:-50}
DURATION=${DURATION:-20}
SERVER_CPU=${SERVER_CPU:-0}
LOADGEN_CPU=${LOADGEN_CPU:-1}
PORT=${PORT:-18300}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"

cargo build --release -q -p loadgen
for run in $(seq 1 "$RUNS"); do
    for side in A B; do
        bin=$A side_args=${A_ARGS:-} scheme=${A_SCHEME:-ws} side_loadgen=${A_LOADGEN:-}
        if [ "$side" = B ]; then
            bin=$B side_args=${B_ARGS:-} scheme=${B_SCHEME:-ws} side_loadgen=${B_LOADGEN:-}
        fi
        # shellcheck disable=SC2086 # the argument lists are word-split on purpose
        taskset -c "$SERVER_CPU" "$bin" --listen "127.0.0.1:$PORT" --log warn ${SERVER_ARGS:-} $side_args &
        pid=$!
        wait_for_port 127.0.0.1 "$PORT" 10
        # shellcheck disable=SC2086
        taskset -c "$LOADGEN_CPU" target/release/loadgen --url "$scheme://127.0.0.1:$PORT" \
            --clients "$CLIENTS" --rooms "$ROOMS" --senders-per-room 2 --rate "$RATE" \
            --duration "$DURATION" --server-pid "$pid" -q $side_loadgen "$@" >"$OUT/$side-$run.txt" 2>&1 || true
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        PORT=$((PORT + 1))
    done
done

python3 - "$OUT" "$RUNS" "$A" "$B" <<'PY'
import re, statistics, sys
out, runs, names = sys.argv[1], int(sys.argv[2]), {"A": sys.argv[3], "B": sys.argv[4]}
print(f"{'side':<5} {'run':>3} {'us/delivery':>12} {'p99 ms':>8} {'lost':>6}")
summary = {}
for side in "AB":
    cpu, p99 = [], []
    for run in range(1, runs + 1):
        text = open(f"{out}/{side}-{run}.txt").read()
        c = re.search(r"server CPU .*?\(([\d.]+) us/delivery\)", text)
        p = re.search(r"latency .*?p99 ([\d.]+)", text)
        lost = re.search(r"lost\s+(\d+)", text)
        c, p = (float(c.group(1)) if c else float("nan")), (float(p.group(1)) if p else float("nan"))
        cpu.append(c); p99.append(p)
        print(f"{side:<5} {run:>3} {c:>12.2f} {p:>8.2f} {lost.group(1) if lost else '?':>6}")
    summary[side] = (statistics.median(cpu), min(cpu), max(cpu), statistics.median(p99), min(p99), max(p99))
for side in "AB":
    c, cl, ch, p, pl, ph = summary[side]
    print(f"{side} {names[side]}: server CPU {c:.2f} us/delivery ({cl:.2f}-{ch:.2f}), p99 {p:.2f} ms ({pl:.2f}-{ph:.2f}), median of {runs}")
PY
