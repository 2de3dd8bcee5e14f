#!/usr/bin/env bash
# One room of 10,000 members spread over two nodes on one Redis, 2 members sending at RATE
# msg/s, and one outsider (not a member, dialect 2) flooding the room as fast as TCP allows
# from the first node. The nodes run with --inbound-frames-per-sec set to each value of LIMITS
# (the flooder's ceiling; 100 is the default); `none` runs without the flooder, at the default
# limit. Nodes pinned to cpu0, loadgen, Redis and the
# flooder to cpu1. Prints per run: healthy loss, p99, node and Redis CPU, the flood written and
# each node's drops, slow-consumer closes and throttles from /healthz.
#
#   bash scripts/cluster-flood.sh              # LIMITS="none 100 10" RATE=2 DURATION=20
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
cargo build --release -q -p roomcast -p loadgen
LIMITS=${LIMITS:-none 100 10}
# The fan-out budget per connection (deliveries/s); 0, the default here, turns it off, which is
# how the RESULTS.md table was measured (before the budget existed). At the server's default
# (2,000) both the outsider and the healthy senders (2 msg/s into 10,000 members) are held to
# 0.2 msg/s.
FANOUT=${FANOUT:-0}
RATE=${RATE:-2}
DURATION=${DURATION:-20}
OUT=${OUT:-target/cluster-flood}
mkdir -p "$OUT"
REDIS_PORT=16398

for limit in $LIMITS; do
    taskset -c 1 redis-server --port $REDIS_PORT --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
    R=$!
    wait_for_port 127.0.0.1 $REDIS_PORT 10
    nodes=()
    for port in 18091 18092; do
        taskset -c 0 target/release/roomcast --listen "127.0.0.1:$port" --log warn \
            --redis "redis://127.0.0.1:$REDIS_PORT" --inbound-frames-per-sec "${limit/none/100}" \
            --inbound-fanout-per-sec "$FANOUT" &
        nodes+=($!)
        wait_for_port 127.0.0.1 "$port" 10
    done
    # The flood starts once every member has joined (connect and warm-up take a few seconds).
    if [ "$limit" = none ]; then
        echo '{"written": 0, "connects": 0}' >"$OUT/flood-$limit.json"
        F=
    else
        (sleep 4; python3 scripts/outsider-flood.py 127.0.0.1 18091 lg-0 $((DURATION + 2)) >"$OUT/flood-$limit.json") &
        F=$!
    fi
    taskset -c 1 target/release/loadgen --url ws://127.0.0.1:18091 --url ws://127.0.0.1:18092 \
        --clients 10000 --rooms 1 --senders-per-room 2 --rate "$RATE" --duration "$DURATION" \
        --dialect subscribe --server-pid "${nodes[0]}" --server-pid "${nodes[1]}" --server-pid "$R" \
        --json "$OUT/$limit.json" -q >"$OUT/$limit.txt" 2>&1 || true
    [ -n "$F" ] && { wait "$F" || true; }
    for port in 18091 18092; do
        curl -s "http://127.0.0.1:$port/healthz" >"$OUT/health-$limit-$port.json"
    done
    kill "${nodes[@]}" 2>/dev/null || true
    sleep 0.5
    kill $R 2>/dev/null || true
    wait 2>/dev/null || true
done

python3 - "$OUT" $LIMITS <<'PY'
import json, sys
out = sys.argv[1]
print("| flooder limit (frames/s) | healthy loss | p99 ms | node CPU s | Redis CPU s | flood written | drops a / b | slow closes a / b | throttled a |")
print("|---|---|---|---|---|---|---|---|---|")
for limit in sys.argv[2:]:
    r = json.load(open(f"{out}/{limit}.json"))
    flood = json.load(open(f"{out}/flood-{limit}.json"))
    ha = json.load(open(f"{out}/health-{limit}-18091.json"))
    hb = json.load(open(f"{out}/health-{limit}-18092.json"))
    pids = r["server"]["pids"]
    t, l = r["totals"], r["measured"]["latency"]
    print(f"| {limit} | {t['lost']} ({t['loss_pct']:.2f}%) | {l['p99_us']/1000:.1f} | "
          f"{pids[0]['cpu_s']:.1f} + {pids[1]['cpu_s']:.1f} | {pids[2]['cpu_s']:.2f} | {flood['written']} | "
          f"{ha['backplane_dropped']} / {hb['backplane_dropped']} | {ha['slow_consumers_closed']} / {hb['slow_consumers_closed']} | {ha['throttled']} |")
PY
