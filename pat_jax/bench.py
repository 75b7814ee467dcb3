"""Throughput and memory of a config's train step, on synthetic data.

  python -m pat_jax.bench --config=configs/<exp>.py [--config.key=value ...] [--steps K] --json
  python -m pat_jax.bench --config=... --torch      # the same step in timm + PyTorch, for comparison
  python -m pat_jax.bench data [args of pat_jax.data.bench]   # the input pipeline alone

Student and teacher are randomly initialised (compute does not depend on the values), so no
dataset or checkpoint is needed. Prints one JSON line with img_per_s, step_time_s
(median), compile_s, peak_bytes (per device, from the compiled step's memory analysis),
mfu (when the device's peak FLOP/s is known) and device.
"""
import json
import statistics
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_integer('steps', 10, 'Timed steps (after one compile-and-run step).')
flags.DEFINE_integer('num_classes', 100, 'Classes of the synthetic task.')
flags.DEFINE_bool('json', False, 'Print only the JSON line.')
flags.DEFINE_bool('torch', False, 'Time the same step in timm + PyTorch instead (method none/kd).')

# Dense bf16 peak FLOP/s per chip, for MFU.
_PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'TPU v4': 275e12, 'TPU v5e': 197e12,
               'TPU v5p': 459e12, 'TPU v6': 918e12}


def _peak_flops(device_kind: str):
  for k, v in _PEAK_FLOPS.items():
    if k.lower() in device_kind.lower():
      return v
  return None


def bench_jax(config, steps, num_classes):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pat_jax import models, sharding, train  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(config.get('num_devices', 0))
  teacher = teacher_vars = None
  if config.teacher.name:
    overrides = train._model_overrides(config, config.teacher.name, jnp.dtype(config.dtype))  # pylint: disable=protected-access
    teacher = models.create(config.teacher.name, num_classes=num_classes, **overrides)
    size = config.dataset.image_size
    teacher_vars = jax.jit(lambda r: teacher.init(r, jnp.zeros((1, size, size, 3))),
                           out_shardings=sharding.replicated(mesh))(jax.random.PRNGKey(1))
  trainer = train.make_trainer(config, mesh, num_classes, steps_per_epoch=1000,
                               teacher=teacher, teacher_vars=teacher_vars)
  state = trainer.init(jax.random.PRNGKey(0))
  b, s = config.batch_size, config.dataset.image_size
  rng = np.random.default_rng(0)
  labels = np.eye(num_classes, dtype=np.float32)[rng.integers(0, num_classes, b)]
  batch = sharding.global_batch({'image': rng.standard_normal((b, s, s, 3), dtype=np.float32),
                                 'label': labels}, mesh)

  t0 = time.perf_counter()
  compiled = trainer.train_step.lower(state, batch, teacher_vars).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0)) if cost else 0.0

  state, m = compiled(state, batch, teacher_vars)  # first run (allocations)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = compiled(state, batch, teacher_vars)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  step_time = statistics.median(times)
  device = jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  peak_flops = _peak_flops(device.device_kind)
  n = mesh.devices.size
  return {
      'impl': 'pat_jax', 'model': config.model.name, 'teacher': config.teacher.name,
      'method': config.method.name, 'batch_size': b, 'image_size': s, 'dtype': config.dtype,
      'img_per_s': b / step_time, 'step_time_s': step_time, 'step_time_min_s': min(times),
      'step_time_max_s': max(times), 'compile_s': compile_s, 'peak_bytes': peak,
      'device_peak_bytes_in_use': (stats or {}).get('peak_bytes_in_use'),
      'flops_per_step': flops,
      'mfu': (flops / step_time / (peak_flops * n)) if (peak_flops and flops) else None,
      'device': f'{n} x {device.device_kind} ({device.platform})',
  }


