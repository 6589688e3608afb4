#!/usr/bin/env bash
# THE MAIN COMMAND: set up .venv, generate the testbed, train the models, execute every
# notebook with papermill and build the Jupyter Book into _build/html. Re-running it reuses
# whatever is already built. Extra arguments go to `latentmed build` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
exec .venv/bin/python -m latentmed build "$@"
