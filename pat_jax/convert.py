"""timm/PyTorch weights <-> pat_jax (Flax) variables.

pat_jax modules are named after timm's modules (`stages.1.blocks.0.conv_dw` is
`stages_1/blocks_0/conv_dw`), so conversion is one mechanical rule per leaf:

    conv  weight (O, I/g, kh, kw)  <->  params .../kernel (kh, kw, I/g, O)
    linear weight (out, in)        <->  params .../kernel (in, out)
    norm weight (C,)               <->  params .../scale
    running_mean / running_var     <->  batch_stats .../mean, var
    num_batches_tracked            <->  batch_stats .../num_batches_tracked
    anything else (bias, cls_token, pos_embed, gamma, ls1, alpha, ...) keeps its name.

The converted tree is checked against the model's own (from `jax.eval_shape` of its
init): a missing, unexpected or wrongly shaped weight is an error that names it,
never silently skipped (the original code loads with strict=False).

CLI:  python -m pat_jax.convert --model NAME --num-classes N --input FILE --output DIR
"""
import os
import re
import zipfile
from typing import Any, Dict, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from pat_jax import errors, models

_WRAPPERS = ('state_dict', 'model', 'state_dict_ema', 'model_ema')
_HEADS = ('head', 'fc')  # top-level classifier modules of the zoo's models
_BN_BUFFERS = {'running_mean': 'mean', 'running_var': 'var',
               'num_batches_tracked': 'num_batches_tracked'}


class ConversionError(errors.UserError, ValueError):
  """A checkpoint that does not fit the requested model, or cannot be read safely."""


# ---------------------------------------------------------------------------
# Reading checkpoint files.

def load_state_dict(path: str, use_ema: bool = False, prefix: str = '') -> Dict[str, np.ndarray]:
  """Reads a timm state dict from .pth/.pth.tar/.bin (safe unpickling) or .safetensors.

  Accepts the usual wrappers ({'state_dict': ...}, {'model': ...}, {'state_dict_ema': ...});
  `use_ema` prefers the EMA weights; `prefix` keeps only keys under it and strips it
  (e.g. 'student.' for a PAT distiller state dict); a DataParallel 'module.' prefix is dropped.
  """
  if not os.path.isfile(path):
    raise ConversionError(f'Checkpoint file {path!r} does not exist.')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      sd = load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
      raise ConversionError(f'Cannot read {path!r} as safetensors (truncated or corrupt?): {e}') from e
  else:
    sd = _load_torch(path)
  sd = _unwrap(sd, use_ema, path)
  if prefix:
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not sd:
      raise ConversionError(f'No key of {path!r} starts with prefix {prefix!r}.')
  if all(k.startswith('module.') for k in sd):
    sd = {k[len('module.'):]: v for k, v in sd.items()}
  return {k: _to_numpy(v) for k, v in sd.items()}


def _load_torch(path):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(f'Reading {path!r} needs PyTorch: install the [torch] extra '
                          '(see README), or convert the file to .safetensors.') from e
  try:
    # weights_only=True: a pickle that would run code is refused, never executed.
    return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    msg = str(e)
    if 'Weights only load failed' in msg or 'Unsupported global' in msg or 'UnpicklingError' in type(e).__name__:
      raise ConversionError(
          f'Refusing to load {path!r}: it contains Python objects beyond tensors and plain '
          f'containers, which could execute code when unpickled. Only tensor state dicts are '
          f'accepted (torch.load(weights_only=True)). Details: {msg.splitlines()[0]}') from e
    if isinstance(e, (EOFError, zipfile.BadZipFile, RuntimeError, OSError)):
      raise ConversionError(f'Cannot read {path!r}: the file is truncated or corrupt ({type(e).__name__}: '
                            f'{msg.splitlines()[0] if msg else ""}). Download or copy it again.') from e
    raise


def _unwrap(obj, use_ema, path):
  if not isinstance(obj, Mapping):
    raise ConversionError(f'{path!r} holds a {type(obj).__name__}, not a state dict.')
  order = ('state_dict_ema', 'model_ema') + _WRAPPERS if use_ema else _WRAPPERS
  for key in order:
    if isinstance(obj.get(key), Mapping):
      return obj[key]
  if use_ema:
    raise ConversionError(f'{path!r} has no EMA weights (state_dict_ema / model_ema).')
  if not all(hasattr(v, 'shape') for v in obj.values()):
    raise ConversionError(f'{path!r} is a dict but neither a state dict nor one of the wrappers '
                          f'{_WRAPPERS}; its keys: {sorted(obj)[:10]}.')
  return obj


