"""`affinity-jax`: the command line.

  affinity-jax run --config configs/synthetic.py[:variant] [--stages train_cam,infer_cam,...]
                   [--workdir DIR] [--config.key=value ...] [--debug]
  affinity-jax demo [--workdir DIR]        # all stages on the synthetic default + results table
  affinity-jax convert psa-pytorch IN.pth OUT_DIR --arch cam|affinity [--backbone vgg16]
  affinity-jax convert mxnet IN.params OUT_DIR
  affinity-jax convert caffe vgg16_20M.caffemodel OUT_DIR

User errors (a bad file, config key or dataset) print one message and exit with status 2; so
does a diverged run (NaN/Inf loss or network outputs: the message names the step and the last
good checkpoint, or the network to retrain). With --debug the traceback is shown too. SIGTERM /
SIGINT during training save a checkpoint and exit with status 130; rerunning resumes. Anything
else is a bug: it shows its traceback and exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from affinity_jax.constants import BACKBONES, ORIGINAL_ARCHS

DEMO_CONFIG = "configs/synthetic.py"


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="affinity-jax", description=__doc__.split("\n\n")[0])
  p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
  sub = p.add_subparsers(dest="command", required=True)

  run = sub.add_parser("run", help="run pipeline stages from a config")
  run.add_argument("--config", required=True, help="configs/X.py or configs/X.py:variant")
  run.add_argument("--stages", default="all",
                   help="comma-separated stages (default: all, in order)")
  run.add_argument("--workdir", default=None, help="output folder (default: config.workdir)")
  run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

  demo = sub.add_parser("demo", help="every stage on the synthetic dataset, then the table")
  demo.add_argument("--workdir", default=None)
  demo.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

  conv = sub.add_parser("convert", help="convert the original's checkpoints")
  conv.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
  csub = conv.add_subparsers(dest="source", required=True)
  pt = csub.add_parser("psa-pytorch", help="a PSA .pth (resnet38_cls / _aff, vgg16_cls / _aff)")
  pt.add_argument("input")
  pt.add_argument("output")
  pt.add_argument("--arch", required=True, choices=ORIGINAL_ARCHS,
                  help="the original's network in the file (resnet38_cls / vgg16_cls, "
                       "resnet38_aff / vgg16_aff, resnet38d / vgg16d)")
  pt.add_argument("--backbone", choices=tuple(BACKBONES), default=None,
                  help="default: read from the file (conv1a: resnet38, conv1_1: vgg16)")
  mx = csub.add_parser("mxnet", help="the ImageNet ResNet-38 .params of ademxapp")
  mx.add_argument("input")
  mx.add_argument("output")
  cf = csub.add_parser("caffe", help="DeepLab's VGG-16 .caffemodel (vgg16_20M), without Caffe")
  cf.add_argument("input")
  cf.add_argument("output")
  return p


def _run(config_spec: str, stages: str, workdir: str | None, overrides: list[str]) -> None:
  from affinity_jax import config as config_lib
  from affinity_jax import stages as stages_lib
  cfg = config_lib.load_config(config_spec)
  config_lib.apply_overrides(cfg, overrides)
  if workdir:
    cfg.workdir = workdir
  if cfg.distributed:
    import jax
    jax.distributed.initialize()
  names = stages_lib.parse_stages(stages)
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  stages_lib.run_stages(cfg, names)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  args = _parser().parse_args([a for a in argv if not a.startswith("--config.")])
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from affinity_jax.errors import REPORTED, TrainingInterrupted
  try:
    if args.command == "run":
      _run(args.config, args.stages, args.workdir, overrides)
    elif args.command == "demo":
      here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
      _run(os.path.join(here, DEMO_CONFIG), "all", args.workdir, overrides)
    elif args.command == "convert":
      from affinity_jax import convert
      if args.source == "psa-pytorch":
        convert.convert_psa_pytorch(args.input, args.output, args.arch, args.backbone)
      elif args.source == "caffe":
        dropped = convert.convert_caffe(args.input, args.output)["dropped"]
        if dropped:
          print(f"left out layers outside the VGG-16 trunk: {', '.join(dropped)}")
      else:
        convert.convert_mxnet(args.input, args.output)
      print(f"wrote {args.output}")
  except TrainingInterrupted as e:
    print(f"affinity-jax: {e}", file=sys.stderr)
    return 130
  except REPORTED as e:
    if args.debug:
      traceback.print_exc()
    print(f"affinity-jax: error: {e}", file=sys.stderr)
    if not args.debug:
      print("(run with --debug for the traceback)", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
