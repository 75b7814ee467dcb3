r"""Runs a grid of config arguments x seeds, one run after another, resumable as a whole.

Command:
  python -m pat_jax.sweep --config=configs/X.py --arg=A [--arg=B ...] --seeds=0,1,2 \
      --workdir=ROOT [--set=key=value ...] [--dry_run] [--report]

Example (the student alone, KD and PAT on three seeds, then a table and plots):
  python -m pat_jax.sweep --config=configs/fmnist_vit.py --arg=student --arg=kd --arg= \
      --seeds=0,1,2 --workdir=workdirs/fmnist --report

Each run is `python -m pat_jax.main --config=X.py:A --workdir=ROOT/<A>/seed<N>
--config.seed=N --config.teacher.workdir=ROOT/teacher --config.<key=value>...` in a subprocess,
its output appended to its run directory's log.txt (the console shows a progress line every
30 s; --verbose shows the log too). <A> is the argument with ',' written as '+' ('default'
when empty); --arg repeats because arguments hold commas (`no_raa,no_afp`). Runs go seed by
seed (every argument at seed 0 first), so a grid stopped half-way holds paired runs. The runs
share one JAX compilation cache (JAX_COMPILATION_CACHE_DIR, default ROOT/.jax_cache): later
seeds load their compiled steps instead of compiling them again.
All runs share one teacher in ROOT/teacher (trained by the first run that needs it). Re-running
the same command skips finished runs and resumes unfinished ones from their checkpoints, so an
interrupted sweep is continued by starting it again. A failed run does not stop the others
(exit code 1 at the end). Ctrl-C or SIGTERM: the running child gets SIGTERM, saves a checkpoint
and exits; the sweep then exits with 130 without starting another run. --report writes
`python -m pat_jax.report ROOT` into ROOT/report at the end.
"""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time

from pat_jax import report


def slug(arg):
  """The experiment folder name of a config argument."""
  return arg.replace(',', '+') or 'default'


def command(config, arg, seed, rundir, root, sets):
  """The pat_jax.main command line of one run."""
  return [sys.executable, '-m', 'pat_jax.main',
          f'--config={config}:{arg}' if arg else f'--config={config}',
          f'--workdir={rundir}', f'--config.seed={seed}',
          f'--config.teacher.workdir={os.path.join(root, "teacher")}',
          *[f'--config.{kv}' for kv in sets]]


def _tail(path, n=5):
  try:
    with open(path, encoding='utf-8', errors='replace') as f:
      return f.read().splitlines()[-n:]
  except OSError:
    return []


class ChildStopper:
  """SIGINT/SIGTERM -> SIGTERM to the running child (it checkpoints and exits), no new runs."""

  def __init__(self):
    self.child, self.stopped = None, False

  def __call__(self, signum, frame):
    del frame
    self.stopped = True
    name = signal.Signals(signum).name
    if self.child is not None and self.child.poll() is None:
      print(f'{name}: asking the running run to checkpoint and stop...', flush=True)
      self.child.send_signal(signal.SIGTERM)
    else:
      print(f'{name}: stopping.', flush=True)


def _child_env(root):
  """The runs' environment: unbuffered output, and one JAX compilation cache for the whole sweep
  (every seed of a method compiles the same programs: the later ones load them in seconds)."""
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(os.path.abspath(root), '.jax_cache'))
  return env


def _progress(rundir):
  """A short line from the run's newest metrics: epoch, loss, last evaluation, ETA."""
  train = evaluation = None
  try:
    with open(os.path.join(rundir, 'metrics.jsonl'), encoding='utf-8') as f:
      for line in f.readlines()[-50:]:
        row = json.loads(line)
        if 'train_loss' in row:
          train = row
        elif 'eval_top1' in row:
          evaluation = row
  except (OSError, ValueError):
    return None
  if train is None:
    return None
  text = f'epoch {train.get("epoch", 0):.1f}, loss {train["train_loss"]:.3f}'
  if evaluation is not None:
    text += f', eval top-1 {max(evaluation["eval_top1"], evaluation["ema_eval_top1"]):.1f}'
  eta = int(train.get('eta_s', 0))
  return text + f', ETA {eta // 60}:{eta % 60:02d}'


def _run_one(cmd, rundir, stopper, env, verbose=False, every_s=30.0):
  """Runs one command with its output appended to rundir/log.txt (and, verbose, to the console);
  prints a progress line every `every_s` seconds; returns its exit code."""
  os.makedirs(rundir, exist_ok=True)
  with open(os.path.join(rundir, 'log.txt'), 'a', encoding='utf-8') as log:
    log.write(f'\n==== {time.strftime("%Y-%m-%d %H:%M:%S")} {shlex.join(cmd)}\n')
    log.flush()
    # Its own process group: a terminal's Ctrl-C reaches only the sweep, which sends SIGTERM.
    stopper.child = subprocess.Popen(cmd, stdout=subprocess.PIPE if verbose else log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     process_group=0, env=env, text=verbose)
    if stopper.stopped:  # the signal came while it was starting
      stopper.child.send_signal(signal.SIGTERM)
    try:
      if verbose:  # tee: the console and the log
        for line in stopper.child.stdout:
          sys.stdout.write(line)
          log.write(line)
        return stopper.child.wait()
      last = None
      while True:
        try:
          return stopper.child.wait(timeout=every_s)
        except subprocess.TimeoutExpired:
          line = _progress(rundir)
          if line and line != last:
            print(f'  {line}', flush=True)
            last = line
    finally:
      stopper.child = None


