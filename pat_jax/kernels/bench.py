"""Times each op's forms against each other on the current backend, side by side.

    python -m pat_jax.kernels.bench [--json] [--batch 8] [--image-size 224] [--repeats 7]
        [--dtype float32] [--cases gelu,dw7_s0,...]

Shapes are those of the paper pair (ConvNeXt-T teacher -> DeiT-T student) at `--image-size`
and `--batch`: ConvNeXt-T's stage maps (56, 28, 14, 7 at 224) and widths (96, 192, 384,
768), DeiT-T's 197 tokens of 192, the four PromptBlocks and RAA aligners of PAT. Each case
is a jitted forward + backward (`grad` says with respect to what: the frozen teacher's ops
only to their input, trained ones also to their weights), compiled once per form under
`kernels.use(op=form)`; the forms then run in turns (`--repeats` rounds, the order reversed
every other round) and each gets the median and minimum of its times. With `--json`, one JSON
object per line: a header (date, backend, device, load average, the table's choices), then
one per case: {case, op, what, grad, ms: {form: median}, min_ms, temp_bytes: {form: XLA's
temporary buffer bytes}, default, fastest}. Without it, a Markdown table.
"""
import argparse
import datetime
import functools
import json
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

if __name__ == '__main__':  # on CPU, start again with huge pages before the imports below
  from pat_jax import xla_cpu as _xla_cpu  # pylint: disable=g-import-not-at-top
  _xla_cpu.reexec_with_huge_pages()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np

from pat_jax import kernels

DIMS = (96, 192, 384, 768)   # ConvNeXt-T stage widths
DEIT_DIM, DEIT_PATCH = 192, 16


def _rand(i, shape, dtype):
  return jax.random.normal(jax.random.key(i), shape, jnp.float32).astype(dtype)


def _sum_loss(y):
  return jnp.sum(jnp.sin(y.astype(jnp.float32)))


def _op_case(op, what, grad, fn, shapes):
  """A case whose loss is fn(*arrays); `grad`: the argument indices differentiated."""
  def build(dtype):
    args = [_rand(i, s, dtype) for i, s in enumerate(shapes)]
    loss = lambda *a: _sum_loss(fn(*a))
    return loss, args, grad
  return dict(op=op, what=what, grad_desc={(0,): 'x', (1,): 'w', (0, 1): 'x, w'}.get(grad, str(grad)),
              build=build)


def _mlp(x, w1, w2):
  return kernels.gelu(x @ w1) @ w2


def _module_case(op, what, make_module, make_inputs):
  """A case over a Flax module: loss of its train-mode output, gradients to params and x."""
  def build(dtype):
    module = make_module(dtype)
    inputs = [_rand(i + 1, s, dtype) for i, s in enumerate(make_inputs())]
    variables = module.init(jax.random.key(0), *inputs, True)
    params, rest = variables['params'], {k: v for k, v in variables.items() if k != 'params'}
    # Perturb so that nothing is zero (PromptBlock's beta starts at 0).
    params = jax.tree_util.tree_map(lambda p: p + 0.05, params)

    def loss(p, *a):
      out, _ = module.apply({'params': p, **rest}, *a, True, mutable=['batch_stats'])
      return _sum_loss(out)
    return loss, [params] + inputs, (0, 1)
  return dict(op=op, what=what, grad_desc='params, x', build=build)


