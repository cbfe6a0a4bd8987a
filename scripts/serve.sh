#!/usr/bin/env bash
# Fresh Debian 12 -> a running server: installs dependencies, builds, and starts dmdserve on the
# embedded default model (models/fashion-dmd, with models/fashion-teacher beside it). Extra
# arguments go to dmdserve (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
scripts/build.sh
exec build/server/dmdserve --model_dirs=models/fashion-dmd,models/fashion-teacher "$@"
