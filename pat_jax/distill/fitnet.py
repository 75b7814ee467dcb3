"""FitNet baseline (method.name='fitnet'), as the PAT repository's generalised FitNet distiller.

loss = ce_weight * CE + kd_weight * KD(student <- teacher, T)
       + fitnet_weight * sum over stages s of MSE_mean(aligner_s(student_s), teacher_s)

The PAT repo's `distillers/fitnet.py` extends OFA-KD's CNN-only FitNet to any pair of
architectures (official-pat-code.md section 4), and adds the KD term by default. Per stage
in `fitnet_stages` (1-based, the `stage_info` taps of section 2):

1. Drop the cls token. The original runs `TokenFilter(getattr(model, 'num_tokens', 0))` and
   then, in forward, drops the FIRST token of a sequence whose length is not a perfect
   square (timm puts cls first, so this is the right token, unlike PAT's Q5).
2. Map the student feature onto the teacher's shape with the aligner for the pair of
   feature kinds (S = student per-sample shape, T = teacher's, after step 1; g = sqrt(L)):

   kind                 when                             layers (state-dict key -> Flax name)
   -------------------- -------------------------------- -------------------------------------------------
   'conv'               map -> map                       aligner = Conv2d(C_s, C_t, 1, bias=False)
                                                         (no resize: the spatial sizes must agree)
   'patch_embed'        map -> seq, H >= g_t             aligner = timm PatchEmbed(img H, p = H // g_t,
                                                         C_s -> D_t): aligner.proj = Conv2d(k=p, s=p)
   'conv_merge'         map -> seq, H <  g_t             aligner.0 = Conv2d(C_s, D_t*r^2, 1) (bias),
                                                         r = g_t // H, then NHWC flatten; the TEACHER
                                                         tokens go through MyPatchMerging(H*W)
   'linear_unpatchify'  seq -> map, H >= g_s             aligner.0 = Linear(D_s, p^2*C_t), p = H // g_s,
                                                         then Unpatchify(p)
   'merge_conv'         seq -> map, H <  g_s             MyPatchMerging(H^2), view as an HxH map,
                                                         aligner.2 = Conv2d(D_s*r^2, C_t, 1) (bias)
   'linear_expand'      seq -> seq, L_t >  L_s           aligner.0 = Linear(D_s, D_s*k), k = L_t*D_t /
                                                         (L_s*D_s), then a RAW reshape to (B, L_t, D_t)
   'merge_linear'       seq -> seq, L_t <= L_s           MyPatchMerging(L_t), aligner.1 =
                                                         Linear(L_s*D_s/L_t, D_t)

   MyPatchMerging(n) groups an s x s token grid into sqrt(n) x sqrt(n) cells of
   (s/sqrt(n))^2 tokens and concatenates each cell's tokens (row offset, column offset,
   channel; channel fastest). Unpatchify(p) is MAE's: token (i, j) of the g x g grid fills
   the p x p block (i, j) of the map, its features ordered (row, column, channel).
3. MSE (mean over every element) between the aligned student feature and the teacher
   feature; the stage losses are SUMMED (`sum(fitnet_losses)`), then times fitnet_weight.

Initialisation is the original's `init_weights` (`self.projector.apply(init_weights)`):
conv kernels kaiming-normal (fan_out, ReLU gain), conv biases PyTorch's default
U(+-1/sqrt(fan_in)), Linear weights N(0, 0.02) and biases 0. No aligner has BatchNorm,
so the method has no batch_stats and no carried state. The teacher runs in eval mode
under stop_gradient (the original calls `teacher.eval()` and `torch.no_grad()`).

Layouts: maps NHWC, sequences (B, L, D). Only element correspondence matters for the MSE,
and every aligner above pairs the same elements as the original does in NCHW.
Flax names follow the original's state-dict keys (`projector.{stage}.aligner.0.weight` ->
`projector_{stage}/aligner_0/kernel`), so `convert.timm_to_flat` maps an original FitNet
projector state dict onto these parameters.

Faithfulness notes
- cls tokens (Q9). Under timm 0.6.5, `getattr(model, 'num_tokens', 0)` is 0 for ViT/DeiT
  (timm renamed it `num_prefix_tokens`), so the original sizes its aligners from the raw
  token count (197) and only drops the cls token in forward. That gives the same modules and
  the same numbers as dropping it first (int(sqrt(197)) = 14 = sqrt(196)) in every
  configuration that runs; the configurations where it does not run (a 197-token sequence
  reaching MyPatchMerging or the seq -> seq size arithmetic: CNN student -> ViT teacher at a
  stage with H < 14, any DeiT student -> sequence teacher) fail an assert in the original.
  We drop the cls token before sizing anything (the `num_tokens = 1` behaviour the code was
  written for), so those pairs train instead of crashing. No switch: no number differs.
- The original's MSE needs equal shapes; a map -> map pair of different spatial sizes is
  rejected here at construction (the original's 1x1 conv does not resize either).
- `kd` is always computed (weight kd_weight, default 1): set kd_weight=0 for OFA-KD's
  original CNN-only FitNet (CE + FitNet).
"""
import dataclasses
import math
from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from pat_jax import errors
from pat_jax.distill import base, losses
from pat_jax.distill import projectors as pj
from pat_jax.models import layers
from pat_jax.models import vit

