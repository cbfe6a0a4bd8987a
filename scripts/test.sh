#!/usr/bin/env bash
# Fresh Debian 12 -> every test: installs dependencies, builds, runs the whole CTest suite
# (unit, integration, Python client, fuzz smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
scripts/build.sh
cd "${BUILD_DIR:-build}"
ctest --output-on-failure --timeout 600 -j "${JOBS:-2}"
