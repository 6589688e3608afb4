#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv) from requirements.txt.
# Idempotent: does nothing when .venv already matches requirements.txt and pyproject.toml.
# LATENTMED_TORCH="torch==X.Y.Z" installs another torch build after the pinned set (e.g. CUDA).
# --browser also installs the headless browser the book's page test drives (scripts/browser.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--browser" ]; then
  bash scripts/browser.sh
fi
PY=${PYTHON:-python3}
"$PY" -c 'import sys; assert sys.version_info[:2] >= (3, 11), "Python 3.11+ needed, found " + sys.version.split()[0]'
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)-${LATENTMED_TORCH:-}
stamp=.venv/.latentmed-env
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo "[env] installing the pinned environment into .venv (a few minutes the first time)"
start=$(date +%s)
log=$(mktemp)
pipi() { .venv/bin/python -m pip install --disable-pip-version-check -q "$@" >>"$log" 2>&1 || { grep -v "is ignored" "$log" | tail -40; exit 1; }; }
"$PY" -m venv .venv
pipi -r requirements.txt
if [ -n "${LATENTMED_TORCH:-}" ]; then pipi "$LATENTMED_TORCH"; fi
pipi --no-deps -e .
.venv/bin/python -m ipykernel install --sys-prefix --name python3 >>"$log" 2>&1
echo "$want" > "$stamp"
echo "[env] ready in $(( $(date +%s) - start )) s"
