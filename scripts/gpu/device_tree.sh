#!/bin/bash
# Keeps what a device run does not need out of the tree that travels to the device machine.
#
# The device tool copies the working tree's tracked and untracked-not-ignored files, plus the
# carried paths, and takes at most 64 MiB. The tests' fixtures (tools/tests/testdata, ~45 MB) and
# the training checkpoints (training/checkpoints, ~17 MB) push the tree past that, and neither is
# read by the GPU build, `ctest -L gpu` or scripts/gpu/gpu_measure.sh. So:
#
#   scripts/gpu/device_tree.sh slim [PATH...]   # untrack PATHs in the index only, ignore them
#                                               # locally (.git/info/exclude), print the size
#   ... the device runs ...
#   scripts/gpu/device_tree.sh restore          # index and exclude file as they were
#
# PATHs default to tools/tests/testdata and training/checkpoints (GPU training needs
# training/checkpoints/teacher.pt: give `slim tools/tests/testdata` for it). The files stay on
# disk; nothing is committed. While slim, `git status` shows the PATHs as deleted: restore before
# committing anything. CARRY (default .gpu-debs) names the folders the device call will carry, so
# that the printed total is what travels.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

LIMIT=$((64 * 1024 * 1024))
EXCLUDE=.git/info/exclude
BEGIN="# >>> scripts/gpu/device_tree.sh slim"
END="# <<< scripts/gpu/device_tree.sh slim"

bytes() { # total size of the files under the given paths (missing paths count 0)
  local p total=0
  for p in "$@"; do
    [[ -e $p ]] && total=$((total + $(du -sb "$p" | cut -f1)))
  done
  echo "$total"
}

tree_bytes() {
  git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null |
    awk '{s += $1} END {print s + 0}'
}

case "${1:-}" in
  slim)
    shift
    if grep -qF "$BEGIN" "$EXCLUDE" 2>/dev/null; then
      echo "device_tree.sh: already slim; run 'restore' first" >&2
      exit 1
    fi
    paths=("$@")
    ((${#paths[@]})) || paths=(tools/tests/testdata training/checkpoints)
    git rm -r -q --cached -- "${paths[@]}"
    { echo "$BEGIN"; printf '/%s/\n' "${paths[@]}"; echo "$END"; } >>"$EXCLUDE"
    read -r -a carry <<<"${CARRY:-.gpu-debs}"
    tree=$(tree_bytes)
    carried=$(bytes "${carry[@]}")
    total=$((tree + carried))
    printf '%-50s %10d bytes\n' "working tree (tracked + untracked, not ignored)" "$tree" \
      "carried (${carry[*]})" "$carried" "total (the device takes at most $LIMIT)" "$total"
    if ((total > LIMIT)); then
      echo "device_tree.sh: still too large by $((total - LIMIT)) bytes" >&2
      exit 1
    fi
    ;;
  restore)
    if ! grep -qF "$BEGIN" "$EXCLUDE" 2>/dev/null; then
      echo "device_tree.sh: not slim; nothing to restore"
      exit 0
    fi
    mapfile -t paths < <(awk -v b="$BEGIN" -v e="$END" '$0 == b {on = 1; next} $0 == e {on = 0}
      on && /^\// {sub(/^\//, ""); sub(/\/$/, ""); print}' "$EXCLUDE")
    git reset -q -- "${paths[@]}"
    awk -v b="$BEGIN" -v e="$END" '$0 == b {skip = 1} !skip {print} $0 == e {skip = 0}' \
      "$EXCLUDE" >"$EXCLUDE.tmp"
    mv "$EXCLUDE.tmp" "$EXCLUDE"
    echo "device_tree.sh: restored ${paths[*]}"
    ;;
  *)
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
