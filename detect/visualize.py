"""Pictures for people: boxes drawn on images, precision-recall curves as PNG files."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from backbone.image_io import ImageDecodeError, read_image_rgb  # noqa: E402
from backbone.runtime.files import atomic_write  # noqa: E402

logger = logging.getLogger(__name__)

_PALETTE = np.array(
    [
        (230, 25, 75),
        (60, 180, 75),
        (255, 225, 25),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
    ]
    + [(240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0)],
    np.uint8,
)


def class_colour(label: int) -> tuple[int, int, int]:
    r, g, b = _PALETTE[label % len(_PALETTE)]
    return int(r), int(g), int(b)


def draw_boxes(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    scores: np.ndarray | None = None,
    thickness: int = 2,
) -> np.ndarray:
    """A copy of the ``(H, W, 3)`` uint8 RGB ``image`` with xyxy ``boxes`` and their class (and score)."""
    canvas = np.ascontiguousarray(image).copy()
    for k, (box, label) in enumerate(zip(np.asarray(boxes).reshape(-1, 4), np.asarray(labels), strict=True)):
        colour = class_colour(int(label))
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        cv2.rectangle(canvas, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), colour, thickness)
        text = class_names[int(label)] + (f" {float(scores[k]):.2f}" if scores is not None else "")
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
        top = max(y1 - th - 4, 0)
        cv2.rectangle(canvas, (x1, top), (x1 + tw + 4, top + th + 4), colour, -1)
        cv2.putText(
            canvas, text, (x1 + 2, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA
        )
    return canvas


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "class"


def save_pr_curves(
    curves: list[tuple[np.ndarray, np.ndarray]],
    ap: list[float],
    class_names: list[str],
    out_dir: str | Path,
    title: str = "",
) -> list[Path]:
    """One PNG per class (``pr_<index>_<name>.png``) with its precision-recall curve and AP."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, ((recall, precision), value, name) in enumerate(zip(curves, ap, class_names, strict=True)):
        fig, axis = plt.subplots(figsize=(4.5, 4), dpi=100)
        if len(recall):
            axis.step(recall, precision, where="post", color="tab:blue")
        label = "n/a (no ground truth)" if np.isnan(value) else f"{100 * value:.2f}"
        axis.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
        axis.set_title(f"{title} {name}: AP {label}".strip(), fontsize=10)
        axis.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"pr_{index:03d}_{_file_safe(name)}.png"
        # Atomic: a run killed mid-write leaves no half PNG.
        atomic_write(path, lambda handle, fig=fig: fig.savefig(handle, format="png"))
        plt.close(fig)
        written.append(path)
    return written


def save_detection_pictures(
    records,
    predictions: dict[int, dict],
    class_names: list[str],
    out_dir: str | Path,
    *,
    max_images: int = 8,
    score_threshold: float = 0.3,
) -> list[Path]:
    """For the first ``max_images`` records: ground truth (left) beside the detections scoring at
    least ``score_threshold`` (right), one PNG each. ``predictions``: image id -> boxes, scores, labels."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for record in list(records)[:max_images]:
        try:
            image = read_image_rgb(record.file_name)
        except ImageDecodeError as err:  # pictures come after the work: never fatal
            logger.warning("no picture for %s (%s)", err.path, err.problem)
            continue
        pred = predictions.get(int(record.image_id), {})
        scores = np.asarray(pred.get("scores", np.zeros(0)), np.float32)
        keep = scores >= score_threshold
        boxes = np.asarray(pred.get("boxes", np.zeros((0, 4))), np.float32).reshape(-1, 4)[keep]
        labels = np.asarray(pred.get("labels", np.zeros(0)), np.int64)[keep]
        truth = draw_boxes(image, record.boxes, record.labels, class_names)
        found = draw_boxes(image, boxes, labels, class_names, scores[keep])
        gap = np.full((image.shape[0], 8, 3), 255, np.uint8)
        path = out_dir / f"{_file_safe(Path(record.file_name).stem)}.png"
        cv2.imwrite(str(path), np.concatenate([truth, gap, found], axis=1)[:, :, ::-1])
        written.append(path)
    return written
