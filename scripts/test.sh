#!/usr/bin/env bash
# Install everything into ./.venv and run every check: tests with doctests, ruff, mypy --strict.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh" "dev"
python -c "import torch, freezesched; print(f'torch {torch.__version__}, freezesched {freezesched.__version__}')"
set -x
ruff check freezesched tests examples benchmarks
ruff format --check freezesched tests examples benchmarks
mypy --strict freezesched
python -m pytest -q
