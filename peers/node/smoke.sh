#!/usr/bin/env bash
# Smoke test for the baseline Node.js peers.
# Starts dialect1.js, then a private redis-server plus two dialect2.js nodes,
# each on a free loopback port, drives them with smoke-client.js, and stops
# everything it started. Exit status 0 means every check passed.
set -euo pipefail
cd "$(dirname "$0")"

[ -d node_modules ] || npm ci --no-audit --no-fund

LOGDIR=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$LOGDIR"
}
trap cleanup EXIT

free_port() {
  node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
}

wait_port() { # port name logfile
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "$2 did not open port $1; its log:" >&2
  cat "$3" >&2 || true
  exit 1
}

failed=0

echo "== dialect1 (in memory)"
P1=$(free_port)
PORT=$P1 node dialect1.js >"$LOGDIR/d1.log" 2>&1 &
PIDS+=($!)
wait_port "$P1" dialect1 "$LOGDIR/d1.log"
node smoke-client.js dialect1 "ws://127.0.0.1:$P1" || failed=1
kill -0 "${PIDS[0]}" 2>/dev/null || { echo "dialect1 server died" >&2; cat "$LOGDIR/d1.log" >&2; failed=1; }

echo "== dialect2 (redis pub/sub, two nodes)"
RP=$(free_port)
redis-server --port "$RP" --bind 127.0.0.1 --save '' --appendonly no --daemonize no >"$LOGDIR/redis.log" 2>&1 &
PIDS+=($!)
wait_port "$RP" redis-server "$LOGDIR/redis.log"
REDIS_URL="redis://127.0.0.1:$RP"
N1=$(free_port)
REDIS_URL=$REDIS_URL PORT=$N1 node dialect2.js >"$LOGDIR/n1.log" 2>&1 &
PIDS+=($!)
N2=$(free_port)
while [ "$N2" = "$N1" ]; do N2=$(free_port); done
REDIS_URL=$REDIS_URL PORT=$N2 node dialect2.js >"$LOGDIR/n2.log" 2>&1 &
PIDS+=($!)
wait_port "$N1" dialect2-node1 "$LOGDIR/n1.log"
wait_port "$N2" dialect2-node2 "$LOGDIR/n2.log"
node smoke-client.js dialect2 "ws://127.0.0.1:$N1" "ws://127.0.0.1:$N2" "$REDIS_URL" || failed=1
for i in 2 3; do
  kill -0 "${PIDS[$i]}" 2>/dev/null || { echo "dialect2 node died" >&2; cat "$LOGDIR"/n*.log >&2; failed=1; }
done

if [ "$failed" -ne 0 ]; then
  echo "== server logs" >&2
  tail -n +1 "$LOGDIR"/*.log >&2
  echo "SMOKE FAILED"
  exit 1
fi
echo "SMOKE PASSED"
