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


_BREAKDOWN = '''
import json
import jax, jax.numpy as jnp, ml_collections, numpy as np
from pat_jax import bench, config as base_config, models, sharding, train
from pat_jax.distill import pat
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
out = {}
for name, (fn, args) in bench.breakdown_parts(trainer, state, batch, tv).items():
  text = jax.jit(fn).lower(*args).as_text()
  longest = max(len(line) for line in text.splitlines() if 'stablehlo.constant' in line)
  finite = all(bool(np.isfinite(np.asarray(x)).all())
               for x in jax.tree_util.tree_leaves(jax.jit(fn)(*args)))
  out[name] = [longest, finite]
print(json.dumps(out))
'''


def test_breakdown_parts_take_the_batch_and_weights_as_arguments():
  """Each part of `--breakdown` is its own program; closed over, the batch and the weights
  became constants inside it, unlike in the real step. (A subprocess: pat_jax.bench defines
  absl flags that pat_jax.main defines too.)"""
  proc = subprocess.run([sys.executable, '-c', _BREAKDOWN], capture_output=True, text=True,
                        cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  parts = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(parts) == {'student_fwd_bwd', 'teacher_fwd', 'prompted_teacher_fwd_bwd',
                        'raa_aligners_loss_fwd_bwd'}
  for name, (longest, finite) in parts.items():
    # The batch alone is 49 kB of float32: as a constant, one line of hex twice that long.
    assert longest < 5_000, (name, longest)
    assert finite, name
