#!/usr/bin/env bash
# Autobahn|Testsuite (fuzzingclient mode) against `roomcast --echo`, compared case by case with
# tests/autobahn/expected.json.
#
#   bash scripts/autobahn.sh                            # run, compare, exit non-zero on a change
#   ROOMCAST_AUTOBAHN_UPDATE=1 bash scripts/autobahn.sh # run and rewrite expected.json
#   ROOMCAST_AUTOBAHN_RUNNER=kosoku bash scripts/...    # force a runner (auto | wstest | kosoku)
#
# The runner lives in .autobahn/ (git-ignored) and is reused by later runs; every cache and
# home directory the Python tools touch is pointed inside it, so nothing lands in $HOME.
# Preferred runner: wstest from autobahntestsuite on Python 2.7.18 (pyenv). Without that
# interpreter (or if its install fails) the script falls back to kosoku, a Python 3 runner of
# the same case files.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
AB=$ROOT/.autobahn
EXPECTED=$ROOT/tests/autobahn/expected.json
WSTEST_PIN=25.10.1
KOSOKU_PIN=0.1.0
RUNNER=${ROOMCAST_AUTOBAHN_RUNNER:-auto}
UPDATE=${ROOMCAST_AUTOBAHN_UPDATE:-0}
START=$SECONDS

log() { printf '[autobahn] %s\n' "$*" >&2; }

# The 2.7 interpreter, found before HOME is redirected (pyenv locates itself through HOME).
PY27=""
if command -v pyenv >/dev/null 2>&1; then
    PY27="$(pyenv root)/versions/2.7.18/bin/python"
elif [ -x "$HOME/.pyenv/versions/2.7.18/bin/python" ]; then
    PY27="$HOME/.pyenv/versions/2.7.18/bin/python"
fi
PY3=$(command -v python3)

cargo build --release -p roomcast

mkdir -p "$AB/home"
# Runs a Python tool with its home, caches and config inside .autobahn.
isolated() {
    env HOME="$AB/home" XDG_CACHE_HOME="$AB/home/.cache" XDG_DATA_HOME="$AB/home/.local/share" \
        XDG_CONFIG_HOME="$AB/home/.config" PIP_CACHE_DIR="$AB/pip-cache" \
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONDONTWRITEBYTECODE=1 \
        VIRTUALENV_OVERRIDE_APP_DATA="$AB/virtualenv-appdata" "$@"
}

install_wstest() {
    local marker=$AB/venv/.roomcast-wstest-$WSTEST_PIN
    if [ -f "$marker" ] && [ -x "$AB/venv/bin/wstest" ]; then
        return 0
    fi
    [ -n "$PY27" ] && [ -x "$PY27" ] || { log "no Python 2.7.18 interpreter"; return 1; }
    log "installing wstest (autobahntestsuite==$WSTEST_PIN) into $AB/venv"
    rm -rf "$AB/venv" "$AB/venv-tools"
    isolated "$PY27" -m pip install -q --target "$AB/venv-tools" 'virtualenv<20.16' || return 1
    isolated env PYTHONPATH="$AB/venv-tools" "$PY27" -m virtualenv -q --no-periodic-update \
        --app-data "$AB/virtualenv-appdata" "$AB/venv" || return 1
    isolated "$AB/venv/bin/pip" install -q "autobahntestsuite==$WSTEST_PIN" || return 1
    touch "$marker"
}

install_kosoku() {
    local marker=$AB/venv-kosoku/.roomcast-kosoku-$KOSOKU_PIN
    if [ -f "$marker" ] && [ -x "$AB/venv-kosoku/bin/kosoku" ]; then
        return 0
    fi
    log "installing kosoku==$KOSOKU_PIN into $AB/venv-kosoku"
    rm -rf "$AB/venv-kosoku"
    isolated "$PY3" -m venv "$AB/venv-kosoku" || return 1
    isolated "$AB/venv-kosoku/bin/pip" install -q "kosoku==$KOSOKU_PIN" || return 1
    touch "$marker"
}

case $RUNNER in
auto)
    if install_wstest; then
        RUNNER=wstest
    else
        log "wstest unavailable; falling back to kosoku"
        install_kosoku
        RUNNER=kosoku
    fi
    ;;
wstest) install_wstest ;;
kosoku) install_kosoku ;;
*)
    log "unknown ROOMCAST_AUTOBAHN_RUNNER=$RUNNER (auto, wstest or kosoku)"
    exit 2
    ;;
esac
log "runner: $RUNNER"

# The server, on a port the kernel picks; its log names the address it bound.
SERVER_LOG=$AB/server.log
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# Case 9.1.6 sends a 16 MiB message, the largest --max-message-bytes allows. The inbound limits
# are off: this checks framing, and cases 9.7/9.8 send thousands of messages as fast as they can.
"$ROOT/target/release/roomcast" --listen 127.0.0.1:0 --echo --log info \
    --max-message-bytes 16777216 --outbox-bytes 67108864 --outbox-frames 100000 \
    --inbound-frames-per-sec 0 --inbound-bytes-per-sec 0 --inbound-fanout-per-sec 0 \
    >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!

healthz() {
    local port=$1
    exec 3<>"/dev/tcp/127.0.0.1/$port" || return 1
    printf 'GET /healthz HTTP/1.1\r\nHost: autobahn\r\nConnection: close\r\n\r\n' >&3
    local reply
    reply=$(timeout 5 cat <&3) || true
    exec 3<&-
    [[ $reply == "HTTP/1.1 200"* ]]
}
PORT=""
for _ in $(seq 1 100); do
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$SERVER_LOG" >&2; log "server exited"; exit 1; }
    if [ -z "$PORT" ]; then
        PORT=$(sed 's/\x1b\[[0-9;]*m//g' "$SERVER_LOG" |
            grep -oE 'listening on 127\.0\.0\.1:[0-9]+' | head -n1 | cut -d: -f2 || true)
    fi
    if [ -n "$PORT" ] && healthz "$PORT" 2>/dev/null; then
        break
    fi
    sleep 0.1
