#!/usr/bin/env bash
# Soak: one roomcast process under steady load for DURATION seconds (default 10 minutes), with
# 10% of the non-sender clients that stop reading (the server should close them as slow
# consumers, 1008) and 5% of the rest that close and reconnect every 5 s. loadgen samples the
# server's VmRSS every SAMPLE_EVERY seconds itself (--server-pid, --rss-every) and reports the
# samples, seconds since its start, in soak.json; /healthz is read once at the end.
#
# It passes (exit 0) when all of these hold, and exits 1 otherwise:
#   1. nothing crashed: loadgen exited 0 and wrote its JSON report, the server process is still
#      alive (and answers /healthz) when loadgen is done, and the server log has no panic;
#   2. the healthy clients (neither stalled nor reconnecting) lost nothing: in soak.json
#      totals.lost == 0, and duplicates, order violations and misrouted are 0 too;
#   3. RSS stopped growing after warm-up: the RSS samples of the measured window (the
#      DURATION seconds after warm-up) are split into thirds by time, and the largest sample in
#      the last third is at most RSS_TOLERANCE_PCT (10) percent above the largest in the middle
#      third (loadgen reports both as server.rss_trend). The first third is left out: the
#      stalled clients' queues fill up and are then closed in it. The window must span at least
#      three sampling steps.
#
# Writes $OUT/soak.json (loadgen --json), loadgen.txt (its report), server.log, rss.csv
# (seconds,rss_kb, from soak.json), healthz.json (at the end), rss.svg (RSS over time, loadgen
# --rss-plot) and summary.md (figures and checks).
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
source scripts/lib.sh

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
rm -f "$OUT"/{soak.json,loadgen.txt,server.log,rss.csv,healthz.csv,healthz.json,rss.svg,summary.md}
if [[ "$BUILD" != 0 ]]; then
    cargo build --release -q -p roomcast -p loadgen
fi

# 10k connections need 10k descriptors in the server too.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

for _ in $(seq 1 50); do
    port_open 127.0.0.1 "$PORT" || break
    PORT=$((PORT + 1))
done
if port_open 127.0.0.1 "$PORT"; then
    echo "soak: no free port found" >&2
    exit 2
fi

pin() { if [[ -n "$1" ]]; then echo "taskset -c $1"; fi; }

server_pid=""
cleanup() {
    [[ -n "$server_pid" ]] && kill "$server_pid" 2>/dev/null || true
}
trap cleanup EXIT

# The inbound limits are lifted: a RATE above 100 frames/s, or above 2,000 deliveries/s of
# fan-out per sender (10 msg/s into a room of 200), must measure the soak, not the throttle.
# shellcheck disable=SC2046,SC2086
$(pin "$SERVER_CPU") target/release/roomcast --listen "127.0.0.1:$PORT" --inbound-frames-per-sec 1000 \
    --inbound-frames-burst 2000 --inbound-fanout-per-sec 0 $SERVER_ARGS \
    >"$OUT/server.log" 2>&1 &
server_pid=$!
if ! wait_for_port 127.0.0.1 "$PORT" 10; then
    echo "soak: roomcast did not start:" >&2
    cat "$OUT/server.log" >&2
    exit 1
fi

# True while the process exists and is not a zombie (a crashed child stays one until reaped).
# The state is the field after the command name, which ends at the last ')'.
alive() {
    local stat
    { stat=$(<"/proc/$1/stat"); } 2>/dev/null || return 1
    stat=${stat##*) }
    [[ -n "$stat" && "${stat%% *}" != Z ]]
}

echo "soak: roomcast pid $server_pid on 127.0.0.1:$PORT; $CLIENTS clients, $RATE/s per sender," \
    "warm-up $WARMUP s + $DURATION s; output in $OUT" >&2
loadgen_rc=0
# shellcheck disable=SC2046,SC2086
$(pin "$LOADGEN_CPU") target/release/loadgen --url "ws://127.0.0.1:$PORT" \
    --clients "$CLIENTS" --rooms "$ROOMS" --senders-per-room "$SENDERS" --rate "$RATE" \
    --duration "$DURATION" --warmup "$WARMUP" --stall-fraction "$STALL" \
    --reconnect-fraction "$RECONNECT" --reconnect-every "$RECONNECT_EVERY" \
    --server-pid "$server_pid" --rss-every "$SAMPLE_EVERY" --rss-plot "$OUT/rss.svg" \
    --json "$OUT/soak.json" $LOADGEN_ARGS >"$OUT/loadgen.txt" || loadgen_rc=$?

server_alive=no
if alive "$server_pid" && curl -s -m 2 -o "$OUT/healthz.json" "http://127.0.0.1:$PORT/healthz"; then
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
python3 - "$OUT" "$RSS_TOLERANCE_PCT" "$server_alive" "$loadgen_rc" "${panics:-0}" <<'PY'
# Judges the run from soak.json (and healthz.json); writes rss.csv and summary.md.
import json, os, sys

out, tolerance, alive, loadgen_rc, panics = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])

def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

