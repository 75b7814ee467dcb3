"""Errors that are the user's to fix: a config value, a flag, a file, a folder.

`python -m pat_jax.main` prints such an error as one paragraph (no traceback) and exits
with status 2; anything else is a bug and keeps its traceback. Each class also derives
from the built-in error it refines, so `except ValueError` (or FileNotFoundError) still
catches it.
"""


class UserError(Exception):
  """Bad input; the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
  """A config key or value that names nothing valid, or values that do not fit together."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or folder the config names does not exist."""