done
healthz "$PORT" || { cat "$SERVER_LOG" >&2; log "server not healthy"; exit 1; }
URL="ws://127.0.0.1:$PORT/echo"
log "server pid $SERVER_PID on $URL"

# Run every case, 12.x and 13.x (permessage-deflate) included: roomcast offers no compression,
# so those must come out UNIMPLEMENTED.
REPORTS=$AB/reports
rm -rf "$REPORTS"
mkdir -p "$REPORTS"
RUN_LOG=$AB/runner.log
log "running all cases (log: $RUN_LOG)"
set +e
case $RUNNER in
wstest)
    cat >"$AB/spec.json" <<EOF
{
  "outdir": "$REPORTS",
  "servers": [{"agent": "roomcast", "url": "$URL"}],
  "cases": ["*"],
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
EOF
    (cd "$AB" && isolated timeout 300 "$AB/venv/bin/wstest" -m fuzzingclient -s "$AB/spec.json") \
        >"$RUN_LOG" 2>&1
    ;;
kosoku)
    # kosoku exits 1 when any case is not OK/NON-STRICT/INFORMATIONAL (UNIMPLEMENTED included);
    # the verdicts are judged from index.json below either way.
    (cd "$AB" && isolated timeout 300 "$AB/venv-kosoku/bin/kosoku" -m fuzzingclient \
        -o "$REPORTS" "$URL") >"$RUN_LOG" 2>&1
    ;;
esac
RUN_STATUS=$?
set -e
log "runner exited with $RUN_STATUS after $((SECONDS - START)) s"

if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    tail -n 50 "$SERVER_LOG" >&2
    log "FAIL: the server died during the run"
    exit 1
fi
if grep -q 'panicked' "$SERVER_LOG"; then
    grep -n -A5 'panicked' "$SERVER_LOG" >&2
    log "FAIL: the server panicked during the run"
    exit 1
fi
cleanup
SERVER_PID=""

if [ ! -f "$REPORTS/index.json" ]; then
    tail -n 40 "$RUN_LOG" >&2
    log "FAIL: no $REPORTS/index.json (runner exit $RUN_STATUS)"
    exit 1
fi

"$PY3" - "$REPORTS/index.json" "$EXPECTED" "$UPDATE" "$RUNNER" <<'PY'
import json, sys
from collections import Counter

index_path, expected_path, update, runner = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
with open(index_path) as f:
    index = json.load(f)
if len(index) != 1:
    sys.exit("[autobahn] FAIL: expected one agent in index.json, found %s" % sorted(index))
results = next(iter(index.values()))

def key(case):
    return tuple(int(p) for p in case.split("."))

got = {c: {"behavior": r["behavior"], "behaviorClose": r["behaviorClose"]}
       for c, r in sorted(results.items(), key=lambda kv: key(kv[0]))}

ACCEPTABLE = {"OK", "NON-STRICT", "INFORMATIONAL"}
def problem(case, v):
    """Why a verdict is unacceptable whatever expected.json says, or None."""
    compression = case.split(".")[0] in ("12", "13")
    for field in ("behavior", "behaviorClose"):
        b = v[field]
        if b in ACCEPTABLE or (b == "UNIMPLEMENTED" and compression):
            continue
        return "%s=%s" % (field, b)
    return None

bad = {c: problem(c, v) for c, v in got.items() if problem(c, v)}

counts = Counter(v["behavior"] for v in got.values())
close_counts = Counter(v["behaviorClose"] for v in got.values())
print("[autobahn] runner %s: %d cases; behavior %s; behaviorClose %s" % (
    runner, len(got), dict(sorted(counts.items())), dict(sorted(close_counts.items()))))
for c, v in got.items():
    if v["behavior"] in ("NON-STRICT", "INFORMATIONAL") or v["behaviorClose"] in ("NON-STRICT", "INFORMATIONAL"):
        print("[autobahn]   %-8s %s / %s" % (c, v["behavior"], v["behaviorClose"]))

if update:
    if bad:
        for c, why in bad.items():
            print("[autobahn] FAIL %s: %s" % (c, why))
        sys.exit("[autobahn] not writing %s: %d unacceptable cases" % (expected_path, len(bad)))
    with open(expected_path, "w") as f:
        # One case per line, in case order, so a change reads as a one-line diff.
        lines = ["  %s: %s" % (json.dumps(c), json.dumps(v)) for c, v in got.items()]
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
    print("[autobahn] wrote %s" % expected_path)
    sys.exit(0)

with open(expected_path) as f:
    expected = json.load(f)

diffs = []
for c in sorted(set(expected) | set(got), key=key):
    e, g = expected.get(c), got.get(c)
    if e != g:
        fmt = lambda v: "missing" if v is None else "%s / %s" % (v["behavior"], v["behaviorClose"])
        diffs.append("  %-8s expected %-30s got %s" % (c, fmt(e), fmt(g)))
for c, why in bad.items():
    print("[autobahn] FAIL %s: %s (see the case report in .autobahn/reports)" % (c, why))
if diffs:
    print("[autobahn] %d cases differ from %s:" % (len(diffs), expected_path))
    print("\n".join(diffs))
if bad or diffs:
    sys.exit(1)
print("[autobahn] all %d cases match %s" % (len(got), expected_path))
PY
log "done in $((SECONDS - START)) s"
