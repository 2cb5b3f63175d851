#!/usr/bin/env bash
# Make sure Debian's nginx is installed (tests/test_nginx.py runs a real one). Idempotent; run as root.
# Nothing is started or enabled here: the tests launch their own nginx with their own config.
set -euo pipefail
NGINX=/usr/sbin/nginx
if [ -x "$NGINX" ]; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# nginx-light is the smallest build (older Debian/Ubuntu); newer releases ship a single `nginx` package.
if ! apt-get install -y -qq --no-install-recommends nginx-light; then
  apt-get install -y -qq --no-install-recommends nginx
fi
# The package's postinst may start the stock server on :80 (where an init system runs it); stop it.
if [ -f /run/nginx.pid ]; then
  "$NGINX" -s quit 2>/dev/null || true
fi
"$NGINX" -v
