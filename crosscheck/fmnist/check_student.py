"""Student architecture check, mini_resmlp: pat_jax's trained weights in the torch student.

Two steps, one per venv:

  JAX_PLATFORMS=cpu $PAT_JAX_PY check_student.py export [CKPT_DIR]   (pat_jax venv)
  $PEER_PY check_student.py compare [OUT_DIR]                        (peer venv; default ./results/mlp)

export: the latest step of pat_jax's mini_resmlp student-alone run (default
  workdirs/miniature/mlp/student/seed0/checkpoints, raw 'variables' item; the step that
  result.json's final_top1 / test_top1 evaluate), converted with `convert.to_timm`, plus
  pat_jax's logits on its own eval-pipeline validation images (jax_eval_val_nhwc.npy from
  export_jax.py) and its four stage taps (stage_ends 0,1,2,3) on the first 500 of them
  -> $XCHECK_DATA/student_mlp_{timm.npz,jax.npz}.
compare: loads that state dict strict=True into common.make_student('mini_resmlp') (timm 0.6.5
  MlpMixer + the original's custom forward) and compares parameter count and shapes, logits,
  top-1, and the stage taps the original PAT takes (forward(requires_feat=True) at
  stage_info(1..4)) -> OUT_DIR/student_check.json.
"""
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MODE = sys.argv[1] if len(sys.argv) > 1 else ''
DATA = os.environ['XCHECK_DATA']


def export():
  repo = os.environ.get('PAT_JAX_REPO', os.path.abspath(os.path.join(HERE, '..', '..')))
  sys.path.insert(0, repo)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pat_jax import checkpoint, convert, models  # pylint: disable=g-import-not-at-top
  ckpt = sys.argv[2] if len(sys.argv) > 2 else os.path.join(
      repo, 'workdirs', 'miniature', 'mlp', 'student', 'seed0', 'checkpoints')
  variables = checkpoint.load_variables(ckpt)
  model = models.create('mini_resmlp', num_classes=10)
  fresh = model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
  n_params = int(sum(x.size for x in jax.tree_util.tree_leaves(fresh['params'])))
  sd = convert.to_timm(variables)
  np.savez(os.path.join(DATA, 'student_mlp_timm.npz'), **{k: np.asarray(v) for k, v in sd.items()})
  x = np.load(os.path.join(DATA, 'jax_eval_val_nhwc.npy'))
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=False, return_features=True))
  logits = []
  for i in range(0, len(x), 500):
    lg, feats = fwd(variables, jnp.asarray(x[i:i + 500]))
    logits.append(np.asarray(lg))
    if i == 0:
      feats0 = [np.asarray(f) for f in feats]
  res_json = os.path.join(os.path.dirname(os.path.abspath(ckpt)), 'result.json')
  np.savez(os.path.join(DATA, 'student_mlp_jax.npz'), logits=np.concatenate(logits),
           **{f'feat{i}': f for i, f in enumerate(feats0)})
  meta = {'checkpoint': os.path.abspath(ckpt), 'steps': sorted(os.listdir(ckpt)),
          'pat_jax_params': n_params, 'n_keys': len(sd),
          'result_json': {k: v for k, v in json.load(open(res_json)).items()
                          if not isinstance(v, (list, dict))} if os.path.exists(res_json) else None}
  json.dump(meta, open(os.path.join(DATA, 'student_mlp_jax.json'), 'w'), indent=1)
  print(json.dumps(meta, indent=1))


def compare():
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, HERE)
  import common  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  meta = json.load(open(os.path.join(DATA, 'student_mlp_jax.json')))
  ref = np.load(os.path.join(DATA, 'student_mlp_jax.npz'))
  _, _, xva, yva, _, _ = common.load_split()
  s = common.make_student('mini_resmlp')
  sd = {k: torch.from_numpy(np.asarray(v)) for k, v in np.load(os.path.join(DATA, 'student_mlp_timm.npz')).items()}
  own = {k: tuple(v.shape) for k, v in s.state_dict().items()}
  s.load_state_dict(sd, strict=True)  # raises on any missing/unexpected/mis-shaped key
  x_jax = torch.from_numpy(np.load(os.path.join(DATA, 'jax_eval_val_nhwc.npy'))).permute(0, 3, 1, 2).contiguous()
  x_ours = common.eval_images(xva)
  lg = common.logits(s, x_jax).numpy()
  jl = ref['logits']
  s.eval()
  with torch.no_grad():
    _, feats = s(x_jax[:500], requires_feat=True)
  feat_diff = []
  for stage in (1, 2, 3, 4):
    idx, shape = s.stage_info(stage)
    f = feats[idx].numpy()
    j = ref[f'feat{stage - 1}']
    assert f.shape == j.shape == (500,) + tuple(shape), (f.shape, j.shape, shape)
    feat_diff.append({'stage': stage, 'block_index': idx, 'shape': list(shape),
                      'max_abs_diff': float(np.abs(f - j).max()), 'max_abs': float(np.abs(j).max())})
  rj = meta['result_json'] or {}
  res = {
      'checkpoint': meta['checkpoint'], 'checkpoint_steps': meta['steps'],
      'params_torch': int(sum(p.numel() for p in s.parameters())), 'params_pat_jax': meta['pat_jax_params'],
      'n_tensors_torch': len(own), 'n_tensors_converted': len(sd),
      'shapes_match_strict_load': True,
      'val_n': int(len(yva)),
      'val_top1_torch_on_pat_jax_images': float(100.0 * np.mean(lg.argmax(-1) == yva)),
      'val_top1_torch_on_torch_images': common.top1(s, x_ours, torch.from_numpy(yva)),
      'val_top1_pat_jax_forward': float(100.0 * np.mean(jl.argmax(-1) == yva)),
      'pat_jax_result_json_final_top1': rj.get('final_top1'),
      'logits_max_abs_diff_vs_pat_jax': float(np.abs(lg - jl).max()),
      'logits_max_abs': float(np.abs(jl).max()),
      'argmax_agreement': float(np.mean(lg.argmax(-1) == jl.argmax(-1))),
      'stage_taps_first500': feat_diff,
      'torch_state_dict_shapes': own}
  print(json.dumps({k: v for k, v in res.items() if k != 'torch_state_dict_shapes'}, indent=1))
  out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, 'results', 'mlp')
  os.makedirs(out, exist_ok=True)
  json.dump(res, open(os.path.join(out, 'student_check.json'), 'w'), indent=1)


if __name__ == '__main__':
  {'export': export, 'compare': compare}.get(MODE, lambda: sys.exit(__doc__))()
