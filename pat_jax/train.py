"""train_and_evaluate(config, workdir): one linear training loop, in sections.

Setup -> data -> models (student, frozen teacher, method) -> optimizer -> state (fresh
or resumed) -> compiled steps -> loop (train, log, evaluate, checkpoint, preemption)
-> final evaluation. The step is a pure function of (state, batch, teacher variables);
randomness is fold_in(seed, step); the data position is the step. A run killed at any
point resumes from its workdir and ends with the same parameters as an uninterrupted run.
"""
import json
import os
import signal
import time
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from pat_jax import (checkpoint, convert, data, errors, evaluate, metrics, models, optim, paths,
                     sharding, step_cache, weights)
from pat_jax.distill import registry


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any        # {'student': ..., 'method': ...}: everything the optimizer updates
  batch_stats: Any   # {'student': ..., 'method': ...}
  opt_state: Any
  ema: Any           # EMA of the student's variables {'params', 'batch_stats'?}
  method_state: Any  # carried from step to step (PAT's feedback)
  rng: jax.Array     # raw uint32 key; step keys are fold_in(rng, step)


def _model_overrides(config, name, dtype):
  """img_size follows the data for models that have one; dtype from the config."""
  fields = {f for f in models.spec(name).module.__dataclass_fields__}
  overrides = {'dtype': dtype}
  if 'img_size' in fields:
    overrides['img_size'] = config.dataset.image_size
  return overrides


def create_teacher(config, num_classes):
  """The teacher module as config.teacher asks: dtype, img_size, remat and, for teachers that
  can run their blocks as one loop (ConvNeXt), scan_blocks. Shared by training and the bench."""
  tcfg = config.teacher
  overrides = _model_overrides(config, tcfg.name, compute_dtype(config))
  if 'scan_blocks' in models.spec(tcfg.name).module.__dataclass_fields__:
    overrides['scan_blocks'] = bool(tcfg.get('scan_blocks', False))
  return models.create(tcfg.name, num_classes=num_classes, remat=tcfg.get('remat', False),
                       **overrides)


def teacher_layout(teacher, variables, mesh):
  """The frozen teacher's variables in the layout its module runs fastest: a scan_blocks
  ConvNeXt gets each stage's blocks stacked once here, not copied on every forward
  (convnext.stack_blocks)."""
  if not getattr(teacher, 'scan_blocks', False):
    return variables
  from pat_jax.models import convnext  # pylint: disable=g-import-not-at-top
  return jax.jit(convnext.stack_blocks, out_shardings=sharding.replicated(mesh))(variables)


def compute_dtype(config):
  """config.dtype as a jnp dtype; 'auto' is bfloat16 on GPU/TPU (the original trained with
  fp16 AMP there) and float32 on CPU (where bfloat16 is slower)."""
  name = config.get('dtype', 'float32')
  if name == 'auto':
    name = 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
  return jnp.dtype(name)


def _student_variables(params, batch_stats):
  v = {'params': params['student']}
  if batch_stats.get('student'):
    v['batch_stats'] = batch_stats['student']
  return v


# ----------------------------------------------------------------------------
# The model side of a run: student, method, optimizer, state init and the train step.

# Keys that only the loop, the evaluation, the checkpoints or the weights' loading read, never the
# step: a resume that changes them (a longer run, another teacher file) still finds its kept step.
_NOT_IN_STEP = ('total_steps', 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
                'keep_checkpoints', 'checkpoint_strict', 'eval_batch_size', 'step_cache',
                'teacher.checkpoint', 'teacher.min_top1', 'teacher.workdir', 'model.init_checkpoint',
                'dataset.data_dir')


def _step_config(config) -> str:
  """The config as JSON (sorted), without the keys the step never reads."""
  values = json.loads(config.to_json_best_effort())
  for path in _NOT_IN_STEP:
    *parents, name = path.split('.')
    node = values
    for parent in parents:
      node = node.get(parent, {})
    node.pop(name, None)
  return json.dumps(values, sort_keys=True)


class Trainer(NamedTuple):
  student: Any
  method: Any
  tx: Any
  lr_fn: Any
  abstract: Any       # TrainState of ShapeDtypeStructs
  shardings: Any      # TrainState of NamedShardings
  init: Any           # rng -> TrainState, created sharded
  train_step: Any     # (state, batch, teacher_vars) -> (state, metrics); donates state
  fingerprint: Any    # what the step depends on besides code and arguments (step_cache.key)


