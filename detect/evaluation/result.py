"""The result every metric returns: per-class AP, mAP, PR curves and metric-specific numbers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class DetectionEvalResult:
    """``ap[c]`` is NaN for a class with no (non-difficult) ground truth; ``mean_ap`` averages the
    others. ``curves[c]`` is ``(recall, precision)``; ``stats`` holds the headline numbers
    (``mAP`` always; COCO adds AP, AP50, AP75, APs/m/l, AR1/10/100, ARs/m/l)."""

    metric: str
    class_names: list[str]
    ap: list[float]
    num_positives: list[int]
    num_detections: list[int]
    mean_ap: float
    curves: list[tuple[np.ndarray, np.ndarray]] = field(repr=False)
    stats: dict[str, float] = field(default_factory=dict)
    summary_text: str = ""  # pycocotools' own printout for the coco metric

    def table(self) -> str:
        """Per-class AP table plus the mean, for printing."""
        width = max([len("class"), *(len(n) for n in self.class_names)])
        lines = [f"{'class':<{width}}  {'AP':>6}  {'GT':>6}  {'dets':>7}", "-" * (width + 25)]
        for name, ap, npos, ndet in zip(
            self.class_names, self.ap, self.num_positives, self.num_detections, strict=True
        ):
            shown = "   n/a" if math.isnan(ap) else f"{100 * ap:6.2f}"
            lines.append(f"{name:<{width}}  {shown}  {npos:>6}  {ndet:>7}")
        lines.append("-" * (width + 25))
        lines.append(f"{'mAP (' + self.metric + ')':<{width}}  {100 * self.mean_ap:6.2f}")
        return "\n".join(lines)

    def to_json_dict(self) -> dict:
        """JSON-ready dict (NaN as null), without the curves."""

        def clean(value: float) -> float | None:
            return None if math.isnan(value) else float(value)

        return {
            "metric": self.metric,
            "mAP": clean(self.mean_ap),
            "per_class": {
                name: {"AP": clean(ap), "num_positives": int(npos), "num_detections": int(ndet)}
                for name, ap, npos, ndet in zip(
                    self.class_names, self.ap, self.num_positives, self.num_detections, strict=True
                )
            },
            "stats": {k: clean(v) for k, v in self.stats.items()},
        }


def nan_mean(values: list[float]) -> float:
    valid = [v for v in values if not math.isnan(v)]
    return float(np.mean(valid)) if valid else float("nan")
