"""IRN's inter-pixel relation loss (losses.relation_loss).

Oracle: the loss written out pair by pair in float64, its offsets, paths and pair sets
enumerated by loops here (not by geometry.py). With IRN_ROOT (a checkout of
github.com/jiwoon-ahn/irn) and torch: IRN's own AffinityDisplacementLoss (affinities, pair
displacements and their targets) and its pair labels, combined by train_irn.py's weighting as
docs/method.md §11 states it.
"""

import functools
import importlib
import math
import os
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affinity_jax import losses, train

PARTS = ("bg_pos", "fg_pos", "neg", "dp_fg", "dp_bg")


def _offsets_and_paths(radius):
  """Forward offsets within the radius (dy = 0 with dx > 0, or dy > 0), each with the cells of
  the box of 0 and o lying under one cell from the line through them."""
  offsets = [(dy, dx) for dy in range(radius) for dx in range(-radius + 1, radius)
             if (dy > 0 or dx > 0) and dy * dy + dx * dx < radius * radius]
  paths = []
  for dy, dx in offsets:
    paths.append([(y, x) for y in range(min(0, dy), max(0, dy) + 1)
                  for x in range(min(0, dx), max(0, dx) + 1)
                  if (dy * x - dx * y) ** 2 < dy * dy + dx * dx])
  return offsets, paths


def _loop_relation_loss(edge_logits, displacement, label, radius, scheme):
  """The loss of docs/method.md §11 pair by pair, float64. Returns (loss, parts)."""
  edge = np.asarray(edge_logits, np.float64)
  boundary = 1 / (1 + np.exp(-edge))
  disp = np.asarray(displacement, np.float64)
  batch, h, w = label.shape
  offsets, paths = _offsets_and_paths(radius)
  sums = dict.fromkeys(PARTS, 0.0)
  counts = dict.fromkeys(("bg_pos", "fg_pos", "neg"), 0)
  for b in range(batch):
    for y in range(h):
      for x in range(w):
        if scheme == "psa" and not (y <= h - radius and radius - 1 <= x <= w - radius):
          continue
        for (dy, dx), path in zip(offsets, paths):
          y2, x2 = y + dy, x + dx
          if not (0 <= y2 < h and 0 <= x2 < w):
            continue
          a, c = int(label[b, y, x]), int(label[b, y2, x2])
          if a == 255 or c == 255:
            continue
          aff = 1 - max(boundary[b, y + py, x + px] for py, px in path)
          pair = disp[b, y, x] - disp[b, y2, x2]
          if a != c:
            sums["neg"] -= math.log(1 + 1e-5 - aff)
            counts["neg"] += 1
          elif a == 0:
            sums["bg_pos"] -= math.log(aff + 1e-5)
            sums["dp_bg"] += np.abs(pair).sum()
            counts["bg_pos"] += 1
          else:
            sums["fg_pos"] -= math.log(aff + 1e-5)
            sums["dp_fg"] += np.abs(pair - (dy, dx)).sum()
            counts["fg_pos"] += 1
  parts = {name: sums[name] / (counts[name] + 1e-5) for name in counts}
  parts["dp_fg"] = sums["dp_fg"] / (2 * counts["fg_pos"] + 1e-5)
  parts["dp_bg"] = sums["dp_bg"] / (2 * counts["bg_pos"] + 1e-5)
  loss = ((parts["bg_pos"] / 2 + parts["fg_pos"] / 2 + parts["neg"]) / 2
          + (parts["dp_fg"] + parts["dp_bg"]) / 2)
  return loss, parts, counts


