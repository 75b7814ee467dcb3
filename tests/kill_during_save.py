"""Runs `python -m pat_jax.main FLAGS...`, SIGKILLing itself at one point of a checkpoint save.

  python tests/kill_during_save.py POINT STEP FLAGS...

orbax writes step STEP as STEP.orbax-checkpoint-tmp/ (each item in its own temporary folder,
renamed when written), then renames the step folder. POINT is where the process dies:
  created        the step's temporary folder exists, no item written yet
  item_written   the first item is complete, the others are not
  before_rename  every item is complete, the step folder not yet renamed
  after_rename   the step folder is renamed (complete), orbax's bookkeeping after it not done
Used by tests/test_faults.py; the hook lives here, not in the package.
"""
import os
import signal
import sys

from orbax.checkpoint._src.path import atomicity

POINTS = ('created', 'item_written', 'before_rename', 'after_rename')


def install(point, step):
  assert point in POINTS, point
  cls = atomicity.AtomicRenameTemporaryPath
  create, finalize = cls.create, cls.finalize

  def die():
    os.kill(os.getpid(), signal.SIGKILL)

  async def create_then_maybe_die(self):
    path = await create(self)
    if point == 'created' and self._final_path.name == step:  # pylint: disable=protected-access
      die()
    return path

  async def finalize_around(self):
    final = self._final_path  # pylint: disable=protected-access
    is_step = final.name == step
    is_item = final.parent.name.startswith(step + '.orbax-checkpoint-tmp')
    if point == 'before_rename' and is_step:
      die()
    result = await finalize(self)
    if (point == 'item_written' and is_item) or (point == 'after_rename' and is_step):
      die()
    return result

  cls.create, cls.finalize = create_then_maybe_die, finalize_around


if __name__ == '__main__':
  install(sys.argv[1], sys.argv[2])
  from absl import app  # pylint: disable=g-import-not-at-top
  from pat_jax import main  # pylint: disable=g-import-not-at-top
  sys.argv = ['pat_jax.main', *sys.argv[3:]]
  app.run(main.main)
