"""Input pipeline throughput (images/s) of each pipeline on this machine.

Datasets: `synthetic_wsss` (default config, 128x128) with the crop sizes of configs/synthetic.py,
and optionally (--voc_images N) a generated VOC-shaped tree of N 500x375 JPEGs read through
`voc2012_aug` with the original's crop sizes (448). The affinity and segmentation pipelines read
score maps / pseudo labels that the script writes first (uniform maps; reading cost is what
matters). Prints a table, then one JSON line.

  python experiments/benchmark_input.py [--voc_images 96] [--batches 20] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
from PIL import Image  # pylint: disable=g-import-not-at-top

from affinity_jax import data  # pylint: disable=g-import-not-at-top
from affinity_jax.data import pipelines  # pylint: disable=g-import-not-at-top
from tests import _voc_tree  # pylint: disable=g-import-not-at-top

ONE_HOST = dict(process_index=0, process_count=1)


def write_side_files(builder, split: str, folder: str) -> tuple[str, str]:
  """Uniform la / ha score maps (.npz) and pseudo labels (.png) for every image of the split."""
  scores, labels = os.path.join(folder, "scores"), os.path.join(folder, "labels")
  os.makedirs(scores, exist_ok=True)
  os.makedirs(labels, exist_ok=True)
  for ex in tfds.as_numpy(builder.as_dataset(split=split)):
    name = ex["name"].decode()
    h, w = ex["image"].shape[:2]
    k = int(ex["label"].sum())
    la = np.full((h, w, k + 1), 0.1, np.float32)
    la[..., -1] = 0.9
    np.savez(os.path.join(scores, name + ".npz"), la=la, ha=la)
    Image.fromarray(ex["mask"][..., 0]).save(os.path.join(labels, name + ".png"))
  return scores, labels


def throughput(batches, batch_size: int, warmup: int, count: int) -> float:
  it = iter(batches)
  for _ in itertools.islice(it, warmup):
    pass
  start = time.perf_counter()
  seen = sum(1 for _ in itertools.islice(it, count))
  return seen * batch_size / (time.perf_counter() - start)


def bench_dataset(label: str, builder, split: str, workdir: str, *, crop: int,
                  resize_long: tuple[int, int], canvas: tuple[int, int], batch_size: int,
                  warmup: int, count: int) -> list[dict]:
  scores, labels = write_side_files(builder, split, workdir)
  n = builder.info.splits[split].num_examples
  runs = {
      "cls_train": lambda: pipelines.cls_train(
          builder, split, batch_size=batch_size, crop_size=crop, resize_long=resize_long,
          seed=0, **ONE_HOST),
      "aff_train": lambda: pipelines.aff_train(
          builder, split, scores, batch_size=batch_size, crop_size=crop, seed=0, **ONE_HOST),
      "seg_train": lambda: pipelines.seg_train(
          builder, split, labels, batch_size=batch_size, crop_size=crop, seed=0, **ONE_HOST),
      "inference (4 scales)": lambda: pipelines.inference(
          builder, split, canvas=canvas, batch_size=batch_size, **ONE_HOST),
  }
  rows = []
  for name, make in runs.items():
    # Inference is finite: measure at most one pass, after its warm-up batches.
    total = count if "train" in name else max(1, n // batch_size - warmup)
    rate = throughput(make(), batch_size, warmup, total)
    rows.append(dict(dataset=label, pipeline=name, crop=crop if "train" in name else None,
                     batch=batch_size, images_per_s=round(rate, 1)))
    print(f"{label:28s} {name:22s} {rate:10.1f} images/s", flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="", help="scratch folder (default: a temp dir)")
  parser.add_argument("--voc_images", type=int, default=0,
                      help="also benchmark a generated VOC-shaped tree of this many images")
  parser.add_argument("--batches", type=int, default=20, help="timed batches per pipeline")
  parser.add_argument("--warmup", type=int, default=3)
  args = parser.parse_args()
  workdir = args.workdir or tempfile.mkdtemp(prefix="bench_input_")
  print(f"scratch: {workdir}; {os.cpu_count()} CPU cores", flush=True)

  start = time.perf_counter()
  synthetic = data.get_builder("synthetic_wsss", os.path.join(workdir, "tfds"))
  prepare_s = time.perf_counter() - start
  print(f"synthetic_wsss default: ready in {prepare_s:.1f} s", flush=True)
  rows = bench_dataset("synthetic_wsss 128x128", synthetic, "train",
                       os.path.join(workdir, "synthetic"), crop=96, resize_long=(96, 144),
                       canvas=(128, 128), batch_size=16, warmup=args.warmup,
                       count=args.batches)
  if args.voc_images:
    manual = os.path.join(workdir, "voc_manual")
    _voc_tree.write_voc_sized(manual, args.voc_images)
    voc = data.get_builder("voc2012_aug", os.path.join(workdir, "tfds"), manual_dir=manual)
    rows += bench_dataset(f"VOC-shaped 500x375 (x{args.voc_images})", voc, "train",
                          os.path.join(workdir, "voc"), crop=448, resize_long=(256, 512),
                          canvas=(512, 512), batch_size=8, warmup=args.warmup,
                          count=args.batches)
  print(json.dumps({"benchmark": "input_pipeline", "cpu_cores": os.cpu_count(),
                    "synthetic_prepare_s": round(prepare_s, 1), "rows": rows}))


if __name__ == "__main__":
  main()
