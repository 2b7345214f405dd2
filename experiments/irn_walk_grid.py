"""IRN's walk over a grid of its values on a finished IRN run, and with another run's relation
network: which of the walk's values, the relation network or the CAMs makes a run's labels.

  python experiments/irn_walk_grid.py --workdir RUN [--split train] [--betas 10,20]
      [--logts 5,8] [--bg-thresholds 0.25,0.4] [--relation-workdir OTHER_RUN]

RUN is the workdir of an `affinity-jax run` with method irn that has its CAMs (infer_cam) and its
relation network (train_aff); its recorded config (config.json) gives the data, the network and
the scale its walk sees the images at (`aff.image_scale`: the CAMs resampled to that grid, the
walked scores back to the image's pixels, as the random_walk stage does).
Each image's flip-averaged boundary map is computed once (random_walk.make_relation_maps_fn, with
OTHER_RUN's relation network when given: IRN's backbone is frozen, so any run's relation network
reads any run's images), then walked (random_walk.boundary_walk, radius from the config) for
every beta and number of steps 2^logt, and labelled (random_walk.boundary_walk_labels) at
every background threshold. Printed: the labels' mIoU % and per-class IoU against the split's
masks, scored as the evaluate stage scores the random_walk row (images without a mask, and
those without a positive class, which the walk skips, left out). Writes nothing.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

from affinity_jax import artifacts, cam, checkpoint, config, data, evaluation, models, predict
from affinity_jax import random_walk as rw
from affinity_jax.constants import IRN_STRIDE
from affinity_jax.data import pipelines
from affinity_jax.stages import per_image


def _floats(text: str) -> list[float]:
  return [float(v) for v in text.split(",")]


def _maps(cfg, net_cfg, split: str) -> tuple[list, list[str]]:
  """([(name, boundary [h, w], strided CAMs [h, w, P], class ids [P], (H, W), (Hs, Ws))] of the
  split's images with a positive class, on the grid of the image resized by `aff.image_scale`
  to (Hs, Ws) as the stage walks it, the class names with the background first)."""
  workdir = artifacts.Workdir(cfg.workdir)
  builder = data.from_config(cfg)
  model, variables = checkpoint.load_network(net_cfg, artifacts.RELATION_NET)
  maps = rw.make_relation_maps_fn(model)
  items = []
  canvas = tuple(int(c) for c in cfg.data.canvas)
  for batch in pipelines.inference(builder, split, scales=(config.aff_image_scale(cfg),),
                                   canvas=canvas,
                                   batch_size=int(cfg.random_walk.batch_size),
                                   convention=models.input_convention(cfg),
                                   names=data.split_names(builder, split)):
    names = per_image.batch_names(batch)
    sizes, scaled = np.asarray(batch["orig_size"]), np.asarray(batch["size_s0"])
    images = batch["image_s0"]
    grid_w = -(-images.shape[2] // IRN_STRIDE)
    grid = -(-scaled // IRN_STRIDE)
    edges = np.asarray(maps(variables, images, cam.flip_index(scaled[:, 1], images.shape[2]),
                            cam.flip_index(grid[:, 1], grid_w))[0])
    for i in range(len(names)):
      if not batch["valid"][i]:
        if names[i]:
          raise SystemExit(f"{names[i]} is larger than the canvas {canvas} (data.canvas)")
        continue
      if not artifacts.has_positive_class(batch["label"][i]):
        continue
      cams, ids = artifacts.load_strided_cam(workdir.cam(names[i]), sizes[i], IRN_STRIDE,
                                             cfg.model.num_classes)
      if cams is None:
        raise SystemExit(f"{workdir.cam(names[i])}: {ids}")
      items.append((names[i], edges[i, :grid[i][0], :grid[i][1]],
                    rw.strided_at_scale(cams, sizes[i], scaled[i], stride=IRN_STRIDE), ids,
                    sizes[i], scaled[i]))
  return items, list(evaluation.dataset_class_names(builder))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--relation-workdir", default=None,
                      help="the run whose relation network makes the boundary maps (default: "
                           "--workdir's)")
  parser.add_argument("--split", default="train")
  parser.add_argument("--betas", default="10,20")
  parser.add_argument("--logts", default="5,8")
  parser.add_argument("--bg-thresholds", default="0.25,0.4")
  args = parser.parse_args(argv)
  cfg, _ = predict.load_config(None, [], args.workdir, [])
  net_cfg, _ = predict.load_config(None, [], args.relation_workdir or args.workdir, [])
  items, class_names = _maps(cfg, net_cfg, args.split)
  masks = dict((name, mask) for name, mask, _ in evaluation.dataset_ground_truth(
      data.from_config(cfg), args.split).read({name for name, *_ in items}))
  items = [item for item in items if item[0] in masks]  # as evaluate: images with a mask
  print(f"{len(items)} images of {args.split} with a class and a mask; relation network of "
        f"{args.relation_workdir or args.workdir}")
  print("beta | logt | background | mIoU | " + " | ".join(class_names))
  radius = int(cfg.random_walk.radius)
  for beta in _floats(args.betas):
    for logt in (int(t) for t in _floats(args.logts)):
      walk = jax.jit(lambda e, c, b=beta, t=2 ** logt: rw.boundary_walk(e, c, radius=radius,
                                                                         beta=b, t=t))
      walked = [np.asarray(walk(e[None], c[None]))[0] for _, e, c, *_ in items]
      for threshold in _floats(args.bg_thresholds):
        scores = evaluation.Scores(class_names)
        for (name, _, _, ids, size, scaled), w in zip(items, walked):
          index = rw.boundary_walk_labels(w, size, threshold=threshold, stride=IRN_STRIDE,
                                          scaled=scaled)
          label = np.concatenate([[0], ids.astype(np.int64) + 1])[index]
          scores.add(masks[name], label, prediction_file=f"{name} walked",
                     ground_truth_file=f"{name} of {args.split}")
        print(f"{beta:g} | {logt} | {threshold:g} | {100 * scores.miou():.1f} | "
              + " | ".join(f"{100 * v:.1f}" for v in scores.iou()), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
