#!/usr/bin/env bash
# Trains the Fashion-MNIST stages on the GPU device machine: the command a device `run` executes
# (training/README.md, "Training on the GPU (device round trip)"). Prepare the call here with
# scripts/gpu/prepare_gpu_training.sh: it packs the data into .gpu-data/ and prints the exact `run`
# arguments; on the device, from the repository root:
#
#   STAGES="teacher ode-pairs dmd" bash scripts/gpu/gpu_train.sh
#
# Every stage runs with --device $DEVICE (cuda). The whole command must end inside the device's
# 10-minute limit: the stages share BUDGET_S seconds; a step count of `auto` is sized from a
# BENCH_S-second benchmark of the stage (same flags) to fill AUTO_FRACTION of the stage's time,
# and --stop-after-s stops a stage that would run over (its state comes back instead of its
# checkpoint, and the later stages are skipped). The teacher gets TEACHER_SHARE % of the time left
# when it starts, ode-pairs takes seconds, dmd the rest.
#
# What comes back in $OUT (flat, within the device's 8 files / 64 MiB): gpu_train.log, SHA256SUMS,
# each finished stage's checkpoint (teacher.pt, ode_pairs.pt, dmd.pt) and summary (.json), and
# the state of a stopped stage (<stage>_state.pt, split in 15 MiB parts .part0, .part1, ...).
# Collect them here with scripts/gpu/prepare_gpu_training.sh --collect FILES_AT.
#
# Environment (default):
#   STAGES (teacher ode-pairs dmd)  which stages, run in this order
#   DEVICE (cuda), THREADS (8: CPU side: batches, the evaluation classifier), PY (python3)
#   BUDGET_S (480), BENCH_S (25), AUTO_FRACTION (0.8)
#   TEACHER_STEPS (auto), TEACHER_BATCH (512), TEACHER_SHARE (60 if dmd runs too, else 90),
#   TEACHER_FLAGS (more train_teacher flags, e.g. "--lr 1e-3 --channels 64")
#   PAIRS_COUNT (20480: on 4096 the student over-fits them, docs/FASHION.md "More ODE pairs,
#     again"), GUIDANCE (3): make_ode_pairs, and the real score's CFG scale in dmd
#   DMD_STEPS (auto), DMD_BATCH (128), DMD_FLAGS (the last phase of training/checkpoints/dmd.pt's
#     recipe, see train_all.sh: --fake-steps 2 --lr 1e-4 --reg-weight 16 --ema 0.995
#     --eval-every 250 --eval-per-class 50)
# Inputs: .gpu-data/fashion-mnist/*.xz (carried; unpacked to gzip'd idx files in /tmp and read
# through DMDSERVE_FASHION_MNIST_DIR); .gpu-state/ (carried, optional): teacher.pt for a call
# without the teacher stage (else training/checkpoints/teacher.pt), <stage>_state.pt to --resume
# (then give that run's TEACHER_STEPS / DMD_STEPS). The stages write their outputs there too.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?OUT must name the folder whose files come back (the device sets it)}"
STAGES=${STAGES:-teacher ode-pairs dmd}
DEVICE=${DEVICE:-cuda}
THREADS=${THREADS:-8}
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-480}
BENCH_S=${BENCH_S:-25}
AUTO_FRACTION=${AUTO_FRACTION:-0.8}
TEACHER_STEPS=${TEACHER_STEPS:-auto}
TEACHER_BATCH=${TEACHER_BATCH:-512}
TEACHER_FLAGS=${TEACHER_FLAGS:-}
PAIRS_COUNT=${PAIRS_COUNT:-20480}
GUIDANCE=${GUIDANCE:-3}
DMD_STEPS=${DMD_STEPS:-auto}
DMD_BATCH=${DMD_BATCH:-128}
DMD_FLAGS=${DMD_FLAGS:---fake-steps 2 --lr 1e-4 --reg-weight 16 --ema 0.995 --eval-every 250 \
--eval-per-class 50}
W=.gpu-state
BENCH=/tmp/gpu_train_bench
PART=$((15 * 1024 * 1024))
mkdir -p "$W" "$BENCH" "$OUT"
exec > >(tee -a "$OUT/gpu_train.log") 2>&1
tee_pid=$!
export PYTHONUNBUFFERED=1
has_stage() { [[ " $STAGES " == *" $1 "* ]]; }
default_share=90
has_stage dmd && default_share=60
TEACHER_SHARE=${TEACHER_SHARE:-$default_share}
start=$SECONDS
left() { echo $((BUDGET_S - (SECONDS - start))); }
RETURN=()  # files to copy into $OUT, most important first
stopped=""

