"""What the per-image inference stages (infer_cam, random_walk, infer_seg) share: the batches of
the images whose output is still missing, so that a rerun does only what is left."""

from __future__ import annotations

from typing import Iterator, Sequence

from affinity_jax import artifacts, console, data, models
from affinity_jax.data import pipelines, records


def batch_names(batch: dict) -> list[str]:
  """The image names of an inference batch as str (dummy examples give "")."""
  return [n.decode() if isinstance(n, bytes) else str(n) for n in batch["name"]]


def pending(cfg, builder, splits: Sequence[str], out_dir: str, suffix: str, *,
            scales: Sequence[float], batch_size: int, report: artifacts.SkipReport
            ) -> Iterator[tuple[dict, list[str], list[int]]]:
  """This host's inference batches (on the config's canvas, in its backbone's input
  convention) of the images of `splits` still without an output `{out_dir}/{name}{suffix}`:
  (batch, names, keep), `keep` the indices of the real examples whose output is missing.
  Splits with every output present are passed over with a note. Images larger than the
  canvas, which the pipeline does not resize, go to `report`. A progress bar (process 0)
  counts this host's missing images as the caller finishes each batch."""
  stage = report.stage
  canvas = tuple(int(c) for c in cfg.data.canvas)
  convention = models.input_convention(cfg)
  index, count = records.host(None, None)
  names_of = {split: data.split_names(builder, split) for split in splits}
  missing = {}  # this host's, for the bar (splits may share images)
  for split in splits:
    todo = artifacts.missing(names_of[split], out_dir, suffix)
    if todo and count > 1:
      mine = set(data.split_names(builder, records.host_split(builder, split, index, count)))
      todo = [n for n in todo if n in mine]
    missing.update(dict.fromkeys(todo))
  with console.progress(len(missing), stage, enabled=index == 0) as bar:
    for split in splits:
      todo = set(artifacts.missing(names_of[split], out_dir, suffix))
      if not todo:
        print(f"[{stage}] {split}: all outputs present in {out_dir}")
        continue
      for batch in pipelines.inference(builder, split, scales=scales, canvas=canvas,
                                       batch_size=batch_size, convention=convention):
        names = batch_names(batch)
        for i, name in enumerate(names):
          if name in todo and not batch["valid"][i]:
            h, w = batch["image_size"][i]
            report.skip(name, f"the image is {h}x{w}, larger than the inference canvas "
                        f"{canvas[0]}x{canvas[1]} (config key data.canvas; memory grows with "
                        "its area)")
        yield batch, names, [i for i, n in enumerate(names) if batch["valid"][i] and n in todo]
        bar.update(sum(n in todo for n in names))
