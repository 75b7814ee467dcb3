r"""Soak benchmark: does a long training run's memory or step time creep up?

Command:
  python -m pat_jax.soak --workdir=WORKDIR [--config=configs/digits_demo.py] [--steps 5000] \
      [--batch-size 16] [--checkpoint-every 100] [--eval-every 500] [--log-every 20] \
      [--sample-every 2] [--set key=value ...] [--teacher-dir DIR] [--out DIR]

It starts one training run, `python -m pat_jax.main --config=CONFIG --workdir=WORKDIR
--config.total_steps=STEPS --config.checkpoint_every_steps=... --config.eval_every_steps=...
--config.log_every_steps=... --config.batch_size=... --config.teacher.workdir=TEACHER_DIR
--config.<key=value>...` (default: PAT on scikit-learn's digits, offline; checkpoints every 100
steps, an evaluation every 500), and while it runs samples, every --sample-every seconds, its
resident memory (VmRSS of the process and of any children it has, in MiB) and the newest step
in WORKDIR/metrics.jsonl. At the end it takes the training rows of metrics.jsonl (those with
`step_time_s`; evaluation rows have `eval_top1` instead), drops the warm-up and fits
least-squares lines of RSS against step and of step time against step. A leak shows as growth
per 1,000 steps (in MiB or s, and in % of the mean). The warm-up is the first 10% of the steps
(--warmup-frac), and at least up to the first training row logged after the first evaluation:
measured on configs/digits_demo.py, RSS fell by about 0.9 GiB (2.55 -> 1.67 GiB) during the
first evaluation, whenever that came (step 200 or 500), and stayed level after it; memory left
from compiling the train step is apparently only returned to the system then. With the
defaults (5000 steps, an evaluation every 500) both rules give the same window.
Also reported: mean/min/max RSS and mean step time after warm-up, the peak RSS of the whole
run, the checkpoints left in WORKDIR/checkpoints, wall time and the run's exit code.

The teacher is kept out of the measurement. A config whose teacher is trained on the fly
(`teacher.pretrain`, no `teacher.checkpoint`, as configs/digits_demo.py) would otherwise train
it inside the measured process, whose memory would then hold what that left behind. So the
config is resolved here first (the same flags, parsed as pat_jax.main parses them), and if it
needs a teacher that TEACHER_DIR (default WORKDIR/teacher; --teacher-dir to share one) does not
hold yet, a separate process trains it there first, unmeasured. The measured run then loads
the finished teacher. The student phase of the measured run is recognised by rows appearing in
WORKDIR/metrics.jsonl (the teacher writes its own metrics into TEACHER_DIR); samples taken
before the first row (start-up, compilation) are kept in the raw samples, marked step None.

WORKDIR must not hold an earlier run (a resumed run measures something else). Output: the
runs' logs in WORKDIR/soak_log.txt, OUT/soak.json (default OUT=WORKDIR) with the keys below,
and a Markdown table on stdout. A run that fails makes this exit 1 after printing its last 40
log lines; Ctrl-C or SIGTERM is passed on to the run as SIGTERM (it checkpoints and stops),
and this exits 130 after writing what it has.

soak.json: command, config, steps, batch_size, warmup_steps, exit_code, interrupted,
teacher_wall_s, wall_s, checkpoints, rss_mib {mean, min, max, peak_all, growth_per_1k_steps,
growth_pct_per_1k_steps, n}, step_time_s {mean, median, min, max, growth_per_1k_steps,
growth_pct_per_1k_steps, n}, samples [{t, rss_mib, step}], train_rows [[step, step_time_s]].
Step times are wall time between log points, so a logging interval that holds an evaluation or
a blocking checkpoint save is slower than the others: compare the median with the mean.
"""
import argparse
import glob
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time

from pat_jax import sweep

LOG_TAIL_LINES = 40


# ----------------------------------------------------------------------------
# Measurement: the memory of a process tree, the steps in metrics.jsonl, the fits.

def _descendants(pid):
  """pid and all its descendants (from /proc/<pid>/task/*/children)."""
  pids, todo = [], [pid]
  while todo:
    p = todo.pop()
    pids.append(p)
    for path in glob.glob(f'/proc/{p}/task/*/children'):
      try:
        with open(path, encoding='ascii') as f:
          todo.extend(int(c) for c in f.read().split())
      except OSError:  # the thread or process has just ended
        pass
  return pids


