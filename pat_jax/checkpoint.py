"""Thin orbax wrapper: model variables and training state as orbax checkpoints.

A variables checkpoint is an orbax CheckpointManager directory whose step holds two
items: `variables` ({'params', 'batch_stats'?}) and `meta` (JSON: model name,
num_classes, where the weights came from). `pat_jax.convert` writes them; teachers
and `--mode=eval` read them with `load_variables`.
"""
import errno
import os
import shutil
import time
from typing import Any, Dict, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from pat_jax import errors, paths


class CheckpointError(errors.UserError, ValueError):
  """A checkpoint directory that is missing, empty or unreadable."""


class DiskFullError(OSError):
  """No room to write a checkpoint: the earlier steps are intact, the run can resume later."""

  def __init__(self, message):
    super().__init__(message)
    self.errno = errno.ENOSPC


# What a full disk, a quota or a file-size limit looks like once tensorstore or orbax has
# wrapped the OSError into another exception type.
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_SPACE_TEXT = ('No space left on device', 'Disk quota exceeded', 'File too large')


def _is_no_space(e: BaseException) -> bool:
  while e is not None:
    if isinstance(e, OSError) and e.errno in _NO_SPACE_ERRNOS:
      return True
    if any(t in str(e) for t in _NO_SPACE_TEXT):
      return True
    e = e.__cause__ or e.__context__
  return False


