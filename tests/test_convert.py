"""The converter's file handling, wrappers, error messages and CLI."""
import json
import os
import pickle

import numpy as np
import pytest
import torch

from pat_jax import checkpoint, convert, timm_zoo


@pytest.fixture(scope='module')
def deit_sd():
  return timm_zoo.perturb_(timm_zoo.create('mini_deit', 10)).state_dict()


def _save(obj, path):
  torch.save(obj, path)
  return str(path)


def _params(variables):
  return variables['params']['blocks_0']['attn']['qkv']['kernel']


@pytest.mark.parametrize('wrap', [None, 'state_dict', 'model', 'state_dict_ema'])
def test_reads_plain_and_wrapped_pth(deit_sd, tmp_path, wrap):
  obj = deit_sd if wrap is None else {wrap: deit_sd, 'epoch': 3}
  v = convert.from_timm('mini_deit', _save(obj, tmp_path / 'w.pth.tar'), num_classes=10)
  np.testing.assert_array_equal(_params(v), deit_sd['blocks.0.attn.qkv.weight'].numpy().T)


def test_use_ema_prefers_ema_weights(deit_sd, tmp_path):
  ema = {k: v + 1 if v.is_floating_point() else v for k, v in deit_sd.items()}
  path = _save({'state_dict': deit_sd, 'state_dict_ema': ema}, tmp_path / 'w.pth')
  raw = convert.from_timm('mini_deit', path, num_classes=10)
  got = convert.from_timm('mini_deit', path, num_classes=10, use_ema=True)
  np.testing.assert_array_equal(_params(got), _params(raw) + 1)


def test_prefix_and_dataparallel_module_prefix(deit_sd, tmp_path):
  distiller = {f'student.{k}': v for k, v in deit_sd.items()}
  distiller['teacher.head.weight'] = torch.zeros(3, 3)
  v = convert.from_timm('mini_deit', _save(distiller, tmp_path / 'd.pth'), num_classes=10,
                        prefix='student.')
  np.testing.assert_array_equal(_params(v), deit_sd['blocks.0.attn.qkv.weight'].numpy().T)
  ddp = {f'module.{k}': v for k, v in deit_sd.items()}
  v = convert.from_timm('mini_deit', _save(ddp, tmp_path / 'ddp.pth'), num_classes=10)
  np.testing.assert_array_equal(_params(v), deit_sd['blocks.0.attn.qkv.weight'].numpy().T)


def test_reads_safetensors(deit_sd, tmp_path):
  from safetensors.torch import save_file
  path = str(tmp_path / 'w.safetensors')
  save_file({k: v.contiguous() for k, v in deit_sd.items()}, path)
  v = convert.from_timm('mini_deit', path, num_classes=10)
  np.testing.assert_array_equal(_params(v), deit_sd['blocks.0.attn.qkv.weight'].numpy().T)


def test_wrong_num_classes_names_the_head_and_both_shapes(deit_sd):
  with pytest.raises(convert.ConversionError) as e:
    convert.from_timm('mini_deit', deit_sd, num_classes=100)
  msg = str(e.value)
  assert "shape mismatch: head/kernel [params] (timm key 'head.weight') expected (32, 100)" in msg
  assert 'found (32, 10)' in msg
  assert 'pass the right --num-classes' in msg


def test_wrong_architecture_lists_missing_and_unexpected_keys():
  sd = timm_zoo.create('mini_resnet', 10).state_dict()
  with pytest.raises(convert.ConversionError) as e:
    convert.from_timm('mini_deit', sd, num_classes=10)
  msg = str(e.value)
  assert 'missing: blocks_0/attn/proj/bias [params]' in msg
  assert "unexpected: bn1/mean [batch_stats] (timm key 'bn1.running_mean')" in msg
  assert 'more like this' in msg
  assert 'another architecture' in msg


def test_a_single_missing_weight_is_named(deit_sd):
  sd = dict(deit_sd)
  del sd['blocks.2.mlp.fc1.bias']
  with pytest.raises(convert.ConversionError, match=r"missing: blocks_2/mlp/fc1/bias .*'blocks.2.mlp.fc1.bias'"):
    convert.from_timm('mini_deit', sd, num_classes=10)


