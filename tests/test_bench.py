"""pat_jax.bench: the step benchmark's JSON line, on a machine without TensorFlow.

The benchmark feeds synthetic arrays, so a GPU image with JAX alone must run it: TensorFlow
and TFDS are blocked in the subprocess (an import of either raises), not stubbed."""
import json
import os
import subprocess
import sys

import pytest

from pat_jax import profile_summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WITHOUT_TF = '''
import runpy, sys
sys.modules['tensorflow'] = None  # `import tensorflow` now raises ImportError
sys.modules['tensorflow_datasets'] = None
sys.argv = ['pat_jax.bench'] + sys.argv[1:]
runpy.run_module('pat_jax.bench', run_name='__main__', alter_sys=True)
'''


def test_bench_json_keys_without_tensorflow(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-c', _WITHOUT_TF, f'--config={REPO}/configs/digits_demo.py:none',
       '--config.batch_size=8', '--num_classes=10', '--steps=2', '--json', '--kernels=gelu=xla',
       f'--profile_dir={tmp_path}/profile'],
      capture_output=True, text=True, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert {'impl', 'model', 'method', 'batch_size', 'image_size', 'dtype', 'compile_s', 'peak_bytes',
          'flops_per_step', 'device', 'img_per_s', 'step_time_s', 'step_time_min_s',
          'step_time_max_s', 'mfu'} <= set(result)
  assert result['model'] == 'mini_deit' and result['method'] == 'none' and result['batch_size'] == 8
  assert result['compile_s'] > 0 and result['img_per_s'] > 0 and result['flops_per_step'] > 0
  # The compile in its parts (a cached restart skips only XLA's), and the set-up before it.
  parts = [result[k] for k in ('trace_s', 'lower_s', 'backend_compile_s')]
  assert min(parts) > 0 and abs(sum(parts) - result['compile_s']) < 1e-6 and result['setup_s'] > 0
  # The tests' compilation cache (conftest.py) is on: the step is kept, as a training start keeps it.
  assert result['step_cache'] in ('exported', 'hit')
  assert result['kernels']['gelu'] == 'xla' and result['kernels']['depthwise_conv'] == 'shift'
  # --profile_dir: the trace summed per op, named after the student's modules.
  profile = result['profile']
  assert 'error' not in profile, profile
  assert profile['by_kind']['matmul'] > 0 and profile['ops_ms_per_step'] > 0
  assert abs(sum(profile['by_kind'].values()) - profile['ops_ms_per_step']) < 0.01
  assert len(profile['top']) == 10 and profile['top'][0]['ms_per_step'] > 0
  every = profile_summary.summarize(str(tmp_path / 'profile'), steps=2, top=10_000)
  assert every['by_kind'] == profile['by_kind']
  fc1 = [r for r in every['by_where'] if r['where'] == 'blocks_*/mlp/fc1/dot_general']
  # mini_deit's 4 blocks: the forward product and its two gradients, one op each
  assert fc1 and fc1[0]['kind'] == 'matmul' and fc1[0]['ops'] == 12, fc1
  assert fc1[0]['gflop_per_s'] > 0


_FLOPS = '''
import json
import jax, jax.numpy as jnp
from pat_jax import profile_summary
x, w = jnp.ones((2, 6, 6, 4)), jnp.ones((3, 3, 4, 5))
def f(x, w, a, b):
  y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  z = jax.lax.conv_general_dilated(x, jnp.ones((3, 3, 1, 4)), (1, 1), 'SAME',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=4)
  return y.sum() + z.sum() + (a @ b).sum() + jnp.einsum('bij,bjk->bik', a[None], b[None]).sum()
a, b = jnp.ones((16, 32)), jnp.ones((32, 8))
instrs, comps = profile_summary.parse_hlo(jax.jit(f).lower(x, w, a, b).compile().as_text())
out = {}
for name in instrs:
  kind, flops = profile_summary.classify(name, instrs, comps)
  if flops:
    out.setdefault(kind, []).append(flops)
print(json.dumps({k: sorted(v) for k, v in out.items()}))
'''


