#!/usr/bin/env bash
# roomcast, the raw-epoll floor (../shared/floor, built outside the repository) and the
# Node.js `ws` peer under the same loadgen workload, side by side in one run. Every step gets a
# fresh server process; server CPU and peak RSS come from /proc (loadgen --server-pid). The
# server is pinned to SERVER_CPU and loadgen to LOADGEN_CPU so the two never share a core.
# With RUNS > 1 the servers take turns at each rate (roomcast, floor, node, roomcast, ...) and
# the table gives the median of the runs with their range. Each run starts one server later
# than the one before (run 2: floor, node, roomcast), so that no server always goes first or
# last: this VM's speed drifts within minutes, and a fixed order turned that drift into a
# difference between servers (RESULTS.md). Use an even RUNS with two servers. Raw JSON
# reports land in $OUT.
#
#   bash scripts/compare.sh                       # dialect 1 (join/chat), all three servers
#   DIALECT=subscribe bash scripts/compare.sh     # dialect 2, Node peer dialect2.js on Redis
#   RUNS=3 RATES=5 SERVERS="roomcast floor" SERVER_THREADS= bash scripts/compare.sh
#       # roomcast with its default thread count (SERVER_THREADS empty; the variable is not
#       # ROOMCAST_THREADS, which roomcast itself reads), the floor with
#       # FLOOR_WORKERS (default 1) epoll threads
#   RUNS=3 RATES=5 SERVERS="roomcast roomcast:1 floor" SERVER_THREADS= bash scripts/compare.sh
#       # roomcast:N is roomcast with --threads N, beside the other entries
#   RUNS=3 RATES=5 SERVERS="roomcast roomcast-queued floor" SERVER_THREADS= bash scripts/compare.sh
#       # roomcast-queued[:N] is roomcast with --direct-write false: every frame goes through
#       # the recipient's session, as before direct writes
#   RUNS=3 RATES=160 SERVERS="old=/tmp/roomcast-old roomcast floor" SERVER_THREADS= bash scripts/compare.sh
#       # LABEL=PATH[:N] is the roomcast binary at PATH (two builds in one run), reported as LABEL
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
RUNS=${RUNS:-1}
SERVER_THREADS=${SERVER_THREADS-1}
FLOOR_WORKERS=${FLOOR_WORKERS:-1}
# The floor speaks dialect 1 only.
if [[ "$DIALECT" == join ]]; then SERVERS=${SERVERS:-roomcast floor node}; else SERVERS=${SERVERS:-roomcast node}; fi
SERVER_CPU=${SERVER_CPU:-0}
LOADGEN_CPU=${LOADGEN_CPU:-1}
PORT=${PORT:-18080}
OUT=${OUT:-target/compare}

mkdir -p "$OUT"
cargo build --release -q -p roomcast -p loadgen
if [[ " $SERVERS " == *" floor "* ]]; then
    FLOOR_BIN=$(build_floor)
fi
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
    local name=$1 bin=${ROOMCAST_BIN:-target/release/roomcast}
    if [[ "$name" == *=* ]]; then
        bin=${name#*=}
        name=roomcast
        if [[ "$bin" =~ ^(.*):([0-9]+)$ ]]; then
            bin=${BASH_REMATCH[1]}
            name=roomcast:${BASH_REMATCH[2]}
        fi
    fi
    case "$name" in
        roomcast | roomcast:* | roomcast-queued | roomcast-queued:*)
            # The ladder's senders reach 160 msg/s into rooms of 200, past the default inbound
            # limits (100 frames/s, and 2,000 deliveries/s of fan-out per connection): lift them
            # so the ladder measures fan-out, not throttling.
            # roomcast:N runs it with --threads N, so two thread counts can share one run.
            local n=$SERVER_THREADS threads=()
            [[ "$name" == *:* ]] && n=${name#*:}
            [[ -n "$n" ]] && threads=(--threads "$n")
            [[ "$name" == roomcast-queued* ]] && threads+=(--direct-write false)
            taskset -c "$SERVER_CPU" "$bin" --listen "127.0.0.1:$PORT" \
                "${threads[@]}" --log warn --inbound-frames-per-sec 1000 --inbound-frames-burst 2000 \
                --inbound-fanout-per-sec 0 &
            ;;
        floor)
            PORT=$PORT WORKERS=$FLOOR_WORKERS taskset -c "$SERVER_CPU" "$FLOOR_BIN" >&2 &
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

