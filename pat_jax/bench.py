"""Throughput and memory of a config's train step, on synthetic data.

  python -m pat_jax.bench --config=configs/<exp>.py [--config.key=value ...] [--steps K] --json
  python -m pat_jax.bench --config=... --torch      # the same step in timm + PyTorch, for comparison
  python -m pat_jax.bench data [args of pat_jax.data.bench]   # the input pipeline alone

Student and teacher are randomly initialised (compute does not depend on the values), so no
dataset or checkpoint is needed. Prints one JSON line with img_per_s, step_time_s
(median), compile_s (the train step's one program: a fresh run's first step, without PAT's
feedback yet, and every later step) and its parts trace_s (JAX tracing the Python step), lower_s
(to StableHLO) and backend_compile_s (XLA's compile, or loading the executable from a warm
--compilation_cache), step_cache (with a compilation cache the step is prepared as a training
start prepares it, pat_jax/step_cache.py: 'exported' when traced and kept, trace_s then tracing and
lowering it, lower_s lowering the call of the kept program; 'hit' when read back, trace_s then
reading it; 'off' without a cache or with --config.step_cache=False), setup_s (before the step:
the teacher's and the train state's variables, their programs compiled or loaded), peak_bytes
(per device, from the compiled step's memory analysis), mfu (when the device's peak FLOP/s is
known) and device.
"""
import json
import os
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
flags.DEFINE_bool('compile_only', False, 'Compile and report memory/FLOPs without running the step.')
flags.DEFINE_bool('breakdown', False, 'PAT: also time the parts of the step separately.')
flags.DEFINE_string('kernels', '', 'Forms of the fast ops (pat_jax/kernels), as PAT_JAX_KERNELS: '
                    "'plain', or 'op=form,...'; '': the backend's table.")
flags.DEFINE_string('profile_dir', '', 'Write a jax.profiler trace of the timed steps there '
                    '(open with TensorBoard or xprof) with the step\'s HLO, and add its summary '
                    '(pat_jax.profile_summary: time per kind of op and per source line) to the '
                    'result as `profile`. The traced steps are slower (on CPU the tracer records '
                    'every thread-pool task): time without it.')
flags.DEFINE_string('compilation_cache', '',
                    "JAX's persistent compilation cache folder, every program cached: run twice "
                    "with one folder to time a cached start. '': JAX's own setting (off unless "
                    '$JAX_COMPILATION_CACHE_DIR).')

# The result's own seconds (and img_per_s); --breakdown adds a '<part>_s' key per part beside them.
RESULT_SECONDS = ('compile_s', 'trace_s', 'lower_s', 'backend_compile_s', 'setup_s', 'step_time_s',
                  'step_time_min_s', 'step_time_max_s', 'img_per_s')

# Dense bf16 peak FLOP/s per chip, for MFU.
_PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'TPU v4': 275e12, 'TPU v5e': 197e12,
               'TPU v5p': 459e12, 'TPU v6': 918e12}


def _peak_flops(device_kind: str):
  for k, v in _PEAK_FLOPS.items():
    if k.lower() in device_kind.lower():
      return v
  return None


def _median_time(fn, *args, steps=3):
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def pat_breakdown(trainer, state, batch, teacher_vars, steps):
  """Seconds for the parts of a PAT step, each compiled on its own (XLA fuses across them
  in the real step, so they need not add up to it exactly)."""
  import jax  # pylint: disable=g-import-not-at-top
  return {f'{name}_s': _median_time(jax.jit(fn), *args, steps=steps)
          for name, (fn, args) in breakdown_parts(trainer, state, batch, teacher_vars).items()}


