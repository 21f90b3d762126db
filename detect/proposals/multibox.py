"""MultiBox (Erhan et al. 2014; Szegedy et al. 2014, arXiv 1412.1441): class-agnostic boxes from
GoogLeNet features.

A head on the backbone's ``forward_features`` predicts ``K`` boxes, each as an offset from a prior,
and ``K`` objectness logits. Priors are k-means centres of the training set's ground-truth boxes in
normalised ``xyxy`` coordinates (0..1 of the image width and height), so a box needs no anchor
grid and resizing the image to a square changes nothing about its target.

Training matches predictions to ground truth one-to-one (Hungarian, ``scipy``) with the cost
``alpha/2 * |l - g|^2 - log(c) + log(1 - c)``; as ``log(c / (1 - c))`` is the logit, the cost is
``alpha/2 * |l - g|^2 - logit``. The loss is ``alpha`` x the localisation term ``1/2 |l - g|^2`` of
the matched pairs plus the logistic loss of every prediction (matched: positive, others: negative),
summed over the K predictions of an image and averaged over the images of the batch.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.vq import kmeans2
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from backbone import IMAGENET_MEAN, IMAGENET_STD, GoogLeNet, googlenet
from backbone.weights import atomic_torch_save, read_weights_file
from detect.boxes import box_iou


def order_corners(boxes: Tensor) -> Tensor:
    """Swap coordinates where a predicted box came out inverted (x2 < x1 or y2 < y1)."""
    return torch.cat(
        [torch.minimum(boxes[..., :2], boxes[..., 2:]), torch.maximum(boxes[..., :2], boxes[..., 2:])], -1
    )


# ---- priors -----------------------------------------------------------------------------------


def normalise_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pixel ``xyxy`` -> ``xyxy`` in units of the image size, clipped to [0, 1]."""
    scale = np.array([width, height, width, height], dtype=np.float32)
    return np.clip(boxes.astype(np.float32) / scale, 0.0, 1.0)


def kmeans_priors(
    boxes: np.ndarray, num_priors: int, seed: int = 0, samples_per_prior: int = 4, jitter: float = 0.1
) -> np.ndarray:
    """``num_priors`` k-means centres of normalised ``(N, 4)`` xyxy boxes, sorted by area then centre.

    Small data sets have fewer boxes than priors (raccoon: 175 boxes, K = 200); there the boxes are
    complemented with jittered copies (centre moved and sides scaled by up to ``jitter`` of the box
    size) until there are ``samples_per_prior`` samples per centre, so every centre is a plausible
    box near the data rather than a duplicate.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        raise ValueError("kmeans_priors needs at least one ground-truth box")
    rng = np.random.default_rng(seed)
    needed = num_priors * samples_per_prior
    samples = boxes
    if len(boxes) < needed:
        picks = boxes[rng.integers(0, len(boxes), needed - len(boxes))]
        centre = (picks[:, :2] + picks[:, 2:]) / 2
        size = picks[:, 2:] - picks[:, :2]
        centre = centre + rng.uniform(-jitter, jitter, centre.shape) * size
        size = size * np.exp(rng.uniform(-jitter, jitter, size.shape))
        samples = np.concatenate([boxes, np.concatenate([centre - size / 2, centre + size / 2], 1)])
    samples = np.clip(samples, 0.0, 1.0)
    with warnings.catch_warnings():
        # An empty cluster keeps its previous centre; scipy warns about it, nothing is lost.
        warnings.simplefilter("ignore", UserWarning)
        centres, _ = kmeans2(samples, num_priors, iter=30, minit="++", seed=rng)
    centres = np.clip(centres, 0.0, 1.0)
    centres = order_corners(torch.from_numpy(centres)).numpy()
    area = (centres[:, 2] - centres[:, 0]) * (centres[:, 3] - centres[:, 1])
    order = np.lexsort((centres[:, 1] + centres[:, 3], centres[:, 0] + centres[:, 2], area))
    return centres[order].astype(np.float32)


# ---- model ------------------------------------------------------------------------------------


class MultiBoxHead(nn.Module):
    """Features -> 1x1 conv reduction -> fixed grid pooling -> K box offsets and K logits.

    The spatial grid is kept (not averaged away) because where a feature fires is what the box
    coordinates depend on. Offsets start at zero, so an untrained head predicts the priors, and the
    objectness bias starts at ``logit(objectness_prior)`` (few of the K boxes are objects).
    """

    def __init__(
        self,
        in_channels: int,
        priors: Tensor,
        reduced_channels: int = 128,
        grid: int = 7,
        dropout: float = 0.3,
        objectness_prior: float = 0.01,
    ) -> None:
        super().__init__()
        self.register_buffer("priors", priors.float().clone())
        self.num_priors = priors.shape[0]
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, reduced_channels, 1), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.dropout = nn.Dropout(dropout)
        flat = reduced_channels * grid * grid
        self.offsets = nn.Linear(flat, self.num_priors * 4)
        self.objectness = nn.Linear(flat, self.num_priors)
        nn.init.zeros_(self.offsets.weight)
        nn.init.zeros_(self.offsets.bias)
        nn.init.normal_(self.objectness.weight, std=0.01)
        nn.init.constant_(self.objectness.bias, math.log(objectness_prior / (1 - objectness_prior)))

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.flatten(self.pool(self.reduce(features)), 1)  # N x (reduced * grid * grid)
        x = self.dropout(x)
        boxes = self.priors + self.offsets(x).view(-1, self.num_priors, 4)  # N x K x 4, normalised xyxy
        return boxes, self.objectness(x)  # N x K


class MultiBoxNet(nn.Module):
    """GoogLeNet up to ``stage`` plus a :class:`MultiBoxHead`; its classifier is dropped."""

    def __init__(self, backbone: GoogLeNet, head: MultiBoxHead, stage: str = "inception5b") -> None:
        super().__init__()
        backbone.fc = nn.Identity()  # unused here; DDP must not see parameters without gradients
        backbone.aux1 = backbone.aux2 = None
        backbone.aux_logits = False
        self.backbone = backbone
        self.head = head
        self.stage = stage

    def freeze_through(self, stage: str | None) -> None:
        """Freeze the backbone's stages up to and including ``stage`` (GoogLeNet.freeze_through)."""
        self.backbone.freeze_through(stage)

    @property
    def frozen_stages(self) -> list[str]:
        return self.backbone.frozen_stages

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.backbone.forward_features(images, self.stage))