read -ra entries <<< "$SERVERS"
for run in $(seq 1 "$RUNS"); do
for rate in ${RATES//,/ }; do
    for k in "${!entries[@]}"; do
        entry=${entries[$(((k + run - 1) % ${#entries[@]}))]}
        name=${entry%%=*}
        start_server "$entry"
        echo "== $name, $DIALECT, rate $rate/s per sender, run $run" >&2
        taskset -c "$LOADGEN_CPU" target/release/loadgen --url "ws://127.0.0.1:$PORT" \
            --clients "$CLIENTS" --rooms "$ROOMS" --senders-per-room "$SENDERS" \
            --payload "$PAYLOAD" --rate "$rate" --duration "$DURATION" --warmup "$WARMUP" \
            --dialect "$DIALECT" --threads 1 --connect-concurrency 128 \
            --server-pid "$server_pid" --json "$OUT/$name-$DIALECT-$rate-$run.json" -q \
            > "$OUT/$name-$DIALECT-$rate-$run.txt" 2>&1 || true
        curl -sf "http://127.0.0.1:$PORT/healthz" > "$OUT/$name-$DIALECT-$rate-$run.health.json" 2>/dev/null || true
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=""
        # A fresh port per step: no TIME_WAIT or late client of the last server in the way.
        PORT=$((PORT + 1))
    done
done
done

python3 - "$OUT" "$DIALECT" "$RATES" "$RUNS" $SERVERS <<'PY'
import json, os, statistics, sys
out, dialect, rates, runs = sys.argv[1], sys.argv[2], sys.argv[3].split(","), int(sys.argv[4])
servers = [entry.split("=")[0] for entry in sys.argv[5:]]
def med(xs, fmt):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    m = fmt.format(statistics.median(xs))
    return m if len(xs) == 1 else f"{m} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"
print(f"Medians of {runs} run(s), range in brackets.\n")
print("| server | rate/sender | deliveries/s | loss | p50 ms | p99 ms | p99.9 ms | server CPU µs/delivery | loadgen CPU µs/delivery | server peak RSS MiB | frames/write | sustainable |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
best = {}
for name in servers:
    for rate in rates:
        rs = []
        for n in range(1, runs + 1):
            path = os.path.join(out, f"{name}-{dialect}-{rate}-{n}.json")
            if not os.path.exists(path):
                print(f"| {name} | {rate} | (no report: see {path[:-5]}.txt) |||||||||")
                continue
            r = json.load(open(path))
            try:
                r["fpw"] = json.load(open(path[:-5] + ".health.json"))["frames_per_write"]
            except Exception:
                r["fpw"] = None
            rs.append(r)
        if not rs:
            continue
        m = lambda k: [r["measured"][k] for r in rs]
        lat = lambda k: [r["measured"]["latency"][k] / 1000 for r in rs]
        ok = all(r["measured"]["sustainable"] and r["totals"]["lost"] == 0 for r in rs)
        if ok:
            best[name] = max(best.get(name, 0), statistics.median(m("deliveries_per_s")))
        print(f"| {name} | {rate} | {med(m('deliveries_per_s'), '{:,.0f}')} | {med([r['totals']['loss_pct'] for r in rs], '{:.3f}')}% | "
              f"{med(lat('p50_us'), '{:.2f}')} | {med(lat('p99_us'), '{:.2f}')} | {med(lat('p999_us'), '{:.2f}')} | "
              f"{med(m('server_cpu_us_per_delivery'), '{:.2f}')} | {med(m('loadgen_cpu_us_per_delivery'), '{:.2f}')} | "
              f"{med([r['server']['peak_rss_kb'] / 1024 for r in rs], '{:.1f}')} | {med([r['fpw'] for r in rs], '{:.2f}')} | "
              f"{'yes' if ok else 'no'} |")
print()
for name in servers:
    print(f"- highest sustainable (no loss, p99 < 100 ms, every run) for {name}: {best.get(name, 0):,.0f} deliveries/s")
if len(servers) >= 2 and best.get(servers[1]):
    print(f"- ratio {servers[0]}/{servers[1]}: {best.get(servers[0], 0) / best[servers[1]]:.2f}x")
PY
