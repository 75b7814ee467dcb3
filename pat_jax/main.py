"""Entry point: python -m pat_jax.main --config=configs/<exp>.py --workdir=DIR [--mode=eval].

Training resumes by itself from DIR when it holds a checkpoint. --mode=eval prints one
JSON line {"top1", "top5", "num_examples", "step"} for --checkpoint (default: DIR), a
training workdir/checkpoint folder or a `pat_jax.convert` output.
"""
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

from pat_jax import checkpoint, evaluate, sharding, train, xla_cpu

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
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  xla_cpu.apply(FLAGS.config)  # before JAX starts its backends
  sharding.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id)
  sharding.check_platform()
  import jax  # pylint: disable=g-import-not-at-top
  logging.info('JAX %s: %d processes, %d devices (%s).', jax.__version__, jax.process_count(),
               jax.device_count(), jax.default_backend())
  if FLAGS.mode == 'eval':
    path = FLAGS.checkpoint or FLAGS.workdir
    if not path:
      raise app.UsageError('--mode=eval needs --checkpoint or --workdir.')
    evaluate.print_result(evaluate.evaluate_checkpoint(FLAGS.config, path, ema=FLAGS.ema))
    return
  if not FLAGS.workdir:
    raise app.UsageError('Training needs --workdir.')
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except checkpoint.DiskFullError as e:
    # One paragraph at the end, and no interpreter shutdown: orbax's writer threads would print
    # hundreds of lines of tracebacks after it.
    logging.error('%s', e)
    logging.flush()
    sys.stderr.write(f'\nerror: {e}\n')
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access


if __name__ == '__main__':
  app.run(main)