@dataclass(frozen=True)
class MultiBoxArch:
    """What rebuilds a MultiBoxNet (stored as the checkpoint's meta)."""

    variant: str
    stage: str
    num_priors: int
    reduced_channels: int = 128
    grid: int = 7
    dropout: float = 0.3
    transform_input: bool = False
    image_size: int = 224


def build_multibox(backbone: GoogLeNet, priors: np.ndarray, arch: MultiBoxArch) -> MultiBoxNet:
    channels = {info["name"]: info["channels"] for info in backbone.feature_info}
    if arch.stage not in channels:
        raise ValueError(f"unknown backbone stage {arch.stage!r}; choose one of {', '.join(channels)}")
    head = MultiBoxHead(
        channels[arch.stage], torch.from_numpy(priors), arch.reduced_channels, arch.grid, arch.dropout
    )
    return MultiBoxNet(backbone, head, arch.stage)


def save_multibox(path: str | Path, model: MultiBoxNet, arch: MultiBoxArch, extra_meta: dict) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"model": state, "meta": {**extra_meta, "multibox": asdict(arch)}}, path)


def load_multibox(path: str | Path) -> tuple[MultiBoxNet, MultiBoxArch, dict[str, Any]]:
    """Rebuild a MultiBoxNet saved by :func:`save_multibox` (``weights_only`` loading)."""
    blob = read_weights_file(path)
    meta = blob.get("meta", {})
    if "multibox" not in meta:
        raise ValueError(f"{path}: not a MultiBox model file (no 'multibox' meta)")
    arch = MultiBoxArch(**meta["multibox"])
    backbone = googlenet(arch.variant, num_classes=1, aux_logits=False, transform_input=arch.transform_input)
    priors = blob["model"]["head.priors"].numpy()
    model = build_multibox(backbone, priors, arch)
    model.load_state_dict(blob["model"])
    return model.eval(), arch, meta


# ---- loss -------------------------------------------------------------------------------------