def rss_mib(pid):
  """VmRSS of `pid` and its descendants, in MiB (None when the process is gone)."""
  total, found = 0, False
  for p in _descendants(pid):
    try:
      with open(f'/proc/{p}/status', encoding='ascii') as f:
        for line in f:
          if line.startswith('VmRSS:'):
            total += int(line.split()[1])  # kB
            found = True
            break
    except OSError:
      pass
  return total / 1024 if found else None


class MetricsTail:
  """Reads the rows appended to a metrics.jsonl since the last call (complete lines only)."""

  def __init__(self, path):
    self.path, self._offset, self.rows = path, 0, []

  def update(self):
    try:
      with open(self.path, 'rb') as f:
        f.seek(self._offset)
        data = f.read()
    except OSError:
      return self.rows
    end = data.rfind(b'\n') + 1  # a line still being written is read next time
    for line in data[:end].splitlines():
      if line.strip():
        self.rows.append(json.loads(line))
    self._offset += end
    return self.rows

  def latest_step(self):
    return max((int(r['step']) for r in self.rows), default=None)


def fit_line(xs, ys):
  """Least-squares (slope, intercept) of ys against xs; None with fewer than 2 distinct xs."""
  n = len(xs)
  if n < 2 or len(set(xs)) < 2:
    return None
  mx, my = sum(xs) / n, sum(ys) / n
  sxx = sum((x - mx) ** 2 for x in xs)
  slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
  return slope, my - slope * mx


def _series(xs, ys):
  """mean/min/max of ys and the growth of the fitted line per 1,000 steps (absolute and %)."""
  if not ys:
    return {'n': 0, 'mean': None, 'min': None, 'max': None, 'growth_per_1k_steps': None,
            'growth_pct_per_1k_steps': None}
  mean = sum(ys) / len(ys)
  fit = fit_line(xs, ys)
  growth = None if fit is None else 1000 * fit[0]
  pct = None if growth is None or mean == 0 else 100 * growth / mean
  return {'n': len(ys), 'mean': mean, 'min': min(ys), 'max': max(ys),
          'growth_per_1k_steps': growth, 'growth_pct_per_1k_steps': pct}


def warmup_end(total_steps, train_steps, eval_steps=(), warmup_frac=0.1):
  """The last step of the warm-up: `warmup_frac` of the run, and at least up to the first training
  row logged after the first evaluation (that evaluation compiles the eval step, and the memory
  left over from compiling the train step is only returned to the system then)."""
  warmup = int(warmup_frac * total_steps)
  if eval_steps:
    after = [s for s in train_steps if s > min(eval_steps)]
    if after:
      warmup = max(warmup, min(after))
  return warmup


def summarize(samples, train_rows, total_steps, warmup_frac=0.1, eval_steps=()):
  """The numbers of soak.json from the raw measurements.

  Args:
    samples: [{'t', 'rss_mib', 'step'}], step None before the first metrics row.
    train_rows: [(step, step_time_s)] from metrics.jsonl.
    total_steps: the run's length.
    warmup_frac: the share of the steps left out of the fits (see `warmup_end`).
    eval_steps: the steps of the evaluation rows in metrics.jsonl.
  """
  warmup = warmup_end(total_steps, [step for step, _ in train_rows], eval_steps, warmup_frac)
  kept = [s for s in samples if s['step'] is not None and s['step'] > warmup and
          s['rss_mib'] is not None]
  rss = _series([s['step'] for s in kept], [s['rss_mib'] for s in kept])
  rss['peak_all'] = max((s['rss_mib'] for s in samples if s['rss_mib'] is not None), default=None)
  rows = [(step, t) for step, t in train_rows if step > warmup]
  step_time = _series([step for step, _ in rows], [t for _, t in rows])
  step_time['median'] = statistics.median([t for _, t in rows]) if rows else None
  return {'warmup_steps': warmup, 'rss_mib': rss, 'step_time_s': step_time}


def _fmt(v, digits):
  return '-' if v is None else f'{v:.{digits}f}'


