#!/usr/bin/env bash
# Creates .venv with everything commlayer, its tests and benchmarks need.
# torch is pinned to the local CPU build *before* the package, so pip never pulls CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,bench]"
.venv/bin/python -c "import torch, zmq, commlayer, commlayer.codecs, commlayer.topologies; print('commlayer', commlayer.__version__, 'torch', torch.__version__, 'pyzmq', zmq.__version__)"
