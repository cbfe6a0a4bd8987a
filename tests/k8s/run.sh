#!/usr/bin/env bash
# Deployment manifests test: yamllint over deploy/, kustomize renders every overlay, the objects
# validate offline (validate.mjs), and a deliberately broken copy is rejected.
set -euo pipefail
cd "$(dirname "$0")"
root=$(cd ../.. && pwd)
[ -d node_modules ] || npm ci --no-audit --no-fund --loglevel=error
yamllint -c "$root/.yamllint" "$root/deploy"
node validate.mjs "$root"

broken=$(mktemp -d)
trap 'rm -rf "$broken"' EXIT
mkdir -p "$broken/deploy" && cp -r "$root/deploy/k8s" "$broken/deploy/"
sed -i 's|app.kubernetes.io/component: server|app.kubernetes.io/component: servre|' \
  "$broken/deploy/k8s/base/service.yaml"
if node validate.mjs "$broken" >/dev/null 2>&1; then
  echo "FAIL: a Service selecting no pod was accepted" >&2
  exit 1
fi
echo "k8s manifests: valid, and a broken selector is caught"
