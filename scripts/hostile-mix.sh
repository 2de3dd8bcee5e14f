#!/usr/bin/env bash
# The hostile mix: 10,000 clients, 50 rooms, 2 senders per room at 2 msg/s (a sustainable
# rate), alone and with 10 flooders plus 10 ping flooders in its rooms (loadgen --flooders
# --pingers), at the server's default limits. Interleaved runs, a fresh server per run, server
# on SERVER_CPU, loadgen on LOADGEN_CPU. Prints each run and the medians (with ranges) of the
# healthy clients' loss and p99 and the server's peak RSS; flood messages the server accepted
# are its messages_in less the clean run's.
#
#   bash scripts/hostile-mix.sh           # RUNS=3 DURATION=20 RATE=2 FLOODERS=10 PINGERS=10;
#                                         SERVER_ARGS / LOADGEN_ARGS add flags to either process
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

RUNS=${RUNS:-3}
DURATION=${DURATION:-20}
RATE=${RATE:-2}
FLOODERS=${FLOODERS:-10}
PINGERS=${PINGERS:-10}
SERVER_CPU=${SERVER_CPU:-0}
LOADGEN_CPU=${LOADGEN_CPU:-1}
PORT=${PORT:-18600}
OUT=${OUT:-target/hostile-mix}
mkdir -p "$OUT"
cargo build --release -q -p roomcast -p loadgen

for run in $(seq 1 "$RUNS"); do
    for mix in clean hostile; do
        # Both mixes report rooms 0..FLOODERS (where the flooders go) and the rest apart.
        extra=(--split-rooms "$FLOODERS")
        [ "$mix" = hostile ] && extra+=(--flooders "$FLOODERS" --pingers "$PINGERS")
        # shellcheck disable=SC2086
        taskset -c "$SERVER_CPU" target/release/roomcast --listen "127.0.0.1:$PORT" --log warn ${SERVER_ARGS:-} &
        pid=$!
        wait_for_port 127.0.0.1 "$PORT" 10
        # shellcheck disable=SC2086
        taskset -c "$LOADGEN_CPU" target/release/loadgen --url "ws://127.0.0.1:$PORT" --clients 10000 \
            --rooms 50 --senders-per-room 2 --rate "$RATE" --duration "$DURATION" --server-pid "$pid" \
            --json "$OUT/$mix-$run.json" -q ${LOADGEN_ARGS:-} "${extra[@]}" >"$OUT/$mix-$run.txt" 2>&1 || true
        curl -s "http://127.0.0.1:$PORT/healthz" >"$OUT/health-$mix-$run.json"
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        PORT=$((PORT + 1))
    done
done

python3 - "$OUT" "$RUNS" <<'PY'
import json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
def row(mix, n):
    r = json.load(open(f"{out}/{mix}-{n}.json"))
    h = json.load(open(f"{out}/health-{mix}-{n}.json"))
    return {"loss": r["totals"]["lost"], "p99": r["measured"]["latency"]["p99_us"] / 1000,
            "rss": r["server"]["pids"][0]["peak_rss_kb"] / 1024,
            "cpu": r["server"]["cpu_s"], "lg_cpu": r["loadgen_cpu_total_s"], "in": h["messages_in"],
            "slow": h["slow_consumers_closed"], "throttled": h["throttled"],
            "pongs": h["pongs_replaced"], "peak": h["outbox_peak_bytes"], "hostile": r.get("hostile"),
            "split": r.get("split_rooms")}
rows = {m: [row(m, n) for n in range(1, runs + 1)] for m in ("clean", "hostile")}
print("| mix | run | healthy loss | healthy p99 ms | server peak RSS MiB | server CPU s | loadgen CPU s | messages_in | slow closes | throttled | pongs replaced | outbox peak B |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for m in ("clean", "hostile"):
    for n, r in enumerate(rows[m], 1):
        print(f"| {m} | {n} | {r['loss']} | {r['p99']:.1f} | {r['rss']:.1f} | {r['cpu']:.1f} | {r['lg_cpu']:.1f} | {r['in']} | {r['slow']} | {r['throttled']} | {r['pongs']} | {r['peak']} |")
def med(m, k):
    xs = [r[k] for r in rows[m]]
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"
for m in ("clean", "hostile"):
    print(f"{m}: loss {med(m, 'loss')}, p99 {med(m, 'p99')} ms, peak RSS {med(m, 'rss')} MiB")
accepted = [h["in"] - c["in"] for h, c in zip(rows["hostile"], rows["clean"])]
print(f"flood accepted by the server (messages_in, hostile less clean): {accepted}")
for m in ("clean", "hostile"):
    for n, r in enumerate(rows[m], 1):
        sp, h = r["split"], r["hostile"]
        line = f"{m} run {n}:"
        if sp:
            k = sp["first_rooms"]
            line += (f" healthy p99 in rooms 0..{k} (the flooders' rooms) {sp['latency_first']['p99_us'] / 1000:.1f} ms,"
                     f" in the other rooms {sp['latency_rest']['p99_us'] / 1000:.1f} ms;")
        if h:
            line += f" flooders wrote {h['flooders']['written']}, pingers {h['pingers']['written']}"
        print(line)
PY