pack() {  # copies RETURN into $OUT (parts of 15 MiB), keeping within 8 files and 64 MiB
  local f name size parts files bytes
  : >"$OUT/SHA256SUMS"
  for f in "${RETURN[@]}"; do
    [[ -e $f ]] || continue
    name=$(basename "$f")
    size=$(stat -c %s "$f")
    parts=$(((size + PART - 1) / PART))
    files=$(find "$OUT" -type f | wc -l)
    bytes=$(find "$OUT" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
    if ((files + parts > 8 || bytes + size > 63 * 1024 * 1024)); then
      echo "!! $name ($size bytes) not returned: \$OUT holds $files files, $bytes bytes"
      continue
    fi
    if ((parts > 1)); then
      split -b "$PART" -d -a 1 "$f" "$OUT/$name.part"
    else
      cp "$f" "$OUT/$name"
    fi
    (cd "$(dirname "$f")" && sha256sum "$name") >>"$OUT/SHA256SUMS"
  done
  echo "== returned in \$OUT:"
  ls -l "$OUT"
  exec >&- 2>&-
  wait "$tee_pid"  # the log is complete when the command returns
}
trap pack EXIT

bench_rate() {  # bench_rate MODULE FLAGS...: steps/s of MODULE run for BENCH_S seconds
  local no_eval=()
  [[ $1 == training.train_dmd ]] && no_eval=(--eval-every 0)
  rm -f "$BENCH/state.pt"
  if ! $PY -m "$1" "${@:2}" "${no_eval[@]}" --steps 1000000 --stop-after-s "$BENCH_S" \
      --save-every 1000000 --state "$BENCH/state.pt" --out "$BENCH/out.pt" >"$BENCH/log" 2>&1
  then
    cat "$BENCH/log" >&2
    return 1
  fi
  $PY -c 'import sys, torch; s = torch.load(sys.argv[1], map_location="cpu")
print(s["step"] / s["elapsed_s"])' "$BENCH/state.pt"
}

run_stage() {  # run_stage NAME MODULE STEPS SECONDS STATE OUT FLAGS...: one stoppable stage
  local name=$1 module=$2 steps=$3 secs=$4 state=$5 out=$6 stage_start=$SECONDS rate
  shift 6
  rm -f "$out" "${out%.pt}.json"
  if ((secs < 2 * BENCH_S)); then
    echo "!! $name: only $secs s left of BUDGET_S $BUDGET_S" >&2
    return 1
  fi
  if [[ $steps == auto ]]; then
    if [[ -e $state ]]; then
      echo "!! $name: resuming $state needs the --steps of the run that wrote it (set it)" >&2
      return 1
    fi
    rate=$(bench_rate "$module" "$@")
    secs=$((secs - (SECONDS - stage_start)))
    steps=$(awk -v r="$rate" -v s="$secs" -v f="$AUTO_FRACTION" \
      'BEGIN {n = int(r * s * f); print (n < 1 ? 1 : n)}')
    echo "== $name: benchmark $rate steps/s -> --steps $steps for the ${secs} s left to it"
  fi
  echo "== $name: $PY -m $module $* --steps $steps --stop-after-s $secs"
  $PY -m "$module" "$@" --steps "$steps" --stop-after-s "$secs" --state "$state" --resume \
    --out "$out"
  if [[ -e $out ]]; then
    RETURN+=("$out" "${out%.pt}.json")
  else
    stopped=$name
    RETURN+=("$state")
  fi
  echo "== $name: $((SECONDS - stage_start)) s"
}

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null ||
  echo "(no nvidia-smi)"
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'

echo "== data: .gpu-data/fashion-mnist -> /tmp/fashion-mnist"
export DMDSERVE_FASHION_MNIST_DIR=/tmp/fashion-mnist
$PY - .gpu-data/fashion-mnist "$DMDSERVE_FASHION_MNIST_DIR" <<'EOF'
import gzip, lzma, os, shutil, sys
src, dst = sys.argv[1:]
names = sorted(n for n in os.listdir(src) if n.endswith(".xz")) if os.path.isdir(src) else []
if not names:
    sys.exit(f"no *.xz in {src}: run scripts/gpu/prepare_gpu_training.sh and carry .gpu-data")
os.makedirs(dst, exist_ok=True)
for name in names:
    with lzma.open(os.path.join(src, name)) as f, \
            gzip.open(os.path.join(dst, name[:-3] + ".gz"), "wb", compresslevel=1) as g:
        shutil.copyfileobj(f, g, 1 << 20)
print(" ".join(n[:-3] + ".gz" for n in names))
EOF

teacher=training/checkpoints/teacher.pt
if has_stage teacher; then
  teacher=$W/teacher.pt
  # shellcheck disable=SC2086 # TEACHER_FLAGS and DMD_FLAGS are split into words
  run_stage teacher training.train_teacher "$TEACHER_STEPS" $(($(left) * TEACHER_SHARE / 100)) \
    "$W/teacher_state.pt" "$teacher" --batch-size "$TEACHER_BATCH" --device "$DEVICE" \
    --threads "$THREADS" $TEACHER_FLAGS
elif [[ -e $W/teacher.pt ]]; then
  teacher=$W/teacher.pt
fi
if [[ -z $stopped ]] && has_stage ode-pairs; then
  echo "== ode-pairs (teacher $teacher)"
  $PY -m training.make_ode_pairs --teacher "$teacher" --count "$PAIRS_COUNT" \
    --guidance "$GUIDANCE" --device "$DEVICE" --threads "$THREADS" --out "$W/ode_pairs.pt"
  RETURN+=("$W/ode_pairs.pt")
fi
if [[ -z $stopped ]] && has_stage dmd; then
  pairs=()
  [[ -e $W/ode_pairs.pt ]] && pairs=(--pairs "$W/ode_pairs.pt")
  # shellcheck disable=SC2086
  run_stage dmd training.train_dmd "$DMD_STEPS" "$(left)" "$W/dmd_state.pt" "$W/dmd.pt" \
    --teacher "$teacher" --batch-size "$DMD_BATCH" --guidance "$GUIDANCE" --device "$DEVICE" \
    --threads "$THREADS" "${pairs[@]}" $DMD_FLAGS
fi
if [[ -n $stopped ]]; then
  echo "== $stopped stopped before its --steps: its state comes back; continue it with --resume"
fi
echo "== done in $((SECONDS - start)) s"