def make_trainer(config, mesh, num_classes, steps_per_epoch, teacher=None, teacher_vars=None):
  """Builds the pure, jitted pieces of training (shared by train_and_evaluate and bench)."""
  rep = sharding.replicated(mesh)
  student_overrides = _model_overrides(config, config.model.name, compute_dtype(config))
  student_overrides['remat'] = config.model.get('remat', False)
  if config.model.get('drop_path_rate') is not None:
    student_overrides['drop_path_rate'] = config.model.drop_path_rate
  student = models.create(config.model.name, num_classes=num_classes, **student_overrides)
  method = registry.create(config, student, teacher)
  tx, lr_fn = optim.create(config.optim, config.num_epochs, steps_per_epoch)
  size = config.dataset.image_size
  sample = jnp.zeros((2, size, size, 3), jnp.float32)

  def init_state(rng, teacher_vars):
    r_student, r_method = jax.random.split(rng)
    student_vars = student.init(r_student, sample, train=False)
    m_params, m_stats, m_state = method.init(r_method, sample, student_vars, teacher_vars)
    params = {'student': student_vars['params'], 'method': m_params}
    batch_stats = {'student': student_vars.get('batch_stats', {}), 'method': m_stats}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), ema=_student_variables(params, batch_stats),
                      method_state=m_state, rng=rng)

  abstract = jax.eval_shape(init_state, jax.random.PRNGKey(0), teacher_vars)
  shardings = jax.tree_util.tree_map(lambda _: rep, abstract)
  shardings = shardings.replace(method_state=method.state_shardings(abstract.method_state, mesh))
  init = lambda rng: jax.jit(init_state, out_shardings=shardings)(rng, teacher_vars)  # pylint: disable=unnecessary-lambda-assignment

  skip_nonfinite = config.get('skip_nonfinite_steps', 0) > 0
  nan_at_step = config.get('debug_nan_at_step', 0)

  def train_step(state, batch, teacher_vars):
    if batch['image'].dtype == jnp.uint8:  # dataset.transfer='uint8': a trace-time branch
      # Mixing, normalisation and erasing on the device, with the host's draws (on_device.py).
      batch = data.on_device.prepare(batch, config.dataset.mean, config.dataset.std,
                                     groups=jax.process_count())
    rng = jax.random.fold_in(state.rng, state.step)
    # A fresh run's first step has no carried state yet (PAT's feedback). Traced, so that it
    # and every later step are one compiled program (a resumed run never has step 0).
    first = state.step == 0

    def loss_fn(params):
      out = method(params, state.batch_stats, state.method_state, teacher_vars, batch, rng, first)
      if nan_at_step:  # fault-handling tests: a NaN in the first loss term at that step
        name = sorted(out.terms)[0]
        poisoned = out.terms[name] * jnp.where(state.step + 1 == nan_at_step, jnp.nan, 1.0)
        out = out._replace(terms={**out.terms, name: poisoned})
      return sum(out.terms.values()), out

    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optim.ema_update(state.ema, _student_variables(params, out.batch_stats), config.ema_decay)
    labels = jnp.argmax(batch['label'], -1)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    step_metrics = {'train_loss': loss, 'lr': lr_fn(state.step), 'grad_norm': grad_norm,
                    'train_top1': 100 * jnp.mean(jnp.argmax(out.logits, -1) == labels),
                    **{f'loss_{k}': v for k, v in out.terms.items()}, 'finite': finite}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=out.batch_stats,
                              opt_state=opt_state, ema=ema, method_state=out.state)
    if skip_nonfinite:  # a bad update leaves everything but the step (= the data position) as it was
      kept = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)
      new_state = kept.replace(step=new_state.step)
    return new_state, step_metrics

  train_step = jax.jit(train_step, donate_argnums=(0,), out_shardings=(shardings, rep))
  fingerprint = {'config': _step_config(config), 'num_classes': num_classes,
                 'steps_per_epoch': steps_per_epoch, 'student': repr(student),
                 'teacher': repr(teacher), 'mesh': dict(mesh.shape)}
  return Trainer(student, method, tx, lr_fn, abstract, shardings, init, train_step, fingerprint)


# ----------------------------------------------------------------------------
# Teacher: reloaded from its source at every start, never checkpointed.

