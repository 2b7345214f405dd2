"""What the per-image inference stages (infer_cam, random_walk, infer_seg) share: the batches of
the images whose output is still missing, so that a rerun does only what is left, and the
process's local devices that each batch is split over (data-parallel)."""

from __future__ import annotations

from typing import Iterator, Sequence

import jax
import numpy as np

from affinity_jax import artifacts, console, data, distributed, models
from affinity_jax.data import pipelines


class LocalDevices:
  """This process's devices as a per-image stage uses them (distributed.local_placement):
  `put(tree)` splits batch-first arrays over them, `replicate(tree)` puts a copy of the
  network's variables on each, `count` is how many there are, and `images` [count] how many
  real examples of the batches passed to `record` each one received (the stage's summary)."""

  def __init__(self):
    self.put, self.replicate, self.count = distributed.local_placement()
    self.images = [0] * self.count

  def record(self, batch: dict) -> None:
    """Counts the real examples (valid) of `batch` on each device, as `put` places them."""
    # The placement `put` gives the batch's own `valid` column, not a computed split: the
    # count shows where the examples went, on any number of devices.
    placed = self.put(np.asarray(batch["valid"]))
    for k, shard in enumerate(sorted(placed.addressable_shards, key=lambda s: s.device.id)):
      self.images[k] += int(np.sum(np.asarray(shard.data)))

  def summary(self, stage: str) -> dict:
    """{"devices", "images_per_device"} for the stage's summary; prints the shares (one line,
    on more than one device)."""
    if self.count > 1:
      where = f" process {distributed.index()}:" if distributed.count() > 1 else ""
      print(f"[{stage}]{where} split over {self.count} local devices; real images on each: "
            f"{', '.join(str(n) for n in self.images)}")
    return {"devices": self.count, "images_per_device": list(self.images)}


def batch_names(batch: dict) -> list[str]:
  """The image names of an inference batch as str (dummy examples give "")."""
  return [n.decode() if isinstance(n, bytes) else str(n) for n in batch["name"]]


def shares(builder, splits: Sequence[str], out_dir: str, suffix: str, stage: str
           ) -> tuple[dict[str, list[str]], set[str]]:
  """({split: its images without an output `{out_dir}/{name}{suffix}`}, this process's share
  of all of them).

  Process 0 looks (and deletes cut-short files, artifacts.missing) before any process starts
  writing, and every process gets its even share of what is missing (distributed.share): of
  the images left to do, not of the split, so a rerun after an interruption keeps every
  process busy alike. On one process the share is everything."""
  def look():
    return {split: artifacts.missing(data.split_names(builder, split), out_dir, suffix)
            for split in splits}
  todo_of = distributed.broadcast(f"{stage} missing outputs", look)
  everything = list(dict.fromkeys(n for split in splits for n in todo_of[split]))
  return todo_of, set(distributed.share(everything))


def pending(cfg, builder, splits: Sequence[str], out_dir: str, suffix: str, *,
            scales: Sequence[float], batch_size: int, report: artifacts.SkipReport,
            devices: int | None = None, plan: tuple | None = None
            ) -> Iterator[tuple[dict, list[str], list[int]]]:
  """This host's inference batches (on the config's canvas, in its backbone's input
  convention) of the images of `splits` still without an output `{out_dir}/{name}{suffix}`:
  (batch, names, keep), `keep` the indices of the real examples whose output is missing.
  A batch holds `batch_size` rounded up to a multiple of `devices` (default: this process's
  device count) examples, so that it splits evenly over them; the last one of a split is
  completed with dummy examples (valid False). Splits with every output present are passed
  over with a note. Images larger than the canvas, which the pipeline does not resize, go to
  `report`. A progress bar (process 0) counts this host's missing images as the caller
  finishes each batch. `plan`: what `shares` returned for these arguments, if the caller
  asked (else it is asked here)."""
  stage = report.stage
  devices = jax.local_device_count() if devices is None else int(devices)
  batch_size = distributed.per_device_multiple(batch_size, devices)
  canvas = tuple(int(c) for c in cfg.data.canvas)
  convention = models.input_convention(cfg)
  todo_of, mine = plan or shares(builder, splits, out_dir, suffix, stage)
  with console.progress(len(mine), stage, enabled=distributed.is_main()) as bar:
    for split in splits:
      if not todo_of[split]:
        print(f"[{stage}] {split}: all outputs present in {out_dir}")
        continue
      # This process's images of the split still without an output (an image of two splits
      # is made in the first), and only those in the batches.
      todo = set(artifacts.missing([n for n in todo_of[split] if n in mine], out_dir, suffix))
      if not todo:
        continue
      for batch in pipelines.inference(builder, split, scales=scales, canvas=canvas,
                                       batch_size=batch_size, convention=convention,
                                       names=sorted(todo)):
        distributed.check_peers()
        names = batch_names(batch)
        for i, name in enumerate(names):
          if name in todo and not batch["valid"][i]:
            h, w = batch["image_size"][i]
            report.skip(name, f"the image is {h}x{w}, larger than the inference canvas "
                        f"{canvas[0]}x{canvas[1]} (config key data.canvas; memory grows with "
                        "its area)")
        yield batch, names, [i for i, n in enumerate(names) if batch["valid"][i] and n in todo]
        bar.update(sum(n in todo for n in names))
