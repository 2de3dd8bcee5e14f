#!/usr/bin/env bash
# Server memory per idle connection: RSS before any client, and the peak RSS while CLIENTS
# clients sit connected in ROOMS rooms with one sender per room at 0.01 msg/s (so every client
# has received a message and its outbox has been used, then all is quiet). Server pinned to
# SERVER_CPU with one worker thread, loadgen to LOADGEN_CPU, transparent huge pages off for the
# server (`scripts/no-thp`: RSS then counts what the clients cost, 4 KiB at a time); THP=on
# leaves them as the system has them.
#
#   bash scripts/idle-memory.sh                     # the release build of this checkout
#   BIN=/path/to/other/roomcast bash scripts/idle-memory.sh
#   SERVER=floor bash scripts/idle-memory.sh        # the raw-epoll floor, one epoll thread
#   SERVER_ARGS="--tls-cert c.pem --tls-key k.pem" SCHEME=wss LOADGEN_ARGS="--tls-ca c.pem" \
#     bash scripts/idle-memory.sh                   # over TLS
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

CLIENTS=${CLIENTS:-10000}
ROOMS=${ROOMS:-50}
SERVER_CPU=${SERVER_CPU:-0}
LOADGEN_CPU=${LOADGEN_CPU:-1}
PORT=${PORT:-18090}

cargo build --release -q -p roomcast -p loadgen
wrap=scripts/no-thp
[ "${THP:-off}" = on ] && wrap=
if [ "${SERVER:-roomcast}" = floor ]; then
    BIN=$(build_floor)
    PORT=$PORT WORKERS=1 $wrap taskset -c "$SERVER_CPU" "$BIN" >/dev/null 2>&1 &
else
    BIN=${BIN:-target/release/roomcast}
    # shellcheck disable=SC2086 # SERVER_ARGS is word-split on purpose
    $wrap taskset -c "$SERVER_CPU" "$BIN" --listen "127.0.0.1:$PORT" --log warn --threads 1 ${SERVER_ARGS:-} &
fi
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
wait_for_port 127.0.0.1 "$PORT" 10
before=$(awk '/VmRSS/ {print $2}' "/proc/$server/status")
# shellcheck disable=SC2086 # LOADGEN_ARGS is word-split on purpose
taskset -c "$LOADGEN_CPU" target/release/loadgen --url "${SCHEME:-ws}://127.0.0.1:$PORT" --clients "$CLIENTS" \
    --rooms "$ROOMS" --senders-per-room 1 --rate 0.01 --duration 5 --warmup 1 \
    --connect-concurrency 128 --threads 1 -q ${LOADGEN_ARGS:-} >/dev/null
peak=$(awk '/VmHWM/ {print $2}' "/proc/$server/status")
awk -v b="$before" -v p="$peak" -v n="$CLIENTS" -v bin="$BIN" 'BEGIN {
    printf "%s: RSS before %d kB, peak with %d clients %d kB, %.2f KiB per connection\n",
        bin, b, n, p, (p - b) / n }'
