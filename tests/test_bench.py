"""pat_jax.bench: the step benchmark's JSON line, on a machine without TensorFlow.

The benchmark feeds synthetic arrays, so a GPU image with JAX alone must run it: TensorFlow
and TFDS are blocked in the subprocess (an import of either raises), not stubbed."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WITHOUT_TF = '''
import runpy, sys
sys.modules['tensorflow'] = None  # `import tensorflow` now raises ImportError
sys.modules['tensorflow_datasets'] = None
sys.argv = ['pat_jax.bench'] + sys.argv[1:]
runpy.run_module('pat_jax.bench', run_name='__main__', alter_sys=True)
'''


def test_bench_json_keys_without_tensorflow():
  proc = subprocess.run(
      [sys.executable, '-c', _WITHOUT_TF, f'--config={REPO}/configs/digits_demo.py:none',
       '--config.batch_size=8', '--num_classes=10', '--steps=2', '--json', '--kernels=gelu=xla'],
      capture_output=True, text=True, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert {'impl', 'model', 'method', 'batch_size', 'image_size', 'dtype', 'compile_s', 'peak_bytes',
          'flops_per_step', 'device', 'img_per_s', 'step_time_s', 'step_time_min_s',
          'step_time_max_s', 'mfu'} <= set(result)
  assert result['model'] == 'mini_deit' and result['method'] == 'none' and result['batch_size'] == 8
  assert result['compile_s'] > 0 and result['img_per_s'] > 0 and result['flops_per_step'] > 0
  assert result['kernels']['gelu'] == 'xla' and result['kernels']['depthwise_conv'] == 'shift'


def test_breakdown_parts_take_the_batch_and_weights_as_arguments():
  """Each part of `--breakdown` is its own program; closed over, the batch and the weights
  became constants inside it, unlike in the real step."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pat_jax import bench, config as base_config, models, sharding, train  # pylint: disable=g-import-not-at-top
  from pat_jax.distill import pat  # pylint: disable=g-import-not-at-top

  c = base_config.base('vit_mlp')
  c.model.name, c.teacher.name = 'mini_deit', 'mini_convnext'
  c.dataset.image_size, c.batch_size = 32, 4
  c.method = ml_collections.ConfigDict(pat.default_config())
  c.method.raa_dim = 32
  teacher = models.create(c.teacher.name, num_classes=10)
  mesh = sharding.make_mesh(1)
  tv = train.teacher_layout(teacher, jax.jit(teacher.init)(jax.random.PRNGKey(1),
                                                           jnp.zeros((1, 32, 32, 3))), mesh)
  trainer = train.make_trainer(c, mesh, 10, steps_per_epoch=10, teacher=teacher, teacher_vars=tv)
  state = trainer.init(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  batch = sharding.global_batch({'image': rng.standard_normal((4, 32, 32, 3), dtype=np.float32),
                                 'label': np.eye(10, dtype=np.float32)[rng.integers(0, 10, 4)]}, mesh)
  parts = bench.breakdown_parts(trainer, state, batch, tv)
  assert set(parts) == {'student_fwd_bwd', 'teacher_fwd', 'prompted_teacher_fwd_bwd',
                        'raa_aligners_loss_fwd_bwd'}
  for name, (fn, args) in parts.items():
    text = jax.jit(fn).lower(*args).as_text()
    # The batch alone is 49 kB of float32: as a constant, one line of hex twice that long.
    longest = max(len(line) for line in text.splitlines() if 'stablehlo.constant' in line)
    assert longest < 5_000, (name, longest)
    out = jax.jit(fn)(*args)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(out)), name
