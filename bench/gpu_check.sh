#!/usr/bin/env bash
# GPU check for a borrowed machine that has Python and JAX with CUDA but no network:
#   bench/gpu_check.sh [gpu_check.py args...]
# run from anywhere in the source tree. Wheels that such a machine lacks (Keras, Hydra and
# what they need; `make gpu-wheels` downloads them, ~10 MB) are taken from bench/gpu_wheels/
# when present and installed into a temporary folder, never into the machine's Python.
# On this machine the same script runs with the project's .venv python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3)}
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
if ! "$PY" -c "import keras, hydra" 2>/dev/null && compgen -G "bench/gpu_wheels/*.whl" >/dev/null; then
  "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" bench/gpu_wheels/*.whl
fi
export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" KERAS_BACKEND=jax
# No GPU memory grabbed up front: the CPU rows run in the same process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
exec "$PY" bench/gpu_check.py "$@"