def breakdown_parts(trainer, state, batch, teacher_vars):
  """The parts of a PAT step as {name: (function, arguments)}. Every array a part reads is an
  argument, as in the real step: closed over, the batch and the weights would be program
  constants, which XLA may fold or lay out differently."""
  import jax  # pylint: disable=g-import-not-at-top
  from pat_jax.distill import losses, pat_modules  # pylint: disable=g-import-not-at-top
  method, student = trainer.method, trainer.student
  images, labels = batch['image'], batch['label']
  stats = {'batch_stats': state.batch_stats['student']} if state.batch_stats['student'] else {}

  def student_loss(p, stats, images, labels):
    logits, _ = student.apply({'params': p, **stats}, images, train=True, mutable=['batch_stats'],
                              rngs={'dropout': jax.random.PRNGKey(0)})
    return losses.soft_target_cross_entropy(logits, labels)

  def teacher_fwd(tv, x):
    return method.teacher.apply(tv, x, train=False)

  _, feats_s = student.apply({'params': state.params['student'], **stats}, images, train=False,
                             return_features=True)
  logits_t0 = jax.jit(teacher_fwd)(teacher_vars, images)
  net = method.net
  feedback = {s: state.method_state['student'][s] - state.method_state['teacher'][s]
              for s in net.afp_stages}

  def prompted_loss(p, rest, tv, mstats, images, feats_s, feedback, logits_t0):
    # Only the prompted teacher's logits: XLA drops the RAA branch.
    variables = {'params': {**rest, **p, 'teacher': tv['params']}, 'batch_stats': mstats}
    (logits_t, _), _ = net.apply(variables, images, feats_s, feedback, True, mutable=['batch_stats'])
    return losses.kd_loss(logits_t, logits_t0, 1.0)

  _, feats_t = jax.jit(lambda tv, x: method.teacher.apply(tv, x, train=False, return_features=True)
                       )(teacher_vars, images)
  fl = pat_modules.PATFeatureLoss(net.student_shapes, tuple(net.feedback_shape(s) for s in range(4)),
                                  net.num_queries, net.dim, net.heads)

  def feature_loss(p, fs, fl_stats, feats_t):
    out, _ = fl.apply({'params': p, 'batch_stats': fl_stats}, fs, feats_t, True,
                      mutable=['batch_stats'])
    return out['loss']

  mparams = {k: v for k, v in state.params['method'].items() if k != 'distill'}
  mstats = dict(state.batch_stats['method'])
  distill = state.params['method']['distill']
  return {
      'student_fwd_bwd': (jax.grad(student_loss), (state.params['student'], stats, images, labels)),
      'teacher_fwd': (teacher_fwd, (teacher_vars, images)),
      'prompted_teacher_fwd_bwd': (jax.grad(prompted_loss), (
          mparams, {'distill': distill}, teacher_vars, mstats, images, feats_s, feedback, logits_t0)),
      'raa_aligners_loss_fwd_bwd': (jax.grad(feature_loss, argnums=(0, 1)), (
          distill, feats_s, mstats.get('distill', {}), feats_t)),
  }


