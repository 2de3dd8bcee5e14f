#!/usr/bin/env bash
# What tokens cost: 10,000 clients connecting (each with its own HS256 token under
# `--auth required`, none without auth), then 50 rooms x 2 senders at 5 msg/s. Interleaved runs,
# fresh server per run, server pinned to SERVER_CPU, loadgen to LOADGEN_CPU.
#
# Per connect: the server's CPU (utime+stime from /proc) over a run that only connects and
# closes (0.01 msg/s, 1 s), divided by the clients; it includes each connection's close.
# Per delivery: loadgen's --server-pid figure over the measured window of the 5 msg/s run.
#
#   bash scripts/auth-cost.sh            # RUNS=3 CLIENTS=10000
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

RUNS=${RUNS:-3}
CLIENTS=${CLIENTS:-10000}
SERVER_CPU=${SERVER_CPU:-0}
LOADGEN_CPU=${LOADGEN_CPU:-1}
PORT=${PORT:-18500}
SECRET=auth-cost-secret
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"

cargo build --release -q -p roomcast -p loadgen

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# run MODE KIND N: one fresh server, one loadgen run; prints "MODE KIND N value..."
run() {
    local mode=$1 kind=$2 n=$3 flags=() lflags=() pid before after
    if [ "$mode" = required ]; then
        flags=(--auth required --auth-secret "$SECRET")
        lflags=(--token-secret "$SECRET")
    fi
    taskset -c "$SERVER_CPU" target/release/roomcast --listen "127.0.0.1:$PORT" --log warn "${flags[@]}" &
    pid=$!
    wait_for_port 127.0.0.1 "$PORT" 10
    before=$(cpu_ticks "$pid")
    if [ "$kind" = connect ]; then
        taskset -c "$LOADGEN_CPU" target/release/loadgen --url "ws://127.0.0.1:$PORT" --clients "$CLIENTS" \
            --rooms 50 --senders-per-room 1 --rate 0.01 --warmup 0.5 --duration 1 \
            "${lflags[@]}" -q >"$OUT/$mode-$kind-$n.txt" 2>&1 || true
        after=$(cpu_ticks "$pid")
        echo "$mode connect $n $(( (after - before) * 10 )) ms server CPU"
    else
        taskset -c "$LOADGEN_CPU" target/release/loadgen --url "ws://127.0.0.1:$PORT" --clients "$CLIENTS" \
            --rooms 50 --senders-per-room 2 --rate 5 --duration 20 --server-pid "$pid" \
            "${lflags[@]}" -q >"$OUT/$mode-$kind-$n.txt" 2>&1 || true
        echo "$mode deliver $n"
    fi
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    PORT=$((PORT + 1))
}

for n in $(seq 1 "$RUNS"); do
    for mode in ${MODES:-off required}; do
        run "$mode" connect "$n"
        run "$mode" deliver "$n"
    done
done | tee "$OUT/cpu.txt"

python3 - "$OUT" "$RUNS" "$CLIENTS" <<'PY'
import re, statistics, sys
out, runs, clients = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cpu = {}
for line in open(f"{out}/cpu.txt"):
    m = re.match(r"(\w+) connect (\d+) (\d+) ms", line)
    if m:
        cpu.setdefault(m.group(1), []).append(int(m.group(3)) * 1000 / clients)
def med(xs):
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"
print(f"{'auth':<9} {'connects/s':>22} {'server us per connect':>26} {'server us per delivery':>24} {'p99 ms':>20} {'verdicts'}")
for mode in ("off", "required"):
    rates, per_del, p99, verdicts = [], [], [], []
    for n in range(1, runs + 1):
        c = open(f"{out}/{mode}-connect-{n}.txt").read()
        m = re.search(r"connected\s+(\d+)/\d+ in ([\d.]+) s", c)
        rates.append(int(m.group(1)) / float(m.group(2)) if m and float(m.group(2)) > 0 else float("nan"))
        d = open(f"{out}/{mode}-deliver-{n}.txt").read()
        m = re.search(r"server CPU .*?\(([\d.]+) us/delivery\)", d)
        per_del.append(float(m.group(1)) if m else float("nan"))
        m = re.search(r"latency .*?p99 ([\d.]+)", d)
        p99.append(float(m.group(1)) if m else float("nan"))
        verdicts.append("clean" if "verdict: clean" in c and "verdict: clean" in d else "NOT CLEAN")
    print(f"{mode:<9} {med(rates):>22} {med(cpu[mode]):>26} {med(per_del):>24} {med(p99):>20} {','.join(verdicts)}")
PY
