#!/usr/bin/env bash
# Install the headless browser that tests/test_browser.py drives: Debian's `chromium` package
# (/usr/bin/chromium). Playwright (from requirements.txt) drives it; `playwright install` is
# never used (it downloads a browser build of its own). Idempotent: does nothing when
# /usr/bin/chromium runs. Needs root (or sudo) and apt-get; elsewhere it says what to install.
set -uo pipefail
CHROMIUM=${LATENTMED_CHROMIUM:-/usr/bin/chromium}
if [ -x "$CHROMIUM" ] && "$CHROMIUM" --version >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[browser] no apt-get here: install Chromium and set LATENTMED_CHROMIUM to its path" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "[browser] installing Debian's chromium needs root: run 'apt-get install chromium' as root" >&2
    exit 1
  fi
fi
echo "[browser] installing Debian's chromium (headless browser for the book's page test)"
start=$(date +%s)
log=$(mktemp)
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -q >"$log" 2>&1 &&
       $SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >>"$log" 2>&1; }; then
  tail -30 "$log" >&2
  echo "[browser] apt-get install chromium failed" >&2
  exit 1
fi
"$CHROMIUM" --version
echo "[browser] ready in $(( $(date +%s) - start )) s"
