"""Vectorised matching of ranked detections to ground truth: the VOC and the ILSVRC DET rules.

Detections come in *rank order* (by class, then descending score), so "earlier" means "higher
score, same class". Only (detection, ground truth) pairs of the same image and class that pass the
IoU threshold matter; they are built in bounded chunks (memory stays flat however many detections
there are) and everything after that works on those few pairs.

* VOC (VOCevaldet.m): each detection looks at the ground truth of highest IoU (over all objects,
  taken or not; first object wins ties). IoU >= threshold and the object not yet taken: true
  positive; taken: false positive; difficult: ignored. Whether an object is taken depends only on
  which earlier detection had it as best match, so the first claimant per object is the true
  positive: one ``np.unique`` call.
* ILSVRC (eval_det.m): each detection takes the highest-IoU object that is still untaken and passes
  its own threshold ``min(0.5, wh / ((w + 10)(h + 10)))``. That is sequential, but resolvable in
  rounds: a detection's current best candidate stays its final choice unless an earlier unresolved
  detection could still take that object, so every round settles (at least) the first unresolved
  detection of each image and class, and in practice almost all of them at once.

IoU uses the devkit's formula and operation order, ``iw * ih / (area_det + area_gt - iw * ih)``,
without ``+ 1``: records are ``x1 = xmin - 1, x2 = xmax``, so ``x2 - x1`` is the devkit's
``xmax - xmin + 1`` and every term equals the devkit's (exactly, for integer boxes).
"""

from __future__ import annotations

import numpy as np

TP, FP, IGNORED = 1, 0, -1
PAIR_CHUNK = 2_000_000  # candidate pairs per chunk: ~100 MB of temporaries at most


def pair_iou(det: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of ``det[i]`` with ``gt[i]`` (float64, devkit operation order)."""
    iw = np.minimum(det[:, 2], gt[:, 2]) - np.maximum(det[:, 0], gt[:, 0])
    ih = np.minimum(det[:, 3], gt[:, 3]) - np.maximum(det[:, 1], gt[:, 1])
    overlap = (iw > 0) & (ih > 0)
    inter = np.where(overlap, iw * ih, 0.0)
    union = (det[:, 2] - det[:, 0]) * (det[:, 3] - det[:, 1]) + (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
    union = union - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=overlap & (union > 0))


def ilsvrc_thresholds(
    gt_boxes: np.ndarray, default: float = 0.5, pixel_tolerance: float = 10.0
) -> np.ndarray:
    """eval_det.m's per-object IoU threshold ``min(0.5, w * h / ((w + 10) * (h + 10)))``.

    ``w = x2 - x1`` here equals the devkit's ``xmax - xmin + 1``.
    """
    w = gt_boxes[:, 2] - gt_boxes[:, 0]
    h = gt_boxes[:, 3] - gt_boxes[:, 1]
    return np.minimum(default, (w * h) / ((w + pixel_tolerance) * (h + pixel_tolerance)))


def qualifying_pairs(
    start: np.ndarray,
    count: np.ndarray,
    det_boxes: np.ndarray,
    gt_boxes: np.ndarray,
    gt_thresholds: np.ndarray,
    chunk: int = PAIR_CHUNK,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(det index, gt index, IoU)`` of every candidate pair with IoU >= the object's threshold.

    Detection ``i``'s candidates are the objects ``start[i] : start[i] + count[i]`` (the objects of
    its image and class, contiguous in ``gt_boxes``).
    """
    ends = np.cumsum(count)
    out_det, out_gt, out_iou = [], [], []
    first = 0
    while first < len(count):
        done = ends[first - 1] if first else 0
        last = max(int(np.searchsorted(ends, done + chunk, side="right")), first + 1)
        counts = count[first:last]
        total = int(counts.sum())
        if total:
            det_idx = np.repeat(np.arange(first, last), counts)
            offset = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
            gt_idx = np.repeat(start[first:last], counts) + offset
            iou = pair_iou(det_boxes[det_idx], gt_boxes[gt_idx])
            keep = iou >= gt_thresholds[gt_idx]
            out_det.append(det_idx[keep])
            out_gt.append(gt_idx[keep])
            out_iou.append(iou[keep])
        first = last
    if not out_det:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    return np.concatenate(out_det), np.concatenate(out_gt), np.concatenate(out_iou)


def _best_first(
    pair_det: np.ndarray, pair_gt: np.ndarray, pair_iou_: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ordered by detection rank, then IoU descending, then object index (first wins ties)."""
    order = np.lexsort((pair_gt, -pair_iou_, pair_det))
    return pair_det[order], pair_gt[order]


def match_voc(
    num_dets: int, pair_det: np.ndarray, pair_gt: np.ndarray, pair_iou_: np.ndarray, gt_difficult: np.ndarray
) -> np.ndarray:
    """``(num_dets,)`` int8 status TP / FP / IGNORED under VOCevaldet.m's rule."""
    status = np.full(num_dets, FP, np.int8)
    if pair_det.size == 0:
        return status
    det_sorted, gt_sorted = _best_first(pair_det, pair_gt, pair_iou_)
    first = np.concatenate(([True], det_sorted[1:] != det_sorted[:-1]))
    best_det, best_gt = det_sorted[first], gt_sorted[first]  # best_det ascending
    difficult = gt_difficult[best_gt]
    status[best_det[difficult]] = IGNORED
    claim_det, claim_gt = best_det[~difficult], best_gt[~difficult]
    _, first_claim = np.unique(claim_gt, return_index=True)  # earliest detection per object
    status[claim_det[first_claim]] = TP
    return status


def match_ilsvrc(
    num_dets: int, pair_det: np.ndarray, pair_gt: np.ndarray, pair_iou_: np.ndarray, gt_difficult: np.ndarray
) -> np.ndarray:
    """``(num_dets,)`` int8 status under eval_det.m's greedy rule (pairs already pass thresholds).

    Difficult objects (absent from ILSVRC itself; present when scoring VOC-style data this way) are
    never taken, and a detection whose best available object is difficult is ignored, as in VOC.
    """
    status = np.full(num_dets, FP, np.int8)
    if pair_det.size == 0:
        return status
    det_alive, gt_alive = _best_first(pair_det, pair_gt, pair_iou_)
    num_gt = len(gt_difficult)
    taken = np.zeros(num_gt, bool)
    resolved = np.zeros(num_dets, bool)
    while det_alive.size:
        first = np.concatenate(([True], det_alive[1:] != det_alive[:-1]))
        cand_det, cand_gt = det_alive[first], gt_alive[first]  # each detection's current best object
        earliest = np.full(num_gt, num_dets, np.int64)
        np.minimum.at(earliest, gt_alive, det_alive)  # earliest unresolved detection wanting each object
        difficult = gt_difficult[cand_gt]
        final = difficult | (earliest[cand_gt] == cand_det)
        status[cand_det[final & difficult]] = IGNORED
        winners = final & ~difficult
        status[cand_det[winners]] = TP
        taken[cand_gt[winners]] = True
        resolved[cand_det[final]] = True
        keep = ~taken[gt_alive] & ~resolved[det_alive]
        det_alive, gt_alive = det_alive[keep], gt_alive[keep]
    return status
