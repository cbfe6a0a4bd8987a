#!/usr/bin/env bash
# Downloads the Debian 12 packages a CUDA build of dmdserve needs on the GPU device machine, which
# has CUDA, a CUDA torch wheel, cmake and ninja but none of gRPC, protobuf, abseil, spdlog, fmt,
# prometheus-cpp, civetweb, libmicrohttpd, libpng, utf8proc, c-ares, re2, googletest or
# google-benchmark (see docs/GPU.md). Run it here, on a Debian 12 machine; `apt-get download`
# needs no root.
#
# The packages go to .gpu-debs/ (override: DEST=dir), which this script adds to .git/info/exclude
# so that git ignores it; name it in the device tool's `carry`. scripts/gpu/gpu_build.sh unpacks
# them on the device under /opt/deps (never into /).
#
# Usage: scripts/gpu/fetch_gpu_build_debs.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${DEST:-.gpu-debs}

# Headers, CMake package files and build tools ...
DEV_PACKAGES=(
  civetweb libabsl-dev libc-ares-dev libcivetweb-dev libcurl4-openssl-dev libfmt-dev libgmock-dev
  libgrpc++-dev libgrpc-dev libgtest-dev libbenchmark-dev libpng-dev libprotobuf-dev libre2-dev
  libspdlog-dev libssl-dev libutf8proc-dev nlohmann-json3-dev pkgconf-bin prometheus-cpp-dev
  protobuf-compiler protobuf-compiler-grpc zlib1g-dev
  # libmicrohttpd (/metrics); its pkg-config file requires gnutls's, which requires these four's
  # (pkgconf checks they exist even for a shared build). Their libraries are not carried: apt
  # itself links libgnutls30 and its dependencies, so a Debian or Ubuntu device already has them.
  libmicrohttpd-dev libgnutls28-dev nettle-dev libtasn1-6-dev libidn2-dev libp11-kit-dev
)
# ... and the shared libraries they and the tools link (CMake's imported targets check that each
# library file exists, push and curl included, although dmdserve links neither).
RUNTIME_PACKAGES=(
  libabsl20220623 libbenchmark1debian libc-ares2 libcivetweb1 libcurl4 libfmt9 libgrpc++1.51
  libgrpc29 libpkgconf3 libpng16-16 libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0
  libprometheus-cpp-push1.0 libprotobuf-lite32 libprotobuf32 libprotoc32 libre2-9 libspdlog1.10
  libssl3 libutf8proc2 zlib1g libmicrohttpd12
)

mkdir -p "$DEST" .git/info
grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude
rm -f "$DEST"/*.deb
(cd "$DEST" && apt-get download "${DEV_PACKAGES[@]}" "${RUNTIME_PACKAGES[@]}")
echo "$(find "$DEST" -name '*.deb' | wc -l) packages, $(du -sh "$DEST" | cut -f1) in $DEST"
