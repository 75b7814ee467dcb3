"""PAT (method.name='pat'): CE + KD + feature distillation through RAA, with AFP prompts in the teacher.

One step, as the original's PAT.forward (official-pat-code.md section 1.2):
  1. student forward with its four stage features (trained);
  2. teacher forward without prompts, under stop_gradient: the KD target;
  3. teacher forward with a PromptBlock on the input of each stage in `afp_stages`, fed with
     the previous step's feedback (aligned student feature minus teacher feature, detached).
     The teacher's weights get no gradient, but its activations carry gradients to the
     prompts. The prompts enter through the backbones' `stage_hook`: no per-architecture code;
  4. RegionAttention over the student stages, one aligner per stage back to the teacher's
     stage shape, hcl loss against the prompted teacher's features (summed over stages);
  5. loss = ce_weight CE + kd_weight KD(student <- teacher, T) + pat_fd_weight L_FD
     + pat_reg_weight KD(prompted teacher <- teacher, T=1);
  6. the new feedback (aligned features and targets, detached) is carried to the next step
     in the train state, and saved in checkpoints (the original keeps it only in memory, so
     its resumed runs start without feedback; ours resume exactly).

Ablations (method.*): `raa=False` aligns each student stage directly (FitNet-style) instead of
through RAA; `afp_stages=()` turns the prompts off (targets come from the plain teacher);
`afp_feedback=False` keeps the prompts but never feeds them back; `raa_num_queries` /
`raa_dim` / `raa_heads` size the attention. Quirk switches: see pat_modules.py
(`seq_layout`, `se_mode`, `pos_encoding`, `cls_token`). Not reproduced: Q7, the teacher's
train mode on the first step of each epoch (identical for ConvNeXt teachers, which have no
BatchNorm and drop_path 0; our teacher always runs in eval mode).
"""
from typing import Any, Sequence, Tuple

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp

from pat_jax.distill import base, losses
from pat_jax.distill import pat_modules as pm


class PATNet(nn.Module):
  """The trainable PAT modules around a frozen teacher (a submodule named 'teacher')."""
  teacher: nn.Module
  student_shapes: Sequence[Tuple[int, ...]]
  teacher_in_shapes: Sequence[Tuple[int, ...]]   # stage inputs (where prompts go), per sample
  teacher_out_shapes: Sequence[Tuple[int, ...]]  # stage outputs, per sample
  afp_stages: Tuple[int, ...] = (0, 1, 2, 3)
  afp_feedback: bool = True
  raa: bool = True
  num_queries: int = 64
  dim: int = 512
  heads: int = 8
  seq_layout: str = 'torch_bug'
  se_mode: str = 'gate'
  pos_encoding: str = 'batch_index'
  cls_token: str = 'last'
  dtype: Any = jnp.float32

  def feedback_shape(self, s):
    """The feedback of stage s: the teacher's stage output, cls token removed."""
    return pm.square_shape(self.teacher_out_shapes[s])

  @nn.compact
  def __call__(self, images, feats_s, feedback=None, train: bool = True, feedback_valid=None):
    prompts = {s: pm.PromptBlock(self.feedback_shape(s), tuple(self.teacher_in_shapes[s]),
                                 self.seq_layout, self.se_mode, self.cls_token, dtype=self.dtype,
                                 name=f'prompt_blocks_{s}') for s in self.afp_stages}

    def hook(i, x):
      if i not in prompts:
        return x
      fb = feedback[i] if (self.afp_feedback and feedback is not None) else None
      return prompts[i](x, fb, train, feedback_valid if fb is not None else None)

    logits_t, feats_t = self.teacher(images, train=False, return_features=True, stage_hook=hook)

    if self.raa:
      out = pm.PATFeatureLoss(tuple(map(tuple, self.student_shapes)), tuple(
          self.feedback_shape(s) for s in range(4)), self.num_queries, self.dim, self.heads,
                              pos_encoding=self.pos_encoding, cls_token=self.cls_token,
                              dtype=self.dtype, name='distill')(feats_s, feats_t, train)
    else:
      out = self._direct_alignment(feats_s, feats_t, train)
    return logits_t, out

  def _direct_alignment(self, feats_s, feats_t, train):
    """RAA off: each student stage goes straight through its own aligner (FitNet-style)."""
    aligned, targets, hcl = [], [], []
    for s, (f_s, f_t) in enumerate(zip(feats_s, feats_t)):
      f_s = pm.drop_cls(f_s, self.cls_token)
      a = pm.get_projector(f_s.shape[1:], self.feedback_shape(s), dtype=self.dtype,
                           name=f'aligners_{s}')(f_s, train)
      t = pm.drop_cls(f_t, self.cls_token)
      aligned.append(a)
      targets.append(t)
      hcl.append(losses.hcl_loss(a, t))
    return {'loss': sum(hcl[1:], hcl[0]), 'hcl': hcl, 'aligned': aligned, 'targets': targets}


