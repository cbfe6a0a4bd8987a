#!/usr/bin/env bash
# Fresh Debian 12 -> every test: installs dependencies, builds, runs the whole CTest suite
# (unit, integration, Python client, fuzz smoke), then the sanitizer builds and their tests
# (scripts/sanitize.sh: ASan+UBSan, TSan), whether or not the suite passed. DMDSERVE_SANITIZERS=0
# skips the sanitizer builds (for a quicker run by hand; CI runs everything).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
scripts/build.sh
status=0
(cd "${BUILD_DIR:-build}" && ctest --output-on-failure --timeout 600 -j "${JOBS:-2}") || status=$?
if [[ ${DMDSERVE_SANITIZERS:-1} != 0 ]]; then
  scripts/sanitize.sh || status=1
fi
exit "$status"
