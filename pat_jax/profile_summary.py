"""Where a step's time goes: a jax.profiler trace summed per XLA operation.

`pat_jax.bench --profile_dir=DIR` writes a trace of the timed steps and the compiled step's
HLO text (DIR/train_step.hlo.txt); `summarize(DIR, steps)` reads both and returns

  {'ops_ms_per_step': total time of the step's operations,
   'by_kind': {kind: ms per step},  # matmul, convolution, reduction, copy, elementwise, ...
   'by_where': [{'kind', 'where', 'ms_per_step', 'ops', 'gflop_per_s'}, ...],  # by source line
   'top': [{'op', 'kind', 'where', 'ms_per_step', 'calls_per_step', 'gflop_per_s'}, ...]}

so that a lent accelerator's run says where the time went without TensorBoard. Operations are
the trace events named after an instruction of the compiled program: XLA:CPU's thunks (one
per fusion or library call; recorded with ProfileOptions.host_tracer_level=3) and, on GPU and
TPU, the "XLA Ops" line of the device (or, where only kernels carry an `hlo_op` argument,
that; not yet seen on a lent GPU). `where` is the op's source (the Flax module path of its
`op_name` metadata, block numbers and control flow folded, so every block's fc1 forward and
backward is one row), `gflop_per_s` a matmul or convolution's own rate.

With several devices every device's ops count (so many more calls per step).
On the CPU, read the numbers as shares: the tracer itself slows the ops (it records every
thread-pool task), the thunks of two threads overlap, and a thunk that runs asynchronously (an
Eigen dot) records less than its work (a rate above the CPU's peak gives it away).

  python -m pat_jax.profile_summary DIR [--steps N] [--top K] [--json]
"""
import argparse
import collections
import glob
import gzip
import json
import math
import os
import re

HLO_FILE = 'train_step.hlo.txt'
# Path elements of control flow, rematerialisation or a call, not modules: left out of `where`
# ('call_exported': the train step read back by step_cache.py runs inside a call of it).
_CONTROL = ('while', 'body', 'cond', 'closed_call', 'checkpoint', 'remat', 'rematted_computation',
            'call_exported')

_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+(?:\{[^}]*\})?|\([^=]*?\))\s+'
                    r'([\w\-]+)\((.*)$')