def markdown(result):
  """The short table printed at the end."""
  r, t = result['rss_mib'], result['step_time_s']
  lines = [
      f'Soak: {result["config"]}, {result["steps"]} steps at batch {result["batch_size"]}, '
      f'fits over steps > {result["warmup_steps"]}.', '',
      '| quantity | mean | min | max | growth / 1k steps | growth % / 1k steps |',
      '|---|---|---|---|---|---|',
      f'| RSS (MiB) | {_fmt(r["mean"], 1)} | {_fmt(r["min"], 1)} | {_fmt(r["max"], 1)} | '
      f'{_fmt(r["growth_per_1k_steps"], 2)} | {_fmt(r["growth_pct_per_1k_steps"], 2)} |',
      f'| step time (s) | {_fmt(t["mean"], 4)} (median {_fmt(t["median"], 4)}) | '
      f'{_fmt(t["min"], 4)} | {_fmt(t["max"], 4)} | {_fmt(t["growth_per_1k_steps"], 5)} | '
      f'{_fmt(t["growth_pct_per_1k_steps"], 2)} |', '',
      f'Peak RSS over the whole run {_fmt(r["peak_all"], 1)} MiB; {r["n"]} RSS samples and '
      f'{t["n"]} step-time rows after warm-up; {result["checkpoints"]} checkpoints; wall '
      f'{result["wall_s"]:.0f} s (teacher first: {result["teacher_wall_s"]:.0f} s); exit code '
      f'{result["exit_code"]}.']
  return '\n'.join(lines)


# ----------------------------------------------------------------------------
# The runs.

def parse_config(config_args):
  """The ConfigDict pat_jax.main builds from these flags (--config=..., --config.key=value)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ['pat_jax.soak', *config_args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                  flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def teacher_to_train(config):
  """The folder where the run would train its teacher first, or None when it needs none there."""
  teacher = config.teacher
  if not teacher.get('name') or teacher.get('checkpoint') or teacher.get('pretrain') is None:
    return None
  return teacher.workdir or None


def train_teacher(teacher_dir, config_args):
  """Runs in a child process: trains the config's teacher.pretrain into teacher_dir, as
  pat_jax.main does at the start of the student's run (which then loads it)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from pat_jax import sharding, train, xla_cpu  # pylint: disable=g-import-not-at-top
  logging.use_absl_handler()  # the log lines of pat_jax.main (absl's format, INFO and up)
  logging.set_verbosity(logging.INFO)
  config = parse_config(config_args)
  xla_cpu.apply(config)
  sharding.check_platform()
  result = train.train_and_evaluate(config.teacher.pretrain, teacher_dir)
  sys.exit(0 if result.get('status') == 'done' else 3)


def _start(cmd, log, forwarder):
  log.write(f'\n==== {time.strftime("%Y-%m-%d %H:%M:%S")} {shlex.join(cmd)}\n')
  log.flush()
  # Its own process group: a terminal's Ctrl-C reaches only this process, which forwards it.
  child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                           process_group=0, env=dict(os.environ, PYTHONUNBUFFERED='1'))
  forwarder.child = child
  if forwarder.stopped:  # the signal came while it was starting
    child.send_signal(signal.SIGTERM)
  return child


def _tail(path, n=LOG_TAIL_LINES):
  with open(path, encoding='utf-8', errors='replace') as f:
    return f.read().splitlines()[-n:]


def _count_checkpoints(workdir):
  path = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(path):
    return 0
  return sum(1 for name in os.listdir(path) if name.isdigit() and
             os.path.isdir(os.path.join(path, name)))


