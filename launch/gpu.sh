#!/usr/bin/env bash
# Train on the GPUs of one machine, or one process per node under SLURM.
#
#   launch/gpu.sh --config=configs/cifar_convnext_deit.py --workdir=runs/convnext_deit
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu.sh --config=... --workdir=...
#
# One process drives all local GPUs (jit shards the batch over them). Under SLURM use
# launch/slurm.sbatch (requeue on preemption); with one task per node pat_jax.sharding gives
# each process all of its node's GPUs (JAX alone would pin it to GPU 0) and joins the
# processes (pat_jax.sharding). Set up once with:
#   python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[cuda]'
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
# XLA preallocates 75% of GPU memory by default; the input pipeline's TF stays on the CPU.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python -m pat_jax.main "$@"