mib = lambda kb: kb / 1024.0
report, health = load("soak.json"), load("healthz.json") or {}
checks = [  # (name, ok, detail)
    ("loadgen finished", loadgen_rc == 0 and report is not None,
     f"exit {loadgen_rc}" + ("" if report else ", no JSON report")),
    ("server alive at the end", alive == "yes", "yes" if alive == "yes" else "no: it crashed or exited"),
    ("no panics in the server log", panics == 0, f"{panics}"),
]
lines, samples = [], []
if report:
    c, t, m, k = report["config"], report["totals"], report["measured"], report["connect"]
    lat = m["latency"]
    roles = report.get("roles") or {}
    st, rc = roles.get("stalled", {}), roles.get("reconnecting", {})
    server = report.get("server") or {}
    samples = [(s["t_s"], s["rss_kb"]) for s in server.get("rss_samples", [])]
    ws, we = report["measured_window_s"]
    faults = t["lost"] + t["duplicates"] + t["order_violations"] + t["misrouted"]
    checks.append(("healthy clients lost nothing", faults == 0 and t["expected"] > 0,
                   f"lost {t['lost']} of {t['expected']}, duplicates {t['duplicates']}, "
                   f"order violations {t['order_violations']}, misrouted {t['misrouted']}"))
    trend = server.get("rss_trend")
    if trend:
        mid, last = trend["middle_third_max_kb"], trend["last_third_max_kb"]
        checks.append(("RSS stopped growing after warm-up", last <= mid * (1 + tolerance / 100),
                       f"max in last third {mib(last):.1f} MiB vs middle third {mib(mid):.1f} MiB "
                       f"({trend['growth_pct']:+.1f}%, limit +{tolerance:g}%)"))
    else:
        checks.append(("RSS stopped growing after warm-up", False,
                       "too few samples (the measured window must span at least three sampling steps)"))
    lines += [
        f"- load: {c['clients']} clients in {c['rooms']} rooms, {c['senders']} senders at "
        f"{c['rates'][0]}/s each ({m['offered_msgs_per_s']:.0f} msg/s offered, "
        f"{m['deliveries_per_s']:.0f} deliveries/s), payload {c['payload_bytes']} B, "
        f"warm-up {c['warmup_s']:g} s + {c['duration_s']:g} s measured",
        f"- connected {k['connected']}/{k['attempted']} in {k['total_s']:.1f} s, not ready {k['not_ready']}",
        f"- healthy clients: {roles.get('healthy_clients', k['connected'])}; messages sent "
        f"{t['sent']}, deliveries expected {t['expected']}, received {t['received']}, "
        f"lost {t['lost']}, duplicates {t['duplicates']}, order violations "
        f"{t['order_violations']}, misrouted {t['misrouted']}; server errors {report['server_errors']}",
        f"- healthy latency (measured window): p50 {lat['p50_us'] / 1000:.2f} / p99 "
        f"{lat['p99_us'] / 1000:.2f} / p99.9 {lat['p999_us'] / 1000:.2f} / max {lat['max_us'] / 1000:.2f} ms",
    ]
    if roles:
        reasons = ", ".join(f"{r} x {n}" for r, n in st.get("close_reasons", {}).items())
        lines += [
            f"- stalled clients: {st.get('clients', 0)}; closed by server: "
            f"{st.get('closed_by_server', 0)} ({reasons or 'none'}); still open at the end: "
            f"{st.get('still_open', 0)}",
            f"- reconnecting clients: {rc.get('clients', 0)} every {rc.get('every_s', 0):g} s; "
            f"reconnects {rc.get('reconnects', 0)}, failed {rc.get('failed', 0)}; "
            f"deliveries received {rc.get('received', 0)} (not checked)",
        ]
    if report.get("disconnects"):
        d = ", ".join(f"{r} x {n}" for r, n in report["disconnects"].items())
        lines.append(f"- unexpected disconnects: {d}")
    if samples:
        kbs = [kb for _, kb in samples]
        before = [kb for s, kb in samples if s <= ws] or kbs[:1]
        lines.append(f"- server RSS: {mib(kbs[0]):.1f} MiB at start, {mib(max(before)):.1f} MiB max "
                     f"by the end of warm-up, peak {mib(max(kbs)):.1f} MiB, {mib(kbs[-1]):.1f} MiB "
                     f"at the end ({len(samples)} samples)")
    lines.append(f"- measured window at {ws:.1f}-{we:.1f} s after loadgen start; thirds of {(we - ws) / 3:.1f} s")
else:
    checks.append(("RSS stopped growing after warm-up", False, "no loadgen report, so no RSS samples"))
if health:
    lines.append(f"- /healthz at the end: {health.get('connections')} connections, "
                 f"slow consumers closed (server's count): {health.get('slow_consumers_closed')}")

with open(os.path.join(out, "rss.csv"), "w") as f:
    f.write("seconds,rss_kb\n" + "".join(f"{s:.1f},{kb}\n" for s, kb in samples))
ok = all(c[1] for c in checks)
text = [f"## soak: {'PASS' if ok else 'FAIL'}", ""] + lines
text += ["", "| check | result | detail |", "|---|---|---|"]
text += [f"| {n} | {'PASS' if k else 'FAIL'} | {d} |" for n, k, d in checks]
table = ["", "| seconds | RSS (MiB) |", "|---:|---:|"] + [f"| {s:.0f} | {mib(kb):.1f} |" for s, kb in samples]
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(text + table) + "\n")
print("\n".join(text))
sys.exit(0 if ok else 1)
PY
verdict=$?
set -e
echo
echo "soak: figures in $OUT/summary.md, plot in $OUT/rss.svg"
exit "$verdict"
