"""Test environment: 8 fake CPU devices, no network, no accelerator.

These variables must be set before jax (or huggingface_hub) is first imported.
"""
import atexit
import os
import shutil
import tempfile

from xla_flags import flags  # tests/ is on sys.path (pytest prepends a conftest's folder)

os.environ.setdefault('XLA_FLAGS', flags(8))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# One persistent compilation cache for the session, inherited by the subprocess runs: the many
# tiny runs compile the same programs again and again (a hit loads the same executable).
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix='pat_jax_tests_jax_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
# Every program, not only those that took over a second to compile: most of the tests' programs
# are small and compiled again by each subprocess run.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

# torchvision (through timm) must be imported before TensorFlow: the other order segfaults here.
import timm  # noqa: E402,F401  pylint: disable=g-import-not-at-top,unused-import
