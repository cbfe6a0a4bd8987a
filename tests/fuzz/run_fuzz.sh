#!/usr/bin/env bash
# Builds tests/fuzz (if needed) with clang-14 into BUILD_DIR and runs the CLIP tokenizer fuzzer
# for SECONDS, starting from the committed seed corpus (tests/fuzz/corpus/, never written) and a
# scratch corpus in BUILD_DIR/corpus. Exits non-zero on any crash, leak, timeout or sanitizer
# report; the failing input is left in BUILD_DIR/artifacts/.
#
# Usage: tests/fuzz/run_fuzz.sh BUILD_DIR SECONDS [extra libFuzzer flags...]
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 BUILD_DIR SECONDS [libFuzzer flags...]" >&2
  exit 2
fi
build_dir=$1
seconds=$2
shift 2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [[ ! -f "$build_dir/CMakeCache.txt" ]]; then
  generator=()
  if command -v ninja >/dev/null; then generator=(-G Ninja); fi
  cmake -S "$here" -B "$build_dir" "${generator[@]}" -DCMAKE_CXX_COMPILER=clang++-14 \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo
fi
cmake --build "$build_dir" --target clip_tokenizer_fuzzer -j 2

mkdir -p "$build_dir/corpus" "$build_dir/artifacts"
exec "$build_dir/clip_tokenizer_fuzzer" \
  -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
  -dict="$here/clip_tokenizer.dict" -print_final_stats=1 \
  -artifact_prefix="$build_dir/artifacts/" "$@" \
  "$build_dir/corpus" "$here/corpus"
