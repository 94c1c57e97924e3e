#!/usr/bin/env bash
# Fresh machine -> a trained model: set up .venv, then pretrain the quickstart config on the
# embedded corpus (the running Python's own standard library). Extra args go to the experiment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
exec .venv/bin/python -m experiments.pretrain_ntp \
  --gin_file=gin_configs/experiments/quickstart.gin "$@"