def check_config(config, where='config'):
  """Names in the config that point at nothing stop the run here, in its first second, not
  after a teacher has trained (`teacher.pretrain` is checked the same way)."""
  models.spec(config.model.name)
  if config.teacher.get('name'):
    models.spec(config.teacher.name)
  method = config.method.name
  if method not in registry.METHODS:
    raise errors.ConfigError(f'Unknown {where}.method.name {method!r}. Valid: {sorted(registry.METHODS)}.')
  if registry.METHODS[method].uses_teacher and not config.teacher.get('name'):
    raise errors.ConfigError(f'{where}.method.name={method!r} needs a teacher: set teacher.name and '
                             'teacher.checkpoint (or teacher.pretrain).')
  if config.optim.name not in optim.NAMES:
    raise errors.ConfigError(f'Unknown {where}.optim.name {config.optim.name!r}: use one of {optim.NAMES}.')
  if config.optim.get('schedule', 'cosine') not in optim.SCHEDULES:
    raise errors.ConfigError(f'Unknown {where}.optim.schedule {config.optim.schedule!r}: use one of '
                             f'{optim.SCHEDULES}.')
  if config.get('dtype', 'float32') not in ('float32', 'bfloat16', 'auto'):
    raise errors.ConfigError(f"{where}.dtype={config.dtype!r}: use 'float32', 'bfloat16' or "
                             "'auto' (bfloat16 on GPU/TPU, float32 on CPU).")
  if config.teacher.get('pretrain') is not None and not config.teacher.get('checkpoint'):
    check_config(config.teacher.pretrain, where=f'{where}.teacher.pretrain')