def read_result(rundir):
  """rundir/result.json, or None while the run is unfinished."""
  result = report.read_json(os.path.join(rundir, 'result.json'))
  return result if isinstance(result, dict) and 'best_top1' in result else None


def _minutes(rundir, result):
  """Training time: result.json's wall_s, else summed from the logged step times."""
  if result.get('wall_s') is not None:
    return result['wall_s'] / 60
  try:
    return report.load_run(rundir)['runtime_s'] / 60
  except OSError:
    return float('nan')


def run_sweep(config, args, seeds, root, sets=(), dry_run=False, verbose=False):
  """Runs the grid; returns the exit code (0 all done, 1 a run failed, 130 stopped by a signal)."""
  # Seed-major: a grid stopped half-way holds every method at the first seeds (paired runs).
  grid = [(arg, seed, os.path.join(root, slug(arg), f'seed{seed}'))
          for seed in seeds for arg in args]
  if dry_run:
    for arg, seed, rundir in grid:
      done = '# done, would skip: ' if read_result(rundir) else ''
      print(done + shlex.join(command(config, arg, seed, rundir, root, sets)))
    return 0
  stopper = ChildStopper()
  previous = {s: signal.signal(s, stopper) for s in (signal.SIGINT, signal.SIGTERM)}
  failed = 0
  try:
    for arg, seed, rundir in grid:
      if stopper.stopped:
        break
      name = f'{slug(arg)} seed {seed}'
      result = read_result(rundir)
      if result:
        print(f'skip {name}: done, best {result["best_top1"]:.2f}', flush=True)
        continue
      verb = 'resume' if os.path.isdir(os.path.join(rundir, 'checkpoints')) else 'run'
      print(f'{verb} {name} in {rundir}', flush=True)
      code = _run_one(command(config, arg, seed, rundir, root, sets), rundir, stopper,
                      _child_env(root), verbose)
      result = read_result(rundir)
      log = os.path.join(rundir, 'log.txt')
      if code == 0 and result:
        final = result.get('final_top1', float('nan'))
        print(f'done {name}: best {result["best_top1"]:.2f}, final {final:.2f}, '
              f'{_minutes(rundir, result):.1f} min', flush=True)
      elif code == 0 or stopper.stopped:  # SIGTERM: checkpointed (exit 0), not finished
        how = 'checkpoint saved' if code == 0 else f'exit code {code}'
        print(f'stopped {name} before the end ({how}), see {log}; run the sweep again to resume',
              flush=True)
        failed += not stopper.stopped
      else:
        failed += 1
        print(f'FAILED {name} (exit code {code}), see {log}:', flush=True)
        for line in _tail(log):
          print(f'  {line}', flush=True)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  if stopper.stopped:
    return 130
  return 1 if failed else 0


def _seeds(text):
  try:
    return [int(s) for s in text.split(',') if s.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f'--seeds wants integers like 0,1,2, not {text!r}') from None


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m pat_jax.sweep', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   allow_abbrev=False)
  parser.add_argument('--config', required=True, help='experiment config file (configs/*.py)')
  parser.add_argument('--arg', action='append', help='config argument (repeat; empty: the default)')
  parser.add_argument('--seeds', type=_seeds, default=[0], help='comma-separated seeds (default 0)')
  parser.add_argument('--workdir', required=True, help='ROOT: runs go to ROOT/<arg>/seed<N>')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='config override for every run (repeat), e.g. --set=num_epochs=10')
  parser.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
  parser.add_argument('--report', action='store_true', help='write ROOT/report at the end')
  parser.add_argument('--verbose', action='store_true',
                      help="show the runs' logs on the console too (always in ROOT/.../log.txt)")
  args = parser.parse_args(argv)
  for kv in args.set:
    if '=' not in kv:
      parser.error(f'--set wants KEY=VALUE, not {kv!r}')
  code = run_sweep(args.config, args.arg if args.arg is not None else [''], args.seeds,
                   args.workdir, args.set, args.dry_run, args.verbose)
  if args.report and not args.dry_run and code != 130:
    try:
      written = report.write_report([args.workdir], os.path.join(args.workdir, 'report'))
    except report.ReportError as e:
      print(f'report: {e}', file=sys.stderr)
    else:
      print(written['table'])
      print(f'report written to {os.path.join(args.workdir, "report")}')
  return code


if __name__ == '__main__':
  sys.exit(main())