def test_other_image_size_points_at_pos_embed(deit_sd):
  with pytest.raises(convert.ConversionError, match=r'pos_embed.*img_size'):
    convert.from_timm('mini_deit', deit_sd, num_classes=10, img_size=64)


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_truncated_file_is_reported(deit_sd, tmp_path, suffix):
  full = tmp_path / f'full{suffix}'
  if suffix == '.pth':
    torch.save(deit_sd, full)
  else:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in deit_sd.items()}, str(full))
  data = full.read_bytes()
  cut = tmp_path / f'cut{suffix}'
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(convert.ConversionError, match='truncated or corrupt'):
    convert.from_timm('mini_deit', str(cut), num_classes=10)


def test_missing_file_is_reported(tmp_path):
  with pytest.raises(convert.ConversionError, match='does not exist'):
    convert.from_timm('mini_deit', str(tmp_path / 'nope.pth'), num_classes=10)


class _Exploit:
  """Unpickling this would call os.system and create a marker file."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def test_code_executing_pickle_is_refused_not_run(deit_sd, tmp_path):
  marker = tmp_path / 'pwned'
  path = tmp_path / 'evil.pth'
  torch.save({'state_dict': dict(deit_sd), 'payload': _Exploit(marker)}, path)
  with pytest.raises(convert.ConversionError, match='Refusing to load'):
    convert.from_timm('mini_deit', str(path), num_classes=10)
  assert not marker.exists()
  # The same bytes through plain pickle would run it: the test's exploit is real.
  with open(tmp_path / 'evil.pkl', 'wb') as f:
    pickle.dump(_Exploit(marker), f)
  with open(tmp_path / 'evil.pkl', 'rb') as f:
    pickle.load(f)
  assert marker.exists()


def test_cli_writes_a_checkpoint_that_loads_and_refuses_to_overwrite(deit_sd, tmp_path, capsys):
  src = _save(deit_sd, tmp_path / 'w.pth')
  out = str(tmp_path / 'ckpt')
  argv = ['--model', 'mini_deit', '--num-classes', '10', '--input', src, '--output', out]
  assert convert.main(argv) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary['num_params'] == sum(v.numel() for v in deit_sd.values())
  variables = checkpoint.load_variables(out)
  np.testing.assert_array_equal(_params(variables), deit_sd['blocks.0.attn.qkv.weight'].numpy().T)
  assert checkpoint.load_meta(out)['model'] == 'mini_deit'

  # A second conversion of other weights into the same directory is refused; the good one stays.
  other = _save({k: v * 0 for k, v in deit_sd.items()}, tmp_path / 'zeros.pth')
  assert convert.main(argv[:5] + [other, '--output', out]) == 2
  assert 'already holds a checkpoint' in capsys.readouterr().err
  np.testing.assert_array_equal(_params(checkpoint.load_variables(out)), _params(variables))
  # A bad conversion (wrong classes) writes nothing.
  bad = str(tmp_path / 'bad')
  assert convert.main(['--model', 'mini_deit', '--num-classes', '7', '--input', src, '--output', bad]) == 2
  assert 'num_classes=7' in capsys.readouterr().err
  assert not os.path.exists(bad)


def test_loading_an_empty_or_corrupt_checkpoint_is_an_error(deit_sd, tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match='does not exist'):
    checkpoint.load_variables(str(tmp_path / 'none'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(checkpoint.CheckpointError, match='no finished checkpoint'):
    checkpoint.load_variables(str(tmp_path / 'empty'))
  out = str(tmp_path / 'ckpt')
  checkpoint.save_variables(out, convert.from_timm('mini_deit', deit_sd, num_classes=10), {})
  for root, _, files in os.walk(out):
    for f in files:
      if 'metadata' not in f.lower() and f != 'commit_success.txt':
        p = os.path.join(root, f)
        with open(p, 'r+b') as fh:
          fh.truncate(max(0, os.path.getsize(p) // 3))
  with pytest.raises(checkpoint.CheckpointError, match='corrupt or incomplete'):
    checkpoint.load_variables(out)
