"""Golden test vectors of the original PyTorch PAT modules vs pat_jax.

Every `*.npz` case in $PAT_GOLDEN_DIR (default: ../shared/golden relative to the repo
root) is one test. The case's parameters/buffers are loaded into pat_jax's own
modules (by the state-dict key rule of `convert.timm_to_flat`), run in float32 with
'highest' matmul precision in the case's mode, and EVERY `out/` and `out_state/`
array is compared within `meta['tolerance'][key]` exactly as stored (integers
exactly). Format and tolerance rule: the golden folder's README.md.
"""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pat_jax import convert
from pat_jax.distill import losses
from pat_jax.distill import pat_modules as pm

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_DIR = os.environ.get('PAT_GOLDEN_DIR',
                            os.path.normpath(os.path.join(REPO_ROOT, '..', 'shared', 'golden')))
_MISSING = '<no golden cases>'


def _case_files():
  files = sorted(glob.glob(os.path.join(GOLDEN_DIR, '*.npz')))
  return files or [_MISSING]


# ---------------------------------------------------------------------------
# Layout helpers.

def to_pat(x):
  """PyTorch layout -> pat_jax layout (NCHW -> NHWC; sequences unchanged)."""
  x = np.asarray(x)
  return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x


def to_torch(x):
  x = np.asarray(x)
  return x.transpose(0, 3, 1, 2) if x.ndim == 4 else x


def pat_shape(shape):
  """A golden constructor shape (PyTorch layout, with batch) -> per-sample pat_jax shape."""
  shape = tuple(int(s) for s in shape)
  if len(shape) == 4:
    _, c, h, w = shape
    return (h, w, c)
  if len(shape) == 3:
    return shape[1:]
  raise ValueError(f'unexpected constructor shape {shape}')


def _flatten(tree):
  return convert.flatten(tree)


def _unflatten(flat):
  return convert.unflatten({k: jnp.asarray(v) for k, v in flat.items()})


def load_variables(z, module, init_args, init_kwargs):
  """param/ + buffer/ -> Flax variables, checked leaf by leaf against the module's init."""
  sd = {k.split('/', 1)[1]: z[k] for k in z.files if k.startswith(('param/', 'buffer/'))}
  flat = convert.timm_to_flat(sd)
  abstract = _flatten(jax.eval_shape(
      lambda *a: module.init(jax.random.key(0), *a, **init_kwargs), *init_args))
  assert set(flat) == set(abstract), (
      f'variables differ: only in golden {sorted(set(flat) - set(abstract))}, '
      f'only in pat_jax {sorted(set(abstract) - set(flat))}')
  for p, v in flat.items():
    assert tuple(v.shape) == tuple(abstract[p].shape), (p, v.shape, abstract[p].shape)
    flat[p] = np.asarray(v, abstract[p].dtype)
  return _unflatten(flat)


def state_outputs(z, variables, new_state, prefix=''):
  """out_state/<torch key> for every BatchNorm buffer after the step (untouched ones too)."""
  flat = {('batch_stats',) + p: v for p, v in _flatten(variables.get('batch_stats', {})).items()}
  flat.update({('batch_stats',) + p: v for p, v in _flatten(new_state.get('batch_stats', {})).items()})
  return {f'out_state/{prefix}{k}': v for k, v in convert.flat_to_timm(flat).items()}


# ---------------------------------------------------------------------------
# One runner per golden module; each returns {npz key: array in PyTorch layout}.

def run_hcl_loss(z, meta, inp, train):
  return {'out/loss': jax.jit(losses.hcl_loss)(to_pat(inp['feat_s']), to_pat(inp['feat_t']))}


def run_kd_loss(z, meta, inp, train):
  t = float(meta['call']['temperature'])
  f = jax.jit(lambda s, te: losses.kd_loss(s, te, t))
  return {'out/loss': f(inp['logits_student'], inp['logits_teacher'])}


def _feats(inp, prefix):
  return [to_pat(inp[f'{prefix}_{i}']) for i in range(4)]


def _apply(module, variables, args, train):
  f = jax.jit(lambda v, a: module.apply(v, *a, train=train, mutable=['batch_stats']))
  return f(variables, args)


def run_region_attention(z, meta, inp, train):
  c = meta['constructor']
  module = pm.RegionAttention([pat_shape(s) for s in c['student_shapes']], c['num_queries'],
                              c['dim'], c['heads'], c['dropout'])
  feats = _feats(inp, 'feat_s')
  variables = load_variables(z, module, (feats,), {'train': train})
  chunks, _ = _apply(module, variables, (feats,), train)
  return {f'out/chunk_{i}': np.asarray(ch)[None] for i, ch in enumerate(chunks)}


