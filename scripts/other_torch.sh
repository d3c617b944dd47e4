#!/usr/bin/env bash
# Run the core tests on another torch: `min` (the oldest supported, pyproject's torch>=)
# or `newest` (the newest this machine's package index has), each in its own venv
# (./.venv-torch-min, ./.venv-torch-newest). Called by scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
which="${1:?usage: other_torch.sh min|newest}"
PYTHON="${PYTHON:-python3}"
venv=".venv-torch-$which"
case "$which" in
  min) minimum=$(sed -n 's/^ *"torch>=\([0-9.]*\)",$/\1/p' pyproject.toml); torch="torch==$minimum" ;;
  newest) torch="torch" ;;
  *) echo "usage: other_torch.sh min|newest" >&2; exit 2 ;;
esac
log="$venv.install.log"
if [ ! -x "$venv/bin/python" ]; then
  "$PYTHON" -m venv "$venv"
fi
echo "freezesched: installing $torch into $venv (log: $log)" >&2
if ! { "$venv/bin/python" -m pip install --disable-pip-version-check --upgrade "$torch" \
         numpy typing-extensions "pytest>=7.4" "hypothesis>=6.80" &&
       "$venv/bin/python" -m pip install --disable-pip-version-check --no-deps -e .; } >"$log" 2>&1; then
  tail -n 40 "$log" >&2
  exit 1
fi
"$venv/bin/python" -c "import torch; print(f'core tests on torch {torch.__version__} ($which)')"
# The core: everything but the framework integrations, the CLI/demo and the benchmarks;
# FSDP2 (whose internals freezesched reads to find sharded parameters) on each torch.
"$venv/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_schedules.py tests/test_guard.py tests/test_guard_adversarial.py \
  tests/test_controller.py tests/test_first_hour.py tests/test_profiling_flops.py \
  tests/test_profiling_run.py tests/test_profiling_memory.py tests/test_amp.py \
  tests/test_ddp.py tests/test_architecture.py tests/test_trainable_rules.py \
  tests/test_distributed.py tests/test_memory_plan.py \
  tests/test_scale_out.py::test_fsdp2_freezing_per_block_and_in_the_root_group
if [ "$which" = newest ]; then
  # PEFT and timm (optional extras, issue 16): torchvision built for this torch, timm,
  # peft (which brings transformers and accelerate) and Lightning, then their tests, the
  # doctests of the two integrations, the worked example, and fast frozen mode on
  # torchvision's and timm's models (issue 17), and the README quickstart on torchvision's
  # ResNet-50 (issue 15). The main venv has none of them (its torch has no matching
  # torchvision), so those tests skip or use a stand-in there.
  echo "freezesched: installing torchvision, timm, peft, lightning into $venv" >&2
  if ! "$venv/bin/python" -m pip install --disable-pip-version-check "torchvision==0.29.1" \
         "timm>=1.0" "peft>=0.15" "lightning>=2.2" "numpy<2.3" >>"$log" 2>&1; then
    tail -n 40 "$log" >&2
    exit 1
  fi
  "$venv/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_peft.py tests/test_timm.py tests/test_side_network.py \
    tests/test_integration_peft.py tests/test_example_peft.py tests/test_fast.py \
    tests/test_fast_stale.py tests/test_fast_building.py \
    tests/test_first_hour.py::test_the_readme_quickstart_runs_on_a_resnet_50 \
    freezesched/integrations/peft.py freezesched/integrations/timm.py
fi
