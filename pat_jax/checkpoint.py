"""Thin orbax wrapper: model variables as a step-numbered orbax checkpoint.

A variables checkpoint is an orbax CheckpointManager directory whose step holds two
items: `variables` ({'params', 'batch_stats'?}) and `meta` (JSON: model name,
num_classes, where the weights came from). `pat_jax.convert` writes them; teachers
and `--mode=eval` read them with `load_variables`.
"""
import os
from typing import Any, Dict, Optional

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


def load_variables(path: str, step: Optional[int] = None) -> Dict[str, Any]:
  """Restores the `variables` item (latest step unless `step`) as host numpy/jax arrays."""
  mngr, step = _manager_and_step(path, step)
  with mngr:
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(variables=ocp.args.StandardRestore()))
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
      raise CheckpointError(f'Cannot restore step {step} of {path}: the checkpoint is corrupt or '
                            f'incomplete ({type(e).__name__}: {str(e).splitlines()[0][:300]}).') from e
  return restored.variables
