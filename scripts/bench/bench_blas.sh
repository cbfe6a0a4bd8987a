#!/usr/bin/env bash
# Serving speed of the Fashion bundles with Debian's reference BLAS vs OpenBLAS, one server after
# the other on the same machine (docs/PERFORMANCE.md "CPU BLAS"). libtorch loads libblas.so.3;
# LD_LIBRARY_PATH picks which one, whatever the system's alternative says.
#   scripts/bench/bench_blas.sh [SECONDS_PER_ROW]       (after scripts/build.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-8}
declare -A dirs=([reference]=/usr/lib/x86_64-linux-gnu/blas
                 [openblas]=/usr/lib/x86_64-linux-gnu/openblas-openmp)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "| BLAS | model | c=1 images/s | c=1 p50 ms | c=16 images/s | c=16 p50 ms |"
echo "|---|---|---|---|---|---|"
for blas in reference openblas; do
  [[ -e ${dirs[$blas]}/libblas.so.3 ]] || { echo "${dirs[$blas]}/libblas.so.3 missing" >&2; exit 1; }
  LD_LIBRARY_PATH=${dirs[$blas]} build/server/dmdserve \
    --model_dirs=models/fashion-dmd,models/fashion-teacher --listen_host=127.0.0.1 --port=0 \
    --metrics_port=0 --http_port=0 --warmup_runs=1 >"$log" 2>&1 &
  pid=$!
  port=
  for _ in $(seq 600); do
    port=$(sed -n 's/.*serving port=\([0-9]*\).*/\1/p' "$log")
    [[ -n $port ]] && break
    kill -0 $pid 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.5
  done
  [[ -n $port ]] || { echo "dmdserve did not start" >&2; cat "$log" >&2; exit 1; }
  grep -q "${dirs[$blas]}" /proc/$pid/maps || { echo "$blas not loaded" >&2; exit 1; }
  for model in fashion-dmd fashion-teacher; do
    row="| $blas | $model"
    for c in 1 16; do
      row+=$(build/client/dmdctl --target=127.0.0.1:$port bench --model=$model --concurrency=$c \
        --duration_s="$seconds" --json | /usr/bin/python3 -c '
import json, sys
d = json.load(sys.stdin)
print(" | %.1f | %.1f" % (d["images_per_second"], 1000 * d["latency_seconds"]["p50"]), end="")')
    done
    echo "$row |"
  done
  kill $pid
  wait $pid || true
done
