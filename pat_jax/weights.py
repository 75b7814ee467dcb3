"""One loader for model weights, on any number of processes.

A teacher (`teacher.checkpoint`), a student to fine-tune (`model.init_checkpoint`) and
`--mode=eval` all read weights the same way: a timm file (.pth, .pth.tar, .bin,
.safetensors) through `pat_jax.convert`, or a pat_jax checkpoint folder (converted or a
training run's), checked against the model's shapes, and placed straight onto the given
(replicated) sharding of the global mesh. Every process reads the file itself; nothing is
sent from one host's device to another's, which multi-host JAX does not allow.
"""
import os
from typing import Any, Dict

import jax
import numpy as np

from pat_jax import checkpoint, convert, paths


def is_timm_file(path: str) -> bool:
  """A timm weights file, as opposed to a pat_jax checkpoint folder (either may be in a bucket)."""
  return paths.isfile(path)


def put(tree, sharding):
  """Host arrays -> global arrays on `sharding`, built from every process's own copy."""
  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree_util.tree_map(one, tree)


def load(path: str, model_name: str, num_classes: int, sharding, *, item: str = 'variables',
         drop_head: bool = False, check: bool = True, **shape_overrides) -> Dict[str, Any]:
  """Variables of `model_name` from `path`, checked, on `sharding` (e.g. replicated).

  drop_head: leave the classifier out (fine-tuning on other classes; not checked then, the
  caller merges and checks). item: 'ema' reads a training checkpoint's EMA student.
  """
  if is_timm_file(path):
    local = paths.local_copy(path)  # torch reads local files only
    try:
      variables = convert.from_timm(model_name, local, num_classes=num_classes,
                                    drop_head=drop_head, **shape_overrides)
    finally:
      if local != path:
        os.remove(local)
    return put(variables, sharding)
  variables = checkpoint.load_variables(path, item=item, sharding=sharding)
  if drop_head:
    variables = {c: {k: v for k, v in tree.items() if k not in ('head', 'fc')}
                 for c, tree in variables.items()}
  elif check:
    convert.check_variables(model_name, variables, num_classes, **shape_overrides)
  return variables
