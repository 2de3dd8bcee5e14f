#!/usr/bin/env bash
# libFuzzer campaign over every target in fuzz/ (cargo-fuzz layout).
#
#   bash scripts/fuzz.sh [SECONDS]              # each target for SECONDS (default 600), in turn
#   FUZZ_JOBS=3 bash scripts/fuzz.sh 600        # up to 3 targets at once (one core each)
#   FUZZ_TARGETS="frame_parser" bash scripts/fuzz.sh 60   # a subset
#   FUZZ_ARGS="-max_len=16384" bash scripts/fuzz.sh       # extra libFuzzer flags for every run
#
# cargo-fuzz needs nightly-only rustc flags (-Zsanitizer=address, sancov passes); on a stable
# toolchain RUSTC_BOOTSTRAP=1 unlocks them. Builds are instrumented with ASan and debug
# assertions (integer overflow checks on).
#
# The committed seeds in fuzz/corpus/<target>/ are only read: libFuzzer writes new inputs to
# the first corpus directory it is given, which here is fuzz/target/corpus/<target>/ (git-
# ignored, kept between runs so campaigns build on each other). Crash reproducers land in
# fuzz/target/artifacts/<target>/ and logs in fuzz/target/logs/<target>.log.
#
# Exit status: non-zero if any target crashed, leaked, timed out or failed to build.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${1:-600}
JOBS=${FUZZ_JOBS:-1}
EXTRA=${FUZZ_ARGS:-}
export RUSTC_BOOTSTRAP=1
# `-a`: debug assertions; the same flags for build and run so run never rebuilds.
FUZZ_FLAGS=(--debug-assertions)

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

if [[ -n ${FUZZ_TARGETS:-} ]]; then
    read -r -a TARGETS <<<"$FUZZ_TARGETS"
else
    mapfile -t TARGETS < <(cargo fuzz list)
fi

echo "[fuzz] building ${TARGETS[*]}" >&2
cargo fuzz build "${FUZZ_FLAGS[@]}"

OUT=fuzz/target
mkdir -p "$OUT/logs"

run_target() {
    local t=$1
    local scratch=$OUT/corpus/$t artifacts=$OUT/artifacts/$t/ log=$OUT/logs/$t.log
    mkdir -p "$scratch" "$artifacts"
    echo "[fuzz] $t: ${DURATION}s (log: $log)" >&2
    # shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
    cargo fuzz run "${FUZZ_FLAGS[@]}" "$t" "$scratch" "fuzz/corpus/$t" -- \
        -max_total_time="$DURATION" -timeout=10 -print_final_stats=1 \
        -artifact_prefix="$artifacts" $EXTRA >"$log" 2>&1
}

summarize() {
    local t=$1 rc=$2 log=$OUT/logs/$t.log
    local done_line execs
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n1 || true)
    execs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' | tail -n1 || true)
    if [[ $rc -eq 0 ]]; then
        printf '[fuzz] %-16s ok      execs=%s  %s\n' "$t" "${execs:-?}" "$done_line"
    else
        printf '[fuzz] %-16s FAILED  exit=%s execs=%s\n' "$t" "$rc" "${execs:-?}"
        grep -E 'panicked at|ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer)|SUMMARY:|Test unit written to' \
            "$log" | head -n 12 | sed 's/^/    /'
        echo "    full log: $log" >&2
    fi
}

declare -A RC=()
if [[ $JOBS -le 1 ]]; then
    for t in "${TARGETS[@]}"; do
        if run_target "$t"; then RC[$t]=0; else RC[$t]=$?; fi
        summarize "$t" "${RC[$t]}"
    done
else
    for t in "${TARGETS[@]}"; do
        while [[ $(jobs -rp | wc -l) -ge $JOBS ]]; do sleep 1; done
        rm -f "$OUT/logs/$t.rc"
        (if run_target "$t"; then echo 0; else echo $?; fi >"$OUT/logs/$t.rc") &
    done
    wait
    for t in "${TARGETS[@]}"; do
        RC[$t]=$(cat "$OUT/logs/$t.rc" 2>/dev/null || echo 1)
        summarize "$t" "${RC[$t]}"
    done
fi

failed=0
for t in "${TARGETS[@]}"; do [[ ${RC[$t]} -eq 0 ]] || failed=1; done
if [[ $failed -ne 0 ]]; then
    echo "[fuzz] crash found: reproduce with" \
        "RUSTC_BOOTSTRAP=1 cargo fuzz run -a <target> fuzz/target/artifacts/<target>/<file>" >&2
    exit 1
fi
echo "[fuzz] all ${#TARGETS[@]} targets clean after ${DURATION}s each" >&2