def run_prompt_block(z, meta, inp, train):
  c = meta['constructor']
  module = pm.PromptBlock(pat_shape(c['in_shapes']), pat_shape(c['out_shapes']))
  args = (to_pat(inp['x']),) + ((to_pat(inp['feedback']),) if meta['call']['feedback'] else ())
  assert ('feedback' in inp) == bool(meta['call']['feedback'])
  variables = load_variables(z, module, args, {'train': train})
  y, state = _apply(module, variables, args, train)
  out = {'out/y': to_torch(y)}
  if train:
    out.update(state_outputs(z, variables, state))
  return out


def run_projector(z, meta, inp, train):
  c = meta['constructor']
  module = pm.get_projector(pat_shape(c['in_shapes']), pat_shape(c['out_shapes']))
  expected_cls = {'ViT2ViTProjector': pm.ViT2ViTProjector, 'ViT2CNNProjector': pm.ViT2CNNProjector,
                  'CNN2CNNProjector': pm.CNN2CNNProjector}[meta['module']]
  assert isinstance(module, expected_cls), (type(module), meta['module'])
  if meta['module'] == 'ViT2ViTProjector':
    assert module.out_shape == (c['embed_tokens'], c['embed_dim'])
  x = to_pat(inp['x'])
  variables = load_variables(z, module, (x,), {'train': train})
  y, state = _apply(module, variables, (x,), train)
  out = {'out/y': to_torch(y)}
  if train:
    out.update(state_outputs(z, variables, state))
  return out


def run_pat_feature_loss(z, meta, inp, train):
  c = meta['constructor']
  assert pat_shape(c['aligner_in_shapes']) == (c['num_queries'] // 4, c['dim'])
  module = pm.PATFeatureLoss([pat_shape(s) for s in c['student_shapes']],
                             [pat_shape(s) for s in c['teacher_shapes']],
                             c['num_queries'], c['dim'], c['heads'], c['dropout'])
  args = (_feats(inp, 'feat_s'), _feats(inp, 'feat_t'))
  variables = load_variables(z, module, args, {'train': train})
  res, state = _apply(module, variables, args, train)
  out = {'out/loss': res['loss']}
  for s in range(4):
    out[f'out/raa_chunk_{s}'] = np.asarray(res['chunks'][s])[None]
    out[f'out/aligned_{s}'] = to_torch(res['aligned'][s])
    out[f'out/hcl_{s}'] = res['hcl'][s]
  if train:
    out.update(state_outputs(z, variables, state))
  return out


RUNNERS = {
    'hcl_loss': run_hcl_loss,
    'kd_loss': run_kd_loss,
    'RegionAttention': run_region_attention,
    'PromptBlock': run_prompt_block,
    'ViT2ViTProjector': run_projector,
    'ViT2CNNProjector': run_projector,
    'CNN2CNNProjector': run_projector,
    'pat_feature_loss': run_pat_feature_loss,
}


@pytest.mark.parametrize('path', _case_files(), ids=lambda p: os.path.basename(p)[:-4] if p != _MISSING else p)
def test_golden_case(path):
  if path == _MISSING:
    pytest.fail(f'No golden test vectors found: {GOLDEN_DIR!r} does not exist or holds no *.npz '
                'files. Set PAT_GOLDEN_DIR to the folder with the golden cases.')
  z = np.load(path)
  meta = json.loads(str(z['meta']))
  assert meta['case'] == os.path.basename(path)[:-4]
  runner = RUNNERS.get(meta['module'])
  assert runner is not None, f'unknown golden module {meta["module"]!r} in {path}: add a runner for it'
  mode = meta['mode']
  assert mode in ('train', 'eval', 'n/a'), mode
  inp = {k[3:]: z[k] for k in z.files if k.startswith('in/')}
  with jax.default_matmul_precision('highest'):
    got = runner(z, meta, inp, mode != 'eval')
  expected_keys = {k for k in z.files if k.startswith(('out/', 'out_state/'))}
  assert set(got) == expected_keys, (
      f'unchecked golden outputs: {sorted(expected_keys - set(got))}; '
      f'extra outputs: {sorted(set(got) - expected_keys)}')
  failures = []
  for key in sorted(expected_keys):
    want, have = z[key], np.asarray(got[key])
    assert have.shape == want.shape, (key, have.shape, want.shape)
    tol = meta['tolerance'][key]
    if np.issubdtype(want.dtype, np.integer):
      assert np.issubdtype(have.dtype, np.integer), (key, have.dtype)
      assert tol == 0
      if not np.array_equal(have.astype(np.int64), want):
        failures.append(f'{key}: {have} != {want} (integers must match exactly)')
      continue
    assert np.all(np.isfinite(have)), key
    err = float(np.max(np.abs(have.astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0
    if not err <= tol:
      failures.append(f'{key}: max abs error {err:.3e} > tolerance {tol:.3e}')
  assert not failures, '\n'.join(failures)
