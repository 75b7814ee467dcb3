"""pat_jax.demo's closing table and verdict, on fake finished runs (the runs themselves are the
sweep's and the trainer's, tested elsewhere)."""
import json
import os

from pat_jax import demo


def _result(path, best, final, wall_s):
  os.makedirs(path)
  with open(os.path.join(path, 'result.json'), 'w', encoding='utf-8') as f:
    json.dump({'status': 'done', 'best_top1': best, 'final_top1': final, 'wall_s': wall_s}, f)


def test_table_and_verdict(tmp_path):
  root = str(tmp_path)
  _result(f'{root}/teacher', 96.3, 96.3, 156.0)
  _result(f'{root}/none/seed{demo.SEED}', 86.87, 86.87, 240.0)
  _result(f'{root}/kd/seed{demo.SEED}', 94.61, 93.27, 342.0)
  table, results = demo.comparison(root)
  rows = table.splitlines()
  assert rows[2] == '| teacher (mini ConvNeXt) | 96.3 | 96.3 | 2.6 min | - |'
  assert rows[3] == '| student alone | 86.9 | 86.9 | 4.0 min | 88.5 ± 4.4 |'
  assert rows[4] == '| student KD | 94.6 | 93.3 | 5.7 min | 90.4 ± 4.3 |'
  assert rows[5] == '| student PAT | not finished | | | |'
  assert demo.verdict(results).startswith('Not all runs finished')

  _result(f'{root}/pat/seed{demo.SEED}', 80.81, 80.47, 672.0)
  _, results = demo.comparison(root)
  text = demo.verdict(results)
  assert text.startswith('KD 94.6 > the student alone 86.9 > PAT 80.8. PAT is not the best here.')
  results['pat']['best_top1'] = 99.0
  assert 'not the best' not in demo.verdict(results)
