#!/usr/bin/env bash
# Keeps the C++ of server/, worker/ and client/ readable at a glance: fails when a function outside
# the tests is longer than MAX_FUNCTION_LINES (80) or a source file longer than MAX_FILE_LINES (700).
# Function extents come from universal-ctags (--fields=+e: each definition's end line).
#   tests/lint/code_size.sh [repo_root]
set -euo pipefail
root=${1:-$(dirname "$0")/../..}
cd "$root"
MAX_FUNCTION_LINES=${MAX_FUNCTION_LINES:-80}
MAX_FILE_LINES=${MAX_FILE_LINES:-700}
command -v ctags >/dev/null || { echo "code_size: universal-ctags is not installed" >&2; exit 2; }

mapfile -t files < <(find server worker client -type f \( -name '*.cc' -o -name '*.h' -o -name '*.inc' -o -name '*.cu' \) | sort)
failures=0
for f in "${files[@]}"; do
  n=$(wc -l < "$f")
  if [ "$n" -gt "$MAX_FILE_LINES" ]; then
    echo "code_size: $f has $n lines (limit $MAX_FILE_LINES)"
    failures=$((failures + 1))
  fi
done

mapfile -t sources < <(printf '%s\n' "${files[@]}" | grep -v '_test\.cc$' | grep -v '_benchmark\.cc$')
# One line per function definition: start, end, scope::name, file.
while read -r start end name file; do
  lines=$((end - start + 1))
  if [ "$lines" -gt "$MAX_FUNCTION_LINES" ]; then
    echo "code_size: $file:$start $name is $lines lines (limit $MAX_FUNCTION_LINES)"
    failures=$((failures + 1))
  fi
done < <(ctags -x --language-force=C++ --kinds-C++=f --fields=+e \
           --_xformat='%{line} %{end} %{scope}::%{name} %{input}' "${sources[@]}")

checked=$(( ${#files[@]} ))
if [ "$failures" -gt 0 ]; then
  echo "code_size: $failures over the limits in $checked files"
  exit 1
fi
echo "code_size: $checked files, every function <= $MAX_FUNCTION_LINES lines, every file <= $MAX_FILE_LINES lines"
