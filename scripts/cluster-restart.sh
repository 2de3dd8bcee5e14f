#!/usr/bin/env bash
# Loss and duplicates for envelope clients across a Redis restart in the middle of a run. One
# run of scripts/cluster.sh's cluster (two roomcast nodes on a redis-server of its own on port
# 16399, all three pinned to cpu0 with one worker thread each, loadgen on cpu1), with history
# (--history-size 1000) and resuming clients: 10,000 envelope clients round-robin over both
# nodes, 50 rooms, 2 senders per room at 2 msg/s, 2 s warm-up and a 20 s measured window; 5% of
# the non-senders close every 5 s, stay away 1 s and resume on the other node.
#
# RESTART_AT seconds after loadgen starts (default 10: its connect phase and the 2 s warm-up
# come first, so this lands some seconds into the measured window; the summary prints both
# times), Redis is killed (kill -9, nothing saved) and started again on the same port after
# DOWN seconds (default 1). Expected: every loss is either a refused send (the sender got an
# error, nobody is owed it) or announced to the client (a gap notice or recovered:false):
# lost_silent 0, duplicates 0.
#
#   bash scripts/cluster-restart.sh
#   RESTART_AT=12 DOWN=3 bash scripts/cluster-restart.sh
#   SERVER_ARGS="--log info" LOADGEN_ARGS="--drain 5s" bash scripts/cluster-restart.sh
set -u
cd "$(dirname "$0")/.." || exit 1
source scripts/lib.sh
cargo build --release -q -p roomcast -p loadgen || exit 1
RESTART_AT=${RESTART_AT:-10}
DOWN=${DOWN:-1}
OUT=${OUT:-target/cluster-restart}; mkdir -p "$OUT"
# Extra flags for both nodes and for loadgen (word-split on purpose).
SERVER_ARGS=${SERVER_ARGS:-}
LOADGEN_ARGS=${LOADGEN_ARGS:-}
REDIS_PORT=16399

