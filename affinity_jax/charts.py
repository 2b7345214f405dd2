"""Pictures of scores (PNG): per-class IoU bars of several rows, and a confusion matrix.

Drawn with matplotlib's Agg canvas on a `Figure` of its own (no pyplot state, no display), and
imported inside the functions, so that the command line and the stages start without it. Each
picture is written atomically (io.atomic_write). Inputs are evaluation.Scores (class_names,
confusion, unlabelled, iou(), miou()).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from affinity_jax import io


def _figure(width: float, height: float):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: str) -> None:
  from io import BytesIO  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  FigureCanvasAgg(fig)
  buf = BytesIO()
  fig.savefig(buf, format="png", metadata={"Software": None})
  io.atomic_write(path, buf.getvalue())


def iou_chart(path: str, rows: Sequence[tuple[str, object]], title: str = "IoU per class"
              ) -> None:
  """Grouped bars: for each class (and the mean, last) one bar per row `(label, scores)`; all
  rows score the same classes. A class without IoU in a row (absent from both sides) gets no
  bar."""
  names = list(rows[0][1].class_names) + ["mIoU"]
  groups = np.arange(len(names))
  width = 0.8 / len(rows)
  fig = _figure(max(6.0, 0.3 * len(names) * len(rows) + 2.0), 4.5)
  ax = fig.add_subplot()
  for i, (label, scores) in enumerate(rows):
    iou = np.append(scores.iou(), scores.miou()) * 100
    shown = ~np.isnan(iou)
    ax.bar(groups[shown] + (i - (len(rows) - 1) / 2) * width, iou[shown], width,
           label=f"{label}: mIoU {iou[-1]:.1f}")
  ax.set_xticks(groups, names, rotation=45, ha="right")
  ax.axvline(len(names) - 1.5, color="0.6", linewidth=0.8)
  ax.set_ylim(0, 100)
  ax.set_ylabel("IoU (%)")
  ax.set_title(title)
  ax.grid(axis="y", color="0.9")
  ax.set_axisbelow(True)
  ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
  _save(fig, path)


def confusion_picture(path: str, scores, title: str) -> None:
  """The confusion matrix, each ground-truth row as shares (%) of its pixels; a last column
  "none (255)" when predictions left pixels unlabelled."""
  counts = scores.confusion.astype(np.float64)
  columns = list(scores.class_names)
  if scores.unlabelled.any():
    counts = np.concatenate([counts, scores.unlabelled[:, None]], axis=1)
    columns.append("none (255)")
  totals = counts.sum(1, keepdims=True)
  share = 100 * counts / np.where(totals > 0, totals, 1)
  rows = list(scores.class_names)
  side = max(4.0, 0.42 * len(columns) + 2.5)
  fig = _figure(side + 1.0, max(3.5, 0.42 * len(rows) + 2.0))
  ax = fig.add_subplot()
  image = ax.imshow(share, cmap="Blues", vmin=0, vmax=100, aspect="auto")
  fig.colorbar(image, ax=ax, label="% of the ground-truth class")
  ax.set_xticks(np.arange(len(columns)), columns, rotation=45, ha="right")
  ax.set_yticks(np.arange(len(rows)), rows)
  ax.set_xlabel("prediction")
  ax.set_ylabel("ground truth")
  ax.set_title(title)
  if len(columns) <= 30:  # numbers stay legible up to VOC's 21 classes and beyond
    for (r, c), value in np.ndenumerate(np.round(share).astype(int)):
      if counts[r, c]:
        ax.text(c, r, str(value), ha="center", va="center", fontsize=7,
                color="white" if value > 60 else "black")
  _save(fig, path)
