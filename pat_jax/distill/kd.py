"""Vanilla KD baseline (method.name='kd'): CE + alpha * KL(teacher || student) at temperature T.

As the original's KD distiller: the teacher runs in eval mode under no gradient,
loss = ce_weight * CE + kd_weight * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) (batchmean).
"""
import jax

from pat_jax.distill import base, losses


class KD(base.Method):
  uses_teacher = True

  def __call__(self, params, batch_stats, state, teacher_variables, batch, rng, first=False):
    del first
    cfg = self.config.method
    logits, student_stats = self.student_apply(params, batch_stats, batch['image'], rng)
    teacher_logits = jax.lax.stop_gradient(self.teacher_apply(teacher_variables, batch['image']))
    terms = {
        'ce': self.cross_entropy(logits, batch['label']),
        'kd': cfg.kd_weight * losses.kd_loss(logits, teacher_logits, cfg.kd_temperature),
    }
    return base.StepOutput(terms, logits, {**batch_stats, 'student': student_stats}, state)