def _to_numpy(v):
  if hasattr(v, 'detach'):  # torch.Tensor
    v = v.detach().cpu()
    if v.is_floating_point():
      v = v.float()
    return v.numpy()
  return np.asarray(v)


# ---------------------------------------------------------------------------
# Key mapping.

def _module_path(parts):
  """['stages', '1', 'blocks', '0', 'conv_dw'] -> ('stages_1', 'blocks_0', 'conv_dw')."""
  out = []
  for p in parts:
    if p.isdigit() and out:
      out[-1] = f'{out[-1]}_{p}'
    else:
      out.append(p)
  return tuple(out)


def _torch_module_path(path):
  """('stages_1', 'blocks_0', 'conv_dw') -> 'stages.1.blocks.0.conv_dw'."""
  return '.'.join(re.sub(r'_(\d+)$', r'.\1', p) for p in path)


def timm_to_flat(sd: Mapping[str, np.ndarray]) -> Dict[tuple, np.ndarray]:
  """timm state dict -> {(collection, *module_path, leaf): array}, layouts converted."""
  flat = {}
  for key, v in sd.items():
    *mods, leaf = key.split('.')
    path = _module_path(mods)
    if leaf in _BN_BUFFERS:
      flat[('batch_stats',) + path + (_BN_BUFFERS[leaf],)] = v.astype(
          np.int32 if leaf == 'num_batches_tracked' else np.float32)
    elif leaf == 'weight' and v.ndim == 4:
      flat[('params',) + path + ('kernel',)] = v.transpose(2, 3, 1, 0)
    elif leaf == 'weight' and v.ndim == 2:
      flat[('params',) + path + ('kernel',)] = v.T
    elif leaf == 'weight' and v.ndim == 1:
      flat[('params',) + path + ('scale',)] = v
    else:
      flat[('params',) + path + (leaf,)] = v
  return flat


def _torch_key(path):
  """('params', 'stages_1', 'downsample_1', 'kernel') -> 'stages.1.downsample.1.weight'."""
  collection, *mods, leaf = path
  if collection == 'batch_stats':
    leaf = {v: k for k, v in _BN_BUFFERS.items()}[leaf]
  elif leaf in ('kernel', 'scale'):
    leaf = 'weight'
  mod = _torch_module_path(mods)
  return f'{mod}.{leaf}' if mod else leaf


def flat_to_timm(flat: Mapping[tuple, Any]) -> Dict[str, np.ndarray]:
  """The inverse of timm_to_flat."""
  sd = {}
  for path, v in flat.items():
    v = np.asarray(v)
    if path[-1] == 'num_batches_tracked':
      v = v.astype(np.int64)
    elif path[-1] == 'kernel':
      v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
    sd[_torch_key(path)] = np.array(v, order="C")  # a writable copy: torch.from_numpy wants one
  return sd


def flatten(tree, prefix=()):
  """Nested dicts -> {path tuple: leaf}."""
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(flatten(v, prefix + (k,)))
    return out
  return {prefix: tree}


def unflatten(flat):
  """{path tuple: leaf} -> nested dicts (the inverse of flatten)."""
  tree = {}
  for path, v in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return tree


def abstract_variables(name: str, num_classes: int, **overrides):
  """Shapes and dtypes of the model's variables, without allocating them."""
  model = models.create(name, num_classes=num_classes, **overrides)
  size = getattr(model, 'img_size', 224)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return model, jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


# ---------------------------------------------------------------------------
# Public API.

def from_timm(name: str, source, num_classes: int, use_ema: bool = False, prefix: str = '',
              drop_head: bool = False, **overrides) -> Dict[str, Any]:
  """Flax variables ({'params', 'batch_stats'?}) for pat_jax model `name` from timm weights.

  `source` is a state dict (torch tensors or numpy arrays) or a path to a .pth /
  .pth.tar / .bin / .safetensors file. Raises ConversionError naming every missing,
  unexpected or wrongly shaped parameter. `drop_head=True` leaves the classifier out
  (for fine-tuning on another label set; the caller keeps a freshly initialised head).
  """
  if isinstance(source, (str, os.PathLike)):
    sd = load_state_dict(os.fspath(source), use_ema=use_ema, prefix=prefix)
  else:
    sd = {k: _to_numpy(v) for k, v in _unwrap(source, use_ema, '<state dict>').items()}
  got = timm_to_flat(sd)
  if drop_head:
    got = {p: v for p, v in got.items() if p[1] not in _HEADS}
  expected = _expected(name, num_classes, drop_head, **overrides)
  _check(name, num_classes, got, expected)
  return unflatten({p: jnp.asarray(v, expected[p].dtype) for p, v in got.items()})


