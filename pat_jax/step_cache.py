"""The train step's lowered program, kept between starts (jax.export): a restart skips tracing.

JAX's persistent compilation cache (main.py --compilation_cache) keys an executable by the
lowered program, so even a cached restart first traces the Python step and lowers it to StableHLO:
for the paper pair on the 2-core Zen 1 VM, 10.7-11.6 s of a 16-17 s cached restart, which that
cache cannot save (docs/BENCHMARKS.md, "The lowered step kept between starts"). Here the lowered
program itself is kept, serialized by jax.export, in <compilation cache>/pat_jax_steps/<key>.step.
A start whose key matches reads it back, wraps it in a jit (lowering that call inlines the kept
program) and XLA loads the wrapper's executable from the compilation cache. The wrapper runs the
same program: its outputs equal the plain step's bit for bit (tests/test_step_cache.py).

The key is what the program depends on besides the arguments' values: pat_jax's own source files,
the versions of jax, jaxlib, flax, optax and numpy, JAX's settings, the kernel forms
(pat_jax/kernels), the platform and devices, what make_trainer was given (Trainer.fingerprint:
the config, the classes, the steps per epoch, the models) and the arguments' shapes, dtypes and
shardings. Code outside pat_jax that changes the step (a patched function, a method defined in
another package) is not in it: turn the cache off then (config.step_cache=False, or
--compilation_cache=none, which turns off both caches). With several processes (a TPU slice, a
GPU cluster) each reads its own copy from its own cache folder, or a shared one; unless every
process has one, all of them trace and export again, so that all run the same kind of program.

Files are written whole (a temporary file, then a rename) with a checksum: a damaged or foreign
file is reported, replaced by a fresh export, and never run.
"""
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import time

from absl import logging
from etils import epath
import jax
import numpy as np

FOLDER = 'pat_jax_steps'  # under JAX's compilation cache folder
_MAGIC = b'pat_jax exported train step v1\n'


def directory(config, cache_dir=None):
  """Where the kept steps go, in `cache_dir` (None: JAX's compilation cache folder); None when
  off: config.step_cache False, or no compilation cache ('' or unset)."""
  cache = jax.config.jax_compilation_cache_dir if cache_dir is None else cache_dir
  if not config.get('step_cache', True) or not cache:
    return None
  return os.path.join(cache, FOLDER)


@functools.lru_cache(maxsize=None)
def code_digest(root=os.path.dirname(os.path.abspath(__file__))) -> str:
  """sha256 of the package's .py files (names and contents), in a fixed order."""
  digest = hashlib.sha256()
  for folder, subfolders, files in os.walk(root):
    subfolders.sort()
    for name in sorted(files):
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        digest.update(os.path.relpath(path, root).encode() + b'\0')
        with open(path, 'rb') as f:
          digest.update(f.read() + b'\0')
  return digest.hexdigest()


def _no_addresses(text: str) -> str:
  return re.sub(r' at 0x[0-9a-fA-F]+', '', text)


def key(fingerprint, args) -> str:
  """The name of the kept program for this step and these arguments (see the module doc)."""
  from pat_jax import kernels  # pylint: disable=g-import-not-at-top
  leaves, treedef = jax.tree_util.tree_flatten(args)
  device = jax.devices()[0]
  parts = {
      'format': _MAGIC.decode(),
      'code': code_digest(),
      'versions': {m: importlib.metadata.version(m) for m in ('jax', 'jaxlib', 'flax', 'optax', 'numpy')},
      # Every setting but the caches' own (their folders differ between a run and its bench).
      'jax_config': {k: repr(v) for k, v in jax.config.values.items() if 'cache' not in k},
      'kernels': kernels.resolved(),
      'devices': [device.platform, device.device_kind, jax.device_count(), jax.process_count()],
      'trainer': fingerprint,
      'arguments': [str(treedef)] + [
          [list(x.shape), str(x.dtype), repr(getattr(x, 'sharding', None))] for x in leaves],
  }
  text = _no_addresses(json.dumps(parts, sort_keys=True, default=repr))
  return hashlib.sha256(text.encode()).hexdigest()[:40]


def _read(path):
  """The kept program at `path`, or None (absent); raises ValueError when damaged."""
  path = epath.Path(path)
  if not path.exists():
    return None
  data = path.read_bytes()
  head = len(_MAGIC) + 64
  if not data.startswith(_MAGIC) or len(data) < head:
    raise ValueError('not a pat_jax step file')
  payload = data[head:]
  if hashlib.sha256(payload).hexdigest().encode() != data[len(_MAGIC):head]:
    raise ValueError('checksum mismatch (a damaged or partly written file)')
  return jax.export.deserialize(bytearray(payload))


