#!/usr/bin/env bash
# Builds dmdserve with CUDA on the GPU device machine and runs its GPU tests (docs/GPU.md).
#
# The device has nvcc, cmake, ninja and a CUDA torch wheel (its python3), but not gRPC & co.:
# scripts/gpu/fetch_gpu_build_debs.sh downloads those as Debian packages into .gpu-debs/ here, the
# device tool carries that folder, and this script unpacks them under $DEPS (never into /). The
# binaries find those libraries through their RPATH; the Debian tools that run during the build
# (protoc, the gRPC plugins, pkgconf) through small wrappers. Nothing else sees LD_LIBRARY_PATH.
#
# Usage (repository root, on the device):
#   scripts/gpu/gpu_build.sh            configure + build into $BUILD_DIR, then ctest -L gpu
# Environment: BUILD_DIR (build-cuda), DEPS (/opt/deps), DEBS (.gpu-debs), JOBS (all cores),
#   TORCH_PREFIX (default: the python3 torch's cmake prefix), DMDSERVE_CUDA (ON; OFF rehearses
#   the dependency set-up with a CPU libtorch), TARGETS (what to build), RUN_TESTS (1),
#   OUT (the logs are copied there when set).
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD_DIR=${BUILD_DIR:-build-cuda}
DEPS=${DEPS:-/opt/deps}
DEBS=${DEBS:-.gpu-debs}
JOBS=${JOBS:-$(nproc)}
DMDSERVE_CUDA=${DMDSERVE_CUDA:-ON}
RUN_TESTS=${RUN_TESTS:-1}
TARGETS=${TARGETS:-dmdserve dmdctl pipeline_benchmark gpu_test device_test postprocess_test}
LIB=$DEPS/usr/lib/x86_64-linux-gnu
WRAP=$DEPS/wrap
LOG_DIR=$BUILD_DIR/gpu-build-logs
mkdir -p "$LOG_DIR"

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null ||
  echo "(no nvidia-smi)"
command -v nvcc >/dev/null && nvcc --version | tail -1
cmake --version | head -1

# The torch wheel: its CMake prefix, and the C++ ABI it was built with (Debian's libraries use
# the new one).
if [ -z "${TORCH_PREFIX:-}" ]; then
  read -r TORCH_PREFIX TORCH_VERSION TORCH_ABI < <(python3 -c \
    'import torch; print(torch.utils.cmake_prefix_path, torch.__version__, int(torch._C._GLIBCXX_USE_CXX11_ABI))')
  echo "torch $TORCH_VERSION, cmake prefix $TORCH_PREFIX, cxx11 ABI $TORCH_ABI"
  if [ "$TORCH_ABI" != 1 ]; then
    echo "the torch wheel uses the pre-C++11 ABI; Debian's gRPC & co. need the C++11 one" >&2
    exit 1
  fi
  # Two protobuf runtimes in one process only work if libtorch keeps its copy's symbols hidden.
  TORCH_LIB=$(dirname "$(dirname "$TORCH_PREFIX")")/lib  # .../torch/share/cmake -> .../torch/lib
  echo "google::protobuf symbols exported by libtorch_cpu.so: $(nm -DC --defined-only \
    "$TORCH_LIB/libtorch_cpu.so" 2>/dev/null | grep -c 'google::protobuf' || true)"
fi

