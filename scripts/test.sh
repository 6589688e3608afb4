#!/usr/bin/env bash
# THE TEST COMMAND: set up .venv, then run the unit tests and the nbval regression tests of the
# notebooks (tests/notebooks/*.ipynb, executed copies with CI parameters) in one pytest run.
set -uo pipefail
cd "$(dirname "$0")/.."
# the environment, plus Debian's chromium for the book's browser test (tests/test_browser.py)
bash scripts/env.sh --browser || exit 1
# Idle OpenMP threads sleep instead of spinning: on 2 shared cores spinning made torch 4x slower.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# Tests and notebook checks keep their generated files apart from the main build.
export LATENTMED_DATA="$PWD/build/test/data" LATENTMED_MODELS="$PWD/build/test/models" \
       LATENTMED_RESULTS="$PWD/build/test/results"
.venv/bin/python -m pytest tests --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg \
  --nbval-current-env "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests: that is a failure of ours" >&2
  exit 1
fi
exit "$rc"