def _expected(name, num_classes, drop_head=False, **overrides):
  _, abstract = abstract_variables(name, num_classes, **overrides)
  expected = flatten(abstract)
  if drop_head:
    expected = {p: v for p, v in expected.items() if p[1] not in _HEADS}
  return expected


def check_variables(name: str, variables, num_classes: int, **overrides):
  """Raises ConversionError unless `variables` fit pat_jax model `name` exactly."""
  _check(name, num_classes, flatten(dict(variables)), _expected(name, num_classes, **overrides))


def _check(name, num_classes, got, expected):
  missing = [f'missing: {_describe(p)} (expected shape {tuple(expected[p].shape)})'
             for p in sorted(set(expected) - set(got))]
  unexpected = [f'unexpected: {_describe(p)} (shape {tuple(got[p].shape)})'
                for p in sorted(set(got) - set(expected))]
  mismatched = [f'shape mismatch: {_describe(p)} expected {tuple(expected[p].shape)} '
                f'(pat_jax layout) but found {tuple(got[p].shape)}'
                for p in sorted(set(got) & set(expected))
                if tuple(got[p].shape) != tuple(expected[p].shape)]
  if missing or unexpected or mismatched:
    lines = []
    for group in (mismatched, missing, unexpected):
      lines += group[:8] + ([f'... and {len(group) - 8} more like this'] if len(group) > 8 else [])
    raise ConversionError(
        f'The weights do not fit pat_jax model {name!r} with num_classes={num_classes}: '
        f'{len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} of another shape.'
        '\n  ' + '\n  '.join(lines) + _hint(name, num_classes, missing, unexpected, mismatched))


def to_timm(variables: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """timm state dict (numpy arrays) from pat_jax variables; load with torch.from_numpy."""
  return flat_to_timm({k: v for k, v in flatten(dict(variables)).items()})


def _describe(path):
  return f'{"/".join(path[1:])} [{path[0]}] (timm key {_torch_key(path)!r})'


def _hint(name, num_classes, missing, unexpected, mismatched):
  if len(missing) + len(unexpected) > 2:
    return (f'\nMany names differ: the checkpoint is probably of another architecture than '
            f'{name!r} (valid models: {", ".join(models.names())}).')
  if any('head' in p or "'fc." in p for p in mismatched):
    return (f'\nThe classifier head differs: the checkpoint was trained for another number of '
            f'classes than num_classes={num_classes}; pass the right --num-classes.')
  if any('pos_embed' in p for p in mismatched):
    return ('\npos_embed differs: the checkpoint was trained at another image size; create the '
            'model with the img_size it was trained at.')
  return ''


# ---------------------------------------------------------------------------
# Command line.

def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from pat_jax import checkpoint  # pylint: disable=g-import-not-at-top

  p = argparse.ArgumentParser(
      prog='python -m pat_jax.convert',
      description='Convert timm weights (.pth/.pth.tar/.bin/.safetensors) into a pat_jax '
                  'orbax checkpoint that teacher.checkpoint and --mode=eval accept.')
  p.add_argument('--model', required=True, help=f'pat_jax model: {", ".join(models.names())}')
  p.add_argument('--num-classes', type=int, required=True)
  p.add_argument('--input', required=True, help='timm checkpoint file')
  p.add_argument('--output', required=True, help='directory to write the checkpoint to')
  p.add_argument('--img-size', type=int, default=None, help='input size of ViT/ResMLP models')
  p.add_argument('--use-ema', action='store_true', help='take state_dict_ema from a wrapper')
  p.add_argument('--prefix', default='', help="keep only keys under this prefix, e.g. 'student.'")
  p.add_argument('--overwrite', action='store_true', help='replace a checkpoint already in --output')
  args = p.parse_args(argv)

  overrides = {'img_size': args.img_size} if args.img_size else {}
  try:
    variables = from_timm(args.model, args.input, num_classes=args.num_classes,
                          use_ema=args.use_ema, prefix=args.prefix, **overrides)
    meta = {'format': 'pat_jax.variables', 'model': args.model, 'num_classes': args.num_classes,
            'overrides': overrides, 'source': os.path.abspath(args.input)}
    out = checkpoint.save_variables(args.output, variables, meta, overwrite=args.overwrite)
  except (ConversionError, checkpoint.CheckpointError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  n = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(variables.get('params', {})))
  print(json.dumps({'output': out, 'model': args.model, 'num_classes': args.num_classes,
                    'num_params': n}))
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