def match_predictions(
    pred_boxes: Tensor, logits: Tensor, gt_boxes: Tensor, alpha: float, priors: Tensor | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of ``(K, 4)`` predictions to ``(M, 4)`` ground truth (normalised xyxy).

    Cost of pairing prediction i with box j: ``alpha/2 |l_i - g_j|^2 - logit_i``; returns
    ``(pred_idx, gt_idx)`` of the ``min(K, M)`` pairs. With ``priors``, ``l_i`` is prediction i's
    prior instead of its current location ("prior matching", arXiv 1412.1441): the assignment then
    cannot drift with the predictions, which keeps one confident box from claiming every object.
    """
    if gt_boxes.shape[0] == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    with torch.no_grad():
        where = pred_boxes if priors is None else priors.to(pred_boxes)
        distance = torch.cdist(where.double(), gt_boxes.double()) ** 2  # K x M
        cost = alpha / 2 * distance - logits.double()[:, None]
    pred_idx, gt_idx = linear_sum_assignment(cost.cpu().numpy())
    return pred_idx.astype(np.int64), gt_idx.astype(np.int64)


def multibox_loss(
    pred_boxes: Tensor, logits: Tensor, gt_boxes: list[Tensor], alpha: float, priors: Tensor | None = None
) -> dict[str, Tensor]:
    """MultiBox loss of a batch: ``(B, K, 4)`` boxes, ``(B, K)`` logits, B tensors ``(M_b, 4)``.

    Returns ``loss = mean_b(alpha * loc_b + conf_b)`` and its two parts (also batch means).
    ``priors``: match on prior locations (see :func:`match_predictions`).
    """
    loc_terms, conf_terms = [], []
    for boxes, image_logits, gt in zip(pred_boxes, logits, gt_boxes, strict=True):
        pred_idx, gt_idx = match_predictions(boxes, image_logits, gt, alpha, priors)
        target = torch.zeros_like(image_logits)
        target[torch.from_numpy(pred_idx)] = 1.0
        matched = boxes[torch.from_numpy(pred_idx)] - gt[torch.from_numpy(gt_idx)].to(boxes)
        loc_terms.append(0.5 * matched.pow(2).sum())
        conf_terms.append(F.binary_cross_entropy_with_logits(image_logits, target, reduction="sum"))
    loc, conf = torch.stack(loc_terms).mean(), torch.stack(conf_terms).mean()
    return {"loss": alpha * loc + conf, "loc": loc, "conf": conf}


# ---- inference --------------------------------------------------------------------------------


def preprocess_image(image_rgb: np.ndarray, image_size: int) -> Tensor:
    """``(H, W, 3)`` uint8 RGB -> ``(3, S, S)`` ImageNet-normalised float (aspect not kept: the
    boxes are in normalised coordinates, which a resize does not change)."""
    resized = cv2.resize(image_rgb, (image_size, image_size), interpolation=cv2.INTER_AREA)
    tensor = torch.from_numpy(resized).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor - mean) / std


def decode_top_k(
    pred_boxes: Tensor, logits: Tensor, width: int, height: int, top_k: int, min_size: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """One image's ``(K, 4)`` normalised boxes and logits -> the ``top_k`` best as pixel xyxy
    (clipped, corners ordered) and their objectness, best first, among the boxes at least
    ``min_size`` pixels wide and high once clipped: a prediction that lies mostly outside the image
    clips to a sliver, which no training region resembles (background is sampled at IoU >= 0.1 by
    default) and which the region classifier would score at random."""
    scores = torch.sigmoid(logits.float())
    boxes = order_corners(pred_boxes.float().clamp(0.0, 1.0)) * pred_boxes.new_tensor(
        [width, height, width, height], dtype=torch.float32
    )
    large = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[large[order]][:top_k]
    return boxes[order].numpy().astype(np.float32), scores[order].numpy().astype(np.float32)


@torch.no_grad()
def multibox_proposals(
    model: MultiBoxNet, image_rgb: np.ndarray, image_size: int, top_k: int, min_size: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``top_k`` MultiBox boxes of at least ``min_size`` pixels (pixel xyxy, float32) and their
    objectness for one RGB image."""
    height, width = image_rgb.shape[:2]
    batch = preprocess_image(image_rgb, image_size)[None].contiguous(memory_format=torch.channels_last)
    boxes, logits = model(batch)
    return decode_top_k(boxes[0], logits[0], width, height, top_k, min_size)


def recall_at_k(
    pred_boxes: Tensor, logits: Tensor, gt_boxes: list[Tensor], top_k: int, iou: float = 0.5
) -> tuple[int, int]:
    """(ground-truth boxes covered at ``iou`` by an image's ``top_k`` predictions, boxes in all)."""
    hits = total = 0
    for boxes, image_logits, gt in zip(pred_boxes, logits, gt_boxes, strict=True):
        total += gt.shape[0]
        if gt.shape[0] == 0:
            continue
        top = boxes[torch.argsort(image_logits, descending=True, stable=True)[:top_k]].clamp(0, 1)
        top = order_corners(top)
        hits += int((box_iou(gt.to(top), top).max(dim=1).values >= iou).sum())
    return hits, total
