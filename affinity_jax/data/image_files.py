"""A user's own image files (`affinity-jax predict`): finding them, and reading any of them as RGB.

A folder of photographs holds JPEGs and PNGs (and whatever else PIL opens) of any size, in
greyscale, palette, CMYK or 16-bit, with alpha, stored sideways with an EXIF orientation tag.
`read_rgb` gives every one as uint8 [H, W, 3] RGB, upright, as an image viewer shows it:

- the EXIF orientation is applied (`ImageOps.exif_transpose`), so a portrait photograph stored
  as landscape comes out portrait, and so does its label map;
- transparency (RGBA, LA, a palette or greyscale with a transparent colour) is composited over
  white, as a viewer shows it on a page; the colours under transparent pixels are often junk;
- 16-bit greyscale keeps its high byte, as PIL reduces 16-bit RGB PNGs itself (PIL's own
  conversion of 16-bit greyscale to RGB clips everything above 255 to white);
- every other mode (CMYK, palette, greyscale, 1-bit, YCbCr) is PIL's `convert("RGB")`, which
  is how the original reads its images, so an RGB JPEG or PNG has PIL's pixels.

A file that cannot be read is an `UnreadableImage` naming it, for the caller to skip.
"""

from __future__ import annotations

import glob
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from affinity_jax.errors import UserError

# What a folder or a glob pattern contributes; a file named on the command line is tried
# whatever its name.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_GLOB_CHARS = frozenset("*?[")
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class UnreadableImage(UserError):
  """An image file that cannot be read: it is skipped and reported, not the end of a run."""


def find_images(specs: Sequence[str]) -> tuple[list[str], dict[str, str]]:
  """The image files that paths, folders and glob patterns name, each once, in order (a
  folder's and a pattern's sorted by name), and {spec: why it names none, a sentence naming
  it} for the others.

  A folder contributes its files (not its subfolders') ending in IMAGE_SUFFIXES, any case;
  a pattern (`*`, `?`, `[`; `**` for subfolders) its matches with those suffixes.
  """
  files, problems, seen = [], {}, set()
  for spec in specs:
    if os.path.isdir(spec):
      try:
        names = sorted(os.listdir(spec))
      except OSError as e:
        problems[spec] = f"{spec}: cannot list the folder ({e.strerror})"
        continue
      found = [os.path.join(spec, n) for n in names if _is_image_name(n)
               and os.path.isfile(os.path.join(spec, n))]
      if not found:
        problems[spec] = f"{spec}: the folder holds no image file ({' '.join(IMAGE_SUFFIXES)})"
    elif os.path.exists(spec):
      found = [spec]
    elif _GLOB_CHARS & set(spec):
      found = sorted(p for p in glob.glob(spec, recursive=True)
                     if _is_image_name(p) and os.path.isfile(p))
      if not found:
        problems[spec] = f"{spec}: the pattern matches no image file"
    else:
      found = []
      problems[spec] = f"{spec}: no such file or folder"
    for path in found:
      key = os.path.realpath(path)
      if key not in seen:
        seen.add(key)
        files.append(path)
  return files, problems


def _is_image_name(path: str) -> bool:
  return path.lower().endswith(IMAGE_SUFFIXES)


def upright_size(path: str) -> tuple[int, int]:
  """(height, width) of the image as `read_rgb` gives it, from the file's header alone (no
  decoding)."""
  try:
    with Image.open(path) as im:
      width, height = im.size
      orientation = _orientation(im)
  except Exception as e:  # pylint: disable=broad-except
    # PIL's parsers of arbitrary files raise many types; all mean "this file", not a bug here.
    raise _unreadable(path, e) from None
  return (width, height) if orientation in _TRANSPOSED else (height, width)


def read_rgb(path: str) -> np.ndarray:
  """The image at `path` as uint8 [H, W, 3] RGB, upright (see the module docstring)."""
  try:
    with Image.open(path) as im:
      im.load()
      image = _transpose(im)
      image.load()
  except Exception as e:  # pylint: disable=broad-except
    # As in `upright_size`: a damaged or foreign file, whatever PIL raises for it.
    raise _unreadable(path, e) from None
  try:
    return to_rgb(image)
  except ValueError as e:  # a mode PIL cannot convert (LAB, HSV, ...)
    raise UnreadableImage(f"{path}: PIL cannot convert its {image.mode} pixels to RGB "
                          f"({e})") from None


def to_rgb(image: Image.Image) -> np.ndarray:
  """A PIL image of any mode -> uint8 [H, W, 3] RGB (see the module docstring)."""
  mode = image.mode
  if mode in _SIXTEEN_BIT or mode == "I":
    values = np.asarray(image).astype(np.int64)
    if mode in _SIXTEEN_BIT or values.max(initial=0) > 255:  # "I": 16-bit unless it fits 8
      values = np.clip(values, 0, 65535) >> 8
    grey = np.clip(values, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))
  if mode == "F":
    grey = np.clip(np.round(np.asarray(image, np.float64)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))
  if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, image.convert("RGBA"))
  return np.array(image.convert("RGB"), dtype=np.uint8)


def _orientation(image: Image.Image) -> int:
  try:
    return int(image.getexif().get(_EXIF_ORIENTATION, 1))
  except Exception:  # pylint: disable=broad-except
    return 1  # a damaged EXIF block: `_transpose` keeps the pixels as stored, and so do we


def _transpose(image: Image.Image) -> Image.Image:
  """The image turned upright by its EXIF orientation (as stored if the EXIF is damaged)."""
  if _orientation(image) == 1:
    return image
  try:
    return ImageOps.exif_transpose(image)
  except Exception:  # pylint: disable=broad-except
    return image


def _unreadable(path: str, e: Exception) -> UnreadableImage:
  """Why `path` cannot be read, in words."""
  if isinstance(e, FileNotFoundError):
    return UnreadableImage(f"{path}: no such file")
  if isinstance(e, IsADirectoryError):
    return UnreadableImage(f"{path} is a folder, not an image file")
  if isinstance(e, PermissionError):
    return UnreadableImage(f"{path} cannot be opened (permission denied)")
  if os.path.isfile(path) and os.path.getsize(path) == 0:
    return UnreadableImage(f"{path} is an empty file")
  if isinstance(e, Image.UnidentifiedImageError):
    return UnreadableImage(f"{path} is not an image file that PIL knows")
  if isinstance(e, Image.DecompressionBombError):
    return UnreadableImage(f"{path} is too large to decode safely ({e})")
  return UnreadableImage(f"{path} cannot be decoded ({type(e).__name__}: {e})")