A='' B='' R='' L=''
cleanup() {
    local p
    for p in $L $A $B $R; do
        kill "$p" 2>/dev/null
    done
    wait 2>/dev/null
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_redis() {
    taskset -c 0 redis-server --port $REDIS_PORT --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
    R=$!
}

# cpu_ticks PID: user + system CPU of PID in clock ticks (0 once it is gone).
cpu_ticks() {
    local stat f
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    # Fields after "pid (comm) ": state is [0], utime [11], stime [12].
    read -r -a f <<<"${stat##*) }"
    echo $((f[11] + f[12]))
}

# since T0: seconds from T0 (an EPOCHREALTIME) to now.
since() {
    awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'
}

start_redis
wait_for_port 127.0.0.1 $REDIS_PORT 10 || { echo "redis did not start" >&2; exit 1; }
# Fan-out budget off, as in scripts/cluster.sh.
# shellcheck disable=SC2086
taskset -c 0 target/release/roomcast --listen 127.0.0.1:18081 --threads 1 --log warn \
    --redis redis://127.0.0.1:$REDIS_PORT --inbound-fanout-per-sec 0 --history-size 1000 $SERVER_ARGS &
A=$!
# shellcheck disable=SC2086
taskset -c 0 target/release/roomcast --listen 127.0.0.1:18082 --threads 1 --log warn \
    --redis redis://127.0.0.1:$REDIS_PORT --inbound-fanout-per-sec 0 --history-size 1000 $SERVER_ARGS &
B=$!
if ! wait_for_port 127.0.0.1 18081 10 || ! wait_for_port 127.0.0.1 18082 10; then
    echo "a node did not start" >&2
    exit 1
fi

t0=$EPOCHREALTIME
# shellcheck disable=SC2086
taskset -c 1 target/release/loadgen --url ws://127.0.0.1:18081 --url ws://127.0.0.1:18082 \
    --clients 10000 --rooms 50 --senders-per-room 2 --payload 64 --rate 2 --duration 20 --warmup 2 \
    --dialect subscribe --threads 1 --connect-concurrency 128 --envelope --resume \
    --reconnect-fraction 0.05 --reconnect-every 5s --reconnect-away 1 --reconnect-elsewhere \
    --server-pid "$A" --server-pid "$B" --json "$OUT/run.json" -q $LOADGEN_ARGS >"$OUT/run.txt" 2>&1 &
L=$!

# Redis's CPU from loadgen's start, both processes: loadgen cannot follow a pid that dies.
redis_ticks=$((0 - $(cpu_ticks "$R")))
sleep "$RESTART_AT"
killed_at='' back_at=''
if kill -0 "$L" 2>/dev/null; then
    redis_ticks=$((redis_ticks + $(cpu_ticks "$R")))
    kill -9 "$R"
    wait "$R" 2>/dev/null
    killed_at=$(since "$t0")
    sleep "$DOWN"
    start_redis
    wait_for_port 127.0.0.1 $REDIS_PORT 10 || echo "redis did not come back" >&2
    back_at=$(since "$t0")
else
    echo "loadgen ended before RESTART_AT=$RESTART_AT s: Redis was not restarted" >&2
fi
wait "$L"
rc=$?
L=''
redis_ticks=$((redis_ticks + $(cpu_ticks "$R")))
redis_cpu_s=$(awk -v t="$redis_ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t / hz }')
[ "$rc" -eq 0 ] || echo "loadgen exited $rc (a run with faults or errors does; see $OUT/run.txt)" >&2
if [ ! -s "$OUT/run.json" ]; then
    echo "no report: see $OUT/run.txt" >&2
    exit 1
fi

python3 - "$OUT/run.json" "$killed_at" "$back_at" "$redis_cpu_s" <<'PY'
import json, sys
path, killed, back, redis_cpu = sys.argv[1:5]
r = json.load(open(path))
t, m = r["totals"], r["measured"]
e = r.get("envelope") or {}
s = r.get("resume") or {}
w0, w1 = r["measured_window_s"]
when = f"killed at {killed} s, back at {back} s" if killed else "not restarted"
print(f"Redis {when} after loadgen started; measured window {w0:.1f}-{w1:.1f} s")
print()
print("| figure | healthy clients | resuming clients |")
print("| --- | ---: | ---: |")
def row(name, healthy, resuming="-"):
    print(f"| {name} | {healthy} | {resuming} |")
row("deliveries/s (measured window, all)", f"{m['deliveries_per_s']:,.0f}")
row("sent (warm-up included)", t["sent"])
row("refused (error reply: owed to no one)", t["refused"])
row("expected", t["expected"], s.get("expected", "-"))
row("lost", t["lost"], s.get("lost", "-"))
row("lost_announced (client told: gap / recovered:false)", t["lost_announced"], s.get("lost_announced", "-"))
row("lost_silent", t["lost_silent"], s.get("lost_silent", "-"))
row("duplicates", t["duplicates"], s.get("duplicates", "-"))
row("gap_notices", e.get("gap_notices", "-"), s.get("gap_notices", "-"))
row("recovered / recovered_false", "-", f"{s.get('recovered', '-')} / {s.get('recovered_false', '-')}")
row("offset gaps", e.get("offset_gaps", "-"), s.get("offset_gaps", "-"))
row("offset repeats", e.get("offset_repeats", "-"), s.get("offset_repeats", "-"))
pids = (r.get("server") or {}).get("pids", [])
print()
each = " + ".join(f"{p['cpu_s']:.2f}" for p in pids)
print(f"node CPU s (measured window): {sum(p['cpu_s'] for p in pids):.2f} ({each})")
print(f"Redis CPU s (from loadgen's start, both processes): {redis_cpu}")
codes = r.get("server_error_codes") or {}
print("server errors: " + (", ".join(f"{k} x {v}" for k, v in codes.items()) or "none"))
print(f"drained: {r['drained']}; disconnects: {sum(r['disconnects'].values())}")
PY
echo "raw output: $OUT"
