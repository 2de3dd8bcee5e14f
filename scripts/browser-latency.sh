#!/usr/bin/env bash
# How long a message sent from one demo page takes to appear on another, measured in the
# browser, while 10,000 loadgen clients share the room: one roomcast (release build), loadgen
# with all its clients in one room (2 senders at 5 msg/s each, 100,000 deliveries/s), and ten
# headless chromium pages in that room, each sending a message a second for 20 s
# (tests/browser.rs, `browser_latency`). Nothing is pinned: the server, loadgen and ten
# browsers share the two cores, as a demo on a laptop would.
#
#   bash scripts/browser-latency.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
need_browser
cargo build --release -q -p roomcast -p loadgen
PORT=${PORT:-18090}
SERVER_ARGS=${SERVER_ARGS:-}
OUT=${OUT:-target/browser-latency}; mkdir -p "$OUT"
ulimit -n 20000
# The per-sender fan-out budget is lifted (as in scripts/cluster.sh): by default a sender may
# cause 2,000 deliveries/s, so into a room of 10,000 a page may send one message every 5 s.
target/release/roomcast --listen 127.0.0.1:$PORT --log warn --inbound-fanout-per-sec 0 $SERVER_ARGS & S=$!
trap 'kill $S $L 2>/dev/null; wait 2>/dev/null' EXIT
L=''
wait_for_port 127.0.0.1 $PORT 10
target/release/loadgen --url ws://127.0.0.1:$PORT --clients 10000 --rooms 1 --senders-per-room 2 \
    --payload 64 --rate 5 --duration 60 --warmup 2 --drain 20s --threads 1 --server-pid $S \
    --json "$OUT/loadgen.json" -q > "$OUT/loadgen.txt" 2>&1 & L=$!
# Let loadgen connect its clients and start sending before the pages open.
sleep 15
ROOMCAST_HTTP=http://127.0.0.1:$PORT ROOMCAST_ROOM=lg-0 cargo nextest run -p roomcast \
    --test browser --run-ignored only browser_latency --no-capture 2>&1 | grep '^LATENCY' | tee "$OUT/latency.txt"
wait $L || true
grep -E "deliveries/s|lost|p99" "$OUT/loadgen.txt" | head -5
