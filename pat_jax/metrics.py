"""Metrics to metrics.jsonl and TensorBoard (process 0 only), and a progress line with ETA."""
import json
import os
import time

import jax
from absl import logging


class MetricWriter:
  """One JSON object per write (always with `step`) to metrics.jsonl, and TensorBoard scalars."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self._tb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._file = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      tf.config.set_visible_devices([], 'GPU')
      self._tf = tf
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard'))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('TensorBoard events disabled (%s); metrics.jsonl is still written.', e)

  def write(self, step: int, metrics: dict):
    if not self.active:
      return
    row = {'step': int(step), **{k: float(v) if not isinstance(v, (str, bool)) else v
                                 for k, v in metrics.items()}}
    self._file.write(json.dumps(row) + '\n')
    self._file.flush()
    if self._tb is not None:
      with self._tb.as_default():
        for k, v in row.items():
          if k != 'step' and isinstance(v, float):
            self._tf.summary.scalar(k, v, step=int(step))
      self._tb.flush()

  def close(self):
    if self.active:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


class Progress:
  """Throughput and ETA between log points."""

  def __init__(self, total_steps: int, first_step: int, batch_size: int):
    self.total, self.batch = total_steps, batch_size
    self._t, self._s = time.time(), first_step

  def update(self, step: int) -> dict:
    now = time.time()
    dt, ds = now - self._t, step - self._s
    self._t, self._s = now, step
    step_time = dt / max(ds, 1)
    return {'step_time_s': step_time, 'img_per_s': self.batch / max(step_time, 1e-9),
            'eta_s': step_time * (self.total - step)}


def format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'