def test_profile_summary_counts_the_flops_of_matmuls_and_convolutions():
  """The GFLOP/s of the profile summary come from the compiled program's own shapes."""
  proc = subprocess.run([sys.executable, '-c', _FLOPS], capture_output=True, text=True, cwd=REPO,
                        timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  flops = json.loads(proc.stdout.strip().splitlines()[-1])
  dense = 2 * 2 * 6 * 6 * 5 * 3 * 3 * 4  # batch, output pixels and channels, kernel taps x inputs
  depthwise = 2 * 2 * 6 * 6 * 4 * 3 * 3  # one input channel per group
  matmul = 2 * 16 * 8 * 32
  assert sorted(flops.get('convolution', []) + flops.get('matmul', [])) == sorted(
      [dense, depthwise, matmul, matmul]), flops


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


_GPU_GEMM = '''HloModule m

ENTRY %main (a: f32[64,32], b: f32[32,16]) -> f32[64,16] {
  %a = f32[64,32]{1,0} parameter(0)
  %b = f32[32,16]{1,0} parameter(1)
  %custom-call.1 = (f32[64,16]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}, metadata={op_name="jit(train_step)/jvp(Model)/blocks_3/mlp/fc1/dot_general"}
  ROOT %get-tuple-element.1 = f32[64,16]{1,0} get-tuple-element(%custom-call.1), index=0
}
'''


def test_profile_summary_reads_a_gpu_gemm():
  """On a GPU, XLA's matrix products are cuBLAS custom calls returning (result, workspace)."""
  instrs, comps = profile_summary.parse_hlo(_GPU_GEMM)
  assert profile_summary.classify('custom-call.1', instrs, comps) == ('matmul', 2 * 64 * 16 * 32)
  assert profile_summary.where('custom-call.1', instrs, comps) == 'blocks_*/mlp/fc1/dot_general'


def test_profile_summary_of_a_written_trace(tmp_path):
  """Events named after an instruction count (divided by the steps); where none is, kernels
  carrying an `hlo_op` argument do; the host's events beside a device's, and loops, do not."""
  import gzip  # pylint: disable=g-import-not-at-top
  (tmp_path / profile_summary.HLO_FILE).write_text(_GPU_GEMM.replace(
      '  ROOT %get', '  %while.2 = f32[64,16]{1,0} while(%a), condition=%c, body=%b\n  ROOT %get'))
  run = tmp_path / 'plugins' / 'profile' / '2026_12_03_15_00_00'
  run.mkdir(parents=True)
  def write(events):
    with gzip.open(run / 'host.trace.json.gz', 'wt') as f:
      json.dump({'traceEvents': [
          {'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/host:CPU'}},
          {'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/device:GPU:0'}},
          {'ph': 'M', 'name': 'thread_name', 'pid': 1, 'tid': 1, 'args': {'name': 'python'}},
          {'ph': 'M', 'name': 'thread_name', 'pid': 1, 'tid': 3, 'args': {'name': 'launch'}},
          {'ph': 'M', 'name': 'thread_name', 'pid': 2, 'tid': 7, 'args': {'name': 'XLA Ops'}},
          {'ph': 'X', 'name': 'custom-call.1', 'pid': 1, 'tid': 1, 'ts': 0, 'dur': 999.0},
          {'ph': 'X', 'name': 'custom-call.1', 'pid': 1, 'tid': 3, 'ts': 0, 'dur': 99.0},
          {'ph': 'X', 'name': 'while.2', 'pid': 2, 'tid': 7, 'ts': 0, 'dur': 5000.0}] + events}, f)
  write([{'ph': 'X', 'name': 'custom-call.1', 'pid': 2, 'tid': 7, 'ts': 1, 'dur': 1000.0},
         {'ph': 'X', 'name': 'custom-call.1', 'pid': 2, 'tid': 7, 'ts': 9, 'dur': 3000.0}])
  summary = profile_summary.summarize(str(tmp_path), steps=2)
  assert summary['by_kind'] == {'matmul': 2.0} and summary['ops_ms_per_step'] == 2.0
  row, = summary['top']
  assert row['calls_per_step'] == 1 and row['gflop_per_s'] == round(65536 / 2e-3 / 1e9, 1)
  write([{'ph': 'X', 'name': 'sm90_xmma_gemm_f32', 'pid': 2, 'tid': 7, 'ts': 1, 'dur': 500.0,
          'args': {'hlo_op': 'custom-call.1'}}])
  assert profile_summary.summarize(str(tmp_path), steps=1)['by_kind'] == {'matmul': 0.5}
  write([{'ph': 'X', 'name': 'sm90_xmma_gemm_f32', 'pid': 2, 'tid': 7, 'ts': 1, 'dur': 500.0}])
  with pytest.raises(ValueError, match='same program'):
    profile_summary.summarize(str(tmp_path), steps=1)