def bench_torch(config, steps, num_classes):
  """The same supervised/KD step in timm + PyTorch (fp32 on CPU; AMP fp16 on CUDA when dtype=bfloat16)."""
  import torch  # pylint: disable=g-import-not-at-top
  from pat_jax import timm_zoo  # pylint: disable=g-import-not-at-top
  if config.method.name not in ('none', 'kd'):
    raise app.UsageError('--torch times method none or kd only.')
  dev = 'cuda' if torch.cuda.is_available() else 'cpu'
  s, b = config.dataset.image_size, config.batch_size
  kw = {'img_size': s} if 'img_size' in timm_zoo.models.spec(config.model.name).shared_overrides else {}
  student = timm_zoo.create(config.model.name, num_classes, **kw).to(dev).train()
  teacher = None
  if config.method.name == 'kd':
    tkw = {'img_size': s} if 'img_size' in timm_zoo.models.spec(config.teacher.name).shared_overrides else {}
    teacher = timm_zoo.create(config.teacher.name, num_classes, **tkw).to(dev).eval()
  decay = [p for p in student.parameters() if p.ndim > 1]
  no_decay = [p for p in student.parameters() if p.ndim <= 1]
  groups = [{'params': decay, 'weight_decay': config.optim.weight_decay},
            {'params': no_decay, 'weight_decay': 0.0}]
  if config.optim.name == 'sgd':
    opt = torch.optim.SGD(groups, lr=config.optim.lr, momentum=0.9, nesterov=True)
  else:
    opt = torch.optim.AdamW(groups, lr=config.optim.lr)
  x = torch.randn(b, 3, s, s, device=dev)
  y = torch.softmax(torch.randn(b, num_classes, device=dev), -1)
  amp = dev == 'cuda' and config.dtype == 'bfloat16'
  scaler = torch.amp.GradScaler(enabled=amp)

  def step():
    with torch.autocast(device_type=dev, dtype=torch.float16, enabled=amp):
      out = student(x)
      loss = torch.sum(-y * torch.log_softmax(out.float(), -1), -1).mean()
      if teacher is not None:
        with torch.no_grad():
          t = teacher(x)
        loss = loss + torch.nn.functional.kl_div(torch.log_softmax(out.float(), -1),
                                                 torch.softmax(t.float(), -1), reduction='batchmean')
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if config.optim.clip_grad:
      scaler.unscale_(opt)
      torch.nn.utils.clip_grad_norm_(student.parameters(), config.optim.clip_grad)
    scaler.step(opt)
    scaler.update()
    if dev == 'cuda':
      torch.cuda.synchronize()

  t0 = time.perf_counter()
  step()
  first = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  step_time = statistics.median(times)
  return {'impl': f'timm+torch {torch.__version__}', 'model': config.model.name,
          'teacher': config.teacher.name, 'method': config.method.name, 'batch_size': b,
          'image_size': s, 'dtype': 'fp16-amp' if amp else 'float32', 'img_per_s': b / step_time,
          'step_time_s': step_time, 'step_time_min_s': min(times), 'step_time_max_s': max(times),
          'compile_s': first, 'threads': torch.get_num_threads(), 'device': dev}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments {argv[1:]} (for the data benchmark: '
                         'python -m pat_jax.bench data ...).')
  if FLAGS.config is None:
    raise app.UsageError('--config is required.')
  fn = bench_torch if FLAGS.torch else bench_jax
  result = fn(FLAGS.config, FLAGS.steps, FLAGS.num_classes)
  if FLAGS.json:
    print(json.dumps(result), flush=True)
  else:
    for k, v in result.items():
      print(f'{k:>24}: {v}')


if __name__ == '__main__':
  if len(sys.argv) > 1 and sys.argv[1] == 'data':
    from pat_jax.data import bench as data_bench  # pylint: disable=g-import-not-at-top
    sys.argv = [sys.argv[0]] + sys.argv[2:]
    sys.exit(data_bench.main())
  app.run(main)
