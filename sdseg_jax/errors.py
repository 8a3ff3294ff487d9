"""The project's own errors: problems a user can fix, reported in one line without a traceback.

Every command line (`main`, `evaluate`, `predict`, `stability`, `convert`, `aot`, `plots`,
`benchmark`) catches `UserFacingError` alone and prints `error: <message>` with a non-zero exit
status. Anything else (a bug, a library failure nobody anticipated) is left to propagate, so
its traceback shows where it came from; catching a bare ValueError would hide real bugs behind a
one-line message.

Each class also derives from the built-in exception it refines (ValueError, FileNotFoundError,
...), so code and tests that catch the built-in keep working.
"""


class UserFacingError(Exception):
  """Base of every error whose message alone tells the user what is wrong and what to do."""


class ConfigError(UserFacingError, ValueError):
  """A config value or command-line flag is invalid; the message names the field."""


class MissingFileError(UserFacingError, FileNotFoundError):
  """A file the command needs is not there; the message names it and how to get it."""
