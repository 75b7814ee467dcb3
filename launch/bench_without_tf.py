"""`python -m pat_jax.bench` on a machine without TensorFlow (e.g. a bare GPU image with JAX).

    PYTHONPATH=. python3 launch/bench_without_tf.py --config=configs/cifar_convnext_deit.py \
        --config.batch_size=128 --config.dtype=bfloat16 --steps 10 --json

The benchmark feeds synthetic arrays and never runs the input pipeline, but `pat_jax.data`
imports TensorFlow and TFDS at module level; this puts permissive stand-ins for both in
sys.modules first. Training and evaluation need the real packages (README set-up). The GPU
table in docs/BENCHMARKS.md was measured this way.
"""
import runpy
import sys
from unittest import mock


class _Builder:  # pat_jax.data.digits subclasses tfds.core.GeneratorBasedBuilder
  def __init__(self, *args, **kwargs):
    pass


def _stand_in(name):
  module = mock.MagicMock(name=name)
  module.__name__, module.__path__, module.__spec__ = name, [], None
  return module


if __name__ == '__main__':
  for name in ('tensorflow', 'tensorflow_datasets'):
    if name in sys.modules:
      raise SystemExit(f'{name} is already imported: run pat_jax.bench directly.')
    sys.modules[name] = _stand_in(name)
  sys.modules['tensorflow_datasets'].core.GeneratorBasedBuilder = _Builder
  sys.argv = ['pat_jax.bench'] + sys.argv[1:]
  runpy.run_module('pat_jax.bench', run_name='__main__', alter_sys=True)
