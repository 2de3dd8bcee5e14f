#!/usr/bin/env bash
# Soak: one roomcast process under steady load for DURATION seconds (default 10 minutes), with
# 10% of the non-sender clients that stop reading (the server should close them as slow
# consumers, 1008) and 5% of the rest that close and reconnect every 5 s. The server's VmRSS is
# sampled from /proc every SAMPLE_EVERY seconds into $OUT/rss.csv (seconds,rss_kb), and
# /healthz into $OUT/healthz.csv (seconds,connections,slow_consumers_closed,messages_in,
# deliveries); seconds count from loadgen's start.
#
# It passes (exit 0) when all of these hold, and exits 1 otherwise:
#   1. nothing crashed: loadgen exited 0 and wrote its JSON report, the server process is still
#      alive (and answers /healthz) when loadgen is done, and the server log has no panic;
#   2. the healthy clients (neither stalled nor reconnecting) lost nothing: in soak.json
#      totals.lost == 0, and duplicates, order violations and misrouted are 0 too;
#   3. RSS stopped growing after warm-up: the RSS samples of the measured window (the
#      DURATION seconds after warm-up) are split into thirds by time, and the largest sample in
#      the last third is at most RSS_TOLERANCE_PCT (10) percent above the largest in the middle
#      third. (The first third is left out: the stalled clients' queues fill up and are then
#      closed in it.) The window must span at least three sampling steps.
#
# Writes $OUT/soak.json (loadgen --json), loadgen.txt (its report), server.log, rss.csv,
# healthz.csv, rss.svg (RSS over time, hand-written SVG) and summary.md (figures and checks).
#
#   RATE=80 bash scripts/soak.sh                       # the 10-minute soak
#   DURATION=40 WARMUP=10 CLIENTS=2000 bash scripts/soak.sh   # a quick check of the script
#
# Knobs (environment): CLIENTS (10000), ROOMS (50), SENDERS (2 per room), RATE (50 msg/s per
# sender; a placeholder: pass half of the highest sustainable rate), DURATION (600), WARMUP
# (30), STALL (0.1), RECONNECT (0.05), RECONNECT_EVERY (5), SAMPLE_EVERY (10),
# RSS_TOLERANCE_PCT (10), PORT (18090; the next free one is used if taken), OUT (target/soak),
# BUILD (1; 0 uses the binaries as they are), SERVER_ARGS and LOADGEN_ARGS (extra flags),
# SERVER_CPU and LOADGEN_CPU (pin each to a core with taskset, as scripts/compare.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-10000}
ROOMS=${ROOMS:-50}
SENDERS=${SENDERS:-2}
RATE=${RATE:-50}
DURATION=${DURATION:-600}
WARMUP=${WARMUP:-30}
STALL=${STALL:-0.1}
RECONNECT=${RECONNECT:-0.05}
RECONNECT_EVERY=${RECONNECT_EVERY:-5}
SAMPLE_EVERY=${SAMPLE_EVERY:-10}
RSS_TOLERANCE_PCT=${RSS_TOLERANCE_PCT:-10}
PORT=${PORT:-18090}
OUT=${OUT:-target/soak}
BUILD=${BUILD:-1}
SERVER_ARGS=${SERVER_ARGS:-}
LOADGEN_ARGS=${LOADGEN_ARGS:-}
SERVER_CPU=${SERVER_CPU:-}
LOADGEN_CPU=${LOADGEN_CPU:-}

mkdir -p "$OUT"
rm -f "$OUT"/{soak.json,loadgen.txt,server.log,rss.csv,healthz.csv,rss.svg,summary.md}
if [[ "$BUILD" != 0 ]]; then
    cargo build --release -q -p roomcast -p loadgen
fi

# 10k connections need 10k descriptors in the server too.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for _ in $(seq 1 50); do
    port_busy "$PORT" || break
    PORT=$((PORT + 1))
done
if port_busy "$PORT"; then
    echo "soak: no free port found" >&2
    exit 2
fi

pin() { if [[ -n "$1" ]]; then echo "taskset -c $1"; fi; }

