"""affinity_jax's ResNet-50, CAM and relation networks against IRN's own, same weights.

IRN (github jiwoon-ahn/irn): net/resnet50_cam.py and net/resnet50_irn.py are imported from its
checkout (`--irn-root` or IRN_ROOT), its files not edited. Its `resnet50(pretrained=True)`
downloads torchvision's ImageNet weights through `model_zoo.load_url`; in this process only,
that function returns instead a seeded random state dict in torchvision's layout (fc included,
which IRN drops), with BatchNorm statistics far from (0, 1) so that they matter. The classifier
gets seeded random weights too. Our side converts IRN's CAM network's own state dict
(`convert.torchvision_to_variables(..., "cam")`, IRN's layout with its stage aliases) and, for
the stages, the torchvision dict ("backbone").

Compared on random normalised images at each size (2 images, NCHW for IRN, NHWC for us):
- logits: IRN's Net.forward (eval) against ResNet50CAMNet's;
- cam: IRN's CAM.forward, relu(classifier . stage4) of both images summed with the second
  flipped left-right, against ours computed the same way;
- conv1 (after bn1 and ReLU), stage1..stage4: IRN's Net.stage1..stage4 in turn against
  ResNet50's taps.
- multi-scale + flip CAMs (`cam.irn_cams`, scales 1, 0.5, 1.5, 2) of one random uint8 image
  (`--ms-size`) and three classes: IRN's CAM module at each scale (the image resized by IRN's
  imutils.pil_rescale, bicubic), put together by the rule of docs/method.md §11 in torch
  (bilinear to the stride-4 grid and to 16 x the stride-16 grid cropped to the image, summed,
  each class over its maximum + 1e-5): `ms_cam_max_rel`, `ms_high_res_max_rel`.
- the inter-pixel relation network (`compare_relation`, `--relation-sizes`, one image each):
  IRN's net/resnet50_irn.py Net (eval, so its mean shift is applied) on the same torchvision
  dict, its heads at torch's seeded default initialisation with GroupNorm scales and biases,
  fc_edge6's bias and the mean shift drawn at random so that they matter, against RelationNet
  with IRN's Net state dict converted (`convert.torchvision_to_variables(..., "relation")`):
  `relation_edge_{H}x{W}` (edge_out, the boundary logits) and `relation_dp_{H}x{W}` (dp_out);
  then IRN's EdgeDisplacement (its inference module: the image and its flipped copy padded
  with zeros to `--crop-size`, cropped back to the stride-4 grid, boundary
  sigmoid(edge[0] / 2 + flip(edge[1]) / 2), displacement dp[0]) on an image of `--flip-size`
  against the same computed from ours: `relation_flip_edge_{H}x{W}`, `relation_flip_dp_...`.
Each as max |ours - IRN's| / max |IRN's| (`{key}_{H}x{W}_max_rel`), plus `max_rel` over all;
the relation network's also as the max absolute error (`..._max_abs`).

Usage: python experiments/compare_irn_networks.py --irn-root /tmp/irn [--sizes 72x104,97x66]
  [--relation-sizes 320x320,281x353] [--flip-size 281x353 --crop-size 512] [--skip-relation]
The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import irn_original  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # oracles: tests/

NUM_CLASSES = 20  # IRN's classifier is Conv2d(2048, 20, 1)
MS_SCALES = (1.0, 0.5, 1.5, 2.0)  # run_sample.py --cam_scales


def parse_size(text: str) -> tuple[int, int]:
  try:
    h, w = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"size {text!r}: expected HxW, e.g. 72x104") from None
  if h < 16 or w < 16:
    raise argparse.ArgumentTypeError(f"size {text!r}: needs at least 16x16 pixels")
  return h, w


def load_irn_net_module(torch, irn_root: str, state_dict: dict, name: str = "net.resnet50_cam"):
  """IRN's module `name` (net.resnet50_cam or net.resnet50_irn), whose resnet50(pretrained=True)
  loads `state_dict` (a fresh copy each time: IRN pops fc from it) instead of downloading."""
  import torch.utils.model_zoo as model_zoo
  model_zoo.load_url = lambda url, *args, **kwargs: {
      k: torch.from_numpy(v.copy()) for k, v in state_dict.items()}
  if irn_root not in sys.path:
    sys.path.insert(0, irn_root)
  module = importlib.import_module(name)
  assert importlib.import_module("net.resnet50").model_zoo.load_url is model_zoo.load_url
  return module


def max_abs(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.abs(ours - theirs).max())


def irn_relation_net(torch, irn_root: str, torchvision_sd: dict, seed: int):
  """(IRN's net.resnet50_irn module, its Net in eval mode): the backbone from `torchvision_sd`,
  the heads at torch's default initialisation (seeded), then GroupNorm scales around 1,
  GroupNorm biases, fc_edge6's bias and the mean shift drawn at random."""
  irn = load_irn_net_module(torch, irn_root, torchvision_sd, "net.resnet50_irn")
  torch.manual_seed(seed)
  net = irn.Net()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for layers in (net.edge_layers, net.dp_layers):
      for module in layers.modules():
        if isinstance(module, torch.nn.GroupNorm):
          module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
          module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.2)
    net.fc_edge6.bias.copy_(torch.randn(net.fc_edge6.bias.shape, generator=gen))
    net.mean_shift.running_mean.copy_(torch.randn(2, generator=gen) * 0.5)
  net.eval()
  return irn, net