def default_config():
  """method.* keys of PAT, with the original's defaults (official-pat-code.md section 1.10)."""
  return dict(
      name='pat', ce_weight=1.0, kd_weight=1.0, kd_temperature=1.0,
      pat_fd_weight=1.0,     # --pat-mse-loss-weight
      pat_reg_weight=1.0,    # --pat-reg-loss-weight
      afp_stages=(1, 2, 3, 4),  # --pat-afp-stage (1-based); () turns AFP off
      afp_feedback=True,     # False: prompts without student feedback
      raa=True,              # False: direct per-stage alignment instead of RAA
      raa_num_queries=64, raa_dim=512, raa_heads=8,
      seq_layout='torch_bug',    # Q1; 'transpose' = corrected
      se_mode='gate',            # Q2; 'scale' = corrected (x * gate)
      pos_encoding='batch_index',  # Q3; 'token' = corrected
      cls_token='last')          # Q5; 'first' = corrected (timm's cls is first)


def _keep_fusion_stats(new, old, valid):
  """`new` with the BatchNorm statistics of every prompt's fusion branch (its fb_aligner)
  taken from `old` unless `valid`: what a step without feedback, which does not run that
  branch, returns."""
  def fusion(path):
    return path[0].startswith('prompt_blocks_') and path[1].startswith(('fb_aligner',
                                                                        'fusion_block'))
  flat_new, flat_old = traverse_util.flatten_dict(new), traverse_util.flatten_dict(old)
  return traverse_util.unflatten_dict({
      path: jnp.where(valid, v, flat_old[path]) if fusion(path) else v
      for path, v in flat_new.items()})


