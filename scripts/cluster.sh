#!/usr/bin/env bash
# Two roomcast nodes on one Redis (a redis-server of its own on port 16399), 10,000 clients
# spread round-robin over both, dialect 2. Both nodes and Redis are pinned to cpu0 with one
# worker thread each, loadgen to cpu1: the cluster gets the same single core a lone node gets in
# scripts/compare.sh. Prints one Markdown row per rate: deliveries/s, loss, p50, p99, the two
# nodes' CPU seconds and Redis's CPU seconds over the 10 s window, messages sent, sustainable.
#
#   RATES=1,2,3 bash scripts/cluster.sh
#   SERVER_ARGS="--history-size 1000" LOADGEN_ARGS="--envelope" RATES=2 bash scripts/cluster.sh
set -u
cd "$(dirname "$0")/.."
source scripts/lib.sh
cargo build --release -q -p roomcast -p loadgen
RATES=${RATES:-1,2,3}
OUT=${OUT:-target/cluster}; mkdir -p $OUT
# Extra flags for both nodes and for loadgen (word-split on purpose).
SERVER_ARGS=${SERVER_ARGS:-}
LOADGEN_ARGS=${LOADGEN_ARGS:-}
for rate in ${RATES//,/ }; do
  taskset -c 0 redis-server --port 16399 --bind 127.0.0.1 --save "" --appendonly no >/dev/null & R=$!
  wait_for_port 127.0.0.1 16399 10
  # Fan-out budget off: RATES above 10 msg/s into rooms of 200 would pass its 2,000 deliveries/s.
  taskset -c 0 target/release/roomcast --listen 127.0.0.1:18081 --threads 1 --log warn --redis redis://127.0.0.1:16399 --inbound-fanout-per-sec 0 $SERVER_ARGS & A=$!
  taskset -c 0 target/release/roomcast --listen 127.0.0.1:18082 --threads 1 --log warn --redis redis://127.0.0.1:16399 --inbound-fanout-per-sec 0 $SERVER_ARGS & B=$!
  wait_for_port 127.0.0.1 18081 10; wait_for_port 127.0.0.1 18082 10
  taskset -c 1 target/release/loadgen --url ws://127.0.0.1:18081 --url ws://127.0.0.1:18082 --clients 10000 --rooms 50 \
     --senders-per-room 2 --payload 64 --rate $rate --duration 10 --warmup 2 --dialect subscribe --threads 1 \
     --connect-concurrency 128 --server-pid $A --server-pid $B --server-pid $R --json $OUT/$rate.json -q $LOADGEN_ARGS > $OUT/$rate.txt 2>&1
  kill $A $B; sleep 0.5; kill $R; wait 2>/dev/null
done
python3 - $OUT $RATES <<'PY'
import json,sys
out=sys.argv[1]
for rate in sys.argv[2].split(','):
    r=json.load(open(f"{out}/{rate}.json")); m=r['measured']; l=m['latency']
    pids=r['server']['pids']
    print(f"| {rate} | {m['deliveries_per_s']:,.0f} | {r['totals']['loss_pct']:.3f}% | {l['p50_us']/1000:.2f} | {l['p99_us']/1000:.2f} | "
          f"{pids[0]['cpu_s']+pids[1]['cpu_s']:.2f} | {pids[2]['cpu_s']:.2f} | {m['sent']} | {'yes' if m['sustainable'] and r['totals']['lost']==0 else 'no'} |")
PY
