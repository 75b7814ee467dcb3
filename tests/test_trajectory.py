"""Training-level equality with the original PAT: replay its recorded training steps.

Why this test exists: the module-level golden cases (test_golden.py) check each PAT module
once, in isolation. Whether those modules are wired into a training step the way the
original wires them (which feedback reaches which prompt, the first step without feedback,
what the optimizer updates and with which decay mask, the learning-rate schedule, the
BatchNorm statistics of the PAT modules) only shows when whole steps are repeated. Each
`*.npz` in $PAT_TRAJECTORY_DIR (default: ../shared/golden-trajectory next to the repo root)
is K training steps of the original PyTorch PAT code on the digits-demo recipe.

How: pat_jax's OWN jitted step (`train.make_trainer(...).train_step`, the one training
runs) is built from configs/digits_demo.py's PAT config, after every recipe entry of the
case's `meta` has been checked against that config (an entry the test does not know is a
failure, not a silent pass). Its TrainState is set to the recorded initial state (the torch
distiller's state_dict keys mapped by `convert.timm_to_flat`, every leaf accounted for), the
teacher is loaded with `convert.from_timm`, and the recorded batches (already augmented and
normalised; NCHW -> NHWC) are fed with pat_jax's own smoothed one-hot targets (step 1 from
state step 0: the first step, without feedback, in the one step program), in float32 at
'highest' matmul precision. Then, with the tolerances stored in the
case's meta (format and rule: the folder's README.md):
  * every step's loss terms, gradient norm and learning rate;
  * every tensor after K steps: r = max|got - want| / max|want| per tensor, over the
    parameters of the student and the PAT modules AND the PAT modules' BatchNorm running
    statistics (running_mean / running_var are tensors like any other here); the median of r
    and the largest r are bounded. `num_batches_tracked` is an integer count and must match
    exactly (it proves which BatchNorms ran in train mode on which steps: the feedback
    aligners skip step 1). The RAA positional-encoding table is a buffer in the original
    and a constant in pat_jax: it is checked against `sinusoid_table` at start and end.

A missing folder, an empty one, or a case that cannot be run faithfully fails with a message
naming the problem, as test_golden.py does for ../shared/golden.
"""
import ast
import glob
import importlib.util
import json
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pat_jax import convert, models, sharding, train
from pat_jax.data import digits, mixup
from pat_jax.distill import pat_modules as pm

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAJECTORY_DIR = os.environ.get(
    'PAT_TRAJECTORY_DIR',
    os.path.normpath(os.path.join(REPO_ROOT, '..', 'shared', 'golden-trajectory')))
_MISSING = '<no trajectory cases>'

# The original's names of the loss terms (its loss dict) -> pat_jax's step metrics.
TERM_NAMES = {'loss_gt': 'loss_ce', 'loss_kd': 'loss_kd', 'loss_pat_mse': 'loss_pat_fd',
              'loss_pat_reg': 'loss_pat_reg'}
# The original's PAT arguments (train.py flags, without `--`) -> pat_jax's method.* keys.
METHOD_KEYS = {'gt_loss_weight': 'ce_weight', 'kd_loss_weight': 'kd_weight',
               'kd_temperature': 'kd_temperature', 'pat_afp_stage': 'afp_stages',
               'pat_mse_loss_weight': 'pat_fd_weight', 'pat_reg_loss_weight': 'pat_reg_weight',
               'pat_raa_num_queries': 'raa_num_queries', 'pat_raa_dim': 'raa_dim',
               'pat_raa_heads': 'raa_heads'}
# The original's behaviour, which the replay must run (pat_modules.py's quirk switches).
FAITHFUL_METHOD = {'seq_layout': 'torch_bug', 'se_mode': 'gate', 'pos_encoding': 'batch_index',
                   'cls_token': 'last', 'raa': True, 'afp_feedback': True}