def cases(batch: int = 8, image_size: int = 224) -> Dict[str, dict]:
  """The benchmark cases at the paper pair's shapes for `image_size`."""
  from pat_jax.distill import projectors, prompts  # pylint: disable=g-import-not-at-top
  b = batch
  sides = [max(1, image_size // f) for f in (4, 8, 16, 32)]
  tokens = (image_size // DEIT_PATCH) ** 2 + 1
  out = {}
  c0, s0 = DIMS[0], sides[0]
  out['gelu'] = _op_case('gelu', f'GELU alone ({b},{s0},{s0},{4 * c0})', (0,), kernels.gelu,
                         [(b, s0, s0, 4 * c0)])
  out['gelu_mlp'] = _op_case('gelu', f'ConvNeXt-T stage-0 MLP ({b},{s0},{s0},{c0})->{4 * c0}->{c0}',
                             (0,), _mlp, [(b, s0, s0, c0), (c0, 4 * c0), (4 * c0, c0)])
  out['gelu_deit_mlp'] = _op_case(
      'gelu', f'DeiT-T MLP ({b},{tokens},{DEIT_DIM})->{4 * DEIT_DIM}->{DEIT_DIM}', (0, 1),
      lambda x, w1: _mlp(x, w1, w1.T), [(b, tokens, DEIT_DIM), (DEIT_DIM, 4 * DEIT_DIM)])
  for s, (c, h) in enumerate(zip(DIMS, sides)):
    out[f'dw7_s{s}'] = _op_case('depthwise_conv', f'depthwise 7x7 ({b},{h},{h},{c})', (0,),
                                lambda x, w: kernels.depthwise(x, w, 3), [(b, h, h, c), (7, 7, 1, c)])
  out['dw7_s0_train'] = _op_case('depthwise_conv', f'depthwise 7x7 ({b},{s0},{s0},{c0})', (0, 1),
                                 lambda x, w: kernels.depthwise(x, w, 3),
                                 [(b, s0, s0, c0), (7, 7, 1, c0)])
  conv = lambda stride, groups: lambda x, w: kernels.conv2d(x, w, stride, 0, groups)
  out['patchify_stem'] = _op_case('patchify_conv', f'ConvNeXt-T stem 4x4/4 ({b},{image_size},{image_size},3)->{c0}',
                              (1,), conv(4, 1), [(b, image_size, image_size, 3), (4, 4, 3, c0)])
  out['patchify_down_s1'] = _op_case('patchify_conv', f'ConvNeXt-T downsample 2x2/2 ({b},{s0},{s0},{c0})->{DIMS[1]}',
                                 (0,), conv(2, 1), [(b, s0, s0, c0), (2, 2, c0, DIMS[1])])
  out['patchify_down_s1_train'] = _op_case(
      'patchify_conv', f'ConvNeXt-T downsample 2x2/2 ({b},{s0},{s0},{c0})->{DIMS[1]}', (0, 1),
      conv(2, 1), [(b, s0, s0, c0), (2, 2, c0, DIMS[1])])
  out['patchify_patch16'] = _op_case(
      'patchify_conv', f'DeiT-T patch embedding 16x16/16 ({b},{image_size},{image_size},3)->{DEIT_DIM}', (1,),
      conv(16, 1), [(b, image_size, image_size, 3), (16, 16, 3, DEIT_DIM)])
  out['pointwise_s1'] = _op_case('pointwise_conv', f'1x1 ({b},{sides[1]},{sides[1]},{DIMS[1]})->{c0} (fb_aligner 1)',
                             (0, 1), conv(1, 1), [(b, sides[1], sides[1], DIMS[1]), (1, 1, DIMS[1], c0)])
  out['pointwise_g4_s0'] = _op_case('pointwise_conv', f'1x1 groups=4 ({b},{s0},{s0},{c0})->{c0} (direct prompt)',
                                (0, 1), conv(1, 4), [(b, s0, s0, c0), (1, 1, c0 // 4, c0)])
  # PromptBlock s sees stage s's input (C = DIMS[s-1] at side sides[s-1]; stage 0: the stem's).
  stage_in = [(sides[0], DIMS[0])] + [(sides[s - 1], DIMS[s - 1]) for s in range(1, 4)]
  for s in (0, 2, 3):
    c = stage_in[s][1]
    out[f'taps_s{s}'] = _op_case('taps_dot', f'taps_dot ({b},5,5,{c}) x (5,5,{c},{c})', (0, 1),
                                 kernels.taps_dot, [(b, 5, 5, c), (5, 5, c, c)])
  for s in range(4):
    (h_in, c_in), h_out = stage_in[s], sides[s]
    in_shape, out_shape = (h_out, h_out, DIMS[s]), (h_in, h_in, c_in)
    out[f'prompt_s{s}'] = _module_case(
        'prompt_chain', f'PromptBlock {in_shape}->{out_shape} with feedback, batch {b}',
        functools.partial(lambda i, o, dtype: prompts.PromptBlock(i, o, dtype=dtype), in_shape, out_shape),
        functools.partial(lambda i, o: [(b,) + o, (b,) + i], in_shape, out_shape))
  for s in (0, 1):
    h, c = sides[s], DIMS[s]
    out[f'aligner_s{s}'] = _module_case(
        'aligner_resize', f'RAA aligner (16,512)->({h},{h},{c}), batch {b}',
        functools.partial(lambda o, dtype: projectors.ViT2CNNProjector((16, 512), o, dtype=dtype),
                          (h, h, c)),
        lambda: [(b, 16, 512)])
  return out


def _compile(case, form, dtype):
  with kernels.use(**{case['op']: form}):
    loss, args, argnums = case['build'](dtype)
    step = jax.jit(jax.value_and_grad(loss, argnums=argnums))
    compiled = step.lower(*args).compile()
  try:
    temp = compiled.memory_analysis().temp_size_in_bytes
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    temp = None
  return compiled, args, temp


def _time(fn: Callable, args) -> float:
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return (time.perf_counter() - t) * 1e3


def select(table: dict, names: Optional[List[str]]) -> List[str]:
  """`names` (all of `table`'s when empty), checked against the table."""
  names = names or list(table)
  unknown = sorted(set(names) - set(table))
  if unknown:
    raise ValueError(f'Unknown cases {unknown}; cases: {", ".join(table)}.')
  return names


def add_shape_args(parser: argparse.ArgumentParser):
  """The flags the kernel benchmarks share: output form, the pair's batch and image size,
  repeats and the cases to run."""
  parser.add_argument('--json', action='store_true', help='one JSON object per line')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--image-size', type=int, default=224)
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--cases', default='', help='comma-separated case names (default: all)')


def case_names(args) -> Optional[List[str]]:
  return [c for c in args.cases.split(',') if c] or None


def run(names: Optional[List[str]] = None, batch: int = 8, image_size: int = 224, repeats: int = 7,
        warmup: int = 1, dtype: str = 'float32', log=None) -> List[dict]:
  """Times every form of each case's op; returns one record per case."""
  table = cases(batch, image_size)
  names = select(table, names)
  dt = jnp.dtype(dtype)
  records = []
  for name in names:
    case = table[name]
    forms = kernels.TABLE[case['op']][0]
    compiled = {f: _compile(case, f, dt) for f in forms}
    for f in forms:
      for _ in range(warmup):
        _time(compiled[f][0], compiled[f][1])
    times = {f: [] for f in forms}
    for r in range(repeats):
      for f in (forms if r % 2 == 0 else forms[::-1]):
        times[f].append(_time(compiled[f][0], compiled[f][1]))
    ms = {f: float(np.median(t)) for f, t in times.items()}
    rec = dict(case=name, op=case['op'], what=case['what'], grad=case['grad_desc'], dtype=dtype,
               ms={f: round(v, 3) for f, v in ms.items()},
               min_ms={f: round(float(min(t)), 3) for f, t in times.items()},
               temp_bytes={f: compiled[f][2] for f in forms},
               default=kernels.form(case['op']), fastest=min(ms, key=ms.get))
    records.append(rec)
    if log:
      log(rec)
  return records


def _commit() -> Optional[str]:
  try:
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10,
                          check=True).stdout.strip() or None
  except Exception:  # pylint: disable=broad-except
    return None


def header() -> dict:
  dev = jax.devices()[0]
  return dict(kind='header', date=datetime.datetime.now().isoformat(timespec='seconds'),
              backend=jax.default_backend(), device=getattr(dev, 'device_kind', str(dev)),
              jax=jax.__version__, commit=_commit(), loadavg=list(os.getloadavg()),
              cpus=os.cpu_count(), xla_flags=os.environ.get('XLA_FLAGS', ''),
              kernels_env=os.environ.get(kernels.ENV, ''), table=kernels.resolved())


def _markdown_row(rec) -> str:
  forms = list(rec['ms'])
  ms = ' / '.join(f'{f} {rec["ms"][f]:.2f}' for f in forms)
  plain = rec['ms'][forms[0]]
  ratio = ' / '.join(f'{plain / rec["ms"][f]:.2f}x' for f in forms[1:])
  return (f'| {rec["case"]} | {rec["what"]} | {rec["grad"]} | {ms} | {ratio} | '
          f'{rec["default"]} | {rec["fastest"]} |')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  add_shape_args(parser)
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--list', action='store_true', help='list the cases and exit')
  args = parser.parse_args(argv)
  from pat_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  xla_cpu.apply()  # as the training entry points do, before JAX starts its backends
  if args.list:
    for name, case in cases(args.batch, args.image_size).items():
      print(f'{name}\t{case["op"]}\t{case["what"]}')
    return
  head = header()
  if args.json:
    emit = lambda rec: print(json.dumps(rec), flush=True)
    emit(head)
  else:
    print(f'{head["date"]}, {head["backend"]} ({head["device"]}), load {head["loadavg"]}, '
          f'commit {head["commit"]}, batch {args.batch}, {args.image_size}px, {args.dtype}, '
          f'median of {args.repeats} interleaved runs (ms, forward + backward)\n')
    print('| case | what | grad | ms per form (plain first) | plain / fast | default | fastest |')
    print('|---|---|---|---|---|---|---|')
    emit = lambda rec: print(_markdown_row(rec), flush=True)
  run(case_names(args), args.batch, args.image_size, args.repeats, args.warmup, args.dtype,
      log=emit)
  tail = dict(kind='footer', loadavg=list(os.getloadavg()))
  print(json.dumps(tail) if args.json else f'\nload at the end: {tail["loadavg"]}')


if __name__ == '__main__':
  sys.exit(main())
