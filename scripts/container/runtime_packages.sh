#!/usr/bin/env bash
# Prints the Debian/Ubuntu packages that own the shared libraries the given binaries load, one a
# line (used by the Dockerfile's runtime stages). Libraries under $SKIP_PREFIX (e.g. a libtorch
# archive copied into the image as is) are skipped. Fails if a library has no owning package.
set -euo pipefail
skip=${SKIP_PREFIX:-/nonexistent}
for lib in $(ldd "$@" | awk '/=> \//{print $3}' | sort -u); do
  case "$(realpath "$lib")" in "$skip"/*) continue ;; esac
  dpkg -S "$lib" 2>/dev/null || dpkg -S "$(realpath "$lib")" 2>/dev/null \
    || dpkg -S "${lib#/usr}" 2>/dev/null || { echo "no package owns $lib" >&2; exit 1; }
done | cut -d: -f1 | sort -u
