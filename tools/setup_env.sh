#!/usr/bin/env bash
# Create .venv (if missing) and install llm with the pinned versions in requirements.lock.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=.venv/.llm-installed
want=$(cat requirements.lock requirements-beam.txt setup.py | sha1sum | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  .venv/bin/python -m pip install -q -r requirements.lock
  # Beam pins protobuf<7; it runs fine against our lock, so it goes in without its resolver.
  .venv/bin/python -m pip install -q --no-deps -r requirements-beam.txt
  .venv/bin/python -m pip install -q --no-deps -e .
  # `lm_eval --model llm_jax`: lm-eval has no plugin entry point (llm/eval/lm_eval_hook.py).
  .venv/bin/python -m llm.eval.lm_eval_hook
  echo "$want" > "$stamp"
fi