def _write(path, exported):
  payload = bytes(exported.serialize())
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = epath.Path(f'{path}.tmp-{jax.process_index()}-{os.getpid()}')  # hosts may share a folder
  tmp.write_bytes(_MAGIC + hashlib.sha256(payload).hexdigest().encode() + payload)
  tmp.replace(path)


def _everyone(flag: bool) -> bool:
  """True when `flag` is True in every process (a collective: every process must call it)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))


def _compile_timed(jitted, args, t0):
  """jitted compiled for args, and the seconds of its parts since t0 (trace_s from t0 on)."""
  traced = jitted.trace(*args)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  compiled = lowered.compile()
  return compiled, {'trace_s': t1 - t0, 'lower_s': t2 - t1,
                    'backend_compile_s': time.perf_counter() - t2}


class CachedStep:
  """make_trainer's jitted train step, (state, batch, teacher_vars) -> (state, metrics), run from
  a kept program when one matches. The state is donated, as by the plain step.

  `status` after the first call or `prepare`: 'hit' (read back), 'exported' (traced, kept for the
  next start), 'off' (no folder: the plain step) or 'failed' (exporting raised: the plain step).
  `times`: trace_s (tracing and lowering the step for the export, or reading a kept one back, with
  tracing the wrapper), lower_s (the wrapper's lowering, or the plain step's) and backend_compile_s.
  """

  def __init__(self, step, fingerprint, folder):
    self._step, self._fingerprint, self._folder = step, fingerprint, folder
    self._run = None
    self.compiled = None  # the jax Compiled (memory and cost analysis, HLO text)
    self.status, self.times, self.path = None, {}, None

  def prepare(self, state, batch, teacher_vars):
    """Compiles for these arguments (their shapes); returns the callable that runs it."""
    args = (state, batch, teacher_vars)
    if self._folder is None:
      self.status = 'off'
      return self._plain(args)
    t0 = time.perf_counter()
    leaves = jax.tree_util.tree_leaves(args)
    self.path = os.path.join(self._folder, key(self._fingerprint, args) + '.step')
    exported = None
    try:
      exported = _read(self.path)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('The kept train step %s cannot be used (%s: %s): exporting the step again.',
                      self.path, type(e).__name__, e)
    if exported is not None and [(a.shape, a.dtype) for a in exported.in_avals] != [
        (x.shape, x.dtype) for x in leaves]:
      logging.warning('The kept train step %s was made for other arguments: exporting again.',
                      self.path)
      exported = None
    if jax.process_count() > 1 and not _everyone(exported is not None):
      exported = None  # another process has none: all export, and run the same kind of program
    self.status = 'hit'
    if exported is None:
      try:
        exported = self._export(args)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Exporting the train step failed (%s: %s); it is traced at every start.',
                        type(e).__name__, e)
        self.status = 'failed'
        return self._plain(args)
      self.status = 'exported'
      try:
        _write(self.path, exported)
      except Exception as e:  # pylint: disable=broad-except
        # Training goes on: only the next start's tracing is at stake.
        logging.warning('Could not keep the train step in %s (%s: %s).', self.path,
                        type(e).__name__, e)
    n_state = len(jax.tree_util.tree_leaves(state))
    wrapper = jax.jit(exported.call, donate_argnums=tuple(range(n_state)))
    compiled, self.times = _compile_timed(wrapper, leaves, t0)
    state_tree = jax.tree_util.tree_structure(state)

    def run(*args):
      state_leaves, metrics = compiled(*jax.tree_util.tree_leaves(args))
      return jax.tree_util.tree_unflatten(state_tree, state_leaves), metrics

    self.compiled, self._run = compiled, run
    return run

  def _export(self, args):
    """The step over flat arguments, exported (serializable: lists and a dict of metrics)."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    step = self._step

    def flat_step(*leaves):
      state, metrics = step(*jax.tree_util.tree_unflatten(treedef, leaves))
      return jax.tree_util.tree_leaves(state), metrics

    in_shardings = [x.sharding for x in leaves]
    return jax.export.export(jax.jit(flat_step, in_shardings=in_shardings))(*leaves)

  def _plain(self, args):
    compiled, self.times = _compile_timed(self._step, args, time.perf_counter())
    self.compiled = self._run = compiled
    return compiled

  def __call__(self, state, batch, teacher_vars):
    if self._run is None:
      self.prepare(state, batch, teacher_vars)
      logging.info('Train step ready in %.1f s (%s; %s).', sum(self.times.values()), self.status,
                   ', '.join(f'{k[:-2]} {v:.1f} s' for k, v in self.times.items()))
    return self._run(state, batch, teacher_vars)
