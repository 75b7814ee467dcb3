"""The distillation-method interface, and plain supervised training (method.name='none').

A method owns the forward passes of one training step: the student's, the teacher's
(frozen: its variables are passed in, never trained) and its own modules'. The trainer
keeps `params = {'student', 'method'}` and `batch_stats = {'student', 'method'}`,
differentiates the sum of the returned loss terms with respect to `params`, and
carries `state` (e.g. PAT's feedback) from step to step and into checkpoints.
"""
from typing import Any, Dict, NamedTuple

import jax

from pat_jax.distill import losses


class StepOutput(NamedTuple):
  terms: Dict[str, jax.Array]  # weighted loss terms; the trainer minimises their sum
  logits: jax.Array            # student logits (for train accuracy)
  batch_stats: Any             # {'student': ..., 'method': ...} after the step
  state: Any                   # the method's carried state after the step


class Method:
  """Supervised training of the student with soft-target cross-entropy (label smoothing
  and mixup are folded into the targets by the input pipeline)."""
  uses_teacher = False

  def __init__(self, config, student, teacher=None):
    self.config = config
    self.student = student
    self.teacher = teacher

  # -- variables -------------------------------------------------------------
  def init(self, rng, images, student_variables, teacher_variables):
    """The method's own (params, batch_stats, state); none for plain training."""
    del rng, images, student_variables, teacher_variables
    return {}, {}, {}

  def state_shardings(self, abstract_state, mesh):
    """Shardings of the carried state (a matching tree): replicated unless a method says otherwise."""
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree_util.tree_map(lambda _: rep, abstract_state)

  # -- forward passes -------------------------------------------------------
  def student_apply(self, params, batch_stats, images, rng, train=True, **kw):
    """Student forward; returns (output, new student batch_stats)."""
    variables = {'params': params['student']}
    if batch_stats.get('student'):
      variables['batch_stats'] = batch_stats['student']
    if not train:
      return self.student.apply(variables, images, train=False, **kw), batch_stats.get('student', {})
    out, upd = self.student.apply(variables, images, train=True, mutable=['batch_stats'],
                                  rngs={'dropout': rng}, **kw)
    return out, upd.get('batch_stats', {})

  def teacher_apply(self, teacher_variables, images, **kw):
    """Frozen teacher in eval mode; no gradient reaches its weights."""
    return self.teacher.apply(jax.lax.stop_gradient(teacher_variables), images, train=False, **kw)

  def cross_entropy(self, logits, labels):
    return self.config.method.get('ce_weight', 1.0) * losses.soft_target_cross_entropy(logits, labels)

  # -- the step ---------------------------------------------------------------
  def __call__(self, params, batch_stats, state, teacher_variables, batch, rng,
               first=False) -> StepOutput:
    """One step's forward passes and loss terms. `first` is true only for the very first step
    of a run, which has no carried state yet (PAT's feedback): the train step passes
    `step == 0`, a traced boolean, so that the first step and the rest are one program; a
    Python bool is accepted too (True: the first step's own computation, traced as such)."""
    del first
    logits, student_stats = self.student_apply(params, batch_stats, batch['image'], rng)
    terms = {'ce': self.cross_entropy(logits, batch['label'])}
    return StepOutput(terms, logits, {**batch_stats, 'student': student_stats}, state)