def _inputs(batch, h, w, seed, max_label=20):
  """(edge_logits [B, h, w], displacement [B, h, w, 2], label [B, h, w] uint8): two
  foreground blocks and background, 255 on a band and on random cells."""
  rng = np.random.default_rng(seed)
  edge = (3 * rng.standard_normal((batch, h, w))).astype(np.float32)
  disp = (4 * rng.standard_normal((batch, h, w, 2))).astype(np.float32)
  label = np.zeros((batch, h, w), np.uint8)
  for b in range(batch):
    first, second = rng.choice(np.arange(1, max_label + 1), 2, replace=False)
    label[b, 1:h - 2, 2:w // 2] = first
    label[b, h // 3:, w // 2 + 2:w - 1] = second
    label[b, :, w // 2:w // 2 + 2] = 255
    label[b][rng.random((h, w)) < 0.15] = 255
  return edge, disp, label


@pytest.mark.parametrize("radius,h,w,scheme", [
    (3, 12, 16, "psa"), (3, 12, 16, "full"), (10, 24, 32, "psa"), (10, 24, 32, "full")])
def test_relation_loss_against_loops(radius, h, w, scheme):
  edge, disp, label = _inputs(2, h, w, seed=radius + h)
  label[1, 0, :] = 254  # the largest foreground label
  want_loss, want, counts = _loop_relation_loss(edge, disp, label, radius, scheme)
  assert min(counts.values()) > 0
  loss, parts = losses.relation_loss(jnp.asarray(edge), jnp.asarray(disp), jnp.asarray(label),
                                     radius=radius, scheme=scheme)
  assert set(parts) == set(PARTS)
  for name in PARTS:
    assert parts[name].dtype == jnp.float32 and parts[name].shape == ()
    assert float(parts[name]) == pytest.approx(want[name], rel=1e-5), name
  assert loss.dtype == jnp.float32
  assert float(loss) == pytest.approx(want_loss, rel=1e-5)


def test_relation_loss_by_hand():
  """The single pair ((0, 0), (0, 1)) of a 1 x 2 grid at radius 2 ("full"), labelled bg_pos,
  fg_pos and neg in turn."""
  edge = jnp.array([[[0.0, math.log(3.0)]]])  # boundaries 0.5 and 0.75: the path's max is 0.75
  disp = jnp.array([[[[1.0, 2.0], [0.5, -1.0]]]])
  for labels, name in (([0, 0], "bg_pos"), ([4, 4], "fg_pos"), ([0, 4], "neg")):
    loss, parts = losses.relation_loss(edge, disp, jnp.array([[labels]], jnp.uint8), radius=2,
                                       scheme="full")
    nonzero = {k for k, v in parts.items() if float(v) != 0}
    aff = 0.25
    if name == "neg":
      assert nonzero == {"neg"}
      assert float(parts["neg"]) == pytest.approx(-math.log(1 + 1e-5 - aff) / (1 + 1e-5))
      assert float(loss) == pytest.approx(float(parts["neg"]) / 2)
    elif name == "bg_pos":
      assert nonzero == {"bg_pos", "dp_bg"}
      assert float(parts["bg_pos"]) == pytest.approx(-math.log(aff + 1e-5) / (1 + 1e-5))
      assert float(parts["dp_bg"]) == pytest.approx((0.5 + 3.0) / (2 + 1e-5))
    else:  # d(p) - d(p + o) - o = (0.5, 3) - (0, 1)
      assert nonzero == {"fg_pos", "dp_fg"}
      assert float(parts["dp_fg"]) == pytest.approx((0.5 + 2.0) / (2 + 1e-5))
      assert float(loss) == pytest.approx(float(parts["fg_pos"]) / 4 + float(parts["dp_fg"]) / 2)


def test_relation_loss_jits_and_gradient_is_finite():
  edge, disp, label = _inputs(2, 12, 16, seed=5)
  edge[0, :4] = 40.0    # saturated boundary: a = 0 on pairs crossing it
  edge[1, :4] = -40.0   # no boundary: a = 1
  fn = jax.jit(functools.partial(losses.relation_loss, radius=3, scheme="psa"))
  loss, parts = fn(edge, disp, label)
  eager, _ = losses.relation_loss(edge, disp, label, radius=3, scheme="psa")
  assert float(loss) == pytest.approx(float(eager), rel=1e-6)
  grads = jax.grad(lambda e, d: fn(e, d, label)[0], argnums=(0, 1))(jnp.asarray(edge),
                                                                      jnp.asarray(disp))
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0)
  assert all(np.isfinite(float(v)) for v in parts.values())


@pytest.mark.parametrize("case", ["all_unsure", "grid_under_psa_set"])
def test_no_pair_gives_zero(case):
  if case == "all_unsure":
    edge, disp, label = _inputs(2, 12, 16, seed=1)
    label[:] = 255
    radius = 3
  else:  # psa at radius 3 needs h >= 3 and w >= 5: this grid has no pair
    edge, disp, label = _inputs(1, 2, 8, seed=2)
    radius = 3
  loss, parts = losses.relation_loss(edge, disp, label, radius=radius)
  assert float(loss) == 0.0 and all(float(v) == 0.0 for v in parts.values())
  grads = jax.grad(lambda e, d: losses.relation_loss(e, d, label, radius=radius)[0],
                   argnums=(0, 1))(jnp.asarray(edge), jnp.asarray(disp))
  assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_relation_loss_shape_errors():
  edge, disp, label = _inputs(2, 12, 16, seed=3)
  with pytest.raises(ValueError, match=r"edge_logits must be \[B, h, w\] \(got shape \(12, 16\)"):
    losses.relation_loss(edge[0], disp, label)
  with pytest.raises(ValueError, match=r"displacement must be \[B, h, w, 2\] = \[2, 12, 16, 2\]"):
    losses.relation_loss(edge, disp[..., :1], label)
  with pytest.raises(ValueError, match=r"displacement must be .* \(got \[2, 2, 12, 16\]\)"):
    losses.relation_loss(edge, np.moveaxis(disp, -1, 1), label)
  with pytest.raises(ValueError, match=r"relation_label must be \[B, h, w\] = \[2, 12, 16\]"):
    losses.relation_loss(edge, disp, label[:, :, :8])
  with pytest.raises(ValueError, match="radius must be an integer >= 2"):
    losses.relation_loss(edge, disp, label, radius=1)
  with pytest.raises(ValueError, match="scheme must be one of"):
    losses.relation_loss(edge, disp, label, scheme="irn")


class _TinyRelationNet(nn.Module):
  """Two 1x1 convolutions standing in for the relation network: (edge, displacement)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    edge = nn.Conv(1, (1, 1), name="edge")(x)[..., 0]
    return edge, nn.Conv(2, (1, 1), name="dp")(x)


def test_training_loss_in_the_trainer():
  edge, disp, label = _inputs(2, 12, 16, seed=4)
  loss_fn = losses.relation_training_loss(radius=3)
  loss, parts = loss_fn((edge, disp), {"relation_label": label})
  want, want_parts = losses.relation_loss(edge, disp, label, radius=3, scheme="psa")
  assert float(loss) == float(want)
  assert {k: float(v) for k, v in parts.items()} == {k: float(v) for k, v in want_parts.items()}

  # One step of the real trainer with a network whose output is the (edge, displacement) pair.
  model = _TinyRelationNet()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 12, 16, 3)))
  labels = {m: {k: f"new_{'bias' if k == 'bias' else 'weight'}" for k in p}
            for m, p in variables["params"].items()}
  optim = train.OptimConfig(lr=0.01, total_steps=2)
  state, constants, tx = train.init_state({"params": variables["params"]}, labels, optim)
  step = train.make_train_step(model, loss_fn, tx, optim)
  batch = {"image": np.random.default_rng(0).normal(size=(2, 12, 16, 3)).astype(np.float32),
           "relation_label": label}
  state, metrics = step(state, constants, batch)
  assert int(state["step"]) == 1
  assert set(metrics) == {"loss", "lr", *PARTS}
  assert all(np.isfinite(float(v)) for v in metrics.values()) and float(metrics["loss"]) > 0


# ---------------------------------------------------------------------------------------------
# IRN's own code (IRN_ROOT, torch)


@pytest.fixture
def irn(monkeypatch):
  """IRN's misc/indexing.py, voc12/dataloader.py and net/resnet50_irn.py. Its Net builds a
  ResNet-50 that downloads ImageNet weights; the loss's pair operations need none of it, so
  Net.__init__ is replaced by nn.Module's and AffinityDisplacementLoss.__init__ (IRN's own)
  registers its path-index buffers and displacement targets on that empty module."""
  root = os.environ.get("IRN_ROOT")
  if not root:
    pytest.skip("set IRN_ROOT to a checkout of github.com/jiwoon-ahn/irn to compare with it")
  if not os.path.isfile(os.path.join(root, "net", "resnet50_irn.py")):
    pytest.fail(f"IRN_ROOT={root!r} is not a checkout of jiwoon-ahn/irn (no net/resnet50_irn.py)")
  torch = pytest.importorskip("torch", reason="IRN's loss needs torch")
  pytest.importorskip("pydensecrf.densecrf")  # its misc/imutils.py, imported by the loader
  try:
    importlib.import_module("imageio")
  except ImportError:  # the loader needs it only to read files
    monkeypatch.setitem(sys.modules, "imageio", types.ModuleType("imageio"))
  before = set(sys.modules)
  monkeypatch.syspath_prepend(root)
  monkeypatch.chdir(root)  # the loader reads voc12/cls_labels.npy on import
  try:
    irn_net = importlib.import_module("net.resnet50_irn")
    monkeypatch.setattr(irn_net.Net, "__init__", lambda self: torch.nn.Module.__init__(self))
    monkeypatch.setattr(irn_net.Net, "forward", irn_net.Net.forward)  # restored after the test
    yield types.SimpleNamespace(torch=torch, indexing=importlib.import_module("misc.indexing"),
                                dataloader=importlib.import_module("voc12.dataloader"),
                                net=irn_net)
  finally:
    for name in set(sys.modules) - before:  # IRN's packages are called misc, voc12 and net
      if name.split(".")[0] in ("misc", "voc12", "net"):
        del sys.modules[name]


def _irn_relation_loss(irn, edge, disp, label):
  """IRN's per-pair terms ([B, K, N], [B, 2, K, N]) and pair labels, combined as §11 states.
  Returns (loss, parts, pair counts, (d loss / d edge [B, h, w], d loss / d disp [B, h, w, 2]))."""
  torch = irn.torch
  batch, h, w = label.shape
  index = irn.indexing.PathIndex(radius=10, default_size=(h, w))
  module = irn.net.AffinityDisplacementLoss(index)
  extract = irn.dataloader.GetAffinityLabelFromIndices(index.src_indices, index.dst_indices)
  bg_pos, fg_pos, neg = (torch.stack(t) for t in zip(*(extract(label[b]) for b in range(batch))))
  edge_t = torch.from_numpy(edge[:, None]).requires_grad_()
  disp_t = torch.from_numpy(np.moveaxis(disp, -1, 1).copy()).requires_grad_()
  # IRN's own forward of the loss module, its network's outputs replaced by the given maps:
  # the per-pair terms (positive and negative affinity terms, displacement terms).
  irn.net.Net.forward = lambda self, x: (edge_t, disp_t)
  pos_terms, neg_terms, dp_fg_terms, dp_bg_terms = module(None, True)

  def mean(terms, pairs):  # docs/method.md §11: a sum over the batch / (pair count + 1e-5)
    return torch.sum(terms * pairs) / (torch.sum(pairs) + 1e-5)

  parts = {"bg_pos": mean(pos_terms, bg_pos),
           "fg_pos": mean(pos_terms, fg_pos),
           "neg": mean(neg_terms, neg),
           "dp_fg": torch.sum(dp_fg_terms * fg_pos[:, None]) / (2 * torch.sum(fg_pos) + 1e-5),
           "dp_bg": torch.sum(dp_bg_terms * bg_pos[:, None]) / (2 * torch.sum(bg_pos) + 1e-5)}
  loss = ((parts["bg_pos"] / 2 + parts["fg_pos"] / 2 + parts["neg"]) / 2
          + (parts["dp_fg"] + parts["dp_bg"]) / 2)
  counts = {name: int(t.sum()) for name, t in (("bg_pos", bg_pos), ("fg_pos", fg_pos),
                                               ("neg", neg))}
  loss.backward()
  grads = edge_t.grad.numpy()[:, 0], np.moveaxis(disp_t.grad.numpy(), 1, -1)
  return float(loss.detach()), {k: float(v.detach()) for k, v in parts.items()}, counts, grads


@pytest.mark.parametrize("batch,h,w", [(2, 24, 32), (2, 128, 128)])
def test_relation_loss_equals_irns(irn, batch, h, w):
  edge, disp, label = _inputs(batch, h, w, seed=h)
  want_loss, want, counts, want_grads = _irn_relation_loss(irn, edge, disp, label)
  assert min(counts.values()) > 100
  loss, parts = losses.relation_loss(edge, disp, label)
  for name in PARTS:
    assert float(parts[name]) == pytest.approx(want[name], rel=1e-5), name
  assert float(loss) == pytest.approx(want_loss, rel=1e-5)
  if h * w > 1000:
    return  # the gradients on the small grid only: they take a while to compile
  # Random logits leave no tie in a path's max, where the two frameworks split the gradient
  # differently.
  grads = jax.grad(lambda e, d: losses.relation_loss(e, d, label)[0], argnums=(0, 1))(
      jnp.asarray(edge), jnp.asarray(disp))
  for got, theirs in zip(grads, want_grads):
    assert got.shape == theirs.shape
    np.testing.assert_allclose(np.asarray(got), theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())
