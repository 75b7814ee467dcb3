"""GFLOP/s of the paper pair's matrix products in XLA and, side by side, in PyTorch.

    python -m pat_jax.kernels.matmuls [--json] [--batch 8] [--image-size 224] [--repeats 7]
        [--no-torch]

Most of the PAT step's time on CPU is matrix products (61-70% in the profiles of
docs/BENCHMARKS.md), so the first question on a new CPU is whether XLA's products run as fast
as those of the code we are compared with. This times each product of the paper pair's step
(ConvNeXt-T's stage MLPs, DeiT-T's qkv, projection and MLP, the attention's two batched
products) three ways, the forward product and the two its gradient needs (dY @ W^T and
X^T @ dY), each jitted alone in float32 with pat_jax's XLA:CPU flags, and the same products in
torch in the same process (best of `--repeats` calls each). With `--json`: a header line, then
one line per case {case, a, b (the shapes), flops, xla: [fwd, dx, dw], torch: [...]}, rates in
GFLOP/s.
"""
import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional

if __name__ == '__main__':  # on CPU, start again with huge pages, as the benchmarks do
  from pat_jax import xla_cpu as _xla_cpu  # pylint: disable=g-import-not-at-top
  _xla_cpu.reexec_with_huge_pages()

import numpy as np

from pat_jax.kernels.bench import (DEIT_DIM, DEIT_PATCH, DIMS, add_shape_args, case_names,
                                   header, select)

DEIT_HEADS = 3


def cases(batch: int = 8, image_size: int = 224) -> Dict[str, tuple]:
  """name -> (a's shape, b's shape): a @ b, batched over leading dims where a has three."""
  out = {}
  for s, c in enumerate(DIMS):
    rows = batch * max(1, image_size // (4 * 2 ** s)) ** 2
    out[f'convnext_s{s}_fc1'] = ((rows, c), (c, 4 * c))
    out[f'convnext_s{s}_fc2'] = ((rows, 4 * c), (4 * c, c))
  tokens = (image_size // DEIT_PATCH) ** 2 + 1
  rows, d = batch * tokens, DEIT_DIM
  out['deit_qkv'] = ((rows, d), (d, 3 * d))
  out['deit_proj'] = ((rows, d), (d, d))
  out['deit_fc1'] = ((rows, d), (d, 4 * d))
  out['deit_fc2'] = ((rows, 4 * d), (4 * d, d))
  heads, hd = batch * DEIT_HEADS, DEIT_DIM // DEIT_HEADS
  out['deit_attn_scores'] = ((heads, tokens, hd), (heads, hd, tokens))
  out['deit_attn_values'] = ((heads, tokens, tokens), (heads, tokens, hd))
  return out


def _best(fn: Callable[[], object], repeats: int) -> float:
  fn()  # compile / warm up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def _rate(gflop: float, seconds: float) -> float:
  """GFLOP/s to three significant digits (never 0 for a tiny product, as rounding to a decimal
  place would make it)."""
  return float(f'{gflop / seconds:.3g}')


def run(names: Optional[List[str]] = None, batch: int = 8, image_size: int = 224,
        repeats: int = 7, with_torch: bool = True, log=None) -> List[dict]:
  """Times each case's three products in XLA and, where torch is installed and `with_torch`,
  in torch; returns one record per case (and passes each to `log` as it is made)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  torch = None
  if with_torch:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      torch = None
  table = cases(batch, image_size)
  names = select(table, names)
  rng = np.random.default_rng(0)
  swap = lambda x: jnp.swapaxes(x, -1, -2)
  fwd = jax.jit(jnp.matmul)
  dx = jax.jit(lambda g, b: g @ swap(b))
  dw = jax.jit(lambda a, g: swap(a) @ g)
  records = []
  for name in names:
    a_shape, b_shape = table[name]
    a = rng.standard_normal(a_shape, dtype=np.float32)
    b = rng.standard_normal(b_shape, dtype=np.float32)
    g = rng.standard_normal(a_shape[:-1] + b_shape[-1:], dtype=np.float32)
    flops = 2 * int(np.prod(a_shape)) * b_shape[-1]
    gflop = flops / 1e9
    # The gradient's products take the transposed operand inside the jitted call, as
    # dot_general does in the step (XLA chooses the layout; torch gets strided views).
    ja, jb, jg = map(jnp.asarray, (a, b, g))
    xla_calls = (lambda: fwd(ja, jb).block_until_ready(), lambda: dx(jg, jb).block_until_ready(),
                 lambda: dw(ja, jg).block_until_ready())
    rec = dict(case=name, a=list(a_shape), b=list(b_shape), flops=flops,
               xla=[_rate(gflop, _best(f, repeats)) for f in xla_calls])
    if torch is not None:
      ta, tb, tg = map(torch.from_numpy, (a, b, g))
      tbt, tat = tb.transpose(-1, -2), ta.transpose(-1, -2)  # strided views, as autograd's
      with torch.no_grad():
        calls = (lambda: ta @ tb, lambda: tg @ tbt, lambda: tat @ tg)
        rec['torch'] = [_rate(gflop, _best(f, repeats)) for f in calls]
    records.append(rec)
    if log:
      log(rec)
  return records


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  add_shape_args(parser)
  parser.add_argument('--no-torch', dest='torch', action='store_false',
                      help='XLA only (torch is timed when it is installed)')
  args = parser.parse_args(argv)
  from pat_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  xla_cpu.apply()  # the training entry points' XLA:CPU flags, before JAX starts its backends
  if args.torch:
    try:
      import torch  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(os.cpu_count())  # every core, as XLA's thread pool has
    except ImportError:
      pass
  head = dict(header(), batch=args.batch, image_size=args.image_size)
  if args.json:
    print(json.dumps(head), flush=True)
    emit = lambda rec: print(json.dumps(rec), flush=True)
  else:
    print(f'{head["date"]}, {head["backend"]}, batch {args.batch}, {args.image_size}px, float32, '
          f'GFLOP/s, best of {args.repeats} (forward / dY @ W^T / X^T @ dY)\n')
    print('| case | a @ b | XLA | torch |')
    print('|---|---|---|---|')
    fmt = lambda v: ' / '.join(f'{x:.0f}' for x in v) if v else '-'
    emit = lambda r: print(f'| {r["case"]} | {tuple(r["a"])} @ {tuple(r["b"])} | {fmt(r["xla"])} | '
                           f'{fmt(r.get("torch"))} |', flush=True)
  run(case_names(args), args.batch, args.image_size, args.repeats, args.torch, log=emit)


if __name__ == '__main__':
  sys.exit(main())