# Top-level meta keys that only describe the case (checked for presence, not replayed).
INFORMATIONAL_META = ('keys', 'tolerance_note', 'replayed_by_pat_jax', 'seed')
# The torch distiller's buffers that are constants in pat_jax (checked by _check_constants).
CONSTANT_BUFFERS = ('attention_blending.positional_encodings',)
FINAL_RULES = ('median_over_tensors_of_max_abs_diff_over_max_abs_value',
               'every_tensor_max_abs_diff_over_max_abs_value')


def _case_files():
  files = sorted(glob.glob(os.path.join(TRAJECTORY_DIR, '*.npz')))
  return files or [_MISSING]


class CaseError(Exception):
  """The case cannot be replayed faithfully (unknown recipe, unmappable key, missing tensor)."""


def _require(cond, msg):
  if not cond:
    raise CaseError(msg)


# ---------------------------------------------------------------------------
# Recipe: every entry of meta['recipe'] is compared with the pat_jax config that will run.

def _demo_config():
  """configs/digits_demo.py's PAT config: the recipe the trajectories were recorded with."""
  spec = importlib.util.spec_from_file_location(
      'digits_demo', os.path.join(REPO_ROOT, 'configs', 'digits_demo.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config('pat')


def _number(text, name, what):
  """The number after `name` in a free-text recipe description (`name 1e-4` or `name=1e-4`)."""
  m = re.search(rf'\b{re.escape(name)}[\s=]+([-+0-9.eE]+)', text)
  _require(m, f'recipe[{what!r}] = {text!r} does not state {name!r}: cannot check it.')
  return float(m.group(1).rstrip('.'))


def _constructor(text, what):
  """'timm Cls(a=1, b=(1, 2)); ... (pat_jax name)' -> (Cls, {a: 1, b: (1, 2)}, name)."""
  m = re.search(r'\b(\w+)\(', text)
  _require(m, f'recipe[{what!r}] = {text!r} names no constructor call.')
  depth, start = 0, m.end()
  for end in range(m.end() - 1, len(text)):
    depth += {'(': 1, ')': -1}.get(text[end], 0)
    if depth == 0:
      break
  _require(depth == 0, f'recipe[{what!r}]: unbalanced parentheses in {text!r}.')
  kwargs = {}
  for k, v in re.findall(r'(\w+)\s*=\s*(\([^()]*\)|[^,()]+)', text[start:end]):
    try:
      kwargs[k] = ast.literal_eval(v.strip())
    except (ValueError, SyntaxError) as e:
      raise CaseError(f'recipe[{what!r}]: cannot read {k}={v!r}.') from e
  name = re.search(r'\(pat_jax (\w+)\)', text)
  _require(name, f'recipe[{what!r}] = {text!r} does not name its pat_jax model "(pat_jax NAME)".')
  return m.group(1), kwargs, name.group(1)


def _check_model(text, what, config_name, module):
  """The described timm model must be the pat_jax module that runs, field by field."""
  cls, kwargs, name = _constructor(text, what)
  _require(name == config_name, f'recipe[{what!r}] is pat_jax {name!r}, the config builds '
           f'{config_name!r}.')
  _require(type(module).__name__ == cls, f'recipe[{what!r}]: timm {cls} but pat_jax {name!r} is a '
           f'{type(module).__name__}.')
  for k, v in kwargs.items():
    _require(hasattr(module, k), f'recipe[{what!r}]: pat_jax {name!r} has no field {k!r} to check.')
    got = getattr(module, k)
    got = tuple(got) if isinstance(v, tuple) else got
    _require(got == v, f'recipe[{what!r}]: {k}={v!r} but pat_jax {name!r} has {k}={got!r}.')
  # timm's default (not stated in the description): no stochastic depth, so no randomness.
  _require(getattr(module, 'drop_path_rate', 0.0) == 0.0, f'{name}: drop_path_rate must be 0.')
  taps = re.search(r'stage taps after blocks ([\d,\s]+)', text)
  if taps:
    want = tuple(int(t) for t in taps.group(1).replace(' ', '').strip(',').split(','))
    _require(tuple(module.stage_ends) == want, f'recipe[{what!r}]: stage taps {want} but pat_jax '
             f'{name!r} taps after blocks {tuple(module.stage_ends)}.')


def _check_optimizer(c, r, v):
  _require('adamw' in v.lower(), f'recipe optimizer {v!r}: only AdamW recipes are replayed here.')
  _require(c.optim.name == 'adamw', f'optim.name={c.optim.name!r}, the recipe uses AdamW.')
  betas = re.search(r'betas \(([\d.]+), ([\d.]+)\)', v)
  # pat_jax's optim.create fixes AdamW's betas and eps at torch's defaults.
  _require(betas and (float(betas.group(1)), float(betas.group(2))) == (0.9, 0.999),
           f'recipe optimizer {v!r}: pat_jax AdamW uses betas (0.9, 0.999).')
  _require(_number(v, 'eps', 'optimizer') == 1e-8, f'recipe optimizer {v!r}: pat_jax uses eps 1e-8.')
  _require('decoupled' in v, f'recipe optimizer {v!r}: pat_jax AdamW decays decoupled.')
  _require(math.isclose(_number(v, 'weight decay', 'optimizer'), c.optim.weight_decay),
           f'recipe optimizer {v!r} vs optim.weight_decay={c.optim.weight_decay}.')
  # "every parameter with ndim > 1" includes the student's cls/pos tables.
  _require('every parameter with ndim > 1' in v and c.optim.decay_pos_embed,
           f'recipe optimizer {v!r}: pat_jax decays ndim > 1 tables only with '
           f'optim.decay_pos_embed=True (it is {c.optim.decay_pos_embed}).')


def _check_schedule(c, r, v):
  _require('CosineLRScheduler' in v and 'per epoch' in v,
           f'recipe schedule {v!r}: only timm per-epoch cosine schedules are replayed here.')
  _require(c.optim.get('schedule', 'cosine') == 'cosine' and not c.optim.per_step_schedule,
           'the config must use the per-epoch cosine schedule.')
  for name, got in (('t_initial', c.num_epochs), ('warmup_t', c.optim.warmup_epochs),
                    ('warmup_lr_init', c.optim.warmup_lr), ('lr_min', c.optim.min_lr)):
    want = _number(v, name, 'schedule')
    _require(math.isclose(want, got), f'recipe schedule {name} {want} but the config has {got}.')


def _check_method(c, r, v):
  unknown = sorted(set(v) - set(METHOD_KEYS))
  _require(not unknown, f'unknown recipe method key(s) {unknown}: map them onto pat_jax method.* '
           'keys in METHOD_KEYS.')
  for k, want in v.items():
    got = c.method[METHOD_KEYS[k]]
    same = tuple(got) == tuple(want) if isinstance(want, list) else math.isclose(float(got), want)
    _require(same, f'recipe method {k}={want!r} but method.{METHOD_KEYS[k]}={got!r}.')
  for k, want in FAITHFUL_METHOD.items():
    _require(c.method[k] == want, f'method.{k}={c.method[k]!r}: replaying the original needs {want!r}.')


def _check_images(c, r, v):
  _require(v.startswith('NCHW float32') and 'augmented' in v and 'normalised' in v,
           f'recipe images {v!r}: the replay expects NCHW float32 batches, augmented and normalised.')
  m = re.search(r'\(x - 255\*([\d.]+)\)/\(255\*([\d.]+)\)', v)
  _require(m, f'recipe images {v!r}: cannot read the normalisation.')
  _require(tuple(c.dataset.mean) == (float(m.group(1)),) * 3 and
           tuple(c.dataset.std) == (float(m.group(2)),) * 3,
           f'recipe normalisation {m.group(0)} vs config mean {c.dataset.mean} std {c.dataset.std}.')


def _check_clip(c, r, v):
  _require(v in (None, 0, 0.0) and not c.optim.clip_grad,
           f'recipe clip_grad={v!r}, config optim.clip_grad={c.optim.clip_grad}.')


def _check_steps_per_epoch(c, v):
  """drop_last over the 1,500 training digits, as pat_jax's pipeline (and the original) batch."""
  _require(c.dataset.name == 'digits', f'config dataset {c.dataset.name!r}, the recipe is digits.')
  _require(int(v) == digits.NUM_TRAIN // c.batch_size, f'recipe steps_per_epoch {v} but pat_jax has '
           f'{digits.NUM_TRAIN} // {c.batch_size} = {digits.NUM_TRAIN // c.batch_size}.')


def _close(cfg_value):
  return lambda c, r, v: _require(math.isclose(float(v), float(cfg_value(c))),
                                   f'recipe value {v!r} but the config has {cfg_value(c)!r}.')


RECIPE_CHECKS = {
    'optimizer': _check_optimizer,
    'lr': _close(lambda c: c.optim.lr),
    'weight_decay': _close(lambda c: c.optim.weight_decay),
    'schedule': _check_schedule,
    'epochs': _close(lambda c: c.num_epochs),
    'batch_size': _close(lambda c: c.batch_size),
    'steps_per_epoch': lambda c, r, v: _check_steps_per_epoch(c, v),
    'label_smoothing': _close(lambda c: c.aug.label_smoothing),
    'clip_grad': _check_clip,
    # EMA only averages the student for evaluation: it never feeds back into a step.
    'ema': lambda c, r, v: _require(str(v).startswith('not involved'), f'recipe ema {v!r}.'),
    'method': _check_method,
    # Model descriptions: checked by _check_model on the modules the trainer builds.
    'student': lambda c, r, v: None,
    'teacher': lambda c, r, v: None,
    'images': _check_images,
    'first_step': lambda c, r, v: _require('without feedback' in v, f'recipe first_step {v!r}: the '
                                           'replay runs step 1 from step 0, without feedback.'),
}


def _config_for(meta):
  """The digits-demo PAT config, checked entry by entry against meta['recipe']."""
  c = _demo_config()
  recipe = meta['recipe']
  unknown = sorted(set(recipe) - set(RECIPE_CHECKS))
  _require(not unknown, f'unknown recipe key(s) {unknown}: the replay cannot tell whether pat_jax\'s '
           'config matches them; add a check to RECIPE_CHECKS.')
  for key, check in RECIPE_CHECKS.items():
    _require(key in recipe, f'the recipe does not state {key!r}.')
    check(c, recipe, recipe[key])
  _require(c.dtype == 'float32', f'config.dtype={c.dtype!r}: the replay is float32.')
  num_classes = _constructor(recipe['student'], 'student')[1].get('num_classes')
  _require(isinstance(num_classes, int), 'recipe student states no num_classes.')
  return c, num_classes


# ---------------------------------------------------------------------------
# State: torch distiller state_dict keys <-> pat_jax TrainState leaves.

def _pat_path(key):
  """A distiller state_dict key -> (its key for timm_to_flat, where that path goes in TrainState)."""
  head = key.split('.', 1)[0]
  if head == 'student':
    return key[len('student.'):], lambda p: (p[0], 'student') + p[1:]
  if head == 'prompt_blocks':  # PATNet's prompt_blocks_<stage>
    return key, lambda p: (p[0], 'method') + p[1:]
  if head in ('attention_blending', 'aligners'):  # inside PATFeatureLoss, named 'distill'
    return key, lambda p: (p[0], 'method', 'distill') + p[1:]
  return None, None


def _map_state(sd):
  """{torch key: array} -> ({(collection, part, *path): array}, {same path: torch key}).

  Raises CaseError for a key with no pat_jax counterpart."""
  flat, names, unmapped = {}, {}, []
  for key, v in sd.items():
    if key in CONSTANT_BUFFERS:
      continue
    sub, place = _pat_path(key)
    if sub is None:
      unmapped.append(key)
      continue
    [(path, arr)] = convert.timm_to_flat({sub: v}).items()
    flat[place(path)], names[place(path)] = arr, key
  _require(not unmapped, f'state key(s) with no pat_jax counterpart: {unmapped}.')
  return flat, names


def _expected_leaves(abstract):
  out = {}
  for collection in ('params', 'batch_stats'):
    for p, v in convert.flatten(getattr(abstract, collection)).items():
      out[(collection,) + p] = v
  return out


def _check_leaves(flat, names, expected, what):
  """Every pat_jax leaf has a recorded tensor of its shape, and every recorded tensor a leaf."""
  missing = sorted('/'.join(p) for p in set(expected) - set(flat))
  extra = sorted(names[p] for p in set(flat) - set(expected))
  bad = sorted(f'{names[p]}: {tuple(flat[p].shape)} -> pat_jax {"/".join(p)} '
               f'{tuple(expected[p].shape)}' for p in set(flat) & set(expected)
               if tuple(flat[p].shape) != tuple(expected[p].shape))
  _require(not (missing or extra or bad),
           f'{what}: pat_jax leaves with no recorded tensor {missing}; recorded tensors with no '
           f'pat_jax leaf {extra}; shape mismatches {bad}.')


def _check_constants(sd, config, what):
  """The original's positional-encoding buffer must be pat_jax's constant sinusoid table.

  Row p is sin/cos(p * div) in float32; torch's and numpy's float32 exp may round div_term
  1 ulp apart, which moves the argument by ~p * 6e-8: the whole table is held to
  1e-6 + 1e-7 * p, and the rows pat_jax actually reads (one per sample in the faithful
  'batch_index' mode, one per query in 'token' mode) to 1e-5.
  """
  dim = config.method.raa_dim
  used = max(config.batch_size, config.method.raa_num_queries)
  for key in CONSTANT_BUFFERS:
    _require(key in sd, f'{what}: missing tensor {key!r}.')
    want = pm.sinusoid_table(sd[key].shape[0], dim)[:, None, :]
    _require(sd[key].shape == want.shape, f'{what} {key}: shape {sd[key].shape} vs {want.shape}.')
    err = np.max(np.abs(sd[key] - want), axis=(1, 2))
    bound = 1e-6 + 1e-7 * np.arange(len(err))
    _require(np.all(err <= bound) and err[:used].max() <= 1e-5,
             f'{what} {key}: differs from pat_jax sinusoid_table by up to {err.max():.2e} '
             f'(row {int(np.argmax(err / bound))}), {err[:used].max():.2e} in the {used} rows used.')


def _initial_state(trainer, flat, seed):
  """A TrainState at step 0 holding the recorded weights, laid out like the trainer's own."""
  abstract = trainer.abstract
  expected = _expected_leaves(abstract)
  leaves = {p: np.asarray(v, expected[p].dtype) for p, v in flat.items()}
  tree = convert.unflatten(leaves)
  params = {'student': tree['params']['student'], 'method': tree['params']['method']}
  stats = tree.get('batch_stats', {})
  batch_stats = {'student': stats.get('student', {}), 'method': stats.get('method', {})}
  # EMA: its own copies (the step donates the state: no leaf may share a buffer with another).
  ema = {'params': jax.tree_util.tree_map(np.copy, params['student'])}
  if batch_stats['student']:
    ema['batch_stats'] = jax.tree_util.tree_map(np.copy, batch_stats['student'])
  state = train.TrainState(
      step=np.zeros((), np.int32), params=params, batch_stats=batch_stats,
      opt_state=trainer.tx.init(params), ema=ema,
      method_state=jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                                          abstract.method_state),
      rng=np.asarray(jax.random.PRNGKey(seed)))
  got, got_def = jax.tree_util.tree_flatten_with_path(state)
  want, want_def = jax.tree_util.tree_flatten_with_path(abstract)
  _require(got_def == want_def, f'the TrainState built from the recorded state has another '
           f'structure than the trainer\'s own:\n{got_def}\nvs\n{want_def}')
  for (where, a), (_, b) in zip(got, want):
    _require((np.shape(a), jnp.result_type(a)) == (b.shape, b.dtype),
             f'TrainState leaf {jax.tree_util.keystr(where)}: {np.shape(a)} {jnp.result_type(a)} '
             f'vs the trainer\'s {b.shape} {b.dtype}.')
  return jax.device_put(state, trainer.shardings)


# ---------------------------------------------------------------------------
# Tolerances.

def _allowed(rule, want):
  """The largest allowed |got - want| under one stored rule."""
  kind = rule[0]
  if kind == 'rel':
    return rule[1] * abs(want)
  if kind == 'abs':
    return rule[1]
  if kind == 'abs+rel':
    return rule[1] + rule[2] * abs(want)
  raise CaseError(f'unknown tolerance kind {rule!r}.')


def _compare_series(name, got, want, rule, failures, worst):
  """Step by step |got - want| <= allowed; records the worst error/allowed ratio."""
  bad = []
  for i, (g, w) in enumerate(zip(got, want)):
    allowed = _allowed(rule, float(w))
    err = abs(float(g) - float(w))
    ratio = err / allowed if allowed > 0 else (0.0 if err == 0 else math.inf)
    if not math.isfinite(float(g)):
      ratio = math.inf
    worst[name] = max(worst.get(name, 0.0), ratio)
    if not ratio <= 1.0:
      bad.append(f'step {i + 1}: got {float(g):.9g}, want {float(w):.9g}, |diff| {err:.3e} > '
                 f'{allowed:.3e}')
  if bad:
    failures.append(f'{name} ({rule}) fails at {len(bad)} of {len(want)} steps:\n    ' +
                    '\n    '.join(bad[:8]) + ('\n    ...' if len(bad) > 8 else ''))


def _relative_tensor_error(got, want):
  """r = max|got - want| / max|want| (0/0 = 0)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if not np.all(np.isfinite(got)):
    return math.inf
  err, scale = float(np.max(np.abs(got - want))), float(np.max(np.abs(want)))
  return err / scale if scale > 0 else (0.0 if err == 0 else math.inf)


# ---------------------------------------------------------------------------

@pytest.mark.parametrize('path', _case_files(),
                         ids=lambda p: os.path.basename(p)[:-4] if p != _MISSING else p)
def test_trajectory(path):
  if path == _MISSING:
    pytest.fail(f'No trajectory cases found: {TRAJECTORY_DIR!r} does not exist or holds no *.npz '
                'files. Set PAT_TRAJECTORY_DIR to the folder with the recorded trajectories.')
  try:
    report = _replay(path)
  except CaseError as e:
    pytest.fail(f'{os.path.basename(path)} cannot be replayed: {e}')
  print(f'\n{os.path.basename(path)}: worst error/tolerance ratios '
        + ', '.join(f'{k} {v:.3g}' for k, v in report['worst'].items())
        + f' (worst tensor {report["worst_tensor"][0]}, r {report["worst_tensor"][1]:.3g}); '
        f'compile {report["seconds"][0]:.0f} s, {len(report["rows"])} steps {report["seconds"][1]:.1f} s')
  assert not report['failures'], (
      f'{os.path.basename(path)}: pat_jax\'s train step leaves the original\'s trajectory:\n  '
      + '\n  '.join(report['failures']))


def _replay(path):
  """Replays one case.

  Returns {'failures': [messages], 'worst': {quantity: worst error / allowed error},
  'worst_tensor': (torch key, r), 'seconds': (compile, steps), 'rows': per-step metrics}.
  Raises CaseError when the case cannot be replayed faithfully.
  """
  with np.load(path) as f:
    z = {k: f[k] for k in f.files}
  _require('meta' in z, 'no meta.')
  meta = json.loads(str(z['meta']))
  _require(meta.get('format_version') == 1, f'format_version {meta.get("format_version")!r}: '
           'this test reads version 1.')
  known = {'format_version', 'steps', 'terms', 'recipe', 'tolerance'} | set(INFORMATIONAL_META)
  _require(not set(meta) - known, f'unknown meta key(s) {sorted(set(meta) - known)}.')
  for key in ('steps', 'terms', 'recipe', 'tolerance'):
    _require(key in meta, f'meta has no {key!r}.')
  arrays = ('x', 'y', 'terms', 'grad_norm', 'lr')
  for key in arrays:
    _require(key in z, f'missing array {key!r}.')
  groups = ('teacher/', 'init/', 'final/')
  stray = [k for k in z if k not in arrays + ('meta',) and not k.startswith(groups)]
  _require(not stray, f'unexpected arrays {stray}: this test would leave them unchecked.')

  config, num_classes = _config_for(meta)
  k_steps = int(meta['steps'])
  x, y = z['x'], z['y']
  size = config.dataset.image_size
  _require(x.shape == (k_steps, config.batch_size, 3, size, size) and x.dtype == np.float32,
           f'x is {x.shape} {x.dtype}, expected ({k_steps}, {config.batch_size}, 3, {size}, {size}).')
  _require(y.shape == (k_steps, config.batch_size) and y.min() >= 0 and y.max() < num_classes,
           f'y is {y.shape} with labels {y.min()}..{y.max()}.')
  unknown_terms = [t for t in meta['terms'] if t not in TERM_NAMES]
  _require(not unknown_terms, f'unknown loss term(s) {unknown_terms}: map them in TERM_NAMES.')
  _require(z['terms'].shape == (k_steps, len(meta['terms'])), f'terms is {z["terms"].shape}.')
  for key in ('grad_norm', 'lr'):
    _require(z[key].shape == (k_steps,), f'{key} is {z[key].shape}.')
  tol = meta['tolerance']
  for key in list(meta['terms']) + ['grad_norm', 'lr', 'final_params']:
    _require(key in tol, f'meta tolerance has no rule for {key!r}.')
  _require(not set(tol) - set(meta['terms']) - {'grad_norm', 'lr', 'final_params'},
           f'tolerance rules for unknown quantities {sorted(set(tol) - set(meta["terms"]))}.')
  _require(set(tol['final_params']) == set(FINAL_RULES),
           f'final_params rules {sorted(tol["final_params"])}, this test knows {FINAL_RULES}.')

  # Teacher: timm keys, checked leaf by leaf against pat_jax's model by from_timm.
  mesh = sharding.make_mesh(1)  # one device: the step is the same on 8 (test_train), and faster
  teacher = models.create(config.teacher.name, num_classes=num_classes)
  teacher_sd = {k[len('teacher/'):]: z[k] for k in z if k.startswith('teacher/')}
  try:
    teacher_vars = convert.from_timm(config.teacher.name, teacher_sd, num_classes=num_classes)
  except convert.ConversionError as e:
    raise CaseError(f'the teacher does not load: {e}') from e
  teacher_vars = jax.device_put(teacher_vars, sharding.replicated(mesh))

  trainer = train.make_trainer(config, mesh, num_classes, int(meta['recipe']['steps_per_epoch']),
                               teacher, teacher_vars)
  _check_model(meta['recipe']['student'], 'student', config.model.name, trainer.student)
  _check_model(meta['recipe']['teacher'], 'teacher', config.teacher.name, teacher)
  expected = _expected_leaves(trainer.abstract)
  sds = {}
  for group in ('init', 'final'):
    sds[group] = {k[len(group) + 1:]: z[k] for k in z if k.startswith(group + '/')}
    _check_constants(sds[group], config, group)
  _require(set(sds['init']) == set(sds['final']),
           f'init/ and final/ hold other keys: {sorted(set(sds["init"]) ^ set(sds["final"]))}.')
  flat_init, names = _map_state(sds['init'])
  _check_leaves(flat_init, names, expected, 'init')
  flat_final, final_names = _map_state(sds['final'])
  _check_leaves(flat_final, final_names, expected, 'final')
  state = _initial_state(trainer, flat_init, int(meta.get('seed', 0)))

  smoothing = float(meta['recipe']['label_smoothing'])
  targets = mixup.smooth_one_hot(y, num_classes, smoothing).numpy()  # pat_jax's own targets
  batches = [sharding.global_batch(
      {'image': np.ascontiguousarray(x[i].transpose(0, 2, 3, 1)), 'label': targets[i]}, mesh)
              for i in range(k_steps)]
  rows = []
  start = time.time()
  with jax.default_matmul_precision('highest'):
    trainer.train_step.lower(state, batches[0], teacher_vars).compile()  # the one program
    compile_seconds = time.time() - start
    for i in range(k_steps):
      state, step_metrics = trainer.train_step(state, batches[i], teacher_vars)
      rows.append(jax.device_get(step_metrics))
  seconds = (compile_seconds, time.time() - start - compile_seconds)

  failures, worst = [], {}
  loss_metrics = {k for k in rows[0] if k.startswith('loss_')}
  _require(loss_metrics == {TERM_NAMES[t] for t in meta['terms']},
           f'pat_jax loss terms {sorted(loss_metrics)} vs recorded '
           f'{[TERM_NAMES[t] for t in meta["terms"]]}: a term would go unchecked.')
  for j, term in enumerate(meta['terms']):
    name = TERM_NAMES[term]
    _compare_series(name, [r[name] for r in rows], z['terms'][:, j], tol[term], failures, worst)
  for name in ('grad_norm', 'lr'):
    _compare_series(name, [r[name] for r in rows], z[name], tol[name], failures, worst)

  # After K steps: float tensors by r (median and max), counters exactly.
  got = {('params',) + p: v for p, v in convert.flatten(jax.device_get(state.params)).items()}
  got.update({('batch_stats',) + p: v
              for p, v in convert.flatten(jax.device_get(state.batch_stats)).items()})
  ratios = {}
  for p, want in flat_final.items():
    have = np.asarray(got[p])
    if p[-1] == 'num_batches_tracked':
      if int(have) != int(want):
        failures.append(f'{names[p]}: {int(have)} != {int(want)} (BatchNorm train-mode calls '
                        'must match exactly)')
      continue
    ratios[names[p]] = _relative_tensor_error(have, want)
  median_tol = tol['final_params'][FINAL_RULES[0]]
  every_tol = tol['final_params'][FINAL_RULES[1]]
  median = float(np.median(list(ratios.values())))
  worst['final median r'] = median / median_tol
  worst['final max r'] = max(ratios.values()) / every_tol
  ranked = sorted(ratios.items(), key=lambda kv: -kv[1])
  if not median <= median_tol:
    failures.append(f'final tensors: median r {median:.3e} > {median_tol:.1e} over {len(ratios)} '
                    f'tensors; worst: ' + ', '.join(f'{k} {v:.2e}' for k, v in ranked[:5]))
  over = [(k, v) for k, v in ranked if not v <= every_tol]
  if over:
    failures.append(f'final tensors with r > {every_tol}: ' +
                    ', '.join(f'{k} {v:.2e}' for k, v in over[:10]) +
                    (f' and {len(over) - 10} more' if len(over) > 10 else ''))
  return {'failures': failures, 'worst': worst, 'seconds': seconds, 'worst_tensor': ranked[0],
          'rows': rows}
