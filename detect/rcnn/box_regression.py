"""R-CNN's class-specific bounding-box regression: ridge on pooled features, applied once at test time.

Targets (R-CNN appendix C): for a proposal P (centre x, y, size w, h) and its ground truth G,
``t = ((Gx - Px) / Pw, (Gy - Py) / Ph, log(Gw / Pw), log(Gh / Ph))``; one ridge regression per
class maps the region's pooled features (plus a bias) to t, trained on proposals with IoU > 0.6.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detect.boxes import box_iou


def _centres(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w = (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-3)
    h = (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-3)
    return boxes[:, 0] + w / 2, boxes[:, 1] + h / 2, w, h


def encode_boxes(proposals: Tensor, targets: Tensor) -> Tensor:
    px, py, pw, ph = _centres(proposals)
    gx, gy, gw, gh = _centres(targets)
    return torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=1)


def decode_boxes(proposals: Tensor, deltas: Tensor, max_log_scale: float = 4.0) -> Tensor:
    """Inverse of :func:`encode_boxes`; ``deltas`` ``(N, ..., 4)`` broadcast over the proposals."""
    px, py, pw, ph = (v.reshape(-1, *([1] * (deltas.dim() - 2))) for v in _centres(proposals))
    cx = px + deltas[..., 0] * pw
    cy = py + deltas[..., 1] * ph
    w = pw * torch.exp(deltas[..., 2].clamp(max=max_log_scale))
    h = ph * torch.exp(deltas[..., 3].clamp(max=max_log_scale))
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


class BoxRegressor(nn.Module):
    """``weight`` ``(C, D + 1, 4)``: per class, scaled features (and a bias column) to box deltas.
    ``feature_scale`` brings the training features to a mean norm of 20 (R-CNN's scaling), so one
    ridge strength suits any backbone."""

    def __init__(self, weight: Tensor, feature_scale: float | Tensor = 1.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("feature_scale", torch.as_tensor(feature_scale, dtype=torch.float32))

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, features: Tensor, proposals: Tensor) -> Tensor:
        """Refined boxes ``(N, C, 4)`` for every proposal and class."""
        features = features * self.feature_scale.to(features.dtype)
        x = torch.cat([features, features.new_ones(len(features), 1)], dim=1)
        deltas = torch.einsum("nd,cdk->nck", x.to(self.weight.dtype), self.weight)
        return decode_boxes(proposals, deltas)


def fit_box_regressor(
    features: Tensor,
    proposals: Tensor,
    targets: Tensor,
    labels: Tensor,
    num_classes: int,
    ridge: float = 1000.0,
) -> BoxRegressor:
    """Closed-form ridge per class (the bias unpenalised); a class without samples predicts no shift."""
    dim = features.shape[1]
    scale = 20.0 / float(features.norm(dim=1).mean().clamp(min=1e-6)) if len(features) else 1.0
    features = features * scale
    x_all = torch.cat([features, features.new_ones(len(features), 1)], dim=1).double()
    t_all = encode_boxes(proposals, targets).double()
    weight = torch.zeros(num_classes, dim + 1, 4, dtype=torch.float64)
    penalty = torch.eye(dim + 1, dtype=torch.float64) * ridge
    penalty[dim, dim] = 0.0
    for c in range(num_classes):
        mask = labels == c
        if int(mask.sum()) == 0:
            continue
        x, t = x_all[mask], t_all[mask]
        weight[c] = torch.linalg.solve(
            x.T @ x + penalty + 1e-6 * torch.eye(dim + 1, dtype=torch.float64), x.T @ t
        )
    return BoxRegressor(weight.float(), scale)


@torch.no_grad()
def collect_regression_samples(
    model, samples, min_iou: float = 0.6, max_per_image: int = 64, channels_last: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pooled features, proposals, matched ground truth and class of every proposal with IoU >
    ``min_iou`` (at most ``max_per_image`` per image, the highest IoU first), in the downscaled
    images' pixels. ``samples`` yields ``(image (3, h, w), proposals (P, 4), gt_boxes (G, 4),
    gt_labels (G,))`` with every box in that image's pixels."""
    model.eval()
    device = next(model.parameters()).device
    parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for image, proposals, gt_boxes, gt_labels in samples:
        if len(proposals) == 0 or len(gt_boxes) == 0:
            continue
        iou = box_iou(proposals, gt_boxes)
        best, match = iou.max(dim=1)
        order = torch.argsort(best, descending=True)
        order = order[best[order] > min_iou][:max_per_image]
        if len(order) == 0:
            continue
        boxes = proposals[order]
        batch = image[None].to(device)
        batch = batch.contiguous(memory_format=torch.channels_last) if channels_last else batch
        rois = torch.cat([boxes.new_zeros((len(boxes), 1)), boxes], dim=1).to(device)
        feats = model.pooled_features(batch, rois).float().cpu()
        parts.append((feats, boxes, gt_boxes[match[order]], gt_labels[match[order]]))
    if not parts:
        empty = torch.zeros(0, 4)
        return torch.zeros(0, 1024), empty, empty, torch.zeros(0, dtype=torch.int64)
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))  # type: ignore[return-value]
