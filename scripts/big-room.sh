#!/usr/bin/env bash
# Rooms of any size, end to end: CLIENTS clients (19,000: the file limit here is 20,000 per
# process) connect and join at full speed, either all into one room or spread over ROOMS_SPREAD
# rooms (95 rooms of 200), then close, with no sender (loadgen --senders-per-room 0), so the two
# layouts differ in membership alone (the readiness probes reach every member in both). Prints
# the server's CPU (utime+stime from /proc) for that whole connect-join-close run, per build and
# layout, interleaved, a fresh server per run. Then, per build, the one room with 2 senders at
# 5 msg/s: server CPU per delivery and p99.
#
#   bash scripts/big-room.sh                                  # this build only
#   BINS="old=/tmp/roomcast-old new=target/release/roomcast" bash scripts/big-room.sh
#
# The fan-out budget is lifted (--inbound-fanout-per-sec 0): at 5 msg/s into 19,000 members a
# sender causes 95,000 deliveries/s, far past the default per-connection budget.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

BINS=${BINS:-new=target/release/roomcast}
RUNS=${RUNS:-3}
CLIENTS=${CLIENTS:-19000}
ROOMS_SPREAD=${ROOMS_SPREAD:-95}
SERVER_CPU=${SERVER_CPU:-0}
LOADGEN_CPU=${LOADGEN_CPU:-1}
PORT=${PORT:-18700}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
SERVER_FLAGS=(--log warn --inbound-fanout-per-sec 0)

cargo build --release -q -p roomcast -p loadgen
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

start() {
    taskset -c "$SERVER_CPU" "$1" --listen "127.0.0.1:$PORT" "${SERVER_FLAGS[@]}" &
    pid=$!
    wait_for_port 127.0.0.1 "$PORT" 10
}

stop() {
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    PORT=$((PORT + 1))
}

for run in $(seq 1 "$RUNS"); do
    for entry in $BINS; do
        name=${entry%%=*} bin=${entry#*=}
        for rooms in 1 "$ROOMS_SPREAD"; do
            start "$bin"
            before=$(cpu_ticks "$pid")
            taskset -c "$LOADGEN_CPU" target/release/loadgen --url "ws://127.0.0.1:$PORT" \
                --clients "$CLIENTS" --rooms "$rooms" --senders-per-room 0 \
                --warmup 0.5 --duration 1 -q >"$OUT/$name-join-$rooms-$run.txt" 2>&1 || true
            after=$(cpu_ticks "$pid")
            echo "$name join rooms=$rooms run=$run server_cpu_ms=$(( (after - before) * 10 ))"
            stop
        done
    done
done | tee "$OUT/join.txt"

for entry in $BINS; do
    name=${entry%%=*} bin=${entry#*=}
    start "$bin"
    taskset -c "$LOADGEN_CPU" target/release/loadgen --url "ws://127.0.0.1:$PORT" \
        --clients "$CLIENTS" --rooms 1 --senders-per-room 2 --rate 5 --duration 20 \
        --server-pid "$pid" -q >"$OUT/$name-deliver.txt" 2>&1 || true
    stop
    echo "== $name, one room of $CLIENTS, 2 senders at 5 msg/s"
    grep -E "server CPU|p99|lost|undelivered" "$OUT/$name-deliver.txt" | head -6
done

python3 - "$OUT/join.txt" <<'PY'
import collections, re, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    m = re.match(r"(\S+) join rooms=(\d+) run=\d+ server_cpu_ms=(\d+)", line)
    if m:
        runs[(m[1], int(m[2]))].append(int(m[3]))
print(f"{'build':<6} {'rooms':>6} {'server CPU ms, median (range)':>32}")
for (name, rooms), v in sorted(runs.items()):
    print(f"{name:<6} {rooms:>6} {statistics.median(v):>14.0f} ({min(v)}-{max(v)})")
for name in sorted({n for n, _ in runs}):
    one = [v for (n, r), v in runs.items() if n == name and r == 1]
    spread = [v for (n, r), v in runs.items() if n == name and r != 1]
    if one and spread:
        print(f"{name}: one room / spread = {statistics.median(one[0]) / statistics.median(spread[0]):.2f}")
PY
echo "raw output in $OUT"
