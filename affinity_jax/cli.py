"""`affinity-jax`: the command line.

  affinity-jax run --config NAME|path.py[:variant] [--stages train_cam,infer_cam,...]
                   [--workdir DIR] [--config.key=value ...] [--debug]
                   [--coordinator HOST:PORT --num-processes N --process-id I]
                                           # one process of a multi-process run (distributed.py)
  affinity-jax launch --processes N [--cpu-devices K] -- run ...
                                           # N local processes of one run (launch.py)
  affinity-jax prepare --config NAME|path.py[:variant] [--config.key=value ...]
                                           # builds the dataset once, prints its split sizes
  affinity-jax demo [--workdir DIR]        # all stages on the synthetic default + results table
  affinity-jax evaluate --pred DIR (--gt DIR | --gt-dataset NAME | --config SPEC) [--split val]
                   [--data-dir D] [--manual-dir M] [--num-classes N | --class-names a,b,..]
                   [--out DIR] [--partial]   # mIoU of any label PNGs; JSON + confusion PNG
  affinity-jax predict (--workdir W | --seg-net DIR | --cam-net DIR --aff-net DIR)
                   --images PATH... --out DIR [--config SPEC] [--config.key=value ...]
                   [--method auto|seg|walk] [--crf|--no-crf] [--heatmaps] [--threshold 0.5]
                                           # label maps of your own images (predict.py)
  affinity-jax convert psa-pytorch IN.pth OUT_DIR --arch cam|affinity [--backbone vgg16]
  affinity-jax convert mxnet IN.params OUT_DIR
  affinity-jax convert caffe vgg16_20M.caffemodel OUT_DIR
  affinity-jax convert torchvision resnet50.pth|.npz OUT_DIR [--arch backbone|cam|relation]

User errors (a bad file, config key or dataset) print one message and exit with status 2; so
does a diverged run (NaN/Inf loss or network outputs: the message names the step and the last
good checkpoint, or the network to retrain). With --debug the traceback is shown too; with
--verbose the logs of TensorFlow, XLA, tfds and orbax, hidden by default. SIGTERM /
SIGINT during training save a checkpoint and exit with status 130; rerunning resumes. Anything
else is a bug: it shows its traceback and exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from affinity_jax.constants import ORIGINAL_ARCHS, PSA_BACKBONES
from affinity_jax.errors import REPORTED, TrainingInterrupted, UserError

REPORTED_OR_STOP = REPORTED + (TrainingInterrupted,)

DEMO_CONFIG = "synthetic"  # shipped with the package (configs/ as affinity_jax.configs)
CONFIG_HELP = ("a shipped config's name (e.g. synthetic, voc_resnet38) or a .py file, "
               "optionally with :variant (synthetic:tiny, configs/synthetic.py:tiny)")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="affinity-jax", description=__doc__.split("\n\n")[0])
  p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
  p.add_argument("--verbose", action="store_true",
                 help="show the logs of TensorFlow, XLA, tfds and orbax (hidden by default)")
  sub = p.add_subparsers(dest="command", required=True)

  run = sub.add_parser("run", help="run pipeline stages from a config")
  run.add_argument("--config", required=True, help=CONFIG_HELP)
  run.add_argument("--stages", default="all",
                   help="comma-separated stages (default: all, in order)")
  run.add_argument("--workdir", default=None, help="output folder (default: config.workdir)")
  run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
  run.add_argument("--coordinator", metavar="HOST:PORT",
                   help="one process of a multi-process run: the address of process 0's "
                        "coordination service (with --num-processes and --process-id); without "
                        "it, --config.distributed=True finds them in a Cloud TPU, SLURM or Open "
                        "MPI environment")
  run.add_argument("--num-processes", type=int, help="processes of the multi-process run")
  run.add_argument("--process-id", type=int, help="this process's index, 0 .. N-1")

  lau = sub.add_parser(
      "launch", help="start N local processes of one multi-process run (to try it on one "
      "machine)", description="Starts N processes of `affinity-jax run ...` on this machine as "
      "one multi-process run (coordinator on localhost), prints process 0's output, and stops "
      "them all when one fails. Example: affinity-jax launch --processes 2 --cpu-devices 2 -- "
      "run --config synthetic:tiny --workdir runs/two")
  lau.add_argument("--processes", type=int, required=True, help="number of processes")
  lau.add_argument("--cpu-devices", type=int, default=None,
                   help="run each process on K CPU devices (JAX_PLATFORMS=cpu); default: the "
                        "platform's own devices, which the processes must not share")
  lau.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
  lau.add_argument("--grace", type=float, default=30.0,
                   help="seconds the other processes get to stop by themselves after one "
                        "fails, before they are killed (default 30)")
  lau.add_argument("run_argv", nargs=argparse.REMAINDER, metavar="-- run ...",
                   help="-- run --config ... (the run command each process runs)")

  prep = sub.add_parser("prepare", help="build the config's dataset (before launching a run)")
  prep.add_argument("--config", required=True, help=CONFIG_HELP)
  prep.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

  demo = sub.add_parser("demo", help="every stage on the synthetic dataset, then the table")
  demo.add_argument("--workdir", default=None)
  demo.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

  ev = sub.add_parser("evaluate", help="mIoU of a folder of label PNGs against ground truth")
  ev.add_argument("--pred", required=True, help="folder of predicted label PNGs ({name}.png)")
  truth = ev.add_mutually_exclusive_group(required=True)
  truth.add_argument("--gt", help="folder of ground-truth label PNGs ({name}.png)")
  truth.add_argument("--gt-dataset", help="a dataset's masks: synthetic_wsss or voc2012_aug")
  truth.add_argument("--config", help="the masks of this config's dataset; " + CONFIG_HELP)
  ev.add_argument("--split", default="val", help="dataset split to score (default: val)")
  ev.add_argument("--data-dir", help="tfds data dir of --gt-dataset (default: tfds')")
  ev.add_argument("--manual-dir", help="folder with VOCdevkit/ to build voc2012_aug from")
  ev.add_argument("--dataset-config", help="which prepared config of --gt-dataset (default: "
                  "the only one prepared, or that of the run holding --pred)")
  ev.add_argument("--num-classes", type=int, help="with --gt: labels 0..N-1 (default: VOC's 21)")
  ev.add_argument("--class-names", help="with --gt: names of labels 0, 1, ... (comma-separated, "
                  "or a file with one a line; default: VOC's background + 20)")
  ev.add_argument("--out", help="folder for {pred}_eval.json and {pred}_confusion.png "
                  "(default: the folder holding --pred)")
  ev.add_argument("--partial", action="store_true",
                  help="score only images with both files, instead of stopping on a missing one")
  ev.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

  pr = sub.add_parser(
      "predict", help="label maps of your own images with a run's trained networks",
      description="Label maps of your own images (JPEG, PNG, ... of any size; greyscale, CMYK, "
      "alpha, 16-bit and EXIF-rotated images are read as a viewer shows them) with a run's "
      "segmentation network, or with its CAM network and AffinityNet (the method without the "
      "segmentation stage). Writes {stem}.png (VOC-palette label map: 0 background, c + 1 "
      "class c), {stem}_overlay.jpg and predict.json (per image, and the files skipped). "
      "Multi-scale and flips as the config's infer stages; see affinity_jax/predict.py.")
  pr.add_argument("--images", nargs="+", required=True, metavar="PATH",
                  help="image files, folders (their .jpg/.jpeg/.png/... files) or glob "
                       "patterns (quoted; ** for subfolders)")
  pr.add_argument("--out", required=True, help="output folder")
  pr.add_argument("--workdir", help="a workdir of `affinity-jax run`: its trained networks and "
                  "the config its last run recorded (config.json)")
  pr.add_argument("--seg-net", help="a segmentation network's checkpoint folder (W/seg_net/final)")
  pr.add_argument("--cam-net", help="a CAM network's checkpoint folder (with --aff-net)")
  pr.add_argument("--aff-net", help="an AffinityNet checkpoint folder (with --cam-net)")
  pr.add_argument("--method", choices=("auto", "seg", "walk"), default="auto",
                  help="seg: the segmentation network; walk: the CAM network's CAMs spread by "
                       "the random walk over AffinityNet's affinities; auto (default): seg "
                       "when there is a segmentation network, else walk")
  pr.add_argument("--config", help="default: the workdir's config.json (or that of the workdir "
                  "holding the networks); " + CONFIG_HELP)
  pr.add_argument("--crf", action=argparse.BooleanOptionalAction, default=None,
                  help="refine by dCRF (default: the config's seg_infer.crf or random_walk.crf)")
  pr.add_argument("--threshold", type=float, default=0.5,
                  help="walk: images come without image-level labels, so the CAM network's "
                       "own classification picks the classes to walk: those whose sigmoid "
                       "score exceeds this (default 0.5), and the top class always")
  pr.add_argument("--heatmaps", action="store_true",
                  help="walk: also write {stem}_cam.jpg and {stem}_rw.jpg, the CAMs' and the "
                       "walk's heat over the image")
  pr.add_argument("--batch-size", type=int, default=None, help="images per batch, a multiple "
                  "of the local devices (default: the config's seg_infer or random_walk one)")
  pr.add_argument("--max-side", type=int, default=1024,
                  help="longer images are resized down to this for the networks, their label "
                       "map brought back to their size (default 1024; 0: never)")
  pr.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

  conv = sub.add_parser("convert", help="convert the original's checkpoints")
  conv.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
  csub = conv.add_subparsers(dest="source", required=True)
  pt = csub.add_parser("psa-pytorch", help="a PSA .pth (resnet38_cls / _aff, vgg16_cls / _aff)")
  pt.add_argument("input")
  pt.add_argument("output")
  pt.add_argument("--arch", required=True, choices=ORIGINAL_ARCHS,
                  help="the original's network in the file (resnet38_cls / vgg16_cls, "
                       "resnet38_aff / vgg16_aff, resnet38d / vgg16d)")
  pt.add_argument("--backbone", choices=PSA_BACKBONES, default=None,
                  help="default: read from the file (conv1a: resnet38, conv1_1: vgg16)")
  mx = csub.add_parser("mxnet", help="the ImageNet ResNet-38 .params of ademxapp")
  mx.add_argument("input")
  mx.add_argument("output")
  cf = csub.add_parser("caffe", help="DeepLab's VGG-16 .caffemodel (vgg16_20M), without Caffe")
  cf.add_argument("input")
  cf.add_argument("output")
  tv = csub.add_parser("torchvision", help="torchvision's ResNet-50 .pth (or .npz), or IRN's "
                       "res50_cam.pth or res50_irn.pth")
  tv.add_argument("input")
  tv.add_argument("output")
  tv.add_argument("--arch", choices=("backbone", "cam", "relation"), default="backbone",
                  help="backbone (default: ImageNet weights, fc left out), cam (IRN's "
                       "res50_cam.pth, with its classifier) or relation (IRN's res50_irn.pth, "
                       "its boundary and displacement heads and mean shift)")
  return p


def _run(config_spec: str, stages: str, workdir: str | None, overrides: list[str],
         cluster: dict | None = None) -> None:
  from affinity_jax import config as config_lib
  from affinity_jax import distributed
  from affinity_jax import stages as stages_lib
  cfg = config_lib.load_config(config_spec)
  config_lib.apply_overrides(cfg, overrides)
  if workdir:
    cfg.workdir = workdir
  names = stages_lib.parse_stages(stages)
  cluster = {k: v for k, v in (cluster or {}).items() if v is not None}
  if cluster and len(cluster) < 3:
    raise UserError("give all of --coordinator, --num-processes and --process-id, or none")
  if cfg.distributed or cluster:
    distributed.initialize(cluster.get("coordinator"), cluster.get("num_processes"),
                           cluster.get("process_id"),
                           barrier_timeout_s=float(cfg.get("barrier_timeout_s",
                                                           distributed.DEFAULT_BARRIER_TIMEOUT_S)),
                           heartbeat_timeout_s=int(cfg.get("heartbeat_timeout_s",
                                                           distributed.DEFAULT_HEARTBEAT_TIMEOUT_S)))
    if not distributed.is_main():  # process 0 speaks for the run; errors still go to stderr
      sys.stdout = open(os.devnull, "w")  # pylint: disable=consider-using-with
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  stages_lib.run_stages(cfg, names)
  distributed.shutdown()


def _prepare(config_spec: str, overrides: list[str]) -> None:
  from affinity_jax import config as config_lib
  from affinity_jax import data
  cfg = config_lib.load_config(config_spec)
  config_lib.apply_overrides(cfg, overrides)
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  print(data.describe(data.from_config(cfg)))


def split_launch(argv: list[str]) -> tuple[list[str], list[str]]:
  """(launch's own arguments, the command each process runs) of `affinity-jax launch ...`:
  the command follows "--", or else starts at "run"; passed on untouched (--config.* too).
  Other commands: (argv, [])."""
  if "launch" not in argv:
    return argv, []
  after = argv.index("launch") + 1
  if "--" in argv[after:]:
    start = argv.index("--", after)
    return argv[:start], argv[start + 1:]
  if "run" in argv[after:]:
    start = argv.index("run", after)
    return argv[:start], argv[start:]
  return argv, []


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  # `launch ... -- run ...`: what follows "--" is each process's command line, untouched.
  argv, passed_on = split_launch(argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  # --verbose, like --config.*, goes before or after any subcommand.
  verbose = "--verbose" in argv
  args = _parser().parse_args([a for a in argv
                               if not a.startswith("--config.") and a != "--verbose"])
  if args.command == "launch":
    args.run_argv = passed_on or args.run_argv
    if overrides:
      print(f"affinity-jax: error: {' '.join(overrides)}: config overrides go after `run`, in "
            "the command every process runs", file=sys.stderr)
      return 2
  from affinity_jax import console  # before TensorFlow or JAX is imported
  console.setup(verbose)
  from affinity_jax import distributed
  try:
    if args.command == "run":
      _run(args.config, args.stages, args.workdir, overrides,
           {"coordinator": args.coordinator, "num_processes": args.num_processes,
            "process_id": args.process_id})
    elif args.command == "launch":
      from affinity_jax import launch
      return launch.main(args.processes, args.run_argv, cpu_devices=args.cpu_devices,
                         port=args.port, grace_s=args.grace)
    elif args.command == "prepare":
      _prepare(args.config, overrides)
    elif args.command == "demo":
      _run(DEMO_CONFIG, "all", args.workdir, overrides)
    elif args.command == "evaluate":
      from affinity_jax import evaluation
      evaluation.command(args.pred, gt=args.gt, gt_dataset=args.gt_dataset, config=args.config,
                         overrides=overrides, split=args.split, data_dir=args.data_dir,
                         manual_dir=args.manual_dir, dataset_config=args.dataset_config,
                         num_classes=args.num_classes, class_names=args.class_names,
                         out=args.out, partial=args.partial)
    elif args.command == "predict":
      from affinity_jax import predict
      predict.run(args, overrides)
    elif args.command == "convert":
      from affinity_jax import convert
      if args.source == "psa-pytorch":
        convert.convert_psa_pytorch(args.input, args.output, args.arch, args.backbone)
      elif args.source == "caffe":
        dropped = convert.convert_caffe(args.input, args.output)["dropped"]
        if dropped:
          print(f"left out layers outside the VGG-16 trunk: {', '.join(dropped)}")
      elif args.source == "torchvision":
        dropped = convert.convert_torchvision(args.input, args.output, args.arch)["dropped"]
        if dropped:
          print(f"left out: {', '.join(dropped)}")
      else:
        convert.convert_mxnet(args.input, args.output)
      print(f"wrote {args.output}")
  except TrainingInterrupted as e:
    print(f"affinity-jax: {e}", file=sys.stderr)
    return _stop(130, e)
  except REPORTED as e:
    if args.debug:
      traceback.print_exc()
    print(f"affinity-jax{_who()}: error: {e}", file=sys.stderr)
    if not args.debug:
      print("(run with --debug for the traceback)", file=sys.stderr)
    return _stop(2, e)
  except BaseException as e:  # a bug: its traceback, and the other processes told
    if distributed.count() > 1 and not isinstance(e, SystemExit):
      traceback.print_exc()
      return _stop(1, e)
    raise
  return 0


def _who() -> str:
  """" (process i of n)" in a multi-process run, whose processes all print their errors."""
  from affinity_jax import distributed
  return f" (process {distributed.index()} of {distributed.count()})" \
      if distributed.count() > 1 else ""


def _stop(status: int, error: BaseException) -> int:
  """`status` for main() to return; in a multi-process run the other processes are told why
  (unless they told this one) and this one ends at once (JAX's exit would wait for them at its
  shutdown barrier)."""
  from affinity_jax import distributed
  if distributed.count() > 1:
    message = None  # it heard of another's failure
    if not (isinstance(error, distributed.PeerFailure) and error.heard):
      message = str(error) if isinstance(error, REPORTED_OR_STOP) else (
          f"{type(error).__name__}: {error}")
    distributed.stop(status, message)
  return status


if __name__ == "__main__":
  sys.exit(main())
