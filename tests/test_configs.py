"""The shipped recipes state the original's values and the papers' protocol (docs/method.md §8, §9)."""

import os

import ml_collections
import pytest

from affinity_jax import config
from affinity_jax.errors import ConfigError

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _load(name: str):
  return config.load_config(os.path.join(CONFIGS, name))


def test_resnet38_learning_rates_are_the_reproduced_ones_and_vgg16_the_scripts():
  # 0.1 is the scripts' default and, by the original's author, the VGG-16 value (psa #8);
  # ResNet-38 reproductions train both networks at 0.01 (psa #9, #18).
  res = _load("voc_resnet38.py")
  assert (res.cam.lr, res.aff.lr) == (0.01, 0.01)
  vgg = _load("voc_vgg16.py")
  assert (vgg.cam.lr, vgg.aff.lr) == (0.1, 0.1)


def test_voc_reports_follow_the_papers_protocol():
  cfg = _load("voc_resnet38.py")
  assert tuple(cfg.data.pseudo_splits) == ("train_aug",)  # pseudo labels for the 10,582
  assert tuple(cfg.eval.cam_splits) == ("train",)          # CAM, CAM + RW scored on 1,464
  assert tuple(cfg.eval.seg_splits) == ("val",)
  assert cfg.random_walk.crf  # the paper's dCRF on the walked maps (not infer_aff.py)


def test_voc_configs_train_the_pretrained_layers_at_the_originals_rates():
  for name in ("voc_resnet38.py", "voc_vgg16.py", "voc_irn_resnet50.py"):
    cfg = _load(name)
    assert [cfg[net].pretrained_lr_mult for net in ("cam", "aff", "seg")] == [1.0] * 3, name
  cfg = _load("voc_resnet38.py")
  cfg.aff.pretrained_lr_mult = -0.5
  with pytest.raises(ConfigError, match="config key aff.pretrained_lr_mult must be >= 0"):
    config.validate(cfg)


def test_irn_config_names_irn_values():
  """configs/voc_irn_resnet50.py: IRN's run_sample.py values where they differ from PSA's."""
  cfg = _load("voc_irn_resnet50.py")
  # The relation network's backbone is frozen: without ImageNet weights it would stay random.
  with pytest.raises(ConfigError, match="config key init.backbone must be a converted ResNet-50"):
    config.validate(cfg)
  cfg.init.backbone = "runs/resnet50"
  config.validate(cfg)
  assert (cfg.method, cfg.model.backbone) == ("irn", "resnet50")
  assert (cfg.cam.batch_size, cfg.cam.epochs, cfg.cam.lr, cfg.cam.weight_decay,
          cfg.cam.crop_size, tuple(cfg.cam.resize_long)) == (16, 5, 0.1, 1e-4, 512, (320, 640))
  assert tuple(cfg.cam_infer.scales) == (1.0, 0.5, 1.5, 2.0)
  assert (cfg.aff_labels.fg_threshold, cfg.aff_labels.bg_threshold) == (0.30, 0.05)
  assert (cfg.aff.batch_size, cfg.aff.epochs, cfg.aff.lr, cfg.aff.weight_decay,
          cfg.aff.crop_size, tuple(cfg.aff.scale_range), cfg.aff.radius, cfg.aff.scheme) == (
              32, 3, 0.1, 1e-4, 512, (0.5, 1.5), 10, "psa")
  assert cfg.cam.momentum_quirk and cfg.aff.momentum_quirk  # PolyOptimizer's SGD(p, lr, wd)
  assert (cfg.random_walk.beta, cfg.random_walk.logt, cfg.random_walk.radius,
          cfg.random_walk.bg_threshold, cfg.random_walk.crf) == (10.0, 8, 5, 0.25, False)


# Config names: `synthetic:tiny` is the shipped configs/synthetic.py (tests/test_packaging.py
# checks the same from an installed wheel).


def _shipped_files():
  return sorted(f for f in os.listdir(CONFIGS) if f.endswith(".py") and not f.startswith("_"))


def test_the_shipped_configs_are_the_files_of_configs():
  shipped = config.shipped_configs()
  assert sorted(shipped) == [f[:-3] for f in _shipped_files()]
  for f in _shipped_files():
    with open(os.path.join(CONFIGS, f)) as ours, open(shipped[f[:-3]]) as installed:
      assert installed.read() == ours.read(), f


@pytest.mark.parametrize("name", ["synthetic", "synthetic_irn", "voc_irn_resnet50",
                                  "voc_resnet38", "voc_vgg16"])
@pytest.mark.parametrize("variant", ["", ":tiny"])
def test_a_name_loads_the_same_config_as_its_path(name, variant):
  by_name = config.load_config(name + variant)
  by_path = config.load_config(os.path.join(CONFIGS, f"{name}.py{variant}"))
  assert by_name.to_dict() == by_path.to_dict()
  if variant:  # the variant reached get_config: it differs from the default
    assert by_name.to_dict() != config.load_config(name).to_dict()


@pytest.mark.parametrize("spec, message", [
    ("synthetc", r"unknown config 'synthetc'; shipped configs: synthetic, synthetic_irn, "
                 r"voc_irn_resnet50, voc_resnet38, voc_vgg16"),
    ("synthetic:huge", r"unknown variant 'huge'"),
    ("nowhere/synthetic.py:tiny", r"config file 'nowhere/synthetic.py' not found \(or name a "
                                  r"shipped config: synthetic, "),
    ("synthetic.py", r"config file 'synthetic.py' not found"),
])
def test_a_bad_config_spec_is_a_config_error(spec, message, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ or synthetic.py here
  with pytest.raises(ConfigError, match=message):
    config.load_config(spec)


def test_a_path_outside_configs_still_loads_and_can_load_a_shipped_config(tmp_path):
  # A user's own file builds on a shipped one by its name.
  own = tmp_path / "mine.py"
  own.write_text("from affinity_jax import config\n\n"
                 "def get_config(arg=None):\n"
                 "  c = config.load_config('synthetic:tiny')\n"
                 "  c.seed = 7\n"
                 "  return c\n")
  cfg = config.load_config(f"{own}")
  assert cfg.seed == 7 and cfg.data.name == "synthetic_wsss"


def test_epochs_count_whole_batches_as_the_originals():
  """(examples // batch) * epochs (PSA's train_cls.py, IRN's train_irn.py): VOC's 10,582 images
  in batches of 32 for 3 epochs are 990 steps (3 * 10582 // 32 would be 992)."""
  from affinity_jax.stages import training
  net = ml_collections.ConfigDict(dict(steps=-1, epochs=3, batch_size=32))
  assert training.steps_for(net, 10582) == 990
  net.steps = 7
  assert training.steps_for(net, 10582) == 7
