"""Turns a config argument into the paper's variants of a PAT run (ablations, baselines, fractions).

`--config=configs/cifar_convnext_deit.py:ARG`, ARG a comma-separated list of:
  student          the student alone (method none; teacher unused)
  kd               vanilla KD baseline
  fitnet           FitNet baseline (+KD, as the original's FitNet)
  no_raa           PAT without RAA (direct per-stage alignment)
  no_afp           PAT without prompts
  no_feedback      PAT prompts without student feedback
  afp=1 / afp=12   prompts only on these stages (1-based digits)
  queries=N        RAA query count (4 stages x N/4 tokens)
  fraction=F       train on the first F of the shuffled training set (paper Table 2)
  corrected        every quirk switch at its corrected value (Q1, Q2, Q3, Q5)
An empty ARG is the faithful PAT run. `no_raa,no_afp` is the FitNet-style row of Table 3.
"""
import ml_collections

from pat_jax import errors
from pat_jax.distill import fitnet, pat


def apply(c: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
  for token in filter(None, (t.strip() for t in (arg or '').split(','))):
    key, _, value = token.partition('=')
    if key == 'student':
      c.method.name = 'none'
      c.teacher.name = ''
    elif key == 'kd':
      c.method.name = 'kd'
    elif key == 'fitnet':
      c.method = ml_collections.ConfigDict(fitnet.default_config())
    elif key == 'no_raa':
      c.method.raa = False
    elif key == 'no_afp':
      c.method.afp_stages = ()
    elif key == 'no_feedback':
      c.method.afp_feedback = False
    elif key == 'afp':
      c.method.afp_stages = tuple(int(d) for d in value)
    elif key == 'queries':
      c.method.raa_num_queries = int(value)
    elif key == 'fraction':
      c.dataset.train_fraction = float(value)
    elif key == 'corrected':
      c.method.update(dict(seq_layout='transpose', se_mode='scale', pos_encoding='token',
                           cls_token='first'))
    else:
      raise errors.ConfigError(f'Unknown config argument {token!r}. Valid: student, kd, fitnet, no_raa, '
                       'no_afp, no_feedback, afp=DIGITS, queries=N, fraction=F, corrected.')
  return c


def pat_method() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(pat.default_config())
