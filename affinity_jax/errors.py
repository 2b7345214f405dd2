"""The errors the command line reports as one message (exit status 2, or 130 when interrupted).

Everything else raised by the package is a bug and keeps its traceback (exit status 1).
"""


class UserError(Exception):
  """Bad input (a file, a config key, a dataset) with a message that names it and what to do."""


class ConfigError(UserError):
  """A config file or a command-line override that cannot be applied."""


class NonFiniteLossError(RuntimeError):
  """Training produced NaN or Inf; the message names the step and the last good checkpoint."""


class NonFiniteOutputError(RuntimeError):
  """A trained network gives NaN or Inf outputs; the message names it and what to redo."""


class TrainingInterrupted(Exception):
  """SIGTERM/SIGINT arrived; a checkpoint of the current step was saved first."""


# What `affinity-jax` turns into a one-line message rather than a traceback.
REPORTED = (UserError, NonFiniteLossError, NonFiniteOutputError)
