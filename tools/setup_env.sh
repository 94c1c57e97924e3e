#!/usr/bin/env bash
# Create .venv (if missing) and install llm with the pinned versions in requirements.lock.
# Idempotent: a second run only checks that everything is installed.
#
# Needs Python 3.11 (the version requirements.lock is pinned for). It uses $PYTHON if set, else the
# first of python3.11, python3, python that is a 3.11; anything else stops with a clear message.
set -euo pipefail
cd "$(dirname "$0")/.."

want_version=3.11
is_311() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1; }

if [[ -x .venv/bin/python ]]; then
  if ! is_311 .venv/bin/python; then
    echo "setup_env: .venv was made with $(.venv/bin/python -V 2>&1), not Python $want_version;" \
      "remove it (rm -rf .venv) and rerun." >&2
    exit 2
  fi
else
  if [[ -n ${PYTHON:-} ]]; then
    if ! command -v "$PYTHON" >/dev/null || ! is_311 "$PYTHON"; then
      echo "setup_env: PYTHON=$PYTHON is not a Python $want_version" \
        "($("$PYTHON" -V 2>&1 || echo 'not found')); point PYTHON at a python3.11." >&2
      exit 2
    fi
    PY=$PYTHON
  else
    PY=
    for candidate in python3.11 python3 python; do
      if command -v "$candidate" >/dev/null && is_311 "$candidate"; then
        PY=$candidate
        break
      fi
    done
    if [[ -z $PY ]]; then
      found=$(command -v python3 >/dev/null && python3 -V 2>&1 || echo "no python3")
      echo "setup_env: needs Python $want_version (requirements.lock is pinned for it); found" \
        "$found. Install python3.11 (e.g. apt install python3.11-venv, brew install" \
        "python@3.11, pyenv install 3.11) or set PYTHON=/path/to/python3.11." >&2
      exit 2
    fi
  fi
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi

# A fingerprint of what is installed: sha1sum (Linux) or shasum (macOS).
if command -v sha1sum >/dev/null; then
  hash_cmd=(sha1sum)
elif command -v shasum >/dev/null; then
  hash_cmd=(shasum -a 1)
else
  hash_cmd=(.venv/bin/python -c 'import hashlib, sys; print(hashlib.sha1(sys.stdin.buffer.read()).hexdigest())')
fi
stamp=.venv/.llm-installed
want=$(cat requirements.lock requirements-beam.txt setup.py | "${hash_cmd[@]}" | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  .venv/bin/python -m pip install -q -r requirements.lock
  # Beam pins protobuf<7; it runs fine against our lock, so it goes in without its resolver.
  .venv/bin/python -m pip install -q --no-deps -r requirements-beam.txt
  .venv/bin/python -m pip install -q --no-deps -e .
  # `lm_eval --model llm_jax`: lm-eval has no plugin entry point (llm/eval/lm_eval_hook.py).
  .venv/bin/python -m llm.eval.lm_eval_hook
  echo "$want" > "$stamp"
fi
