#!/usr/bin/env bash
# Create (or reuse) ./.venv-mmrotate: the MMRotate 1.x stack on the CPU torch wheel, for
# the CPU smoke test of examples/mmrotate_dota. Pinned versions (see the example's README):
#   torch 2.13.0 (CPU), mmcv 2.1.0 (compiled here with its CPU ops; no wheel exists for this
#   torch), mmengine 0.10.7, mmdet 3.3.0, mmrotate-dev 1.0.1 (a third-party repackage of
#   upstream MMRotate's 1.x branch; the official mmrotate==1.0.0rc1 pins mmcv 2.0.x and
#   mmdet 3.0.0, which do not build against this torch).
# The compiled mmcv wheel (about 4 minutes on 2 cores) is cached in
# ${FREEZESCHED_WHEELHOUSE:-$HOME/.cache/freezesched/wheels} and reused by later runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
venv=.venv-mmrotate
wheels="${FREEZESCHED_WHEELHOUSE:-$HOME/.cache/freezesched/wheels}"
log="$venv.install.log"
if [ ! -x "$venv/bin/python" ]; then
  echo "freezesched: creating $venv" >&2
  "$PYTHON" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)
if ! "$venv/bin/python" -c "import mmcv, mmdet, mmrotate, pytest" 2>/dev/null; then
  echo "freezesched: installing the MMRotate stack into $venv (log: $log)" >&2
  {
    "${pip[@]}" torch==2.13.0 setuptools==80.9.0 wheel ninja numpy "pytest>=7.4"
    mkdir -p "$wheels"
    if ! ls "$wheels"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
      echo "compiling mmcv 2.1.0 with CPU ops into $wheels"
      MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=2 CFLAGS="-O2 -g0" \
        "$venv/bin/python" -m pip wheel --no-build-isolation --no-deps -w "$wheels" mmcv==2.1.0
    fi
    "${pip[@]}" "$wheels"/mmcv-2.1.0-*.whl mmengine==0.10.7 mmdet==3.3.0 mmrotate-dev==1.0.1
  } >"$log" 2>&1 || { tail -n 40 "$log" >&2; echo "freezesched: see $log" >&2; exit 1; }
fi
"${pip[@]}" --no-deps -e . >>"$log" 2>&1
