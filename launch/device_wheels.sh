#!/usr/bin/env bash
# The wheels of pat_jax's pure-Python pins that a lent GPU machine lacks, into .whl/ (ignored
# by git). Its image has JAX (with CUDA), flax, optax, orbax, chex, einops, numpy, Pillow,
# scikit-learn and safetensors, but not ml_collections, and no package index; optax is carried
# at pat_jax's pin so that the optimizer is the one the tests check. Run here (pip reaches the
# registry), then carry .whl: launch/device_check.sh installs them when an import fails.
#
#   bash launch/device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
# Pure-Python wheels (py3-none-any): the same file for the device's Python 3.12.
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
  ml-collections==1.1.0 optax==0.2.8
ls .whl
