#!/usr/bin/env bash
# The dashboard in headless Chromium (tests/it/ui.rs): a gateway with traffic on several
# routes, a backend down, a spool and a dead letter; the page must show them and replay the
# dead letter. Saves the screenshot in docs/dashboard.png (SHOT=<file> for another place).
#
#   bash bench/ui-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
need chromium chromium
SHOT=${SHOT:-$PWD/docs/dashboard.png}
SWITCHYARD_UI_CHECK=1 SWITCHYARD_UI_SCREENSHOT="$SHOT" \
  cargo test --locked --test it ui:: -- --nocapture
echo "ui-check: the dashboard passed; screenshot in $SHOT"
