"""Step 1 (peer venv): the pat_jax miniature teacher, converted to a timm 0.6.5 ConvNeXt, on the
validation (and test) split.

Checks (a) our torch eval preprocessing equals pat_jax's eval pipeline images bit for bit,
(b) the teacher's validation top-1 in torch vs pat_jax's (its own forward here, and result.json's
final_top1: the last raw eval, which is the checkpoint PAT loads), (c) logits vs pat_jax's.

  $PEER_PY check_teacher.py [OUT_DIR]    (default ./results)
"""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

torch.set_num_threads(1)
_, _, xva, yva, xte, yte = common.load_split()
t = common.make_teacher(os.path.join(common.DATA, 'teacher_timm.npz'))
jres = json.load(open(os.path.join(common.DATA, 'teacher_jax_eval.json')))
res = {}
for name, x_u8, y_np in (('val', xva, yva), ('test', xte, yte)):
  x_ours = common.eval_images(x_u8)
  x_jax = torch.from_numpy(np.load(os.path.join(common.DATA, f'jax_eval_{name}_nhwc.npy'))).permute(0, 3, 1, 2)
  y = torch.from_numpy(y_np)
  lg = common.logits(t, x_ours).numpy()
  jl = np.load(os.path.join(common.DATA, f'teacher_jax_{name}_logits.npy'))
  res[name] = {
      'n': int(len(y_np)),
      'preprocessing_max_abs_diff_vs_pat_jax': float((x_ours - x_jax).abs().max()),
      'preprocessing_bit_identical': bool(torch.equal(x_ours, x_jax)),
      'teacher_top1_torch_timm065': float(100.0 * np.mean(lg.argmax(-1) == y_np)),
      'teacher_top1_torch_on_pat_jax_images': common.top1(t, x_jax, y),
      'teacher_top1_pat_jax_forward': float(100.0 * np.mean(jl.argmax(-1) == y_np)),
      'logits_max_abs_diff_vs_pat_jax': float(np.abs(lg - jl).max()),
      'argmax_agreement': float(np.mean(lg.argmax(-1) == jl.argmax(-1)))}
r = jres['result_json']
res['pat_jax_result_json'] = {k: r.get(k) for k in ('best_top1', 'best_source', 'best_step', 'final_top1',
                                                    'final_ema_top1', 'step', 'eval_split', 'test_top1',
                                                    'test_ema_top1')}
res['teacher_checkpoint_steps'] = jres['steps']
print(json.dumps(res, indent=1))
out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
os.makedirs(out, exist_ok=True)
json.dump(res, open(os.path.join(out, 'teacher_check.json'), 'w'), indent=1)
