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

# A misspelt field (unknown to Kubernetes) must be rejected too.
rm -rf "$broken/deploy" && mkdir -p "$broken/deploy" && cp -r "$root/deploy/k8s" "$broken/deploy/"
sed -i 's|      terminationGracePeriodSeconds: 50|      terminationGracePeriodSecond: 50|' \
  "$broken/deploy/k8s/base/deployment.yaml"
out=$(node validate.mjs "$broken" 2>&1) && { echo "FAIL: an unknown field was accepted" >&2; exit 1; }
grep -q "terminationGracePeriodSecond: unknown field" <<<"$out" \
  || { echo "FAIL: unknown field not reported: $out" >&2; exit 1; }
echo "k8s manifests: valid; a broken selector and an unknown field are caught"
