#!/usr/bin/env bash
# DeepSpeed ZeRO stages 1-3 with freezesched on DeepSpeed's CPU accelerator (2 gloo
# processes), in its own environment ./.venv-deepspeed (DeepSpeed is an optional extra and
# not part of the dev install). Called by scripts/test.sh. Creating the environment takes
# about 2 minutes once (torch comes from the pip cache); the test itself about 25 seconds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
venv=.venv-deepspeed
log="$venv.install.log"
if [ ! -x "$venv/bin/python" ]; then
  echo "freezesched: creating $venv" >&2
  "$PYTHON" -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import deepspeed, freezesched, pytest" 2>/dev/null; then
  echo "freezesched: installing DeepSpeed into $venv (log: $log)" >&2
  if ! "$venv/bin/python" -m pip install --disable-pip-version-check \
       -c scripts/constraints.txt -e ".[test]" deepspeed >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    exit 1
  fi
fi
DS_ACCELERATOR=cpu "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_deepspeed.py
