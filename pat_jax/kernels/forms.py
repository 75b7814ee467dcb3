"""The one table of which form each op takes on which backend, and its overrides.

`form(op)` is read when a program is traced (not when it runs), from, first to last:
  1. `use(...)`, a context manager: `with kernels.use(gelu='xla'):` or `kernels.use('plain')`
     (every op in its plain form; `use('plain', gelu='rule')` mixes);
  2. the environment variable PAT_JAX_KERNELS, the same words separated by commas:
     `PAT_JAX_KERNELS=plain`, `PAT_JAX_KERNELS=depthwise_conv=xla,gelu=xla`,
     `PAT_JAX_KERNELS=plain,prompt_chain=pooled` (empty or `default`: the table);
  3. the table below, for `jax.default_backend()` ('cuda' and 'rocm' count as 'gpu'; any
     other backend gets the plain forms).
A program traced under one choice keeps it: compile under the override (e.g.
`jax.jit(f).lower(...).compile()` inside `use`), or use a fresh function per choice.
"""
import contextlib
import contextvars
import functools
import os
from typing import Dict, Optional

import jax

ENV = 'PAT_JAX_KERNELS'
BACKENDS = ('cpu', 'gpu', 'tpu')

# op: (forms, plain form first), then the default form on cpu, gpu, tpu. Why each: see
# pat_jax/kernels/__init__.py; timings: docs/BENCHMARKS.md and `python -m pat_jax.kernels.bench`.
TABLE = {
    #  op                forms                  cpu       gpu       tpu
    'gelu':           (('xla', 'rule'),       'rule',   'xla',    'xla'),
    'depthwise_conv': (('xla', 'shift'),      'shift',  'xla',    'xla'),
    'pointwise_conv': (('xla', 'matmul'),     'matmul', 'xla',    'xla'),
    'patchify_conv':  (('xla', 'matmul'),     'matmul', 'xla',    'xla'),
    'taps_dot':       (('xla', 'rule'),       'rule',   'xla',    'xla'),
    'prompt_chain':   (('direct', 'pooled'),  'pooled', 'pooled', 'pooled'),
    'aligner_resize': (('first', 'last'),     'last',   'last',   'last'),
}

PLAIN = {op: row[0][0] for op, row in TABLE.items()}

_SCOPED: contextvars.ContextVar = contextvars.ContextVar('pat_jax_kernels', default={})


def backend_name(backend: Optional[str] = None) -> Optional[str]:
  """'cpu', 'gpu' or 'tpu' for a JAX backend (default: jax.default_backend()), else None."""
  b = (backend or jax.default_backend()).lower()
  b = {'cuda': 'gpu', 'rocm': 'gpu'}.get(b, b)
  return b if b in BACKENDS else None


def default(op: str, backend: Optional[str] = None) -> str:
  """The table's form of `op` on `backend` (default: the current one), without overrides."""
  _check_op(op)
  b = backend_name(backend)
  return TABLE[op][1 + BACKENDS.index(b)] if b else PLAIN[op]


def _check_op(op: str):
  if op not in TABLE:
    raise ValueError(f'Unknown kernel op {op!r}; ops: {", ".join(TABLE)}.')


def _check(choices: Dict[str, str], source: str) -> Dict[str, str]:
  for op, f in choices.items():
    if op not in TABLE:
      raise ValueError(f'{source}: unknown kernel op {op!r}; ops: {", ".join(TABLE)}.')
    if f not in TABLE[op][0]:
      raise ValueError(f'{source}: {op} must be one of {", ".join(TABLE[op][0])}, got {f!r}.')
  return choices


def parse(spec: str, source: str = ENV) -> Dict[str, str]:
  """'plain,gelu=rule' -> {op: form}; 'plain' sets every op to its plain form."""
  out: Dict[str, str] = {}
  for word in (w.strip() for w in spec.split(',')):
    if not word or word == 'default':
      continue
    if word == 'plain':
      out.update(PLAIN)
    elif '=' in word:
      op, f = (s.strip() for s in word.split('=', 1))
      out[op] = f
    else:
      raise ValueError(f"{source}: {word!r} is neither 'plain', 'default' nor op=form "
                       f'(ops: {", ".join(TABLE)}).')
  return _check(out, source)


@functools.lru_cache(maxsize=16)
def _env_choices(spec: str) -> Dict[str, str]:
  return parse(spec)


@contextlib.contextmanager
def use(*presets: str, **forms: str):
  """Within the block, ops take the given forms: `use('plain')`, `use(gelu='xla')`."""
  choices = dict(_SCOPED.get())
  for p in presets:
    choices.update(parse(p, 'kernels.use'))
  choices.update(_check(dict(forms), 'kernels.use'))
  token = _SCOPED.set(choices)
  try:
    yield
  finally:
    _SCOPED.reset(token)


def form(op: str, backend: Optional[str] = None) -> str:
  """The form `op` takes now: `use(...)`, then PAT_JAX_KERNELS, then the backend's default."""
  _check_op(op)
  scoped = _SCOPED.get()
  if op in scoped:
    return scoped[op]
  env = _env_choices(os.environ.get(ENV, ''))
  if op in env:
    return env[op]
  return default(op, backend)


def resolved(backend: Optional[str] = None) -> Dict[str, str]:
  """{op: form} as `form` resolves every op now (for logs and benchmark records)."""
  return {op: form(op, backend) for op in TABLE}
