#!/usr/bin/env bash
# Make sure Debian's Chromium is installed (tests/test_browser.py drives a real headless one through
# playwright-core). Idempotent; run as root. The browser always comes from Debian: nothing downloads one.
set -euo pipefail
CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
"$CHROMIUM" --version
