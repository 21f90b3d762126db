"""R-CNN's class-specific linear SVMs on pooled features, with hard-negative mining (optional extra).

Positives of class c: its ground-truth boxes; negatives: proposals with IoU < 0.3 to every box of
class c. Features are scaled to a mean norm of 20 (R-CNN). Each SVM minimises
``0.5 * reg * |w|^2 + mean(squared hinge)`` with L-BFGS; mining starts from a random subset of the
negatives and adds, each round, the negatives inside the margin (score > -1), as
``train_svms.py: SVMTrainer.train_with_hard_negatives`` does.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)


class LinearSVMs(nn.Module):
    """``weight`` ``(C, D + 1)``; ``forward`` gives ``(N, C + 1)`` pseudo-probabilities (sigmoid of the
    margins, background = 1 - max) so the detector's postprocessing applies unchanged."""

    def __init__(self, weight: Tensor, feature_scale: float | Tensor = 1.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("feature_scale", torch.as_tensor(feature_scale, dtype=torch.float32))

    def margins(self, features: Tensor) -> Tensor:
        x = features.float() * self.feature_scale
        return x @ self.weight[:, :-1].T + self.weight[:, -1]

    def forward(self, features: Tensor) -> Tensor:
        scores = torch.sigmoid(self.margins(features))
        return torch.cat([scores, 1 - scores.max(dim=1, keepdim=True).values], dim=1)


def _train_one(x: Tensor, y: Tensor, reg: float, iterations: int = 100) -> Tensor:
    """Squared-hinge linear SVM (bias unpenalised) on ``x`` with labels ``y`` in {-1, +1}."""
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    xb = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    y = y.double()
    optimizer = torch.optim.LBFGS([w], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        hinge = (1 - y * (xb @ w)).clamp(min=0)
        loss = 0.5 * reg * (w[:-1] ** 2).sum() + (hinge**2).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach().float()


def fit_svms(
    positives: Tensor,
    positive_labels: Tensor,
    negatives: Tensor,
    negative_max_iou: Tensor,
    num_classes: int,
    *,
    reg: float = 1e-3,
    neg_iou: float = 0.3,
    initial_negatives: int = 2000,
    rounds: int = 3,
    seed: int = 0,
) -> LinearSVMs:
    """``negative_max_iou`` ``(N, C)``: each negative's highest IoU with a box of each class."""
    all_features = torch.cat([positives, negatives])
    scale = 20.0 / float(all_features.norm(dim=1).mean().clamp(min=1e-6)) if len(all_features) else 1.0
    positives, negatives = positives.float() * scale, negatives.float() * scale
    gen = torch.Generator().manual_seed(seed)
    weight = torch.zeros(num_classes, positives.shape[1] + 1)
    for c in range(num_classes):
        pos = positives[positive_labels == c]
        pool = torch.nonzero(negative_max_iou[:, c] < neg_iou).flatten()
        if len(pos) == 0 or len(pool) == 0:
            continue
        active = pool[torch.randperm(len(pool), generator=gen)[:initial_negatives]]
        for _ in range(rounds):
            x = torch.cat([pos, negatives[active]])
            y = torch.cat([torch.ones(len(pos)), -torch.ones(len(active))])
            weight[c] = _train_one(x, y, reg)
            margins = negatives[pool] @ weight[c, :-1] + weight[c, -1]
            hard = pool[margins > -1.0]
            new = hard[~torch.isin(hard, active)]
            if len(new) == 0:
                break
            active = torch.cat([active, new])
        logger.info("SVM %d: %d positives, %d negatives after mining", c, len(pos), len(active))
    return LinearSVMs(weight, scale)