def parse_args(argv):
  p = argparse.ArgumentParser(prog='python -m pat_jax.soak', description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True, help='Run directory (must not hold an earlier run).')
  p.add_argument('--config', default='configs/digits_demo.py', help='Config file[:argument].')
  p.add_argument('--steps', type=int, default=5000, help='Training steps (config.total_steps).')
  p.add_argument('--batch-size', type=int, default=16, help='config.batch_size.')
  p.add_argument('--checkpoint-every', type=int, default=100, help='config.checkpoint_every_steps.')
  p.add_argument('--eval-every', type=int, default=500, help='config.eval_every_steps.')
  p.add_argument('--log-every', type=int, default=20, help='config.log_every_steps.')
  p.add_argument('--sample-every', type=float, default=2.0, help='Seconds between RSS samples.')
  p.add_argument('--warmup-frac', type=float, default=0.1,
                 help='Share of the steps left out of the fits (compilation, warm-up).')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='Another config override (repeatable), e.g. --set model.name=mini_resnet.')
  p.add_argument('--teacher-dir', default=None,
                 help='Where the teacher is trained if the config trains one '
                 '(default WORKDIR/teacher).')
  p.add_argument('--out', default=None, help='Folder for soak.json (default WORKDIR).')
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  workdir = os.path.abspath(args.workdir)
  out = os.path.abspath(args.out or workdir)
  if os.path.exists(os.path.join(workdir, 'metrics.jsonl')) or _count_checkpoints(workdir):
    sys.exit(f'{workdir} holds an earlier run: a soak needs a new workdir.')
  config_args = [f'--config={args.config}', f'--config.total_steps={args.steps}',
                 f'--config.checkpoint_every_steps={args.checkpoint_every}',
                 f'--config.eval_every_steps={args.eval_every}',
                 f'--config.log_every_steps={args.log_every}',
                 f'--config.batch_size={args.batch_size}',
                 '--config.teacher.workdir=' + os.path.abspath(
                     args.teacher_dir or os.path.join(workdir, 'teacher')),
                 *[f'--config.{kv}' for kv in args.set]]
  teacher_dir = teacher_to_train(parse_config(config_args))  # fails early on a bad override
  os.makedirs(workdir, exist_ok=True)
  os.makedirs(out, exist_ok=True)
  log_path = os.path.join(workdir, 'soak_log.txt')
  forwarder = sweep.ChildStopper()  # the sweep's: SIGINT/SIGTERM -> SIGTERM to the run
  previous = {s: signal.signal(s, forwarder) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    with open(log_path, 'a', encoding='utf-8') as log:
      teacher_wall = 0.0
      if teacher_dir and not os.path.isfile(os.path.join(teacher_dir, 'result.json')):
        print(f'Training the teacher into {teacher_dir} first (not measured)...', flush=True)
        t0 = time.time()
        child = _start([sys.executable, '-c', 'import sys; from pat_jax import soak; '
                        'soak.train_teacher(sys.argv[1], sys.argv[2:])', teacher_dir, *config_args],
                       log, forwarder)
        code = child.wait()
        teacher_wall = time.time() - t0
        if code != 0 or forwarder.stopped:
          print('\n'.join(_tail(log_path)), file=sys.stderr)
          print(f'The teacher run ended with exit code {code} (log: {log_path}).', file=sys.stderr)
          return 130 if forwarder.stopped else 1

      cmd = [sys.executable, '-m', 'pat_jax.main', f'--workdir={workdir}', *config_args]
      print(f'Measuring {args.steps} steps in {workdir} (log: {log_path})...', flush=True)
      tail = MetricsTail(os.path.join(workdir, 'metrics.jsonl'))
      samples, t0 = [], time.time()
      child = _start(cmd, log, forwarder)
      while True:
        tail.update()
        samples.append({'t': round(time.time() - t0, 3), 'rss_mib': rss_mib(child.pid),
                        'step': tail.latest_step()})
        try:
          code = child.wait(timeout=args.sample_every)
          break
        except subprocess.TimeoutExpired:
          pass
      wall = time.time() - t0
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)

  tail.update()
  train_rows = [(int(r['step']), float(r['step_time_s'])) for r in tail.rows if 'step_time_s' in r]
  result = {'command': cmd, 'config': args.config, 'steps': args.steps,
            'batch_size': args.batch_size, 'exit_code': code, 'interrupted': forwarder.stopped,
            'teacher_wall_s': teacher_wall, 'wall_s': wall,
            'checkpoints': _count_checkpoints(workdir),
            **summarize(samples, train_rows, args.steps, args.warmup_frac,
                        [int(r['step']) for r in tail.rows if 'eval_top1' in r]),
            'samples': samples, 'train_rows': train_rows}
  with open(os.path.join(out, 'soak.json'), 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=1)
  print(markdown(result))
  if code != 0:
    print('\n'.join(_tail(log_path)), file=sys.stderr)
    print(f'The run ended with exit code {code} (log: {log_path}).', file=sys.stderr)
    return 1
  return 130 if forwarder.stopped else 0


if __name__ == '__main__':
  sys.exit(main())
