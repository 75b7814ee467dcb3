"""Paths of a run: a local folder or a bucket URL (gs://bucket/run), read and written alike.

On a TPU VM slice or a GPU cluster every host must write the same workdir, usually a bucket:
everything a run reads or writes (workdir, metrics.jsonl, config.json, result.json,
checkpoints, teacher and init checkpoints, the damaged/ folder, data directories) goes
through etils.epath, which speaks both. Two things differ for URLs and are handled here:
`os.path.abspath('gs://b/run')` is '<cwd>/gs:/b/run' (so URLs are left as they are), and an
object store cannot append to a file (metrics.py rewrites the whole file there).

Buckets: gs:// only. epath reads them through TensorFlow's GCS filesystem (TensorFlow is a
dependency anyway), tensorstore writes orbax's arrays with its own GCS driver, and orbax lists
a bucket's checkpoint steps with google-cloud-storage, the one extra package a bucket needs
(`pip install -e '.[gcs]'`; the `tpu` extra has it).
"""
import importlib.util
import os
import tempfile

from etils import epath

from pat_jax import errors


def is_url(path) -> bool:
  """'gs://bucket/x', 's3://...': a path of an object store, not of this machine."""
  return '://' in os.fspath(path)


def _importable(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # its parent package is missing
    return False


def check_backend(path) -> None:
  """A URL this installation cannot use: one clear error before any work."""
  if not is_url(path):
    return
  scheme = os.fspath(path).split('://', 1)[0]
  if scheme != 'gs':
    raise errors.ConfigError(f'{path}: pat_jax runs on local paths (or mounted shared folders) '
                             f'and gs:// buckets, not {scheme}://.')
  if not _importable('google.cloud.storage'):
    raise errors.ConfigError(
        f"{path} is in a bucket: orbax lists its checkpoints with google-cloud-storage, which is "
        f"not installed. pip install -e '.[gcs]' (the tpu extra has it).")


def absolute(path) -> str:
  """A local path made absolute; a URL unchanged."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(path)


def exists(path) -> bool:
  return epath.Path(path).exists()


def isdir(path) -> bool:
  return epath.Path(path).is_dir()


def isfile(path) -> bool:
  return epath.Path(path).is_file()


def makedirs(path) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_text(path) -> str:
  return epath.Path(path).read_text(encoding='utf-8')


def write_text_atomic(path, text: str) -> None:
  """Writes `text` to a temporary file beside `path`, then renames it over `path`: a reader
  (another host, `pat_jax.report`) sees the old file or the new one, never half of one."""
  tmp = epath.Path(os.fspath(path) + '.tmp')
  tmp.write_text(text, encoding='utf-8')
  tmp.replace(epath.Path(path))


def rename(source, target) -> None:
  epath.Path(source).rename(epath.Path(target))


def local_copy(path) -> str:
  """A local file with the bytes of `path`: `path` itself when local, else a temporary copy
  (for readers that only open local files, e.g. torch.load of a teacher in a bucket)."""
  if not is_url(path):
    return os.fspath(path)
  suffix = ''.join(epath.Path(path).suffixes)
  fd, local = tempfile.mkstemp(suffix=suffix, prefix='pat_jax_')
  with os.fdopen(fd, 'wb') as f:
    f.write(epath.Path(path).read_bytes())
  return local
