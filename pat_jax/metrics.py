"""Metrics to metrics.jsonl and TensorBoard (process 0 only), and a progress line with ETA."""
import json
import os
import time

import jax
from absl import logging

from pat_jax import paths


def _kind(row: dict) -> str:
  return 'eval' if 'eval_top1' in row else 'train'


def _keep_rows_through(path: str, resume_step: int):
  """Drops the rows of metrics.jsonl logged after `resume_step` (and repeats, and a torn last
  line) by a run that died later; returns the (step, kind) pairs kept and their lines.
  Rewritten atomically."""
  if not paths.exists(path):
    return set(), []
  kept, seen, dropped = [], set(), 0
  for line in paths.read_text(path).splitlines(keepends=True):
    try:
      row = json.loads(line)
      key = (int(row['step']), _kind(row))
    except (ValueError, KeyError, TypeError):
      dropped += 1
      continue
    if key[0] > resume_step or key in seen:
      dropped += 1
      continue
    seen.add(key)
    kept.append(line if line.endswith('\n') else line + '\n')
  if dropped:
    paths.write_text_atomic(path, ''.join(kept))
    logging.info('metrics.jsonl: dropped %d rows logged after step %d (resumed there).', dropped,
                 resume_step)
  return seen, kept


class MetricWriter:
  """One JSON object per write (always with `step`) to metrics.jsonl, and TensorBoard scalars.

  metrics.jsonl holds at most one training row and one evaluation row per step: a run resumed
  at `resume_step` first drops the rows a previous start logged after it, and a row that is
  already there is not written again (e.g. the evaluation of a run resumed at its last step).
  In a bucket (gs://...), where a file cannot be appended to, every write replaces the whole
  file (a few hundred kB for a long run; written at log points only).
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self.active = jax.process_index() == 0
    self._tb = None
    if not self.active:
      return
    paths.makedirs(workdir)
    self._path = os.path.join(workdir, 'metrics.jsonl')
    self._seen, kept = _keep_rows_through(self._path, resume_step)
    # Local: appended line by line. URL: the lines are kept here and the file rewritten.
    self._lines = kept if paths.is_url(workdir) else None
    self._file = None if self._lines is not None else open(self._path, 'a', encoding='utf-8')
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
    if (row['step'], _kind(row)) in self._seen:
      return
    self._seen.add((row['step'], _kind(row)))
    if self._file is not None:
      self._file.write(json.dumps(row) + '\n')
      self._file.flush()
    else:
      self._lines.append(json.dumps(row) + '\n')
      paths.write_text_atomic(self._path, ''.join(self._lines))
    if self._tb is not None:
      with self._tb.as_default():
        for k, v in row.items():
          if k != 'step' and isinstance(v, float):
            self._tf.summary.scalar(k, v, step=int(step))
      self._tb.flush()

  def close(self):
    if self.active:
      if self._file is not None:
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