def save_variables(directory: str, variables: Dict[str, Any], meta: Dict[str, Any],
                   step: int = 0, overwrite: bool = False) -> str:
  """Writes `variables` and `meta` as step `step` of an orbax checkpoint in `directory`.

  Refuses to replace an existing checkpoint unless `overwrite`; orbax writes into a
  temporary folder and renames it on success, so a failed save leaves no partial step.
  """
  directory = paths.absolute(directory)
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True)) as mngr:
    if mngr.all_steps() and not overwrite:
      raise CheckpointError(f'{directory} already holds a checkpoint (steps {mngr.all_steps()}); '
                            f'choose another directory or pass overwrite=True (--overwrite).')
    for s in mngr.all_steps():
      mngr.delete(s)
    mngr.save(step, args=ocp.args.Composite(variables=ocp.args.StandardSave(variables),
                                            meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()
  return directory


def _manager_and_step(path: str, step: Optional[int]):
  path = paths.absolute(path)
  if not paths.isdir(path):
    raise CheckpointError(f'Checkpoint directory {path} does not exist.')
  root, name = os.path.split(path)
  if step is None and name.isdigit() and not paths.isdir(os.path.join(path, name)):
    path, step = root, int(name)  # a step folder was named directly
  mngr = ocp.CheckpointManager(path)
  steps = mngr.all_steps()
  if not steps:
    mngr.close()
    raise CheckpointError(f'{path} holds no finished checkpoint (no step folders). Write one with '
                          f'`python -m pat_jax.convert` or by training.')
  if step is None:
    step = mngr.latest_step()
  elif step not in steps:
    mngr.close()
    raise CheckpointError(f'{path} has no step {step}; it has {steps}.')
  return mngr, step


def load_meta(path: str, step: Optional[int] = None) -> Dict[str, Any]:
  mngr, step = _manager_and_step(path, step)
  with mngr:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def load_variables(path: str, step: Optional[int] = None, item: str = 'variables',
                   sharding=None) -> Dict[str, Any]:
  """Restores a model's variables (latest step unless `step`).

  Works on converted checkpoints and on training checkpoints; `item='ema'` takes the
  EMA student of a training checkpoint. `sharding`: where the arrays go (every process
  calls this and reads its own shards, e.g. replicated over the global mesh); default this
  process's first device (for host-side use).
  """
  mngr, step = _manager_and_step(path, step)
  with mngr:
    if item not in mngr.item_metadata(step):
      raise CheckpointError(f'Step {step} of {path} has no {item!r} item (it has '
                            f'{sorted(mngr.item_metadata(step))}).')
    # Whatever topology wrote it (e.g. a multi-host run): the target sharding decides.
    if sharding is None:
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.StandardCheckpointer() as reader:
      tree = reader.metadata(os.path.join(mngr.directory, str(step), item))
    tree = getattr(tree, 'item_metadata', tree)
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree,
        is_leaf=lambda m: hasattr(m, 'shape') and hasattr(m, 'dtype'))
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
      raise CheckpointError(f'Cannot restore step {step} of {path}: the checkpoint is corrupt or '
                            f'incomplete ({type(e).__name__}: {str(e).splitlines()[0][:300]}).') from e
  return restored[item]


# ---------------------------------------------------------------------------
# Training checkpoints.
#
# One step holds four items, so that evaluation can read the student without the
# optimizer state: `variables` (raw student, the same item a converted checkpoint
# has), `ema` (EMA student), `train` (step, rng, optimizer state, the method's
# params, batch_stats and carried state) and `meta` (JSON). The teacher is never
# saved (DESIGN decision 6).

def _student_vars(params, batch_stats):
  v = {'params': params}
  if batch_stats:
    v['batch_stats'] = batch_stats
  return v


def state_to_items(state):
  return {
      'variables': _student_vars(state.params['student'], state.batch_stats.get('student')),
      'ema': _student_vars(state.ema['params'], state.ema.get('batch_stats')),
      'train': {'step': state.step, 'rng': state.rng, 'opt_state': state.opt_state,
                'method_params': state.params.get('method', {}),
                'method_batch_stats': state.batch_stats.get('method', {}),
                'method_state': state.method_state},
  }


def items_to_state(items, like):
  train = items['train']
  return like.replace(
      step=train['step'], rng=train['rng'], opt_state=train['opt_state'],
      params={'student': items['variables']['params'], 'method': train['method_params']},
      batch_stats={'student': items['variables'].get('batch_stats', {}),
                   'method': train['method_batch_stats']},
      ema=items['ema'], method_state=train['method_state'])


class TrainCheckpointer:
  """orbax CheckpointManager keeping the latest `keep` steps and the best-accuracy one.

  Saves are asynchronous; orbax writes each step to a temporary folder and renames it when
  complete, so a crash (even SIGKILL) mid-save never replaces a good checkpoint; leftover
  temporary folders are removed at the next start. A damaged newest step is moved aside to
  `damaged/` and the newest whole one restored (`restore_latest`); a full disk is a
  `DiskFullError` that names the folder and the bytes needed.
  """

  def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
    from orbax.checkpoint import checkpoint_managers as cm  # pylint: disable=g-import-not-at-top
    policy = cm.AnyPreservationPolicy([
        cm.LatestN(n=keep),
        cm.BestN(get_metric_fn=lambda m: m['top1'], n=1, keep_checkpoints_without_metrics=False),
    ])
    self.directory = paths.absolute(directory)
    self.mngr = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        create=True, preservation_policy=policy, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True))
    self._pending = (None, None)  # (step, bytes) of the last save, for a full-disk message

  def latest_step(self) -> Optional[int]:
    return self.mngr.latest_step()

  def all_steps(self):
    return sorted(self.mngr.all_steps())

  def save(self, step: int, state, meta: Dict[str, Any], metrics: Optional[Dict[str, float]] = None,
           force: bool = False) -> bool:
    items = state_to_items(state)
    self._pending = (step, _nbytes(items))
    self._check_free_space(*self._pending)
    args = ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in items.items()},
                              meta=ocp.args.JsonSave(meta))
    try:  # also raises the error of the previous asynchronous save, if it failed
      return self.mngr.save(step, args=args, metrics=metrics, force=force)
    except Exception as e:
      self._raise_if_no_space(e, *self._pending)
      raise

  def _check_free_space(self, step, needed):
    """Refuses to start a save the disk cannot hold (a local workdir; remote ones are not asked)."""
    if paths.is_url(self.directory):
      return
    try:
      free = shutil.disk_usage(self.directory).free
    except OSError:
      return
    if free < needed + (16 << 20):  # metadata, the JSON meta and a margin
      raise DiskFullError(self._no_space_message(step, needed, free))

  def _no_space_message(self, step, needed, free=None):
    latest = max([s for s in self.mngr.all_steps() if s != step], default=None)
    free = (f'{free / 2**20:.1f} MiB are free' if free is not None
            else 'the disk, a quota or a file-size limit ran out')
    return (f'No room to save checkpoint step {step} in {self.directory}: it needs about '
            f'{needed / 2**20:.1f} MiB ({needed} bytes) and {free}. The earlier checkpoints are '
            f'intact (newest: step {latest}). Free space in (or move) the workdir and start the '
            f'same command again: the run resumes from step {latest}.')

  def _raise_if_no_space(self, e, step, needed):
    if _is_no_space(e):
      raise DiskFullError(self._no_space_message(step, needed)) from e

  def restore(self, step: int, abstract_state):
    """Restores onto `abstract_state`'s shardings (the current mesh, whatever it was at save)."""
    abstract = state_to_items(abstract_state)
    args = ocp.args.Composite(**{k: ocp.args.StandardRestore(v) for k, v in abstract.items()},
                              meta=ocp.args.JsonRestore())
    try:
      restored = self.mngr.restore(step, args=args)
    except Exception as e:
      raise CheckpointError(
          f'Cannot restore step {step} from {self.directory}: {type(e).__name__}: '
          f'{str(e).splitlines()[0][:400]}.') from e
    state = items_to_state({k: restored[k] for k in abstract}, abstract_state)
    return state, restored['meta']

  def restore_latest(self, abstract_state, strict: bool = False):
    """(state, meta, step) of the newest step that restores, newest first.

    Steps newer than that one are damaged (a truncated or missing file, garbage JSON): each is
    moved to `damaged/<step>` (never deleted) with a warning naming it and its error. When no
    step restores (e.g. the configuration changed), nothing is moved and the newest step's error
    is raised; so it is with `strict`, at the first failure.
    """
    failed = []
    for step in sorted(self.mngr.all_steps(), reverse=True):
      try:
        state, meta = self.restore(step, abstract_state)
      except CheckpointError as e:
        if strict:
          raise CheckpointError(
              f'{e} checkpoint_strict=True, so the run does not fall back to an older step: move '
              f'that step folder away (or set checkpoint_strict=False) to resume from the previous '
              f'one; if the run configuration changed, use a new workdir.') from e
        logging.warning('Checkpoint step %d is damaged, trying the previous one: %s', step, e)
        failed.append((step, e))
        continue
      for bad, error in failed:
        self._move_aside(bad, error)
      if failed:
        self.mngr.reload()
      return state, meta, step
    if not failed:
      raise CheckpointError(f'{self.directory} holds no checkpoint to restore.')
    newest_error = failed[0][1]
    raise CheckpointError(
        f'{newest_error} No older step restores either (tried steps {[s for s, _ in failed]}), '
        f'so nothing was moved or deleted. If the run configuration changed (model, method, '
        f'optimizer), use a new workdir for it.') from newest_error

  def _move_aside(self, step, error):
    if jax.process_index() == 0:
      target = move_aside(self.directory, step, error)
      logging.warning('Moved damaged checkpoint step %d aside to %s (not deleted).', step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'pat_jax_damaged_{step}')

  def reached_preemption(self, step: int) -> bool:
    return self.mngr.reached_preemption(step)

  def wait(self):
    """Waits for the asynchronous save; raises its error (a full disk as DiskFullError)."""
    try:
      self.mngr.wait_until_finished()
    except Exception as e:
      self._raise_if_no_space(e, *self._pending)
      raise

  def close(self):
    try:
      self.wait()
    finally:
      self.mngr.close()


def _nbytes(tree) -> int:
  return int(sum(getattr(x, 'nbytes', 0) for x in jax.tree_util.tree_leaves(tree)))


def move_aside(directory: str, step: int, error) -> str:
  """DIRECTORY/<step> -> DIRECTORY/damaged/<step>[.N], with the reason beside it; returns the
  new path. Local folders and buckets alike (a bucket's "rename" copies, then deletes)."""
  target_dir = os.path.join(directory, 'damaged')
  paths.makedirs(target_dir)
  target, n = os.path.join(target_dir, str(step)), 1
  while paths.exists(target):
    target, n = os.path.join(target_dir, f'{step}.{n}'), n + 1
  paths.rename(os.path.join(directory, str(step)), target)
  paths.write_text_atomic(target + '.reason.txt', f'{time.strftime("%Y-%m-%d %H:%M:%S")}: {error}\n')
  return target
