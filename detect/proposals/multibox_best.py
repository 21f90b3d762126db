"""Which MultiBox weights to export: the best validated epoch, judged against the k-means priors alone.

Training can end worse than it started (on a small set from a weak classifier, held-out recall@200
fell from 89% to 58%), so ``tools/train_multibox.py`` exports the epoch with the best validation
recall, kept by :class:`BestEpoch` in the run directory so that a stop and ``--resume`` keeps the
choice, and measures the priors as a proposer of their own (:func:`priors_recall`): an untrained
head predicts exactly them, which is the bar training has to clear.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.cluster.vq import vq
from torch import nn

from backbone.runtime.checkpoint import load_checkpoint
from backbone.runtime.dist import is_main_process
from backbone.runtime.files import atomic_torch_save
from detect.proposals.multibox import recall_at_k

logger = logging.getLogger(__name__)
BEST_FILE = "best.pt"


def prior_counts(priors: np.ndarray, train_boxes: np.ndarray) -> np.ndarray:
    """How many training boxes each prior is the nearest of (k-means's distance): the priors' ranking."""
    if len(train_boxes) == 0:
        return np.zeros(len(priors), np.int64)
    codes, _ = vq(np.asarray(train_boxes, np.float64), np.asarray(priors, np.float64))
    return np.bincount(codes, minlength=len(priors))


def priors_recall(
    priors: np.ndarray, counts: np.ndarray, targets: Sequence[np.ndarray], top_ks: Sequence[int]
) -> dict[str, float]:
    """Recall (percent, IoU 0.5) of ``targets`` (normalised boxes per image) by the priors alone, the
    commonest first, under the keys ``evaluate_multibox`` uses (``recall@k``)."""
    if not targets:
        return {f"recall@{k}": 0.0 for k in top_ks}
    boxes = torch.from_numpy(np.asarray(priors, np.float32))[None].expand(len(targets), -1, -1)
    scores = torch.from_numpy(np.asarray(counts, np.float32))[None].expand(len(targets), -1)
    gt = [torch.from_numpy(np.asarray(t, np.float32).reshape(-1, 4)) for t in targets]
    out = {}
    for k in top_ks:
        hits, total = recall_at_k(boxes, scores, gt, k)
        out[f"recall@{k}"] = 100.0 * hits / max(total, 1)
    return out


class BestEpoch:
    """The evaluated epoch with the highest validation ``key`` so far, its metrics and (rank 0) its
    weights in ``run_dir/best.pt``, written atomically when an evaluation beats it.

    The file is written just before fit checkpoints that epoch. A resumed run reads it back, so the
    choice survives a stop; a run stopped between the two writes redoes the epoch, and deterministic
    training reaches the same weights and recall again, so the stored file stands. A ``resume=False``
    run deletes an earlier run's file. Epochs that are not evaluated (``eval_every``) cannot be chosen.
    """

    def __init__(self, run_dir: str | Path, key: str, resume: bool) -> None:
        self.path = Path(run_dir) / BEST_FILE
        self.key = key
        self.epoch: int | None = None
        self.metrics: dict[str, float] = {}
        if not is_main_process():  # only rank 0 writes and exports; the others need no state
            return
        if not resume:
            self.path.unlink(missing_ok=True)
        elif not self.path.is_file():
            logger.warning("%s not found: the best epoch is chosen among those evaluated from now", self.path)
        else:
            state = load_checkpoint(self.path)
            if key in state["metrics"]:
                self.epoch, self.metrics = int(state["epoch"]), dict(state["metrics"])
                logger.info("best so far: epoch %d, val %s %.1f%%", self.epoch, key, self.metrics[key])
            else:
                logger.warning("%s holds no val %s (config changed): not used", self.path, key)

    def update(self, model: nn.Module, metrics: Mapping[str, float], epoch: int) -> bool:
        """Keep ``model``'s weights if ``metrics[key]`` beats the best so far (ties keep the earlier)."""
        if self.epoch is not None and metrics[self.key] <= self.metrics[self.key]:
            return False
        self.epoch, self.metrics = epoch, dict(metrics)
        if is_main_process():
            weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            state = {"epoch": epoch, "key": self.key, "metrics": self.metrics, "model": weights}
            atomic_torch_save(state, self.path)
            logger.info("epoch %d: best val %s so far, %.1f%%", epoch, self.key, metrics[self.key])
        return True

    def weights(self) -> dict[str, torch.Tensor]:
        return load_checkpoint(self.path)["model"]


def compare_with_priors(
    key: str, epoch: int, epochs: int, best: Mapping[str, float], priors: Mapping[str, float]
) -> tuple[bool, str]:
    """Whether the best epoch beat the priors alone on ``key`` (a tie does not), and a line with both."""
    trained, alone = best[key], priors[key]
    return trained > alone, f"val {key} {trained:.1f}% (epoch {epoch} of {epochs}), priors alone {alone:.1f}%"
