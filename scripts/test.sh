#!/usr/bin/env bash
# The whole test suite, as README.md gives it. Installs what it needs on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

# Backplane tests start their own redis-server processes on free ports.
if ! command -v redis-server >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq redis-server
fi
# tests/browser.rs drives headless chromium through chromedriver.
source scripts/lib.sh
need_browser
if ! command -v cargo-nextest >/dev/null 2>&1; then
    cargo install cargo-nextest --locked
fi

cargo nextest run --workspace --no-fail-fast
# Every interleaving (within loom's preemption bound) of two publishers and a session on one
# connection's socket ownership word: whole frames, per-publisher order, close last, nothing
# stranded. Its own workspace, built with --cfg loom (model/run.sh).
bash model/run.sh
# RFC 6455 conformance: Autobahn|Testsuite against `roomcast --echo`, compared with
# tests/autobahn/expected.json (the runner is installed into .autobahn/ on first use).
bash scripts/autobahn.sh
