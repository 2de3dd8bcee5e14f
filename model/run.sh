#!/usr/bin/env bash
# Runs the loom model of the outbox's ownership word (every interleaving of two publishers and
# a draining, closing session, within loom's preemption bound).
#   bash model/run.sh
set -euo pipefail
cd "$(dirname "$0")"
export RUSTFLAGS="--cfg loom ${RUSTFLAGS:-}"
export LOOM_MAX_PREEMPTIONS=${LOOM_MAX_PREEMPTIONS:-3}
cargo test --release --target-dir "${MODEL_TARGET_DIR:-../target/model}" -- --test-threads 1 "$@"
