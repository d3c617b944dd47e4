# Sourced by scripts/demo.sh and scripts/test.sh: create (or reuse) ./.venv and install
# freezesched into it with the given extras. Versions pinned for development live in
# scripts/constraints.txt (torch 2.13.0 is the CPU wheel; the package itself needs
# torch>=2.12.0, see pyproject.toml).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "freezesched: creating .venv with $($PYTHON --version)" >&2
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
extras="${1:-}"
log=.venv/install.log
echo "freezesched: installing into .venv (log: $log)" >&2
if ! { python -m pip install --disable-pip-version-check --upgrade pip &&
       python -m pip install --disable-pip-version-check \
         -c scripts/constraints.txt -e ".${extras:+[$extras]}"; } >"$log" 2>&1; then
  tail -n 40 "$log" >&2
  echo "freezesched: installation failed; the full log is $log" >&2
  exit 1
fi