def compare_relation(torch, irn_root: str, torchvision_sd: dict, sizes, flip_size,
                     crop_size: int, seed: int = 0) -> dict[str, float]:
  """IRN's relation network (Net and EdgeDisplacement) against ours on the same weights: the
  `relation_*` entries of the module docstring, as {name: error}."""
  import jax

  from affinity_jax import convert, models
  irn, net = irn_relation_net(torch, irn_root, torchvision_sd, seed)
  irn_sd = {k: v.numpy() for k, v in net.state_dict().items()}
  variables, dropped = convert.torchvision_to_variables(irn_sd, "relation",
                                                        source="IRN's relation Net")
  assert dropped == [], dropped
  ours = models.build("relation", backbone="resnet50")
  forward = jax.jit(ours.apply)
  results = {}
  rng = np.random.default_rng(seed + 3)
  for h, w in sizes:
    key = f"{h}x{w}"
    x = rng.normal(size=(1, 3, h, w)).astype(np.float32)
    with torch.no_grad():
      edge, dp = (t.numpy() for t in net(torch.from_numpy(x)))
    our_edge, our_dp = forward(variables, x.transpose(0, 2, 3, 1))
    pairs = {"edge": (np.asarray(our_edge)[:, None], edge),
             "dp": (np.asarray(our_dp).transpose(0, 3, 1, 2), dp)}
    _record(results, pairs, key, f"IRN's Net, {key}")

  # EdgeDisplacement: IRN's inference on [image, flipped image], padded to crop_size.
  h, w = flip_size
  edge_disp = irn.EdgeDisplacement(crop_size=crop_size, stride=4)
  edge_disp.load_state_dict(net.state_dict(), strict=True)
  edge_disp.eval()
  x = rng.normal(size=(3, h, w)).astype(np.float32)
  pair = np.stack([x, x[:, :, ::-1]])
  with torch.no_grad():
    edge, dp = (t.numpy() for t in edge_disp(torch.from_numpy(pair.copy())))
  canvas = np.zeros((2, crop_size, crop_size, 3), np.float32)
  canvas[:, :h, :w] = pair.transpose(0, 2, 3, 1)
  our_edge, our_dp = (np.asarray(t) for t in forward(variables, canvas))
  fh, fw = -(-h // 4), -(-w // 4)
  our_edge, our_dp = our_edge[:, :fh, :fw], our_dp[:, :fh, :fw]
  flipped = 1 / (1 + np.exp(-(our_edge[0] / 2 + our_edge[1][:, ::-1] / 2)))
  pairs = {"flip_edge": (flipped[None], edge), "flip_dp": (our_dp[0].transpose(2, 0, 1), dp)}
  _record(results, pairs, f"{h}x{w}", f"IRN's EdgeDisplacement, {h}x{w} on {crop_size}x"
          f"{crop_size}")
  return results


def _record(results: dict, pairs: dict, key: str, title: str) -> None:
  """Adds relation_{name}_{key}_max_rel / _max_abs of each (ours, IRN's) pair and prints them."""
  for name, (ours, theirs) in pairs.items():
    results[f"relation_{name}_{key}_max_rel"] = max_rel(ours, theirs)
    results[f"relation_{name}_{key}_max_abs"] = max_abs(ours, theirs)
  print(f"relation network, {title}: " + ", ".join(
      f"{name} {results[f'relation_{name}_{key}_max_rel']:.2e} (abs "
      f"{results[f'relation_{name}_{key}_max_abs']:.2e}, IRN's max "
      f"{np.abs(theirs).max():.3g})" for name, (_, theirs) in pairs.items()), flush=True)


def max_rel(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--irn-root", default=os.environ.get("IRN_ROOT"),
                 help="checkout of github.com/jiwoon-ahn/irn (default: $IRN_ROOT)")
  p.add_argument("--sizes", default="72x104,97x66",
                 type=lambda s: [parse_size(t) for t in s.split(",")],
                 help="image sizes HxW, comma-separated (default 72x104,97x66)")
  p.add_argument("--ms-size", default=(75, 98), type=parse_size,
                 help="size of the multi-scale CAM image, HxW (default 75x98)")
  p.add_argument("--relation-sizes", default="320x320,281x353",
                 type=lambda s: [parse_size(t) for t in s.split(",")],
                 help="image sizes HxW of the relation network, comma-separated (default "
                      "320x320,281x353)")
  p.add_argument("--flip-size", default=(281, 353), type=parse_size,
                 help="size HxW of the image of the EdgeDisplacement comparison (default "
                      "281x353)")
  p.add_argument("--crop-size", type=int, default=512,
                 help="EdgeDisplacement's canvas side (IRN's default 512), >= --flip-size")
  p.add_argument("--skip-relation", action="store_true",
                 help="compare the backbone and the CAM network only (tests/test_resnet50.py; "
                      "tests/test_relation_net.py runs compare_relation itself)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
  args = p.parse_args(argv)
  if not args.irn_root:
    p.error("give --irn-root or set IRN_ROOT")
  if args.crop_size < max(args.flip_size):
    p.error(f"--crop-size {args.crop_size} is smaller than --flip-size {args.flip_size}")
  try:
    irn_root = irn_original.check_irn_root(args.irn_root)
  except ValueError as e:
    print(e, file=sys.stderr)
    return 2

  import jax
  import torch

  from affinity_jax import convert, models
  from tests import reference_resnet50

  torch.set_num_threads(args.threads)
  torchvision_sd = reference_resnet50.random_state_dict(1.0, seed=args.seed, fc=True)
  irn = load_irn_net_module(torch, irn_root, torchvision_sd)
  net, cam = irn.Net(), irn.CAM()
  classifier = np.random.default_rng(args.seed + 1).normal(
      0.0, 0.02, (NUM_CLASSES, 2048, 1, 1)).astype(np.float32)
  with torch.no_grad():
    net.classifier.weight.copy_(torch.from_numpy(classifier))
  cam.load_state_dict(net.state_dict(), strict=True)
  net.eval()
  cam.eval()

  irn_sd = {k: v.numpy() for k, v in net.state_dict().items()}
  cam_variables, _ = convert.torchvision_to_variables(irn_sd, "cam", source="IRN's Net")
  backbone_variables, dropped = convert.torchvision_to_variables(torchvision_sd, "backbone")
  assert dropped == ["fc.bias", "fc.weight"], dropped
  ours_cam = models.build("cam", num_classes=NUM_CLASSES, backbone="resnet50")
  ours_backbone = models.build("backbone", backbone="resnet50")
  logits_fn = jax.jit(ours_cam.apply)
  cam_fn = jax.jit(lambda v, x: ours_cam.apply(v, x, method="cam"))
  taps_fn = jax.jit(ours_backbone.apply)

  results = {}
  rng = np.random.default_rng(args.seed + 2)
  for h, w in args.sizes:
    key = f"{h}x{w}"
    x = rng.normal(size=(2, 3, h, w)).astype(np.float32)
    nhwc = x.transpose(0, 2, 3, 1)
    with torch.no_grad():
      tx = torch.from_numpy(x)
      theirs = {"logits": net(tx).numpy(), "cam": cam(tx).numpy()}
      y = net.stage1[:3](tx)  # conv1, bn1, relu
      theirs["conv1"] = y.numpy().copy()
      y = net.stage1[3:](y)   # maxpool, layer1
      theirs["stage1"] = y.numpy().copy()
      for stage in ("stage2", "stage3", "stage4"):
        y = getattr(net, stage)(y)
        theirs[stage] = y.numpy().copy()
    ours = {"logits": np.asarray(logits_fn(cam_variables, nhwc))}
    maps = np.asarray(cam_fn(cam_variables, nhwc))  # [2, h, w, C]
    ours["cam"] = (maps[0] + maps[1][:, ::-1]).transpose(2, 0, 1)
    for name, tap in taps_fn(backbone_variables, nhwc).items():
      ours[name] = np.asarray(tap).transpose(0, 3, 1, 2)
    for name in ("logits", "cam", "conv1", "stage1", "stage2", "stage3", "stage4"):
      results[f"{name}_{key}_max_rel"] = max_rel(ours[name], theirs[name])
    print(f"{key}: " + ", ".join(f"{n} {results[f'{n}_{key}_max_rel']:.2e}" for n in (
        "logits", "cam", "conv1", "stage1", "stage2", "stage3", "stage4")) +
        f" (stage4 {theirs['stage4'].shape[2]}x{theirs['stage4'].shape[3]}, CAM max "
        f"{np.abs(theirs['cam']).max():.3g})", flush=True)
  # Multi-scale + flip CAMs of one uint8 image: ours (cam.irn_cams) against IRN's CAM module
  # at each scale (the image resized by IRN's own imutils.pil_rescale) put together by the rule
  # of docs/method.md §11 in torch.
  from affinity_jax import cam as cam_lib
  imutils = importlib.import_module("misc.imutils")
  h, w = args.ms_size
  image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
  classes = np.array([2, 7, 15])
  mean, std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
  grid, padded = (-(-h // 4), -(-w // 4)), (-(-h // 16) * 16, -(-w // 16) * 16)
  resize = lambda t, size: torch.nn.functional.interpolate(  # noqa: E731
      t[None], size=size, mode="bilinear", align_corners=False)[0]
  strided, high_res = 0, 0
  with torch.no_grad():
    for scale in MS_SCALES:
      scaled = image if scale == 1 else imutils.pil_rescale(image, scale, order=3)
      x = ((scaled / 255.0 - mean) / std).astype(np.float32).transpose(2, 0, 1)
      out = cam(torch.from_numpy(np.stack([x, x[:, :, ::-1]]).copy()))
      strided = strided + resize(out, grid)
      high_res = high_res + resize(out, padded)[:, :h, :w]
  theirs = {}
  for key, total in (("cam", strided), ("high_res", high_res)):
    total = total[torch.from_numpy(classes)]
    theirs[key] = (total / (total.amax(dim=(1, 2), keepdim=True) + 1e-5)).numpy()
  ours = cam_lib.irn_cams(lambda x: cam_fn(cam_variables, x), image, classes, scales=MS_SCALES)
  for key in ("cam", "high_res"):
    results[f"ms_{key}_max_rel"] = max_rel(ours[key].transpose(2, 0, 1), theirs[key])
  print(f"multi-scale + flip CAMs of a {h}x{w} image, classes {classes.tolist()}: stride-4 "
        f"{results['ms_cam_max_rel']:.2e}, full resolution {results['ms_high_res_max_rel']:.2e}",
        flush=True)
  if not args.skip_relation:
    results.update(compare_relation(torch, irn_root, torchvision_sd, args.relation_sizes,
                                    args.flip_size, args.crop_size, args.seed))
  results["max_rel"] = max(v for k, v in results.items() if k.endswith("_max_rel"))
  print(json.dumps(results, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