class PAT(base.Method):
  uses_teacher = True

  def _net(self, student_shapes, teacher_in, teacher_out):
    cfg = self.config.method
    return PATNet(self.teacher, student_shapes, teacher_in, teacher_out,
                  afp_stages=tuple(int(s) - 1 for s in cfg.afp_stages),  # config is 1-based
                  afp_feedback=cfg.afp_feedback, raa=cfg.raa, num_queries=cfg.raa_num_queries,
                  dim=cfg.raa_dim, heads=cfg.raa_heads, seq_layout=cfg.seq_layout,
                  se_mode=cfg.se_mode, pos_encoding=cfg.pos_encoding, cls_token=cfg.cls_token,
                  dtype=self.student.dtype)

  def _shapes(self, images, student_variables, teacher_variables):
    """Per-sample stage shapes, measured with a dummy forward (as the original does)."""
    _, feats_s = jax.eval_shape(
        lambda v, x: self.student.apply(v, x, train=False, return_features=True),
        student_variables, images)
    stage_inputs = []

    def record(i, x):
      stage_inputs.append(x.shape[1:])
      return x
    _, feats_t = jax.eval_shape(
        lambda v, x: self.teacher.apply(v, x, train=False, return_features=True, stage_hook=record),
        teacher_variables, images)
    return ([tuple(f.shape[1:]) for f in feats_s], [tuple(s) for s in stage_inputs],
            [tuple(f.shape[1:]) for f in feats_t])

  def init(self, rng, images, student_variables, teacher_variables):
    self.net = self._net(*self._shapes(images, student_variables, teacher_variables))
    _, feats_s = self.student.apply(student_variables, images, train=False, return_features=True)
    variables = self.net.init(rng, images, feats_s, None, False)  # creates every parameter
    params = {k: v for k, v in variables['params'].items() if k != 'teacher'}
    stats = {k: v for k, v in variables.get('batch_stats', {}).items() if k != 'teacher'}
    b = self.config.batch_size
    fb = {s: jnp.zeros((b,) + self.net.feedback_shape(s), jnp.float32) for s in self.net.afp_stages}
    state = {'student': fb, 'teacher': dict(fb)}
    return params, stats, state

  def state_shardings(self, abstract_state, mesh):
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # Feedback of sample i stays with sample i's shard, as per-rank feedback under DDP.
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    return jax.tree_util.tree_map(lambda a: batch if a.ndim else rep, abstract_state)

  def __call__(self, params, batch_stats, state, teacher_variables, batch, rng, first=False):
    """`first`: the run's first step, which has no feedback yet (the original's prev_feat_*
    are None). Traced (the train step's `step == 0`): one program for every step; the
    prompts compute their fusion branch and, on the first step, give the output without it
    (`PromptBlock(feedback_valid=...)`), and the fusion branch's BatchNorm statistics keep
    their old values there, so the first step equals the feedback-free computation
    (tests/test_pat.py). Python True: that feedback-free computation itself. (A run-time
    branch over more of the step had made the CPU step 20x slower; the branch here holds
    only the prompt branch's few small ops, and the step costs the same: docs/BENCHMARKS.md.)"""
    if not hasattr(self, 'net'):
      raise RuntimeError('PAT.init must run (or be traced) before the first step: it measures the '
                         'stage shapes that size the PAT modules.')
    cfg = self.config.method
    images = batch['image']
    (logits, feats_s), student_stats = self.student_apply(params, batch_stats, images, rng,
                                                          return_features=True)
    teacher_variables = jax.lax.stop_gradient(teacher_variables)
    logits_t0 = jax.lax.stop_gradient(self.teacher.apply(teacher_variables, images, train=False))

    variables = {'params': {**params['method'], 'teacher': teacher_variables['params']},
                 'batch_stats': {**batch_stats['method'],
                                 **({'teacher': teacher_variables['batch_stats']}
                                    if 'batch_stats' in teacher_variables else {})}}
    feedback = valid = None
    if first is not True:
      feedback = {s: jax.lax.stop_gradient(state['student'][s] - state['teacher'][s])
                  for s in self.net.afp_stages}
      valid = None if first is False else jnp.logical_not(first)
    (logits_t, out), upd = self.net.apply(variables, images, feats_s, feedback, True, valid,
                                          mutable=['batch_stats'])
    method_stats = {k: v for k, v in upd['batch_stats'].items() if k != 'teacher'}
    if valid is not None:  # the first step leaves the unused fusion branch's statistics as they were
      method_stats = _keep_fusion_stats(method_stats, batch_stats['method'], valid)

    terms = {
        'ce': self.cross_entropy(logits, batch['label']),
        'kd': cfg.kd_weight * losses.kd_loss(logits, logits_t0, cfg.kd_temperature),
        'pat_fd': cfg.pat_fd_weight * out['loss'],
    }
    if self.net.afp_stages:
      terms['pat_reg'] = cfg.pat_reg_weight * losses.kd_loss(logits_t, logits_t0, 1.0)
    new_state = {
        'student': {s: jax.lax.stop_gradient(out['aligned'][s]).astype(jnp.float32)
                    for s in self.net.afp_stages},
        'teacher': {s: jax.lax.stop_gradient(out['targets'][s]).astype(jnp.float32)
                    for s in self.net.afp_stages},
    }
    return base.StepOutput(terms, logits, {'student': student_stats, 'method': method_stats},
                           new_state)