def check_shared_workdir(workdir):
  """Several processes must write one workdir (one checkpoint, one feedback state): process 0
  writes a fresh token into it, every process reads it back, and all stop if one cannot."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, '.process0_token')
  token = np.frombuffer(os.urandom(8), np.uint32) if jax.process_index() == 0 else np.zeros(2, np.uint32)
  if jax.process_index() == 0:
    paths.write_text_atomic(path, ' '.join(map(str, token)))
  token = ' '.join(map(str, multihost_utils.broadcast_one_to_all(token)))  # also a barrier
  try:
    same = paths.read_text(path) == token
  except OSError:
    same = False
  all_same = multihost_utils.process_allgather(np.asarray(same))
  if not np.all(all_same):
    bad = [i for i, ok in enumerate(np.asarray(all_same).ravel()) if not ok]
    raise errors.ConfigError(
        f'The workdir {workdir} is not one folder for all {jax.process_count()} processes: '
        f'process(es) {bad} do not see what process 0 wrote there. Give every process the same '
        f'--workdir on a filesystem they all mount.')


class TeacherPreempted(Exception):
  """The teacher trained by teacher.pretrain was preempted: the run stops too (and resumes it)."""


def load_teacher(config, num_classes, workdir, mesh):
  """(teacher module, variables) or (None, None) when the config has no teacher."""
  tcfg = config.teacher
  if not tcfg.get('name'):
    return None, None
  path = tcfg.get('checkpoint') or ''
  if not path and tcfg.get('pretrain') is not None:
    # No checkpoint given: train the teacher with teacher.pretrain into teacher.workdir
    # (default WORKDIR/teacher; resumes there like any run; skipped once finished).
    teacher_dir = paths.absolute(tcfg.get('workdir') or os.path.join(workdir, 'teacher'))
    path = os.path.join(teacher_dir, 'checkpoints')
    if not paths.isfile(os.path.join(teacher_dir, 'result.json')):
      logging.info('No teacher.checkpoint: training the teacher into %s first.', teacher_dir)
      if train_and_evaluate(tcfg.pretrain, teacher_dir)['status'] != 'done':
        raise TeacherPreempted(teacher_dir)  # never distil from a half-trained teacher
  if not path or not paths.exists(path):
    raise errors.MissingFileError(
        f'teacher.checkpoint={path!r} does not exist. Get a teacher by converting timm weights '
        f'(e.g. the OFA-KD CIFAR-100 release file {tcfg.name}_cifar100.pth): python -m '
        f'pat_jax.convert --model {tcfg.name} --num-classes {num_classes} --input FILE --output DIR, '
        f'then set --config.teacher.checkpoint=DIR; or train one with configs/teacher_cifar_convnext.py.')
  teacher = create_teacher(config, num_classes)
  shape_overrides = {k: v for k, v in _model_overrides(config, tcfg.name, jnp.float32).items()
                     if k != 'dtype'}
  variables = weights.load(path, tcfg.name, num_classes, sharding.replicated(mesh), **shape_overrides)
  variables = teacher_layout(teacher, variables, mesh)

  if tcfg.get('min_top1', 0) > 0:
    [res] = evaluate.evaluate(evaluate.make_eval_step(teacher), [variables], config, mesh)
    logging.info('Teacher %s from %s: top-1 %.2f%%, top-5 %.2f%% on %d examples.', tcfg.name, path,
                 res['top1'], res['top5'], res['num_examples'])
    if res['top1'] < tcfg.min_top1:
      raise errors.ConfigError(
          f'Teacher {tcfg.name} from {path} reaches only {res["top1"]:.2f}% top-1 on '
          f'{config.dataset.eval_split} (chance is {100 / num_classes:.2f}%, teacher.min_top1='
          f'{tcfg.min_top1}): the checkpoint is probably for another dataset, class order or '
          f'preprocessing. Check teacher.checkpoint, or lower teacher.min_top1 on purpose.')
  return teacher, variables


def _init_student_from(config, variables, num_classes, mesh):
  """model.init_checkpoint: start the student from pretrained weights, head freshly initialised."""
  path = config.model.get('init_checkpoint') or ''
  if not path:
    return variables
  name = config.model.name
  shape = {k: v for k, v in _model_overrides(config, name, jnp.float32).items() if k != 'dtype'}
  loaded = weights.load(path, name, num_classes, sharding.replicated(mesh), drop_head=True, **shape)
  merged = jax.tree_util.tree_map(lambda x: x, dict(variables))
  for collection, tree in loaded.items():
    for k, v in tree.items():
      merged[collection][k] = v
  convert.check_variables(name, merged, num_classes, **shape)
  logging.info('Initialised the student from %s (classifier left at its init).', path)
  return merged


# ----------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the configured run in `workdir`; returns the final summary."""
  # ---- Setup ---------------------------------------------------------------
  check_config(config)
  workdir = paths.absolute(workdir)  # a local folder or a bucket (gs://...): pat_jax/paths.py
  for path in (workdir, config.teacher.get('checkpoint'), config.model.get('init_checkpoint')):
    if path:
      paths.check_backend(path)
  paths.makedirs(workdir)
  check_shared_workdir(workdir)
  if jax.process_index() == 0:
    paths.write_text_atomic(os.path.join(workdir, 'config.json'),
                            config.to_json_best_effort(indent=2))
  mesh = sharding.make_mesh(config.get('num_devices', 0))
  logging.info('%s.', sharding.describe(mesh))
  rep = sharding.replicated(mesh)

  # ---- Data ----------------------------------------------------------------
  info = data.get_info(config)
  steps_per_epoch = data.steps_per_epoch(config, config.batch_size)
  total_steps = config.total_steps if config.total_steps > 0 else config.num_epochs * steps_per_epoch
  per_host_batch = sharding.local_batch_size(config.batch_size, mesh)
  every = lambda n: n if n > 0 else steps_per_epoch  # pylint: disable=unnecessary-lambda-assignment
  log_every, eval_every = every(config.log_every_steps), every(config.eval_every_steps)
  ckpt_every = every(config.checkpoint_every_steps)

  # ---- Models, optimizer, compiled step ---------------------------------------
  try:
    teacher, teacher_vars = load_teacher(config, info.num_classes, workdir, mesh)
  except TeacherPreempted as e:
    logging.warning('Preempted while training the teacher in %s: exiting; the next start '
                    'finishes the teacher first.', e)
    return {'status': 'preempted', 'step': 0}
  started = time.time()  # wall_s: this run's own time, without a teacher trained just before
  trainer = make_trainer(config, mesh, info.num_classes, steps_per_epoch, teacher, teacher_vars)
  student, shardings = trainer.student, trainer.shardings
  # Compiled at the first step; its lowered program is kept for the next start (step_cache.py).
  train_step = step_cache.CachedStep(trainer.train_step, trainer.fingerprint,
                                     step_cache.directory(config))

  # ---- State: fresh (created sharded) or resumed ---------------------------
  rng = jax.random.PRNGKey(config.seed)
  ckpt = checkpoint.TrainCheckpointer(os.path.join(workdir, 'checkpoints'),
                                      keep=config.get('keep_checkpoints', 2))
  best = {'top1': -1.0, 'source': None, 'step': None}
  wall_before = 0.0  # training wall time of earlier starts of this run (from the checkpoint)
  skipped = []  # steps whose non-finite update was skipped (skip_nonfinite_steps)
  if ckpt.latest_step() is not None:
    with_shardings = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), trainer.abstract, shardings)
    # The newest whole step; damaged newer ones are moved to checkpoints/damaged/ (not deleted).
    state, meta, _ = ckpt.restore_latest(with_shardings, strict=config.get('checkpoint_strict', False))
    best = meta.get('best', best)
    wall_before = float(meta.get('wall_s', 0.0))
    skipped = list(meta.get('skipped_nonfinite', []))
    logging.info('Resumed from %s at step %d.', ckpt.directory, int(state.step))
  else:
    state = trainer.init(rng)
    if config.model.get('init_checkpoint'):
      student_vars = _init_student_from(config, _student_variables(state.params, state.batch_stats),
                                        info.num_classes, mesh)
      # The EMA starts as a copy: the train step donates the state, and one buffer in two
      # places of it (params and ema) is donated twice, which crashes XLA (a segfault on CPU).
      state = state.replace(
          params={**state.params, 'student': student_vars['params']},
          batch_stats={**state.batch_stats, 'student': student_vars.get('batch_stats', {})},
          ema=jax.tree_util.tree_map(lambda x: x.copy(), student_vars),
          opt_state=jax.jit(trainer.tx.init, out_shardings=rep)(
              {**state.params, 'student': student_vars['params']}))
  start_step = int(state.step)
  # Rows logged after the restored step (by a run that died later) are dropped: one row per step.
  writer = metrics.MetricWriter(workdir, resume_step=start_step)

  eval_step = evaluate.make_eval_step(student)

  def run_eval(state, step):
    raw, ema = evaluate.evaluate(
        eval_step, [_student_variables(state.params, state.batch_stats), state.ema], config, mesh)
    row = {'eval_top1': raw['top1'], 'eval_top5': raw['top5'],
           'ema_eval_top1': ema['top1'], 'ema_eval_top5': ema['top5'], 'epoch': step / steps_per_epoch}
    top1, source = max((raw['top1'], 'raw'), (ema['top1'], 'ema'))
    if top1 > best['top1']:
      best.update(top1=top1, source=source, step=step)
    row['best_top1'] = best['top1']
    writer.write(step, row)
    logging.info('step %d: eval top-1 %.2f (EMA %.2f), best %.2f (%s, step %s)', step, raw['top1'],
                 ema['top1'], best['top1'], best['source'], best['step'])
    return row, top1

  def save(state, step, top1=None):
    meta = {'step': step, 'epoch': step / steps_per_epoch, 'best': best, 'model': config.model.name,
            'wall_s': wall_before + time.time() - started, 'skipped_nonfinite': skipped,
            'num_classes': info.num_classes,
            'overrides': {k: getattr(student, k) for k in ('img_size',) if hasattr(student, k)}}
    ckpt.save(step, state, meta, metrics=None if top1 is None else {'top1': top1}, force=True)

  # ---- Loop ------------------------------------------------------------------
  # SIGTERM (a preempted VM, a cluster scheduler) -> checkpoint at the next step boundary, exit.
  # Several processes: jax.distributed.initialize() started JAX's preemption sync manager, which
  # catches SIGTERM on any host and picks one step at which every host stops (and saves);
  # orbax asks it through reached_preemption, every step. A Python handler would replace its
  # signal handler and nothing would fire, so one is installed only for a single process.
  preempted, previous_handler = [], None
  if jax.process_count() == 1:
    try:
      previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
    except ValueError:  # not the main thread: the caller handles signals
      pass

  def should_stop(step):
    return bool(preempted) or ckpt.reached_preemption(step)

  train_iter = data.train_iterator(config, batch_size=per_host_batch, start_step=start_step,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count())
  progress = metrics.Progress(total_steps, start_step, config.batch_size)
  last_eval = None
  logging.info('Training %s (%s) for %d steps (%d per epoch) from step %d on %d devices.',
               config.model.name, config.method.name, total_steps, steps_per_epoch, start_step,
               mesh.devices.size)
  max_skipped = config.get('skip_nonfinite_steps', 0)

  def check_finite(step, step_metrics):
    """Every step's update is checked (one step late, so the device never waits on the host)."""
    if bool(jax.device_get(step_metrics['finite'])):
      return
    row = {k: float(v) for k, v in jax.device_get(step_metrics).items() if k != 'finite'}
    bad = sorted(k for k, v in row.items() if not np.isfinite(v))
    values = ', '.join(f'{k}={row[k]:.4g}' for k in sorted(row) if k.startswith('loss_') or
                       k in ('train_loss', 'grad_norm'))
    if len(skipped) < max_skipped:
      skipped.append(step)
      logging.warning('Non-finite %s at step %d: update skipped (%d of skip_nonfinite_steps=%d). '
                      '%s', ', '.join(bad), step, len(skipped), max_skipped, values)
      return
    raise FloatingPointError(
        f'Non-finite {", ".join(bad)} at step {step} ({values}). '
        + (f'{len(skipped)} such updates were skipped before (steps {skipped}), the most '
           f'skip_nonfinite_steps={max_skipped} allows. ' if max_skipped else '')
        + f'Its state was not saved: the newest checkpoint ({ckpt.directory}, step '
        f'{ckpt.latest_step()}) is from before it. Lower the learning rate or turn on gradient '
        f'clipping (optim.clip_grad), or set skip_nonfinite_steps=N to skip up to N bad updates.')

  unchecked = None  # (step, metrics) whose finiteness is not checked yet

  def check_unchecked():
    nonlocal unchecked
    if unchecked is not None:
      check_finite(*unchecked)
      unchecked = None

  failed = False
  try:
    for step in range(start_step + 1, total_steps + 1):
      batch = sharding.global_batch(next(train_iter), mesh)
      state, step_metrics = train_step(state, batch, teacher_vars)
      check_unchecked()  # the previous step's, while this one runs
      unchecked = (step, step_metrics)

      if step % log_every == 0 or step == total_steps:
        check_unchecked()
        row = {k: float(v) for k, v in jax.device_get(step_metrics).items() if k != 'finite'}
        if max_skipped:
          row['skipped_nonfinite'] = len(skipped)
        row.update(progress.update(step), epoch=step / steps_per_epoch)
        writer.write(step, row)
        logging.info('step %d/%d (epoch %.2f) loss %.4f lr %.3g %.1f img/s ETA %s', step,
                     total_steps, row['epoch'], row['train_loss'], row['lr'], row['img_per_s'],
                     metrics.format_eta(row['eta_s']))

      top1 = None
      if step % eval_every == 0 or step == total_steps:
        last_eval, top1 = run_eval(state, step)
      if top1 is not None or step % ckpt_every == 0 or step == total_steps:
        check_unchecked()  # never save a state that a non-finite update produced
        save(state, step, top1)
      if should_stop(step):
        if step % ckpt_every and top1 is None and step != total_steps:
          check_unchecked()
          save(state, step)
        ckpt.wait()
        logging.warning('Preempted at step %d: checkpoint saved, exiting.', step)
        return {'status': 'preempted', 'step': step}

    # ---- Final report ----------------------------------------------------------
    if last_eval is None:  # resumed at the end: evaluate what was restored
      last_eval, _ = run_eval(state, int(state.step))
    ckpt.wait()  # the last checkpoint is on disk (or its error raised) before the run says done
    result = {'status': 'done', 'step': int(state.step), 'best_top1': best['top1'],
              'best_source': best['source'], 'best_step': best['step'],
              'final_top1': last_eval['eval_top1'], 'final_ema_top1': last_eval['ema_eval_top1'],
              'final_top5': last_eval['eval_top5'], 'eval_split': config.dataset.eval_split}
    if max_skipped:
      result['skipped_nonfinite'] = skipped
    if config.dataset.get('test_split'):  # read once, by the final students
      test_config = config.copy_and_resolve_references()
      with test_config.unlocked():
        test_config.dataset.eval_split = config.dataset.test_split
      raw, ema = evaluate.evaluate(
          eval_step, [_student_variables(state.params, state.batch_stats), state.ema], test_config,
          mesh)
      result.update(test_split=config.dataset.test_split, test_top1=raw['top1'],
                    test_ema_top1=ema['top1'], test_top5=raw['top5'])
      logging.info('Test split %s: top-1 %.2f (EMA %.2f).', config.dataset.test_split, raw['top1'],
                   ema['top1'])
    result['wall_s'] = wall_before + time.time() - started
    if jax.process_index() == 0:  # atomically: a reader never sees half a result
      paths.write_text_atomic(os.path.join(workdir, 'result.json'), json.dumps(result, indent=2))
    logging.info('Done: %s', result)
    return result
  except BaseException:
    failed = True
    raise
  finally:
    if not failed:
      ckpt.close()  # waits for the last save; raises its error
    else:
      try:  # the error in flight is the one to report
        ckpt.close()
      except Exception as e:  # pylint: disable=broad-except
        logging.error('Also, closing the checkpointer failed: %s', e)
    writer.close()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