server_pid=""
sampler_pid=""
cleanup() {
    [[ -n "$sampler_pid" ]] && kill "$sampler_pid" 2>/dev/null || true
    [[ -n "$server_pid" ]] && kill "$server_pid" 2>/dev/null || true
}
trap cleanup EXIT

# shellcheck disable=SC2046,SC2086
$(pin "$SERVER_CPU") target/release/roomcast --listen "127.0.0.1:$PORT" $SERVER_ARGS \
    >"$OUT/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do
    if port_busy "$PORT"; then break; fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "soak: roomcast did not start:" >&2
        cat "$OUT/server.log" >&2
        exit 1
    fi
    sleep 0.1
done

# True while the process exists and is not a zombie (a crashed child stays one until reaped).
alive() {
    local state
    state=$(awk '{ sub(/.*\) /, ""); print $1 }' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n "$state" && "$state" != Z ]]
}

t0=$EPOCHREALTIME
elapsed() { awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
sample() {
    local t rss h
    t=$(elapsed)
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$server_pid/status" 2>/dev/null || true)
    [[ -n "$rss" ]] && echo "$t,$rss" >>"$OUT/rss.csv"
    h=$(curl -s -m 2 "http://127.0.0.1:$PORT/healthz" || true)
    if [[ -n "$h" ]]; then
        local f
        f() { sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p" <<<"$h"; }
        echo "$t,$(f connections),$(f slow_consumers_closed),$(f messages_in),$(f deliveries)" \
            >>"$OUT/healthz.csv"
    fi
}
echo "seconds,rss_kb" >"$OUT/rss.csv"
echo "seconds,connections,slow_consumers_closed,messages_in,deliveries" >"$OUT/healthz.csv"
sample # the baseline, before loadgen starts
(
    set +e
    i=1
    while alive "$server_pid"; do
        # Sleep to the next multiple of SAMPLE_EVERY, so the samples do not drift.
        sleep "$(awk -v a="$t0" -v b="$EPOCHREALTIME" -v s="$SAMPLE_EVERY" -v i="$i" \
            'BEGIN { d = a + i * s - b; printf "%.3f", (d > 0 ? d : 0) }')"
        sample
        i=$((i + 1))
    done
) &
sampler_pid=$!

echo "soak: roomcast pid $server_pid on 127.0.0.1:$PORT; $CLIENTS clients, $RATE/s per sender," \
    "warm-up $WARMUP s + $DURATION s; output in $OUT" >&2
loadgen_rc=0
# shellcheck disable=SC2046,SC2086
$(pin "$LOADGEN_CPU") target/release/loadgen --url "ws://127.0.0.1:$PORT" \
    --clients "$CLIENTS" --rooms "$ROOMS" --senders-per-room "$SENDERS" --rate "$RATE" \
    --duration "$DURATION" --warmup "$WARMUP" --stall-fraction "$STALL" \
    --reconnect-fraction "$RECONNECT" --reconnect-every "$RECONNECT_EVERY" \
    --server-pid "$server_pid" --json "$OUT/soak.json" $LOADGEN_ARGS \
    >"$OUT/loadgen.txt" || loadgen_rc=$?
kill "$sampler_pid" 2>/dev/null || true
wait "$sampler_pid" 2>/dev/null || true
sampler_pid=""
sample

server_alive=no
if alive "$server_pid" && curl -s -m 2 -o /dev/null "http://127.0.0.1:$PORT/healthz"; then
    server_alive=yes
fi
# Stop the server gracefully; how it exits is reported, not judged.
kill -TERM "$server_pid" 2>/dev/null || true
server_rc=0
wait "$server_pid" 2>/dev/null || server_rc=$?
server_pid=""
panics=$(grep -c "panicked" "$OUT/server.log" || true)

cat "$OUT/loadgen.txt"
echo
echo "server exit status after SIGTERM: $server_rc"
set +e
python3 scripts/plot_rss.py "$OUT" --duration "$DURATION" --warmup "$WARMUP" \
    --tolerance "$RSS_TOLERANCE_PCT" --server-alive "$server_alive" \
    --loadgen-rc "$loadgen_rc" --panics "${panics:-0}"
verdict=$?
set -e
echo
echo "soak: figures in $OUT/summary.md, plot in $OUT/rss.svg"
exit "$verdict"
