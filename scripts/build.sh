#!/usr/bin/env bash
# THE MAIN COMMAND: set up .venv, generate the testbed, train the models, execute every
# notebook with papermill and build the Jupyter Book into _build/html. Re-running it reuses
# whatever is already built. Extra arguments go to `latentmed build` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
# Idle OpenMP threads sleep instead of spinning: on 2 shared cores spinning made torch 4x slower.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec .venv/bin/python -m latentmed build "$@"
