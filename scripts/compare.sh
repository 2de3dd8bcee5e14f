#!/usr/bin/env bash
# roomcast and the Node.js `ws` peer under the same loadgen workload, side by side in one run.
# Every step gets a fresh server process; server CPU and peak RSS come from /proc (loadgen
# --server-pid). The server is pinned to SERVER_CPU and loadgen to LOADGEN_CPU so the two never
# share a core. Prints a Markdown table; raw JSON reports land in $OUT.
#
#   bash scripts/compare.sh                       # dialect 1 (join/chat), Node peer dialect1.js
#   DIALECT=subscribe bash scripts/compare.sh     # dialect 2, Node peer dialect2.js on Redis
#   RATES=5,50 SERVERS=roomcast bash scripts/compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

RATES=${RATES:-5,20,50,100,160}
CLIENTS=${CLIENTS:-10000}
ROOMS=${ROOMS:-50}
SENDERS=${SENDERS:-2}
PAYLOAD=${PAYLOAD:-64}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
DIALECT=${DIALECT:-join}
SERVERS=${SERVERS:-roomcast node}
SERVER_CPU=${SERVER_CPU:-0}
LOADGEN_CPU=${LOADGEN_CPU:-1}
PORT=${PORT:-18080}
OUT=${OUT:-target/compare}

mkdir -p "$OUT"
cargo build --release -q -p roomcast -p loadgen
if [[ " $SERVERS " == *" node "* && ! -d peers/node/node_modules ]]; then
    (cd peers/node && npm ci --silent)
fi

redis_pid=""
cleanup() {
    [[ -n "${server_pid:-}" ]] && kill "$server_pid" 2>/dev/null || true
    [[ -n "$redis_pid" ]] && kill "$redis_pid" 2>/dev/null || true
}
trap cleanup EXIT

if [[ "$DIALECT" == subscribe && " $SERVERS " == *" node "* ]]; then
    redis_port=$((PORT + 1000))
    taskset -c "$SERVER_CPU" redis-server --port "$redis_port" --bind 127.0.0.1 --save "" \
        --appendonly no >/dev/null &
    redis_pid=$!
fi

start_server() {
    local name=$1
    case "$name" in
        roomcast)
            # The ladder's senders reach 160 msg/s into rooms of 200, past the default inbound
            # limits (100 frames/s, and 2,000 deliveries/s of fan-out per connection): lift them
            # so the ladder measures fan-out, not throttling.
            taskset -c "$SERVER_CPU" "${ROOMCAST_BIN:-target/release/roomcast}" --listen "127.0.0.1:$PORT" \
                --threads 1 --log warn --inbound-frames-per-sec 1000 --inbound-frames-burst 2000 \
                --inbound-fanout-per-sec 0 &
            ;;
        node)
            if [[ "$DIALECT" == join ]]; then
                PORT=$PORT taskset -c "$SERVER_CPU" node peers/node/dialect1.js >&2 &
            else
                PORT=$PORT REDIS_URL="redis://127.0.0.1:$redis_port" \
                    taskset -c "$SERVER_CPU" node peers/node/dialect2.js >&2 &
            fi
            ;;
        *) echo "unknown server $name" >&2; exit 2 ;;
    esac
    server_pid=$!
    wait_for_port 127.0.0.1 "$PORT" 10 && return
    echo "$name did not start" >&2
    exit 1
}

for name in $SERVERS; do
    for rate in ${RATES//,/ }; do
        start_server "$name"
        echo "== $name, $DIALECT, rate $rate/s per sender" >&2
        taskset -c "$LOADGEN_CPU" target/release/loadgen --url "ws://127.0.0.1:$PORT" \
            --clients "$CLIENTS" --rooms "$ROOMS" --senders-per-room "$SENDERS" \
            --payload "$PAYLOAD" --rate "$rate" --duration "$DURATION" --warmup "$WARMUP" \
            --dialect "$DIALECT" --threads 1 --connect-concurrency 128 \
            --server-pid "$server_pid" --json "$OUT/$name-$DIALECT-$rate.json" -q \
            > "$OUT/$name-$DIALECT-$rate.txt" 2>&1 || true
        curl -sf "http://127.0.0.1:$PORT/healthz" > "$OUT/$name-$DIALECT-$rate.health.json" 2>/dev/null || true
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=""
    done
done

python3 - "$OUT" "$DIALECT" "$RATES" $SERVERS <<'PY'
import json, os, sys
out, dialect, rates, servers = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4:]
print(f"| server | rate/sender | deliveries/s | loss | p50 ms | p99 ms | p99.9 ms | server CPU µs/delivery | loadgen CPU µs/delivery | server peak RSS MiB | frames/write | sustainable |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
best = {}
for name in servers:
    for rate in rates:
        path = os.path.join(out, f"{name}-{dialect}-{rate}.json")
        if not os.path.exists(path):
            print(f"| {name} | {rate} | (no report: see {path[:-5]}.txt) |||||||||")
            continue
        r = json.load(open(path))
        m, lat = r["measured"], r["measured"]["latency"]
        loss = r["totals"]["loss_pct"]
        ok = m["sustainable"] and r["totals"]["lost"] == 0
        fpw = "n/a"
        try:
            fpw = f"{json.load(open(path[:-5] + '.health.json'))['frames_per_write']:.2f}"
        except Exception:
            pass
        if ok:
            best[name] = max(best.get(name, 0), m["deliveries_per_s"])
        print(f"| {name} | {rate} | {m['deliveries_per_s']:,.0f} | {loss:.3f}% | {lat['p50_us']/1000:.2f} | "
              f"{lat['p99_us']/1000:.2f} | {lat['p999_us']/1000:.2f} | {m['server_cpu_us_per_delivery'] or 0:.2f} | "
              f"{m['loadgen_cpu_us_per_delivery']:.2f} | {r['server']['peak_rss_kb']/1024:.1f} | {fpw} | {'yes' if ok else 'no'} |")
print()
for name in servers:
    print(f"- highest sustainable (no loss, p99 < 100 ms) for {name}: {best.get(name, 0):,.0f} deliveries/s")
if len(servers) == 2 and best.get(servers[1]):
    print(f"- ratio {servers[0]}/{servers[1]}: {best.get(servers[0], 0) / best[servers[1]]:.2f}x")
PY