Shape = Tuple[int, ...]

KINDS = ('conv', 'patch_embed', 'conv_merge', 'linear_unpatchify', 'merge_conv',
         'linear_expand', 'merge_linear')


def default_config():
  """method.* keys of FitNet, with the PAT repo's defaults (official-pat-code.md 1.10, 4)."""
  return dict(
      name='fitnet',
      ce_weight=1.0,          # --gt-loss-weight
      kd_weight=1.0,          # --kd-loss-weight (the PAT repo's FitNet adds KD by default)
      kd_temperature=1.0,     # --kd-temperature
      fitnet_weight=1.0,      # --fitnet-loss-weight
      fitnet_stages=(1, 2, 3, 4))  # --fitnet-stages (1-based)


# ---------------------------------------------------------------------------
# Shape rules.

@dataclasses.dataclass(frozen=True)
class Plan:
  """How one stage is aligned: the aligner kind and its sizes (per-sample, cls removed)."""
  kind: str
  student_shape: Shape
  teacher_shape: Shape
  out_features: int      # output channels of the aligner's one layer
  factor: int = 1        # p (patch size) for patch_embed / linear_unpatchify, r for the merges

  @property
  def aligned_shape(self) -> Shape:
    """Per-sample shape of the aligned student feature (= that of the MSE target)."""
    if self.kind == 'conv_merge':
      h, w, _ = self.student_shape
      return (h * w, self.out_features)
    return self.teacher_shape


def _side(n: int, what: str) -> int:
  s = math.isqrt(n)
  if s * s != n:
    raise ValueError(f'FitNet: {what} has {n} tokens, not a square grid.')
  return s


def _map_grid_ratio(map_shape, g: int, err: str):
  """(map side >= token grid side g, the integer ratio of the larger side to the smaller) for a
  square map against a g x g token grid; a ValueError starting with `err` otherwise."""
  h, w = map_shape[:2]
  if h != w:
    raise ValueError(f'{err}: a non-square map.')
  big, small = max(h, g), min(h, g)
  if big % small:
    raise ValueError(f'{err}: of the map side {h} and the token grid side {g}, the larger is '
                     'not a multiple of the smaller.')
  return h >= g, big // small


