"""Average precision from a ranked list of true/false positives, as the Pascal VOC devkit computes it.

Both integrations follow VOCevaldet.m / VOCap.m step by step, including their floating-point
order, so the numbers agree with the MATLAB devkit to the last printed digit:

* ``voc07`` (11-point): ``for t = 0:0.1:1, ap = ap + max(prec(rec >= t)) / 11``. The sample points
  are the doubles MATLAB's colon operator yields (first half ``k * 0.1``, second half
  ``1 - (10 - k) * 0.1``, the middle ``(0 + 1) / 2``). py-faster-rcnn and detectron2 use
  ``np.arange(0, 1.1, 0.1)`` instead, whose 0.6 and 0.7 are one ulp larger
  (0.6000000000000001, 0.7000000000000001): a recall of exactly 3/5 then misses the 0.6 sample there.
* ``voc`` (all-point, VOC 2010+): precision made monotone from the right, summed over the recall
  steps; sums are sequential (``cumsum``), as MATLAB's ``sum`` over a vector is.
"""

from __future__ import annotations

import numpy as np

# MATLAB's 0:0.1:1 (symmetric colon algorithm), see the module docstring.
VOC07_RECALL_POINTS: tuple[float, ...] = (
    *(k * 0.1 for k in range(5)),
    (0.0 + 1.0) / 2,
    *(1.0 - (10 - k) * 0.1 for k in range(6, 11)),
)


def precision_recall(tp: np.ndarray, fp: np.ndarray, num_positives: int) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative recall and precision along a ranked list (``tp``/``fp`` are 0/1 per detection).

    Detections matched to a difficult object have ``tp = fp = 0``; where nothing has been counted yet
    precision is 0 (the devkit's NaN there never reaches the AP: the envelope replaces it).
    """
    tp_cum = np.cumsum(tp, dtype=np.float64)
    fp_cum = np.cumsum(fp, dtype=np.float64)
    recall = tp_cum / float(num_positives)
    counted = tp_cum + fp_cum
    precision = np.divide(tp_cum, counted, out=np.zeros_like(tp_cum), where=counted > 0)
    return recall, precision


def average_precision_all_point(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOCap.m: area under the monotone precision envelope."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    terms = (mrec[steps] - mrec[steps - 1]) * mpre[steps]
    return float(np.cumsum(terms)[-1]) if terms.size else 0.0


def average_precision_11_point(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC 2007's 11-point interpolated AP."""
    ap = 0.0
    for t in VOC07_RECALL_POINTS:
        reached = precision[recall >= t]
        ap = ap + (float(reached.max()) if reached.size else 0.0) / 11
    return ap
