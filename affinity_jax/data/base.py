"""What our tfds builders share."""

from __future__ import annotations

import tensorflow_datasets as tfds


class LocalBuilder(tfds.core.GeneratorBasedBuilder):
  """A builder that downloads nothing: no checksums file, so no need for its code path.

  tfds 4.9.10 looks up a builder's source folder (for its url checksums) through
  `importlib_resources`, a module it does not declare as a dependency; our builders have no
  urls, so they skip the lookup instead of requiring that package.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # pylint: disable=invalid-overridden-method
    return None
