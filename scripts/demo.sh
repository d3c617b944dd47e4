#!/usr/bin/env bash
# The main job: set up ./.venv and run the demo (about a minute on 2 CPU cores).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh" "plot"
exec python -m freezesched demo "$@"
