"""method.name -> distillation method class."""
from pat_jax import errors
from pat_jax.distill import base, fitnet, kd, pat

METHODS = {
    'none': base.Method,
    'kd': kd.KD,
    'fitnet': fitnet.FitNet,
    'pat': pat.PAT,
}


def create(config, student, teacher=None):
  name = config.method.name
  if name not in METHODS:
    raise errors.ConfigError(f'Unknown method.name {name!r}. Valid: {sorted(METHODS)}.')
  cls = METHODS[name]
  if cls.uses_teacher and teacher is None:
    raise errors.ConfigError(f"method.name={name!r} needs a teacher: set teacher.name and teacher.checkpoint.")
  return cls(config, student, teacher)
