#!/usr/bin/env bash
# Install the LiteLLM proxy (litellm[proxy] 1.109.1) into its own venv, bench/.litellm-venv, for the
# benchmark's "litellm" target. Separate from .venv on purpose: the proxy's pins must not touch ours.
#
# `litellm[proxy]==1.109.1` does not resolve against our registry as is (its exact pins on certifi,
# litellm-proxy-extras and litellm-enterprise have no matching release there), so: install the wheel with
# --no-deps, then its own requirements (base + the `proxy` extra, read from the wheel's METADATA) with
# those three pins loosened to any version.
#
# Idempotent: exits 0 at once when the venv already has this version. Exit status non-zero = not installed
# (bench.run then reports the litellm target as unavailable and carries on).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VERSION="${LITELLM_VERSION:-1.109.1}"
VENV="${LITELLM_VENV:-$HERE/.litellm-venv}"
PY="${PYTHON:-python3}"
LOOSEN="certifi litellm-proxy-extras litellm-enterprise"

STAMP="$VENV/.installed-$VERSION"
if [ -f "$STAMP" ]; then
  echo "litellm $VERSION already installed in $VENV"
  exit 0
fi

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
WHEELS="$(mktemp -d)"
trap 'rm -rf "$WHEELS"' EXIT
"$VENV/bin/pip" download -q --no-deps -d "$WHEELS" "litellm==$VERSION"
WHEEL="$(ls "$WHEELS"/litellm-"$VERSION"-*.whl)"
"$VENV/bin/pip" install -q --no-deps "$WHEEL"

# The wheel's requirements for `litellm[proxy]` on this interpreter, with the three pins loosened.
"$VENV/bin/python" - "$WHEEL" "$LOOSEN" > "$WHEELS/requirements.txt" <<'PYEOF'
import sys
import zipfile

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip's own copy
    from pip._vendor.packaging.requirements import Requirement

wheel, loosen = sys.argv[1], set(sys.argv[2].split())
with zipfile.ZipFile(wheel) as archive:
    name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = archive.read(name).decode()
for line in metadata.splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in ("", "proxy")):
        continue
    req.marker = None
    if req.name in loosen:
        req.specifier = type(req.specifier)("")
    print(req)
PYEOF
echo "installing $(wc -l < "$WHEELS/requirements.txt") requirements of litellm[proxy] $VERSION (loosened: $LOOSEN)"
"$VENV/bin/pip" install -q -r "$WHEELS/requirements.txt"
"$VENV/bin/python" -c "import litellm.proxy.proxy_server" >/dev/null
touch "$STAMP"
echo "litellm $VERSION installed in $VENV"