echo "== dependencies: $DEBS -> $DEPS"
if [ ! -f "$DEPS/.unpacked" ]; then
  ls "$DEBS"/*.deb >/dev/null  # fails clearly when the packages were not carried
  mkdir -p "$DEPS/curl"
  for deb in "$DEBS"/*.deb; do
    case $(basename "$deb") in
      # libcurl only has to exist for prometheus-cpp's CMake file (dmdserve links no curl); it
      # stays out of the RPATH directory, whose libraries the binaries load.
      libcurl4_*) dpkg-deb -x "$deb" "$DEPS/curl" ;;
      *) dpkg-deb -x "$deb" "$DEPS" ;;
    esac
  done
  # Absolute symbolic links (zlib1g-dev's libz.so -> /lib/...) must point into $DEPS.
  find "$DEPS" -type l -lname '/*' | while read -r link; do
    ln -sfn "$DEPS$(readlink "$link")" "$link"
  done
  mkdir -p "$WRAP"
  for tool in protoc grpc_cpp_plugin grpc_python_plugin pkgconf; do
    printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$LIB" "$DEPS/usr/bin/$tool" \
      > "$WRAP/$tool"
    chmod +x "$WRAP/$tool"
  done
  touch "$DEPS/.unpacked"
fi
"$WRAP/protoc" --version

echo "== configure ($BUILD_DIR, DMDSERVE_CUDA=$DMDSERVE_CUDA)"
# PKG_CONFIG_LIBDIR/SYSROOT: pkgconf reads only the unpacked .pc files and prefixes their
# /usr paths with $DEPS.
export PKG_CONFIG_LIBDIR=$LIB/pkgconfig:$DEPS/usr/share/pkgconfig
export PKG_CONFIG_SYSROOT_DIR=$DEPS
cmake -S . -B "$BUILD_DIR" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DDMDSERVE_CUDA="$DMDSERVE_CUDA" \
  -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DCMAKE_PREFIX_PATH="$DEPS/usr;$TORCH_PREFIX" \
  -DProtobuf_PROTOC_EXECUTABLE="$WRAP/protoc" \
  -DPKG_CONFIG_EXECUTABLE="$WRAP/pkgconf" \
  -DCURL_LIBRARY="$DEPS/curl/usr/lib/x86_64-linux-gnu/libcurl.so.4" \
  -DCURL_INCLUDE_DIR="$DEPS/usr/include/x86_64-linux-gnu" \
  -DCMAKE_BUILD_RPATH="$LIB;$DEPS/lib/x86_64-linux-gnu" \
  -DCMAKE_EXE_LINKER_FLAGS="-Wl,--disable-new-dtags" \
  -DCMAKE_GTEST_DISCOVER_TESTS_DISCOVERY_MODE=PRE_TEST \
  -DDMDSERVE_BUILD_FUZZERS=OFF \
  -DDMDSERVE_PYTHON="$(command -v python3)" 2>&1 | tee "$LOG_DIR/configure.log"
# Where each dependency was found (all should be under $DEPS or the torch wheel).
grep -E '^(absl|gRPC|spdlog|fmt|prometheus-cpp|GTest|benchmark|nlohmann_json|Torch|Caffe2)_DIR|^Protobuf_(INCLUDE_DIR|LIBRARY)|^PNG_LIBRARY_RELEASE|^ZLIB_LIBRARY_RELEASE' \
  "$BUILD_DIR/CMakeCache.txt" || true

echo "== build: $TARGETS"
# shellcheck disable=SC2086  # TARGETS is a list
if ! cmake --build "$BUILD_DIR" -j "$JOBS" --target $TARGETS > "$LOG_DIR/build.log" 2>&1; then
  grep -E -A5 'error|FAILED' "$LOG_DIR/build.log" | head -80
  echo "build failed; full log: $LOG_DIR/build.log" >&2
  exit 1
fi
grep -E 'warning' "$LOG_DIR/build.log" | sort -u | head -20 || true
for binary in "$BUILD_DIR/client/dmdctl" "$BUILD_DIR/server/dmdserve"; do
  [ -x "$binary" ] || continue
  echo "libraries of $binary from outside $DEPS and the torch wheel:"
  ldd "$binary" | grep -vE "$DEPS|torch|nvidia|linux-vdso|ld-linux" || true
  if ldd "$binary" | grep -q 'not found'; then
    echo "$binary has unresolved libraries (see above)" >&2
    exit 1
  fi
done

if [ "$RUN_TESTS" = 1 ]; then
  echo "== tests"
  (cd "$BUILD_DIR" && ctest -L gpu --output-on-failure --timeout 600 2>&1 |
    tee "$PWD/gpu-build-logs/ctest-gpu.log")
  "$BUILD_DIR/worker/device_test" --gtest_brief=1
  "$BUILD_DIR/worker/postprocess_test" --gtest_brief=1
fi
if [ -n "${OUT:-}" ]; then
  tar -czf "$OUT/gpu-build-logs.tar.gz" -C "$BUILD_DIR" gpu-build-logs
fi
