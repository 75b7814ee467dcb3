"""Entry point: python -m pat_jax.main --config=configs/<exp>.py --workdir=DIR [--mode=eval].

Training resumes by itself from DIR when it holds a checkpoint. --mode=eval prints one
JSON line {"top1", "top5", "num_examples", "step"} for --checkpoint (default: DIR), a
training workdir/checkpoint folder or a `pat_jax.convert` output.
"""
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
if __name__ == '__main__':  # on CPU, start again with huge pages before the imports below
  from pat_jax import xla_cpu as _xla_cpu  # pylint: disable=g-import-not-at-top
  _xla_cpu.reexec_with_huge_pages()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

from pat_jax import checkpoint, errors, evaluate, paths, sharding, train, xla_cpu

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, config.json.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'Train (and resume), or evaluate a checkpoint.')
flags.DEFINE_string('checkpoint', None, '--mode=eval: checkpoint directory (default: --workdir).')
flags.DEFINE_bool('ema', False, '--mode=eval: evaluate the EMA student of a training checkpoint.')
flags.DEFINE_string('coordinator_address', None, 'Multi-host: host:port of process 0.')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.')
flags.DEFINE_string('compilation_cache', None,
                    "JAX's persistent compilation cache, so that a restart or resume does not compile "
                    "again: a folder (local or gs://), or 'none'. Default: $JAX_COMPILATION_CACHE_DIR, "
                    'else $XDG_CACHE_HOME/pat_jax/jax (~/.cache/pat_jax/jax).')
flags.mark_flags_as_required(['config'])


def compilation_cache_dir(value=None, environ=os.environ):
  """The cache folder --compilation_cache names (None: switched off)."""
  if value is None:
    value = environ.get('JAX_COMPILATION_CACHE_DIR') or os.path.join(
        environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'pat_jax', 'jax')
  return None if value.strip().lower() in ('', 'none') else value


def _fail(message):
  """A user error: one paragraph on stderr, exit status 2 (no traceback: nothing is broken)."""
  sys.stderr.write(f'error: {message}\n')
  sys.stderr.flush()
  sys.exit(2)


def _unknown_override(argv, config):
  """The first --config.KEY=... of argv whose KEY is not in `config`, with what is there."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  for arg in argv[1:]:
    if not arg.startswith('--config.'):
      continue
    path = arg[len('--config.'):].split('=', 1)[0]
    node, done = config, []
    for key in path.split('.'):
      if not isinstance(node, ml_collections.ConfigDict):
        break  # a value, not a dict: ml_collections reports that one itself
      if key not in node:
        where = 'config' + ''.join(f'.{k}' for k in done)
        return (f'Unknown config key {".".join(done + [key])!r} in {arg}. {where} has: '
                f'{", ".join(sorted(node.keys()))}.')
      node, done = node[key], done + [key]
  return None


def _config_from_argv(argv):
  """The config that --config=FILE[:ARG] names, loaded again (None if that fails too)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = next((a.split('=', 1)[1] for a in argv[1:] if a.startswith('--config=')), None)
  if not spec:
    return None
  path, _, arg = spec.partition(':')
  try:
    module_spec = importlib.util.spec_from_file_location('_pat_jax_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None


def parse_flags(argv):
  """absl's flag parsing, with config mistakes reported in one paragraph (exit status 2)."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(f'{e}. `python -m pat_jax.main --helpfull` lists the flags.')
  except (KeyError, AttributeError, ValueError, TypeError) as e:
    # --config.KEY=VALUE with an unknown key (ml_collections raises a bare AttributeError), a
    # VALUE of the wrong type, or a config file that rejects its argument (configs/X.py:ARG).
    message = _unknown_override(argv, _config_from_argv(argv))
    _fail(message or f'{type(e).__name__}: {e} (while reading --config and its overrides).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  xla_cpu.apply(FLAGS.config)  # before JAX starts its backends
  sharding.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id)
  try:
    sharding.check_platform()
  except errors.UserError as e:
    _fail(e)
  import jax  # pylint: disable=g-import-not-at-top
  logging.info('JAX %s, %s.', jax.__version__, sharding.describe())
  cache = compilation_cache_dir(FLAGS.compilation_cache)
  jax.config.update('jax_compilation_cache_dir', cache)  # before the first compilation
  logging.info('Compilation cache: %s.', cache or 'off')
  if FLAGS.mode == 'eval':
    path = FLAGS.checkpoint or FLAGS.workdir
    if not path:
      raise app.UsageError('--mode=eval needs --checkpoint or --workdir.')
    try:
      paths.check_backend(path)  # a bucket without google-cloud-storage: say so before any work
      evaluate.print_result(evaluate.evaluate_checkpoint(FLAGS.config, path, ema=FLAGS.ema))
    except errors.UserError as e:
      logging.debug('The error in full:', exc_info=True)
      _fail(e)
    return
  if not FLAGS.workdir:
    raise app.UsageError('Training needs --workdir.')
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except errors.UserError as e:
    logging.debug('The error in full:', exc_info=True)  # --verbosity=1 shows the traceback
    _fail(e)
  except checkpoint.DiskFullError as e:
    # One paragraph at the end, and no interpreter shutdown: orbax's writer threads would print
    # hundreds of lines of tracebacks after it.
    logging.error('%s', e)
    logging.flush()
    sys.stderr.write(f'\nerror: {e}\n')
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
