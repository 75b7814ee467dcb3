"""Thin orbax wrapper: model variables and training state as orbax checkpoints.

A variables checkpoint is an orbax CheckpointManager directory whose step holds two
items: `variables` ({'params', 'batch_stats'?}) and `meta` (JSON: model name,
num_classes, where the weights came from). `pat_jax.convert` writes them; teachers
and `--mode=eval` read them with `load_variables`.
"""
import os
from typing import Any, Dict, Optional

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint directory that is missing, empty or unreadable."""


def save_variables(directory: str, variables: Dict[str, Any], meta: Dict[str, Any],
                   step: int = 0, overwrite: bool = False) -> str:
  """Writes `variables` and `meta` as step `step` of an orbax checkpoint in `directory`.

  Refuses to replace an existing checkpoint unless `overwrite`; orbax writes into a
  temporary folder and renames it on success, so a failed save leaves no partial step.
  """
  directory = os.path.abspath(directory)
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
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f'Checkpoint directory {path} does not exist.')
  root, name = os.path.split(path)
  if step is None and name.isdigit() and not os.path.isdir(os.path.join(path, name)):
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


def load_variables(path: str, step: Optional[int] = None, item: str = 'variables') -> Dict[str, Any]:
  """Restores a model's variables (latest step unless `step`) as host arrays.

  Works on converted checkpoints and on training checkpoints; `item='ema'` takes the
  EMA student of a training checkpoint.
  """
  mngr, step = _manager_and_step(path, step)
  with mngr:
    if item not in mngr.item_metadata(step):
      raise CheckpointError(f'Step {step} of {path} has no {item!r} item (it has '
                            f'{sorted(mngr.item_metadata(step))}).')
    # Restore onto this process's first device, whatever topology wrote it (e.g. a multi-host run).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.StandardCheckpointer() as reader:
      tree = reader.metadata(os.path.join(mngr.directory, str(step), item))
    tree = getattr(tree, 'item_metadata', tree)
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree,
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

  Saves are asynchronous; orbax writes each step to a temporary folder and renames
  it when complete, so a crash mid-save never replaces a good checkpoint.
  """

  def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
    from orbax.checkpoint import checkpoint_managers as cm  # pylint: disable=g-import-not-at-top
    policy = cm.AnyPreservationPolicy([
        cm.LatestN(n=keep),
        cm.BestN(get_metric_fn=lambda m: m['top1'], n=1, keep_checkpoints_without_metrics=False),
    ])
    self.directory = os.path.abspath(directory)
    self.mngr = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        create=True, preservation_policy=policy, enable_async_checkpointing=async_save))

  def latest_step(self) -> Optional[int]:
    return self.mngr.latest_step()

  def save(self, step: int, state, meta: Dict[str, Any], metrics: Optional[Dict[str, float]] = None,
           force: bool = False) -> bool:
    items = state_to_items(state)
    args = ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in items.items()},
                              meta=ocp.args.JsonSave(meta))
    return self.mngr.save(step, args=args, metrics=metrics, force=force)

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
          f'{str(e).splitlines()[0][:400]}. If the run configuration changed (model, method, '
          f'optimizer), use a new workdir; if the step is damaged, delete that step folder to '
          f'resume from the previous one.') from e
    state = items_to_state({k: restored[k] for k in abstract}, abstract_state)
    return state, restored['meta']

  def reached_preemption(self, step: int) -> bool:
    return self.mngr.reached_preemption(step)

  def wait(self):
    self.mngr.wait_until_finished()

  def close(self):
    self.mngr.wait_until_finished()
    self.mngr.close()
