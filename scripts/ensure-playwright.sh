#!/usr/bin/env bash
# Make sure playwright-core (the driver library only, no bundled browser) is installed under tools/
# (gitignored) for tests/browser/captions.mjs. Idempotent. Needs node and npm on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=1.64.1
if [ -f tools/node_modules/playwright-core/package.json ] \
  && grep -q "\"version\": \"$VERSION\"" tools/node_modules/playwright-core/package.json; then
  exit 0
fi
mkdir -p tools
# playwright-core never downloads a browser on install; the test points it at Debian's /usr/bin/chromium.
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix tools --no-audit --no-fund --no-save \
  "playwright-core@$VERSION" >/dev/null
node -e "console.log('playwright-core', require('./tools/node_modules/playwright-core/package.json').version)"
