#!/usr/bin/env bash
# Builds tests/fuzz (if needed) with clang-14 into BUILD_DIR and runs one libFuzzer target for
# SECONDS, starting from its committed seed corpus (tests/fuzz/corpus/TARGET/, never written) and a
# scratch corpus in BUILD_DIR/corpus. Exits non-zero on any crash, leak, timeout or sanitizer
# report; the failing input is left in BUILD_DIR/artifacts/.
#
# Usage: tests/fuzz/run_fuzz.sh TARGET BUILD_DIR SECONDS [extra libFuzzer flags...]
#   TARGET: clip_tokenizer | request | http_json
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 clip_tokenizer|request|http_json BUILD_DIR SECONDS [libFuzzer flags...]" >&2
  exit 2
fi
target=$1
build_dir=$2
seconds=$3
shift 3
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
case "$target" in
  clip_tokenizer) max_len=4096 ;;
  request) max_len=8192 ;;  # a prompt or text at and past its 4096-byte limit, with room
  http_json) max_len=8192 ;;  # a body with a prompt past its 4096-byte limit
  *) echo "unknown target '$target': clip_tokenizer, request or http_json" >&2; exit 2 ;;
esac

if [[ ! -f "$build_dir/CMakeCache.txt" ]]; then
  generator=()
  if command -v ninja >/dev/null; then generator=(-G Ninja); fi
  cmake -S "$here" -B "$build_dir" "${generator[@]}" -DCMAKE_CXX_COMPILER=clang++-14 \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo
fi
cmake --build "$build_dir" --target "${target}_fuzzer" -j 2

mkdir -p "$build_dir/corpus" "$build_dir/artifacts"
exec "$build_dir/${target}_fuzzer" \
  -max_total_time="$seconds" -max_len="$max_len" -timeout=10 -rss_limit_mb=2048 \
  -dict="$here/$target.dict" -print_final_stats=1 \
  -artifact_prefix="$build_dir/artifacts/" "$@" \
  "$build_dir/corpus" "$here/corpus/$target"
