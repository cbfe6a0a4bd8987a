#!/usr/bin/env bash
# The two ends of a training run on the GPU device machine (scripts/gpu/gpu_train.sh runs there;
# training/README.md, "Training on the GPU (device round trip)"). From the repository root, here:
#
#   scripts/gpu/prepare_gpu_training.sh                           # before the device call
#   scripts/gpu/prepare_gpu_training.sh --collect FILES_AT [DEST] # after it
#
# Before: packs Fashion-MNIST ($DMDSERVE_FASHION_MNIST_DIR or /usr/share/datasets/fashion-mnist)
# into .gpu-data/fashion-mnist/ as xz (26.4 MB instead of gzip's 30.9 MB: the device takes 64 MiB
# in all, and the repository alone is ~36 MB), refills .gpu-state/ with what the call needs from
# here (TEACHER=PATH: the teacher checkpoint for a call without the teacher stage, when it is not
# training/checkpoints/teacher.pt, which travels anyway; RESUME=1: $STATE_DIR/<stage>_state.pt of
# the stages in STAGES, to continue on the device), adds both folders to .git/info/exclude, checks
# that the working tree and both folders fit in 64 MiB, and prints the device `run` arguments. The
# gpu_train.sh settings set in this script's environment (STAGES, TEACHER_STEPS, DMD_FLAGS, ...)
# are written into the printed command.
#
# After: FILES_AT is the folder the device tool reports for the files of $OUT. Joins the parts of
# split files, checks everything against SHA256SUMS into DEST (default $STATE_DIR/gpu) and says
# where each file goes.
set -euo pipefail
cd "$(dirname "$0")/../.."
STATE_DIR=${STATE_DIR:-/tmp/dmdserve-training}
STAGES=${STAGES:-teacher ode-pairs dmd}
LIMIT=$((64 * 1024 * 1024))
SETTINGS="STAGES DEVICE THREADS BUDGET_S BENCH_S AUTO_FRACTION TEACHER_STEPS TEACHER_BATCH
  TEACHER_SHARE TEACHER_FLAGS PAIRS_COUNT GUIDANCE DMD_STEPS DMD_BATCH DMD_FLAGS"

collect() {
  local src=$1 dest=${2:-$STATE_DIR/gpu} f name
  if [[ ! -s $src/SHA256SUMS ]]; then
    echo "no files listed in $src/SHA256SUMS: see gpu_train.log" >&2
    exit 1
  fi
  mkdir -p "$dest"
  for f in "$src"/*; do
    name=$(basename "$f")
    case $name in
      *.part0) cat "${f%0}"? >"$dest/${name%.part0}" ;;
      *.part[1-9]) ;;
      *) cp "$f" "$dest/$name" ;;
    esac
  done
  chmod u+w "$dest"/*
  (cd "$dest" && sha256sum -c SHA256SUMS)
  echo "collected in $dest:"
  for f in "$dest"/*; do
    case $(basename "$f") in
      teacher.pt | dmd.pt) echo "  $f: checkpoint; with its .json into training/checkpoints/ to" \
        "export it here (training/README.md)" ;;
      ode_pairs.pt) echo "  $f: ODE pairs, for train_dmd --pairs" ;;
      *_state.pt) echo "  $f: state of a stage stopped by --stop-after-s; continue it with" \
        "--state $f --resume and the flags and --steps in gpu_train.log" ;;
    esac
  done
}

if [[ ${1:-} == --collect ]]; then
  [[ $# -ge 2 ]] || { echo "usage: $0 --collect FILES_AT [DEST]" >&2; exit 2; }
  collect "$2" "${3:-}"
  exit 0
fi
has_stage() { [[ " $STAGES " == *" $1 "* ]]; }
bytes() { find "$@" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}'; }

for folder in .gpu-data .gpu-state; do
  grep -qxF "/$folder/" .git/info/exclude 2>/dev/null || echo "/$folder/" >>.git/info/exclude
done

src=${DMDSERVE_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
mkdir -p .gpu-data/fashion-mnist
for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte \
    t10k-labels-idx1-ubyte; do
  xz=.gpu-data/fashion-mnist/$name.xz
  if [[ ! -s $xz || $src/$name.gz -nt $xz ]]; then
    echo "packing $src/$name.gz -> $xz (xz -9e)"
    zcat "$src/$name.gz" | xz -9e -T1 >"$xz.tmp"
    mv "$xz.tmp" "$xz"
  fi
done

rm -rf .gpu-state
mkdir -p .gpu-state
if [[ -n ${TEACHER:-} ]] && ! has_stage teacher; then
  cp "$TEACHER" .gpu-state/teacher.pt
fi
if [[ ${RESUME:-0} == 1 ]]; then
  for stage in teacher dmd; do
    if has_stage $stage && [[ -e $STATE_DIR/${stage}_state.pt ]]; then
      cp "$STATE_DIR/${stage}_state.pt" .gpu-state/
    fi
  done
fi

tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null |
  awk '{s += $1} END {print s + 0}')
data=$(bytes .gpu-data)
state=$(bytes .gpu-state)
total=$((tree + data + state))
printf '%-58s %10d bytes\n' "working tree (tracked + untracked, not ignored)" "$tree" \
  ".gpu-data (Fashion-MNIST, xz)" "$data" ".gpu-state ($(find .gpu-state -type f -printf '%f '))" "$state" \
  "total (the device takes at most $LIMIT)" "$total"
if ((total > LIMIT)); then
  echo "too large by $((total - LIMIT)) bytes: carry less (a teacher state is ~27 MB and a DMD" \
    "state ~44 MB, so neither fits beside the data: size the stages to finish in one call)" >&2
  exit 1
fi

command=""
for var in $SETTINGS; do
  if [[ -n ${!var+set} ]]; then
    command+="$var='${!var//\'/\'\\\'\'}' "
  fi
done
command+="bash scripts/gpu/gpu_train.sh"
echo
echo "device run arguments:"
echo "  command:   $command"
echo '  carry:     [".gpu-data", ".gpu-state"]'
echo "  timeout_s: 600"
echo "then: $0 --collect FILES_AT"
