"""XLA flags for the CPU backend, set by the entry points before JAX starts its backends.

Always:
  --xla_cpu_experimental_ynn_fusion_type=individual_dot
      Each matrix product is its own YNNPACK call instead of being fused with the
      element-wise ops around it: XLA's default fusion made every bias add materialise a
      broadcast the size of the product.
With rematerialisation on (model.remat or teacher.remat):
  --xla_cpu_enable_concurrency_optimized_scheduler=false
      The default CPU scheduler runs the recomputed forwards early, keeping all their
      activations alive, which undoes rematerialisation. It costs some step time, so it is
      only set when memory was asked for.
Measurements of both: docs/BENCHMARKS.md ("XLA:CPU flags").

The flags only affect the CPU backend (they are set before the backend is known; the other
CPU-only forms are chosen per backend in `pat_jax.kernels`). PAT_JAX_XLA_CPU_FLAGS=0 leaves
XLA_FLAGS alone; a flag already in XLA_FLAGS is not overridden.
"""
import os

FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=individual_dot',)
REMAT_FLAGS = ('--xla_cpu_enable_concurrency_optimized_scheduler=false',)


def flags_for(config=None):
  """The flags for an experiment config (None: the always-on ones)."""
  remat = config is not None and bool(config.get('model', {}).get('remat', False) or
                                      config.get('teacher', {}).get('remat', False))
  return FLAGS + (REMAT_FLAGS if remat else ())


def apply(config=None):
  """Adds `flags_for(config)` to XLA_FLAGS. Call before the first JAX computation: XLA reads
  XLA_FLAGS once, when the backends start."""
  if os.environ.get('PAT_JAX_XLA_CPU_FLAGS', '1') == '0':
    return
  current = os.environ.get('XLA_FLAGS', '')
  extra = [f for f in flags_for(config) if f.split('=')[0] not in current]
  if extra:
    os.environ['XLA_FLAGS'] = ' '.join([current] + extra).strip()