def plan_stage(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> Plan:
  """The original's aligner for a (student, teacher) pair of per-sample stage shapes.

  Shapes are pat_jax per-sample shapes, (H, W, C) for maps and (L, D) for sequences; a
  non-square sequence has its (first) cls token removed first.
  """
  s, t = pj.square_shape(student_shape), pj.square_shape(teacher_shape)
  err = f'FitNet cannot align student stage {tuple(student_shape)} to teacher stage {tuple(teacher_shape)}'
  if len(s) == 3 and len(t) == 3:
    if s[:2] != t[:2]:
      raise ValueError(f'{err}: the 1x1-conv aligner needs equal spatial sizes (the original '
                       'does not resize).')
    return Plan('conv', s, t, t[2])
  if len(s) == 3 and len(t) == 2:
    h, g = s[0], _side(t[0], 'the teacher stage')
    map_larger, ratio = _map_grid_ratio(s, g, err)
    if map_larger:
      return Plan('patch_embed', s, t, t[1], ratio)
    return Plan('conv_merge', s, t, t[1] * ratio * ratio, ratio)
  if len(s) == 2 and len(t) == 3:
    g, c = _side(s[0], 'the student stage'), t[2]
    map_larger, ratio = _map_grid_ratio(t, g, err)
    if map_larger:
      return Plan('linear_unpatchify', s, t, ratio * ratio * c, ratio)
    return Plan('merge_conv', s, t, c, ratio)
  if len(s) == 2 and len(t) == 2:
    (l_s, d_s), (l_t, d_t) = s, t
    if l_t > l_s:
      k = (l_t * d_t) // (l_s * d_s)
      if k * l_s * d_s != l_t * d_t:
        raise ValueError(f'{err}: L_t*D_t is not a multiple of L_s*D_s.')
      return Plan('linear_expand', s, t, d_s * k, k)
    g_s, g_t = _side(l_s, 'the student stage'), _side(l_t, 'the teacher stage')
    if l_s % l_t or g_s % g_t:
      raise ValueError(f'{err}: the student token grid {g_s} is not a multiple of the teacher\'s {g_t}.')
    return Plan('merge_linear', s, t, d_t, g_s // g_t)
  raise ValueError(f'{err}: per-sample shapes must be (H, W, C) or (L, D).')


# ---------------------------------------------------------------------------
# Parameter-free reshapes (the original's MyPatchMerging / Unpatchify, in (B, L, D) / NHWC).

def my_patch_merging(x, out_patch_num: int):
  """MyPatchMerging(out_patch_num): (B, s*s, D) -> (B, n, (s/sqrt(n))^2 * D), n = out_patch_num."""
  b, l, d = x.shape
  s = _side(l, 'MyPatchMerging input')
  o = _side(out_patch_num, 'MyPatchMerging output')
  g = s // o
  if g * o != s:
    raise ValueError(f'MyPatchMerging: grid {s} is not a multiple of {o}.')
  x = x.reshape(b, o, g, o, g, d).transpose(0, 1, 3, 2, 4, 5)  # b, row, col, row-offset, col-offset, d
  return x.reshape(b, o * o, g * g * d)


def unpatchify(x, p: int):
  """Unpatchify(p): (B, g*g, p*p*C) -> (B, g*p, g*p, C) (NHWC)."""
  b, l, f = x.shape
  g = _side(l, 'Unpatchify input')
  c = f // (p * p)
  x = x.reshape(b, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)  # b, i, pi, j, qj, c
  return x.reshape(b, g * p, g * p, c)


# ---------------------------------------------------------------------------
# Modules.

def _conv1x1(features, fan_in, use_bias, dtype, name):
  return layers.conv(features, 1, use_bias=use_bias, dtype=dtype,
                     kernel_init=pj.kaiming_normal_fan_out,
                     bias_init=layers.torch_default_bias(fan_in), name=name)


def _linear(features, dtype, name):
  return nn.Dense(features, kernel_init=pj.trunc_normal_02, bias_init=nn.initializers.zeros,
                  dtype=dtype, name=name)


class FitNetProjector(nn.Module):
  """One stage of the original's `projector` ModuleDict: (student, teacher) -> (aligned, target).

  Inputs have their cls token already removed; shapes are checked against the plan.
  """
  student_shape: Shape
  teacher_shape: Shape
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, f_s, f_t):
    plan = plan_stage(self.student_shape, self.teacher_shape)
    if tuple(f_s.shape[1:]) != plan.student_shape or tuple(f_t.shape[1:]) != plan.teacher_shape:
      raise ValueError(f'FitNetProjector built for {plan.student_shape} -> {plan.teacher_shape}, '
                       f'called with {f_s.shape} and {f_t.shape}.')
    b = f_s.shape[0]
    kind, n = plan.kind, plan.out_features
    if kind == 'conv':
      y = _conv1x1(n, plan.student_shape[-1], False, self.dtype, 'aligner')(f_s)
    elif kind == 'patch_embed':
      y = vit.PatchEmbed(plan.factor, n, dtype=self.dtype, kernel_init=pj.kaiming_normal_fan_out,
                         name='aligner')(f_s)
    elif kind == 'conv_merge':
      h, w, c = plan.student_shape
      y = _conv1x1(n, c, True, self.dtype, 'aligner_0')(f_s).reshape(b, h * w, n)
      f_t = my_patch_merging(f_t, h * w)
    elif kind == 'linear_unpatchify':
      y = unpatchify(_linear(n, self.dtype, 'aligner_0')(f_s), plan.factor)
    elif kind == 'merge_conv':
      h = plan.teacher_shape[0]
      x = my_patch_merging(f_s, h * h)
      x = x.reshape(b, h, h, x.shape[-1])
      y = _conv1x1(n, x.shape[-1], True, self.dtype, 'aligner_2')(x)
    elif kind == 'linear_expand':
      y = _linear(n, self.dtype, 'aligner_0')(f_s).reshape(b, -1, plan.teacher_shape[1])
    elif kind == 'merge_linear':
      y = _linear(n, self.dtype, 'aligner_1')(my_patch_merging(f_s, plan.teacher_shape[0]))
    else:  # pragma: no cover
      raise AssertionError(kind)
    return y, f_t


class FitNetAligners(nn.Module):
  """The original's `projector` ModuleDict: one FitNetProjector per selected stage.

  student_shapes / teacher_shapes: per-sample shapes of the four stage taps (cls token
  included, as the models return them); stages: 1-based stage numbers.
  """
  student_shapes: Sequence[Shape]
  teacher_shapes: Sequence[Shape]
  stages: Tuple[int, ...] = (1, 2, 3, 4)
  dtype: Any = jnp.float32

  def plans(self):
    return {s: plan_stage(self.student_shapes[s - 1], self.teacher_shapes[s - 1]) for s in self.stages}

  @nn.compact
  def __call__(self, feats_s, feats_t) -> Dict[str, Any]:
    mse, aligned, targets = [], [], []
    for s in self.stages:
      f_s = pj.drop_cls(feats_s[s - 1], 'first')
      f_t = pj.drop_cls(feats_t[s - 1], 'first')
      a, t = FitNetProjector(pj.square_shape(self.student_shapes[s - 1]),
                             pj.square_shape(self.teacher_shapes[s - 1]), dtype=self.dtype,
                             name=f'projector_{s}')(f_s, f_t)
      mse.append(jnp.mean(jnp.square(a.astype(jnp.float32) - t.astype(jnp.float32))))
      aligned.append(a)
      targets.append(t)
    return {'loss': sum(mse[1:], mse[0]), 'mse': mse, 'aligned': aligned, 'targets': targets}


# ---------------------------------------------------------------------------
# The method.

def _stages(cfg) -> Tuple[int, ...]:
  stages = tuple(int(s) for s in cfg.fitnet_stages)
  if not stages or any(s not in (1, 2, 3, 4) for s in stages) or len(set(stages)) != len(stages):
    raise errors.ConfigError(f'method.fitnet_stages must be distinct stages among 1..4, got {cfg.fitnet_stages!r}.')
  return stages


class FitNet(base.Method):
  uses_teacher = True

  def net(self, student_shapes, teacher_shapes) -> FitNetAligners:
    """The aligners for these per-sample stage shapes (validated: raises on a bad pair)."""
    net = FitNetAligners(tuple(map(tuple, student_shapes)), tuple(map(tuple, teacher_shapes)),
                         _stages(self.config.method), dtype=self.student.dtype)
    net.plans()
    return net

  def stage_shapes(self, images, student_variables, teacher_variables):
    """Per-sample shapes of the four stage taps of student and teacher (abstract forward)."""
    _, feats_s = jax.eval_shape(
        lambda v, x: self.student.apply(v, x, train=False, return_features=True),
        student_variables, images)
    _, feats_t = jax.eval_shape(
        lambda v, x: self.teacher.apply(v, x, train=False, return_features=True),
        teacher_variables, images)
    return [tuple(f.shape[1:]) for f in feats_s], [tuple(f.shape[1:]) for f in feats_t]

  def init(self, rng, images, student_variables, teacher_variables):
    shapes_s, shapes_t = self.stage_shapes(images, student_variables, teacher_variables)
    net = self.net(shapes_s, shapes_t)
    b = images.shape[0]
    variables = net.init(rng, [jnp.zeros((b,) + s, jnp.float32) for s in shapes_s],
                         [jnp.zeros((b,) + s, jnp.float32) for s in shapes_t])
    return variables['params'], {}, {}

  def __call__(self, params, batch_stats, state, teacher_variables, batch, rng, first=False):
    del first  # FitNet carries no state
    cfg = self.config.method
    images = batch['image']
    (logits, feats_s), student_stats = self.student_apply(params, batch_stats, images, rng,
                                                          return_features=True)
    logits_t, feats_t = jax.lax.stop_gradient(
        self.teacher_apply(teacher_variables, images, return_features=True))
    net = self.net([f.shape[1:] for f in feats_s], [f.shape[1:] for f in feats_t])
    out = net.apply({'params': params['method']}, feats_s, feats_t)
    terms = {
        'ce': self.cross_entropy(logits, batch['label']),
        'kd': cfg.kd_weight * losses.kd_loss(logits, logits_t, cfg.kd_temperature),
        'fitnet': cfg.fitnet_weight * out['loss'],
    }
    return base.StepOutput(terms, logits, {**batch_stats, 'student': student_stats}, state)
