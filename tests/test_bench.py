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
