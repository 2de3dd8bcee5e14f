#!/usr/bin/env bash
# Regenerates docs/demo.png and docs/dashboard.png (shown in README.md) with headless chromium:
# the demo page with two people chatting, and the dashboard after ten seconds of traffic.
# Installs chromium and chromium-driver from Debian when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
need_browser
ROOMCAST_SCREENSHOTS="$PWD/docs" cargo nextest run -p roomcast --test browser \
    --run-ignored only screenshots
ls -l docs/demo.png docs/dashboard.png
