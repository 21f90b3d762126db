"""How well proposals cover the ground truth: the paper's comparison, as numbers and a plot.

- recall at IoU t: the fraction of ground-truth boxes (difficult ones excluded, as in VOC) with at
  least one proposal of IoU >= t;
- MABO (Uijlings et al.): the best IoU any proposal reaches with a box, averaged over the boxes of
  each class, then over the classes;
- recall versus the number of proposals: the same recall using only each image's first n
  proposals (the methods' own ranking);
- proposals per image and extraction seconds per image (one core).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backbone.runtime.files import atomic_write, atomic_write_text
from detect.boxes import box_iou
from detect.datasets.records import DetectionRecord

CURVE_COUNTS = (1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 1000, 2000, 5000)


def best_overlaps(gt: np.ndarray, proposals: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """``(G, len(counts))``: each box's best IoU among the first ``n`` proposals, for each ``n``."""
    if len(gt) == 0:
        return np.zeros((0, len(counts)))
    if len(proposals) == 0:
        return np.zeros((len(gt), len(counts)))
    iou = box_iou(torch.from_numpy(gt).double(), torch.from_numpy(proposals).double())
    running_best = torch.cummax(iou, dim=1).values.numpy()  # best over proposals 0..j
    columns = [min(n, len(proposals)) - 1 for n in counts]
    return running_best[:, columns]


def coverage_stats(
    records: Sequence[DetectionRecord],
    boxes: Iterable[np.ndarray],
    seconds: np.ndarray,
    iou_thresholds: Sequence[float] = (0.5, 0.7),
    counts: Sequence[int] = CURVE_COUNTS,
) -> dict[str, Any]:
    """Coverage of ``records``' ground truth by the ranked ``boxes`` (aligned with ``records``), in one
    pass over them: a cache's proposals are read one image at a time."""
    all_counts = [*counts, sys.maxsize]  # the last column: every proposal
    per_box, labels, per_image = [], [], []
    for record, proposals in zip(records, boxes, strict=True):
        keep = ~record.difficult if len(record.difficult) else np.ones(len(record.boxes), bool)
        per_box.append(best_overlaps(record.boxes[keep], proposals, all_counts))
        labels.append(record.labels[keep])
        per_image.append(len(proposals))
    best = np.concatenate(per_box) if per_box else np.zeros((0, len(all_counts)))
    label = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    final = best[:, -1]
    n = max(len(final), 1)
    stats: dict[str, Any] = {
        "images": len(records),
        "gt_boxes": int(len(final)),
        "proposals_per_image": float(np.mean(per_image)) if per_image else 0.0,
        "seconds_per_image": float(np.mean(seconds)) if len(seconds) else 0.0,
        "mabo": float(np.mean([final[label == c].mean() for c in np.unique(label)])) if len(final) else 0.0,
    }
    for t in iou_thresholds:
        stats[f"recall@{t:g}"] = float((final >= t).sum() / n)
        stats[f"curve@{t:g}"] = {str(c): float((best[:, i] >= t).sum() / n) for i, c in enumerate(counts)}
    return stats


def format_table(results: Mapping[str, Mapping[str, Any]], title: str) -> str:
    """Plain-text table, one row per method."""
    width = max([len(name) for name in results] + [6])
    columns = f"{'recall@0.5':>10s} {'recall@0.7':>10s} {'MABO':>6s} {'props/img':>9s} {'s/img':>6s}"
    header = f"{'method':{width}s} {columns}"
    lines = [title, header, "-" * len(header)]
    for name, s in results.items():
        lines.append(
            f"{name:{width}s} {100 * s['recall@0.5']:9.1f}% {100 * s['recall@0.7']:9.1f}% {s['mabo']:6.3f} "
            f"{s['proposals_per_image']:9.1f} {s['seconds_per_image']:6.3f}"
        )
    return "\n".join(lines)


def plot_recall_curves(results: Mapping[str, Mapping[str, Any]], path: str | Path, title: str) -> None:
    """Recall at IoU 0.5 and 0.7 against the number of proposals per image (log x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for ax, t in zip(axes[0], ("0.5", "0.7"), strict=True):
        for name, s in results.items():
            curve = s[f"curve@{t}"]
            # Beyond a method's own count the curve is flat: stop there, so the count shows.
            xs = [int(c) for c in curve if int(c) < s["proposals_per_image"]]
            ys = [100 * curve[str(x)] for x in xs]
            # The last point: every proposal (at the method's mean count per image).
            xs.append(max(s["proposals_per_image"], 1))
            ys.append(100 * s[f"recall@{t}"])
            ax.plot(xs, ys, "o-", markersize=3, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("proposals per image (first n)")
        ax.set_ylabel(f"recall at IoU {t} (%)")
        ax.set_ylim(0, 101)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=100))
    finally:
        plt.close(fig)


def write_report(
    results: Mapping[str, Mapping[str, Any]],
    out_dir: str | Path,
    title: str,
    extra: dict,
    notes: Sequence[str] = (),
) -> str:
    """``report.txt``, ``report.json`` and ``recall_curves.png`` in ``out_dir``; returns the table
    (with ``notes``, e.g. why a method is missing, one ``note:`` line each under it)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = "\n".join([format_table(results, title), *(f"note: {note}" for note in notes)])
    atomic_write_text(out_dir / "report.txt", table + "\n")
    payload = {"title": title, **extra, "notes": list(notes), "methods": results}
    atomic_write_text(out_dir / "report.json", json.dumps(payload, indent=1) + "\n")
    plot_recall_curves(results, out_dir / "recall_curves.png", title)
    return table