def bench_jax(config, steps, num_classes, compile_only=False, breakdown=False, profile_dir=''):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pat_jax import kernels, profile_summary, sharding, step_cache, train  # pylint: disable=g-import-not-at-top

  t_setup = time.perf_counter()
  mesh = sharding.make_mesh(config.get('num_devices', 0))
  teacher = teacher_vars = None
  if config.teacher.name:
    teacher = train.create_teacher(config, num_classes)
    size = config.dataset.image_size
    plain_vars = jax.jit(lambda r: teacher.init(r, jnp.zeros((1, size, size, 3))),
                         out_shardings=sharding.replicated(mesh))(jax.random.PRNGKey(1))
    teacher_vars = train.teacher_layout(teacher, plain_vars, mesh)
  trainer = train.make_trainer(config, mesh, num_classes, steps_per_epoch=1000,
                               teacher=teacher, teacher_vars=teacher_vars)
  state = trainer.init(jax.random.PRNGKey(0))
  b, s = config.batch_size, config.dataset.image_size
  rng = np.random.default_rng(0)
  labels = np.eye(num_classes, dtype=np.float32)[rng.integers(0, num_classes, b)]
  batch = sharding.global_batch({'image': rng.standard_normal((b, s, s, 3), dtype=np.float32),
                                 'label': labels}, mesh)

  jax.block_until_ready((state, batch, teacher_vars))
  setup_s = time.perf_counter() - t_setup

  # One program for every step, a fresh run's first one included (see train.make_trainer),
  # prepared as a training start prepares it: with a compilation cache, its lowered program is
  # kept and a cached restart skips the tracing too (step_cache.py). Timed in three parts.
  step = step_cache.CachedStep(trainer.train_step, trainer.fingerprint,
                               step_cache.directory(config))
  run = step.prepare(state, batch, teacher_vars)
  compiled, parts = step.compiled, step.times
  compile_s = sum(parts.values())
  if profile_dir:  # the compiled program names the trace's ops (pat_jax.profile_summary)
    os.makedirs(profile_dir, exist_ok=True)
    with open(os.path.join(profile_dir, profile_summary.HLO_FILE), 'w') as f:
      f.write(compiled.as_text())
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes)
  cost = compiled.cost_analysis()
  if teacher is not None and getattr(teacher, 'scan_blocks', False):
    # XLA counts a loop body once, whatever its trip count: count the unrolled teacher's step
    # (lowered only, not compiled: the unoptimised program's count, 2% below the compiled one's
    # for the digits KD step) so that flops_per_step and MFU stay comparable.
    unrolled = teacher.clone(scan_blocks=False)
    cost = train.make_trainer(config, mesh, num_classes, steps_per_epoch=1000, teacher=unrolled,
                              teacher_vars=plain_vars).train_step.lower(
                                  state, batch, plain_vars).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0)) if cost else 0.0

  device = jax.devices()[0]
  n = mesh.devices.size
  result = {
      'impl': 'pat_jax', 'model': config.model.name, 'teacher': config.teacher.name,
      'method': config.method.name, 'batch_size': b, 'image_size': s, 'dtype': str(train.compute_dtype(config)),
      'remat': bool(config.model.remat or config.teacher.remat), 'compile_s': compile_s,
      **parts, 'setup_s': setup_s, 'step_cache': step.status,
      'peak_bytes': peak, 'flops_per_step': flops, 'kernels': kernels.resolved(),
      'device': f'{n} x {device.device_kind} ({device.platform})'}
  if compile_only:
    return result
  extra = pat_breakdown(trainer, state, batch, teacher_vars, steps) if breakdown else {}
  state, m = run(state, batch, teacher_vars)  # first run (allocations)
  jax.block_until_ready(m)
  times = []
  if profile_dir:
    options = jax.profiler.ProfileOptions()
    options.host_tracer_level = 3  # XLA:CPU's thunks (its ops) are recorded at level 3
    jax.profiler.start_trace(profile_dir, profiler_options=options)
  for _ in range(steps):
    t = time.perf_counter()
    state, m = run(state, batch, teacher_vars)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  if profile_dir:
    jax.profiler.stop_trace()
    try:
      extra['profile'] = profile_summary.summarize(profile_dir, steps, top=10)
    except (OSError, ValueError, KeyError) as e:  # the trace is still there to open
      extra['profile'] = {'error': f'{type(e).__name__}: {e}'}
  step_time = statistics.median(times)
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  peak_flops = _peak_flops(device.device_kind)
  result.update({
      'img_per_s': b / step_time, 'step_time_s': step_time, 'step_time_min_s': min(times),
      'step_time_max_s': max(times), 'device_peak_bytes_in_use': (stats or {}).get('peak_bytes_in_use'),
      'mfu': (flops / step_time / (peak_flops * n)) if (peak_flops and flops) else None, **extra})
  return result


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
  amp = dev == 'cuda' and config.dtype in ('bfloat16', 'auto')
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
  from pat_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  xla_cpu.apply(FLAGS.config)  # before JAX starts its backends
  if FLAGS.compilation_cache and FLAGS.compilation_cache != 'none':  # 'none': off, as in main
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_compilation_cache_dir', FLAGS.compilation_cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  if FLAGS.kernels:
    from pat_jax import kernels  # pylint: disable=g-import-not-at-top
    kernels.parse(FLAGS.kernels, '--kernels')  # a bad name stops here, naming the choices
    os.environ[kernels.ENV] = FLAGS.kernels
  if FLAGS.torch:
    result = bench_torch(FLAGS.config, FLAGS.steps, FLAGS.num_classes)
  else:
    result = bench_jax(FLAGS.config, FLAGS.steps, FLAGS.num_classes, FLAGS.compile_only,
                       FLAGS.breakdown, FLAGS.profile_dir)
  if FLAGS.json:
    print(json.dumps(result), flush=True)
  else:
    for k, v in result.items():
      print(f'{k:>24}: {v}')


if __name__ == '__main__':
  from pat_jax import xla_cpu as _xla_cpu  # pylint: disable=g-import-not-at-top
  _xla_cpu.reexec_with_huge_pages()  # on CPU: start again with huge pages
  if '--torch' in sys.argv:
    # torchvision (through timm) must load before TensorFlow, which the configs import.
    import timm  # pylint: disable=g-import-not-at-top,unused-import
  if len(sys.argv) > 1 and sys.argv[1] == 'data':
    from pat_jax.data import bench as data_bench  # pylint: disable=g-import-not-at-top
    sys.argv = [sys.argv[0]] + sys.argv[2:]
    sys.exit(data_bench.main())
  app.run(main)
