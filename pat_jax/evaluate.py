"""Exact top-1/top-5 over a whole split (padded last batch, masked), and --mode=eval."""
import json
import os
from typing import Any, Dict

import jax
import jax.numpy as jnp
from absl import logging

from pat_jax import checkpoint, data, models, paths, sharding, weights


def make_eval_step(model):
  """(variables, batch, norm=None) -> per-batch sums of correct top-1, top-5 and counted
  examples. norm (static): (mean, std) tuples, needed for uint8 images (dataset.transfer)."""
  def step(variables, batch, norm=None):
    image = batch['image']
    if image.dtype == jnp.uint8:  # normalised here, on the device (a trace-time branch)
      image = data.on_device.normalize(image, *norm)
    logits = model.apply(variables, image, train=False).astype(jnp.float32)
    top5 = jax.lax.top_k(logits, 5)[1]
    hit = top5 == batch['label'][:, None]
    mask = batch['mask'].astype(jnp.float32)
    return {'top1': jnp.sum(hit[:, 0] * mask), 'top5': jnp.sum(jnp.any(hit, 1) * mask),
            'n': jnp.sum(mask)}
  return jax.jit(step, static_argnames=('norm',))


def evaluate(eval_step, variables_list, config, mesh) -> list:
  """Evaluates several variable sets (e.g. raw and EMA student) in one pass over the split."""
  totals = [{'top1': 0.0, 'top5': 0.0, 'n': 0.0} for _ in variables_list]
  per_host = sharding.local_batch_size(config.get('eval_batch_size') or config.batch_size, mesh)
  norm = (tuple(config.dataset.mean), tuple(config.dataset.std))  # for uint8 batches
  for local in data.eval_iterator(config, batch_size=per_host, process_index=jax.process_index(),
                                  process_count=jax.process_count()):
    batch = sharding.global_batch(local, mesh)
    for tot, variables in zip(totals, variables_list):
      for k, v in eval_step(variables, batch, norm=norm).items():
        tot[k] += float(v)
  return [{'top1': 100.0 * t['top1'] / max(t['n'], 1), 'top5': 100.0 * t['top5'] / max(t['n'], 1),
           'num_examples': int(t['n'])} for t in totals]


def evaluate_checkpoint(config, checkpoint_path: str, ema: bool = False) -> Dict[str, Any]:
  """--mode=eval: the student (or its EMA) of a training or converted checkpoint."""
  if paths.isdir(os.path.join(checkpoint_path, 'checkpoints')):
    checkpoint_path = os.path.join(checkpoint_path, 'checkpoints')
  meta = checkpoint.load_meta(checkpoint_path)
  name = meta.get('model', config.model.name)
  num_classes = meta.get('num_classes') or data.get_info(config).num_classes
  overrides = dict(meta.get('overrides', {}))
  model = models.create(name, num_classes=num_classes, **overrides)
  mesh = sharding.make_mesh(config.get('num_devices', 0))
  variables = weights.load(checkpoint_path, name, num_classes, sharding.replicated(mesh),
                           item='ema' if ema else 'variables', check=False)
  logging.info('Evaluating %s (%s) from %s', name, 'EMA' if ema else 'raw', checkpoint_path)
  [result] = evaluate(make_eval_step(model), [variables], config, mesh)
  result['step'] = int(meta.get('step', 0))
  return result


def print_result(result):
  """The result as one JSON line, printed by process 0 only."""
  if jax.process_index() != 0:
    return
  print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}),
        flush=True)
