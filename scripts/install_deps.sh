#!/usr/bin/env bash
# Installs every build, test and tooling dependency of dmdserve from Debian 12 packages.
# Idempotent: safe to run again; apt-get skips what is already installed.
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
PKGS=(
  # toolchain
  build-essential cmake ninja-build pkg-config git ca-certificates curl
  # serving stack
  libtorch-dev libgrpc++-dev protobuf-compiler-grpc protobuf-compiler libprotobuf-dev
  libabsl-dev libspdlog-dev libfmt-dev prometheus-cpp-dev libpng-dev nlohmann-json3-dev
  # libtorch's BLAS: installing OpenBLAS makes it the libblas.so.3 alternative, 5x faster
  # serving than the reference BLAS on CPU (docs/PERFORMANCE.md "CPU BLAS")
  libopenblas0-openmp
  # tokenizer: Unicode classes
  libutf8proc-dev
  # the /metrics endpoint and the HTTP API (server/metrics_http.h, server/http_server.h), and
  # GnuTLS for HTTPS (server/https_credentials.h)
  libmicrohttpd-dev libgnutls28-dev
  # TLS start-up checks (server/tls.h); the openssl command makes the tests' certificates
  libssl-dev openssl
  # tests and benchmarks
  libgtest-dev libgmock-dev libbenchmark-dev prometheus yamllint
  # the HTTP API unit test's client (server/http_server_test.cc)
  libcurl4-openssl-dev
  # code-size lint (tests/lint): function extents
  universal-ctags
  # fuzzing (libFuzzer + sanitizers)
  clang-14 libfuzzer-14-dev libclang-rt-14-dev
  # python tooling (Debian's interpreter at /usr/bin/python3)
  python3 python3-torch python3-numpy python3-grpcio python3-protobuf python3-pil python3-scipy
  # the Python client package's offline install test (clients/python: venv + pip, no index)
  python3-venv python3-pip python3-setuptools python3-wheel
  # training and evaluation data (Fashion-MNIST)
  dataset-fashion-mnist
  # the playground page's browser test (tests/integration/test_playground.py): headless Chromium
  # driven over the DevTools Protocol, and a font for its screenshot
  chromium python3-websocket fonts-dejavu-core
)
# Node.js runs the offline Kubernetes manifest validation (tests/k8s); use Debian's if none.
command -v node >/dev/null && command -v npm >/dev/null || PKGS+=(nodejs npm)
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${PKGS[@]}"
