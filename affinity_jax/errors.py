"""Errors that mean "the user's input is wrong": the CLI prints their message, not a traceback."""


class UserError(ValueError):
  """Bad input (a file, a config key, a dataset) with a message that says what to do."""


class ConfigError(UserError):
  """A config file or a command-line override that cannot be applied."""


class NonFiniteLossError(RuntimeError):
  """Training produced NaN or Inf; the message names the step and the last good checkpoint."""
