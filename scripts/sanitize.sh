#!/usr/bin/env bash
# Sanitizer builds and their tests (README "Sanitizers"); scripts/test.sh runs both after the
# normal suite.
#   asan  build-asan/, -fsanitize=address,undefined (ASan, LeakSanitizer, UBSan): every C++ unit
#         test binary, and the integration tests test_generate, test_errors, test_dmdctl and
#         test_http_native against the instrumented dmdserve and dmdctl.
#   tsan  build-tsan/, -fsanitize=thread: the batcher, thread pool, engine, HTTP API server
#         and HTTP stream tests, and the tests of the TSan build's abseil annotations
#         (tests/sanitizers/).
# Each build compiles only the targets its tests need, with gcc at -O1 -g1 (line numbers in the
# reports), without benchmarks or fuzzers. In these builds each unit test binary is one CTest
# test (cmake/DmdserveTest.cmake).
#
# Any report fails the run. Every sanitizer ends the process that hits an error with a non-zero
# status (halt_on_error; UBSan through -fno-sanitize-recover). ASan, LeakSanitizer and TSan also
# write their reports to files under <build>/sanitizer-reports/ (log_path): a report from a
# process whose exit status no test checks, such as a server stopped at the end of a test, fails
# the run too, and is printed at the end. UBSan, part of the ASan runtime here, prints to stderr.
#
# Usage: scripts/sanitize.sh [asan|tsan]...   (default: both; JOBS sets the parallelism)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
jobs=${JOBS:-$(nproc)}

# ASan runs every C++ unit test binary: <build>/unit_tests.txt, which CMake writes (every
# dmdserve_cc_test with label unit; gpu_test, which needs a CUDA device, has label gpu).
# The request path end to end: generation (unary and streamed) over gRPC and HTTP, errors, the
# client. The lifecycle tests are left out: their drain tests run a 50-step model for minutes
# under ASan, about 20 times slower than uninstrumented (ASan's allocator hands libtorch fresh
# pages). test_http_native streams that model's images too, but fewer: about a minute under ASan.
asan_integration=(test_generate test_errors test_dmdctl test_http_native)
# http_server_test runs the HTTP API in libmicrohttpd, whose connections are suspended on its
# thread and resumed from the backend's. image_service_test (the gRPC service in a real gRPC
# server) is left out: tests/sanitizers/tsan.supp and server/grpc_happens_before.h remove most of
# what TSan reports of Debian's uninstrumented gRPC, but about 1 run in 10 still reports one of
# gRPC's own hand-offs in its header-only callback code. TSAN_TESTS (names separated by spaces)
# replaces the list, e.g. TSAN_TESTS=image_service_test to run it by hand.
tsan_tests=(tsan_absl_mutex_test tsan_absl_status_test batcher_test thread_pool_test engine_test
  http_stream_test http_server_test)
if [[ -n ${TSAN_TESTS:-} ]]; then
  read -ra tsan_tests <<< "$TSAN_TESTS"
fi

# configure DIR SANITIZERS
configure() {
  cmake -S . -B "$1" -G Ninja -DDMDSERVE_SANITIZE="$2" -DDMDSERVE_BUILD_TESTS=ON \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1" \
    -DDMDSERVE_BUILD_BENCHMARKS=OFF -DDMDSERVE_BUILD_FUZZERS=OFF >/dev/null
}

# build DIR TARGET...
build() {
  local dir=$1
  shift
  cmake --build "$dir" -j "$jobs" --target "$@"
}

# run_tests DIR REPORTS TEST...: the CTest tests named TEST, then fails on any report file that
# holds a report (every sanitizer report ends with a SUMMARY line; a file without one holds
# warnings only, such as ASan's note on an allocation refused with allocator_may_return_null).
run_tests() {
  local dir=$1 reports=$2 status=0
  shift 2
  ctest --test-dir "$dir" --output-on-failure --timeout 900 -j "$jobs" --no-tests=error \
    -R "^($(IFS='|'; echo "$*"))\$" || status=$?
  local report
  for report in $(grep -l '^SUMMARY: ' "$reports"/* 2>/dev/null); do
    echo "=== $report" && cat "$report"
    status=1
  done
  return "$status"
}

# run_asan and run_tsan run where a failure does not stop the script (`job || status=1`): each
# step returns on failure itself, so that a failed build never tests stale binaries.
# allocator_may_return_null: the out-of-memory tests (pipeline, engine) allocate 2^50 bytes on
# purpose and expect libtorch's error, as from glibc's malloc; the sanitizers' allocators would
# abort the process instead.
run_asan() {
  local dir=build-asan reports=$root/build-asan/sanitizer-reports
  configure "$dir" address,undefined || return 1
  local asan_tests=()
  mapfile -t asan_tests < "$dir/unit_tests.txt" || return 1
  if (( ${#asan_tests[@]} == 0 )); then
    echo "sanitize: $dir/unit_tests.txt lists no unit test" >&2
    return 1
  fi
  build "$dir" "${asan_tests[@]}" dmdserve dmdctl python_stubs || return 1
  rm -rf "$reports" && mkdir -p "$reports"
  export ASAN_OPTIONS="halt_on_error=1:detect_leaks=1:allocator_may_return_null=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1:log_path=$reports/asan"
  export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
  run_tests "$dir" "$reports" "${asan_tests[@]}" "${asan_integration[@]}"
}

run_tsan() {
  local dir=build-tsan reports=$root/build-tsan/sanitizer-reports
  configure "$dir" thread || return 1
  build "$dir" "${tsan_tests[@]}" || return 1
  rm -rf "$reports" && mkdir -p "$reports"
  export TSAN_OPTIONS="halt_on_error=1:suppressions=$root/tests/sanitizers/tsan.supp:second_deadlock_stack=1:allocator_may_return_null=1:log_path=$reports/tsan"
  run_tests "$dir" "$reports" "${tsan_tests[@]}"
}

selected=("$@")
[[ $# -gt 0 ]] || selected=(asan tsan)
status=0
for job in "${selected[@]}"; do
  case $job in
    asan) run_asan || status=1 ;;
    tsan) run_tsan || status=1 ;;
    *) echo "usage: $0 [asan|tsan]..." >&2; exit 2 ;;
  esac
done
exit "$status"
