"""Training and validation samples for MultiBox: a square image and its boxes in 0..1 coordinates.

Targets are normalised boxes, which no resize changes, so images are decoded once into a shared
in-memory cache at reduced size (``backbone.image_cache``) and boxes never need rescaling.
Augmentation (albumentations, seeded per sample by the runtime's loader): a crop that keeps
every box (half of the time), horizontal flip and colour jitter.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from backbone.image_cache import DecodedImageCache
from backbone.transforms import image_to_tensor
from detect.datasets.records import DetectionRecord
from detect.proposals.multibox import normalise_boxes

log = logging.getLogger(__name__)


def normalised_gt(record: DetectionRecord, skip_difficult: bool = True) -> np.ndarray:
    """A record's ground truth as ``(M, 4)`` float32 boxes in 0..1 of its width and height."""
    boxes = record.boxes
    if skip_difficult and len(record.difficult):
        boxes = boxes[~record.difficult]
    return normalise_boxes(boxes.reshape(-1, 4), record.width, record.height)


def build_augmentation(image_size: int, train: bool) -> A.Compose:
    size = [A.Resize(image_size, image_size, interpolation=cv2.INTER_AREA)]
    steps = size
    if train:
        steps = [
            A.RandomSizedBBoxSafeCrop(image_size, image_size, erosion_rate=0.0, p=0.5),
            *size,
            A.HorizontalFlip(p=0.5),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
        ]
    params = A.BboxParams(format="albumentations", label_fields=["labels"], min_visibility=0.3, clip=True)
    return A.Compose(steps, bbox_params=params)


class MultiBoxDataset(Dataset):
    """``(image (3, S, S), boxes (M, 4) in 0..1)`` per record; undecodable images are skipped
    (with a count in the log) when the cache is built."""

    def __init__(
        self, records: Sequence[DetectionRecord], image_size: int, train: bool, cache_shorter_side: int
    ) -> None:
        self.images = DecodedImageCache.build([r.file_name for r in records], cache_shorter_side)
        kept = self.images.kept_indices
        if len(kept) < len(records):
            log.warning(
                "MultiBox data: %d of %d images undecodable, skipped", len(records) - len(kept), len(records)
            )
        self.targets = [normalised_gt(records[i]) for i in kept]
        self.image_size = image_size
        self.transform = build_augmentation(image_size, train)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        boxes = self.targets[index]
        out = self.transform(image=self.images[index], bboxes=boxes, labels=np.zeros(len(boxes), np.int64))
        boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        return image_to_tensor(out["image"]), torch.from_numpy(boxes)


def collate_multibox(batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, list[Tensor]]:
    images, boxes = zip(*batch, strict=True)
    return torch.stack(images), list(boxes)


def all_gt_boxes(records: Sequence[DetectionRecord]) -> np.ndarray:
    """Every non-difficult ground-truth box of ``records``, normalised: the k-means input for priors."""
    parts = [normalised_gt(r) for r in records]
    return np.concatenate(parts) if parts else np.zeros((0, 4), np.float32)