_COMP = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?\s*->.*\{\s*$')
_SHAPE = re.compile(r'^[a-z0-9]+\[([0-9,]*)\]')


def _dims(shape):
  """The dimensions of an array shape; of a tuple's first element (a GPU gemm's result)."""
  m = _SHAPE.match(shape.lstrip('('))
  return [int(d) for d in m.group(1).split(',') if d] if m else None


def parse_hlo(text):
  """{instruction name: {'opcode', 'shape', 'rest'}} and {computation: [its instructions' names]}."""
  instrs, comps, comp = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m and not line.startswith(' '):
      comp = m.group(1)
      continue
    m = _INSTR.match(line)
    if m and comp is not None:
      name, shape, opcode, rest = m.groups()
      instrs[name] = {'opcode': opcode, 'shape': shape, 'rest': rest}
      comps[comp].append(name)
  return instrs, comps


def _operand_names(rest):
  head = rest.split('),', 1)[0]
  return re.findall(r'%([\w.\-]+)', head)


def _dot_flops(instr, instrs):
  out = _dims(instr['shape'])
  operands = _operand_names(instr['rest'])
  m = (re.search(r'lhs_contracting_dims=\{([0-9,]*)\}', instr['rest']) or  # a dot
       re.search(r'"lhs_contracting_dimensions":\[([0-9",]*)\]', instr['rest']))  # a GPU gemm
  if out is None or not operands or operands[0] not in instrs or not m:
    return 0.0
  lhs = _dims(instrs[operands[0]]['shape']) or []
  dims = [int(d.strip('"')) for d in m.group(1).split(',') if d.strip('"')]
  contracted = [lhs[d] for d in dims if d < len(lhs)]
  return 2.0 * math.prod(out) * math.prod(contracted)


def _conv_flops(instr, instrs):
  out = _dims(instr['shape'])
  operands = _operand_names(instr['rest'])
  m = re.search(r'dim_labels=\w+_(\w+)->', instr['rest'])
  if out is None or len(operands) < 2 or operands[1] not in instrs or not m:
    return 0.0
  kernel = _dims(instrs[operands[1]]['shape']) or []
  labels = m.group(1)  # e.g. 01io: the kernel's spatial, input (per group) and output dims
  return 2.0 * math.prod(out) * math.prod(k for k, l in zip(kernel, labels) if l != 'o')


def _called(instr):
  m = re.search(r'calls=%?([\w.\-]+)', instr['rest'])
  return m.group(1) if m else None


def classify(name, instrs, comps):
  """(kind, flops) of one instruction; a fusion is classified by what it computes."""
  instr = instrs[name]
  body = [instr]
  called = _called(instr)
  if called in comps:
    body = [instrs[n] for n in comps[called]]
  opcodes = {i['opcode'] for i in body}
  is_gemm = instr['opcode'] == 'custom-call' and 'gemm' in instr['rest'].lower()  # cuBLAS
  flops = sum(_dot_flops(i, instrs) for i in body if i['opcode'] == 'dot' or is_gemm)
  flops += sum(_conv_flops(i, instrs) for i in body if i['opcode'] == 'convolution')
  if 'dot' in opcodes or is_gemm:
    kind = 'matmul'
  elif 'convolution' in opcodes or (instr['opcode'] == 'custom-call' and
                                    'conv' in instr['rest'].lower()):  # cuDNN
    kind = 'convolution'
  elif opcodes & {'reduce-window', 'select-and-scatter'}:
    kind = 'reduce-window'
  elif 'reduce' in opcodes:
    kind = 'reduction'
  elif opcodes & {'all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all'}:
    kind = 'collective'
  elif opcodes <= {'copy', 'transpose', 'bitcast', 'parameter', 'reshape', 'pad', 'slice',
                   'concatenate', 'dynamic-slice', 'dynamic-update-slice', 'broadcast',
                   'constant', 'tuple', 'get-tuple-element'}:
    kind = 'copy'
  elif instr['opcode'] in ('while', 'conditional', 'call'):
    kind = 'control'
  else:
    kind = 'elementwise'
  return kind, flops


def where(name, instrs, comps):
  """The op's Flax module path from its metadata (a fusion without any: its main op's, or its
  root's), with transformations, control flow and block numbers folded."""
  instr = instrs[name]
  m = re.search(r'op_name="([^"]*)"', instr['rest'])
  called = _called(instr)
  if not m and called in comps:
    body = [instrs[n] for n in comps[called]]
    body.sort(key=lambda i: i['opcode'] not in ('dot', 'convolution'))  # then the root, last
    for i in body[:1] + body[::-1]:
      m = re.search(r'op_name="([^"]*)"', i['rest'])
      if m:
        break
  if not m:
    return ''
  path = m.group(1).split('/')
  path = [p for p in path[1:] if not re.match(r'^(transpose|jvp|vmap|remat|checkpoint|pjit|jit)\(', p)
          and p not in _CONTROL and not re.match(r'^branch_\d+_fun$', p)]
  return re.sub(r'_\d+(?=[/.]|$)', '_*', '/'.join(path))


def _trace_events(trace_dir):
  """The events of the newest trace under trace_dir (every host's file of that run)."""
  runs = sorted(glob.glob(os.path.join(trace_dir, 'plugins', 'profile', '*')))
  files = sorted(glob.glob(os.path.join(runs[-1], '*.trace.json.gz'))) if runs else []
  if not files:
    raise FileNotFoundError(f'No *.trace.json.gz under {trace_dir}/plugins/profile: write one '
                            'with `python -m pat_jax.bench --profile_dir=...`.')
  events = []
  for path in files:
    with gzip.open(path) as f:
      data = json.load(f)
    events += data['traceEvents'] if isinstance(data, dict) else data
  return events


def _op_times(events, instrs):
  """{instruction: [summed ms, calls]} of the trace's op events.

  An op event is named after its instruction (XLA:CPU's thunks; the "XLA Ops" line of a GPU or
  TPU). Where no event is, the kernels' `hlo_op` argument names it instead. Where the trace has
  devices (processes named /device:...), only their events count: the host's launches of the
  same ops would count twice. Loops are left out (their bodies' ops count themselves), and so
  is the python thread (jit dispatch)."""
  meta = [e for e in events if e.get('ph') == 'M']
  threads = {(e['pid'], e.get('tid')): e['args']['name'] for e in meta
             if e.get('name') == 'thread_name'}
  devices = {e['pid'] for e in meta if e.get('name') == 'process_name' and
             str(e['args']['name']).startswith('/device:')}
  spans = [e for e in events if e.get('ph') == 'X' and 'dur' in e and
           threads.get((e['pid'], e.get('tid'))) != 'python' and
           (not devices or e['pid'] in devices)]
  for name_of in (lambda e: e.get('name'), lambda e: (e.get('args') or {}).get('hlo_op')):
    times = collections.defaultdict(lambda: [0.0, 0])
    for e in spans:
      name = name_of(e)
      if name in instrs and instrs[name]['opcode'] not in ('while', 'conditional', 'call'):
        times[name][0] += e['dur'] / 1e3  # trace durations are in microseconds
        times[name][1] += 1
    if times:
      return times
  raise ValueError('No event of the trace names an instruction of the HLO text: are they of '
                   'the same program?')


def _rate(flops, ms):
  return round(flops / (ms / 1e3) / 1e9, 1) if flops and ms else None


def summarize(trace_dir, steps, top=15, hlo_path=None):
  """The summary (see the module docstring) of the trace and HLO text written under trace_dir."""
  with open(hlo_path or os.path.join(trace_dir, HLO_FILE)) as f:
    instrs, comps = parse_hlo(f.read())
  times = _op_times(_trace_events(trace_dir), instrs)
  by_kind = collections.Counter()
  rows, places = [], {}
  for name, (ms, calls) in times.items():
    kind, flops = classify(name, instrs, comps)
    by_kind[kind] += ms / steps
    rows.append({'op': name, 'kind': kind, 'where': where(name, instrs, comps),
                 'ms_per_step': round(ms / steps, 3), 'calls_per_step': calls / steps,
                 'gflop_per_s': _rate(flops * calls, ms)})
    # The same source line in every block, forward and backward, together.
    place = places.setdefault((kind, rows[-1]['where']), [0.0, 0, 0.0])
    place[0] += ms
    place[1] += 1
    place[2] += flops * calls
  rows.sort(key=lambda r: -r['ms_per_step'])
  by_where = sorted(({'kind': k, 'where': w, 'ms_per_step': round(ms / steps, 3), 'ops': ops,
                      'gflop_per_s': _rate(flops, ms)}
                     for (k, w), (ms, ops, flops) in places.items()),
                    key=lambda r: -r['ms_per_step'])
  return {'ops_ms_per_step': round(sum(ms for ms, _ in times.values()) / steps, 3),
          'by_kind': {k: round(v, 3) for k, v in by_kind.most_common()},
          'by_where': by_where[:top], 'top': rows[:top]}


def markdown(summary):
  lines = [f"Ops {summary['ops_ms_per_step']:.1f} ms per step; by kind: " + ', '.join(
      f'{k} {v:.1f}' for k, v in summary['by_kind'].items()), '',
           '| where (every block, forward and backward) | kind | ops | ms/step | GFLOP/s |',
           '|---|---|---|---|---|']
  for r in summary['by_where']:
    rate = f"{r['gflop_per_s']:.3g}" if r['gflop_per_s'] else '–'
    lines.append(f"| {r['where'] or '?'} | {r['kind']} | {r['ops']} | {r['ms_per_step']:.2f} | "
                 f"{rate} |")
  lines += ['', '| op | kind | where | ms/step | GFLOP/s |', '|---|---|---|---|---|']
  for r in summary['top']:
    rate = f"{r['gflop_per_s']:.3g}" if r['gflop_per_s'] else '–'
    lines.append(f"| {r['op']} | {r['kind']} | {r['where']} | {r['ms_per_step']:.2f} | {rate} |")
  return '\n'.join(lines) + '\n'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('trace_dir')
  parser.add_argument('--steps', type=int, default=1, help='Steps the trace holds.')
  parser.add_argument('--top', type=int, default=15)
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args(argv)
  summary = summarize(args.trace_dir, args.steps, args.top)
  print(json.dumps(summary) if args.json else markdown(summary))


if __name__ == '__main__':
  main()
