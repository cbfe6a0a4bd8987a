#!/usr/bin/env bash
# Measures dmdserve on a GPU after scripts/gpu/gpu_build.sh (docs/GPU.md, docs/PERFORMANCE.md):
#  1. the raw pipeline (worker/pipeline_benchmark, in process: no batcher, PNG or RPC): images/s
#     and stage times per manifest batch size, for each bundle x dtype x CUDA graphs off/on with
#     torch-ops post-processing, plus the CUDA post-processing kernel with graphs off/on;
#  2. the service (scripts/bench/bench_service.py: dmdserve + `dmdctl bench`, unary Generate,
#     1 image, PNG) at each concurrency: images/s, p50/p90/p99, mean batch, and the ratio to the raw
#     pipeline (same dtype, graphs on) at that batch size;
#  3. scripts/gpu/gpu_report.py: summary.md and the plots.
# Results go to $OUT (the device tool's output folder; default ./gpu-results): summary.md,
# throughput.png, latency.png, results.tar.gz (every JSON, Markdown report and log), device.txt.
#
# Environment (defaults): BUILD_DIR (build-cuda), BUNDLES ("models/tiny-random"; add an SD1.5
# bundle directory), DEVICE (cuda:0), DTYPES ("float32 bfloat16 float16"), MIN_TIME (0.5: seconds
# per benchmark), REPETITIONS (3), POSTPROCESS_DTYPE (bfloat16), CONCURRENCY (1,4,16,64),
# DURATION_S (10), SERVICE_DTYPE (bfloat16; empty: the manifest's), SERVICE_FLAGS
# ("--instances_per_device=2 --encode_threads=8 --max_queue_images=1024").
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD_DIR=${BUILD_DIR:-build-cuda}
BUNDLES=${BUNDLES:-models/tiny-random}
DEVICE=${DEVICE:-cuda:0}
DTYPES=${DTYPES:-float32 bfloat16 float16}
MIN_TIME=${MIN_TIME:-0.5}
REPETITIONS=${REPETITIONS:-3}
POSTPROCESS_DTYPE=${POSTPROCESS_DTYPE:-bfloat16}
CONCURRENCY=${CONCURRENCY:-1,4,16,64}
DURATION_S=${DURATION_S:-10}
SERVICE_DTYPE=${SERVICE_DTYPE-bfloat16}
SERVICE_FLAGS=${SERVICE_FLAGS:---instances_per_device=2 --encode_threads=8 --max_queue_images=1024}
OUT_DIR=${OUT:-$PWD/gpu-results}
WORK=$(mktemp -d)
mkdir -p "$OUT_DIR"

{
  date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  python3 -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN",
               torch.backends.cudnn.version())' 2>&1 || true
  nvcc --version 2>&1 | tail -1 || true
  echo "$(nproc) CPU cores; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
} > "$WORK/device.txt"
cp "$WORK/device.txt" "$OUT_DIR/device.txt"
cat "$WORK/device.txt"

# raw NAME BUNDLE DTYPE GRAPHS POSTPROCESS: one pipeline_benchmark run, indexed in raw_index.tsv.
raw() {
  local name=$1 bundle=$2 dtype=$3 graphs=$4 postprocess=$5
  echo "raw: $name" | tee -a "$WORK/raw.log"
  if "$BUILD_DIR/worker/pipeline_benchmark" --bundle="$bundle" --device="$DEVICE" \
      --dtype="$dtype" --cuda_graphs="$graphs" --postprocess="$postprocess" \
      --benchmark_min_time="$MIN_TIME" --benchmark_repetitions="$REPETITIONS" \
      --benchmark_report_aggregates_only=true --benchmark_format=json \
      > "$WORK/raw_$name.json" 2>> "$WORK/raw.log"; then
    printf '%s\t%s\t%s\t%s\t%s\n' "raw_$name.json" "$(basename "$bundle")" "${dtype:-manifest}" \
      "$graphs" "$postprocess" >> "$WORK/raw_index.tsv"
  else
    echo "FAILED: raw $name (see raw.log)" | tee -a "$WORK/raw.log"
  fi
}

for bundle in $BUNDLES; do
  b=$(basename "$bundle")
  for dtype in $DTYPES; do
    for graphs in false true; do
      raw "${b}_${dtype}_graphs-${graphs}_torch" "$bundle" "$dtype" "$graphs" torch
    done
  done
  for graphs in false true; do
    raw "${b}_${POSTPROCESS_DTYPE}_graphs-${graphs}_kernel" "$bundle" "$POSTPROCESS_DTYPE" \
      "$graphs" cuda_kernel
  done
  echo "service: $b"
  # shellcheck disable=SC2086  # SERVICE_FLAGS is a list of flags
  if ! python3 scripts/bench/bench_service.py --build "$BUILD_DIR" --bundle "$bundle" \
      --concurrency "$CONCURRENCY" --duration_s "$DURATION_S" --repetitions "$REPETITIONS" \
      --raw_flags "--device=$DEVICE --dtype=$SERVICE_DTYPE --cuda_graphs=true" \
      --json_out "$WORK/service_$b.json" \
      -- --device="$DEVICE" --dtype="$SERVICE_DTYPE" $SERVICE_FLAGS \
      > "$WORK/service_$b.md" 2>&1; then
    echo "FAILED: service $b (see service_$b.md)"
    tail -20 "$WORK/service_$b.md"
  fi
done

python3 scripts/gpu/gpu_report.py "$WORK" --out "$OUT_DIR"
tar -czf "$OUT_DIR/results.tar.gz" -C "$WORK" .
cat "$OUT_DIR/summary.md"
