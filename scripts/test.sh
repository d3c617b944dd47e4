#!/usr/bin/env bash
# Install everything into ./.venv and run every check: ruff, mypy --strict, the docs site
# (MkDocs, warnings are errors), and the tests with doctests.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh" "dev"
python -c "import torch, freezesched; print(f'torch {torch.__version__}, freezesched {freezesched.__version__}')"
set -x
ruff check freezesched tests examples benchmarks
ruff format --check freezesched tests examples benchmarks
mypy --strict freezesched
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
python -m pytest -q
# The core tests once more on the oldest supported torch and on the newest available.
bash scripts/other_torch.sh min
bash scripts/other_torch.sh newest
# DeepSpeed ZeRO 1-3 on its CPU accelerator, in its own environment (an optional extra).
bash scripts/deepspeed_test.sh
# The MMRotate example's CPU smoke test, in its own environment (mmcv is compiled once).
bash scripts/mmrotate_env.sh
.venv-mmrotate/bin/python -m pytest -q examples/mmrotate_dota/tests
