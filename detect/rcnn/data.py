"""Images and their labelled regions for training and scoring the region classifier.

Images are decoded at reduced size (shorter side ``shorter_side``, never upscaled), either once
into RAM (``DecodedImageCache``, small sets) or per sample from disk (ILSVRC-sized sets); boxes are
scaled to match. Bad images follow ``on_bad_image`` (``backbone.bad_images``): a skipped one
gives an empty training sample or no scoring sample (its objects count as missed), named in the
log. A training sample is one image with ``regions_per_image`` sampled regions
(R-CNN's 32 foreground / 96 background over the images of a batch), flipped and colour-jittered
with albumentations; a scoring sample is one image with all of its proposals.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import albumentations as A
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from backbone.bad_images import DEFAULT_ON_BAD_IMAGE, BadImages
from backbone.image_cache import DecodedImageCache, shrink_to_shorter_side
from backbone.transforms import image_to_tensor
from detect.datasets.records import DetectionRecord
from detect.rcnn.regions import label_proposals, sample_regions

logger = logging.getLogger(__name__)


class ImageSource:
    """Decoded, downscaled images by record index: cached in RAM or read on demand."""

    def __init__(
        self,
        records: Sequence[DetectionRecord],
        shorter_side: int,
        in_memory: bool,
        on_bad_image: str = DEFAULT_ON_BAD_IMAGE,
    ) -> None:
        self.paths = [r.file_name for r in records]
        self.shorter_side = shorter_side
        # This process's tally: loader workers log what they skip themselves, once per file.
        self.bad_images = BadImages(on_bad_image, "images")
        self.cache = None
        if in_memory:
            self.cache = DecodedImageCache.build(self.paths, shorter_side, bad_images=self.bad_images)
            self.bad_images.log_summary(logger)
        kept = self.cache.kept_indices if self.cache is not None else None
        self.position = {index: pos for pos, index in enumerate(kept)} if kept is not None else None

    def __call__(self, index: int) -> np.ndarray | None:
        """The image of record ``index``, or None when it is skipped (BadImageError under "error")."""
        if self.position is not None:
            pos = self.position.get(index)
            return None if pos is None else self.cache[pos]
        image = self.bad_images.read(self.paths[index])
        return None if image is None else shrink_to_shorter_side(image, self.shorter_side)


def scale_to_image(
    boxes: np.ndarray, record: DetectionRecord, image: np.ndarray
) -> tuple[np.ndarray, float, float]:
    """Boxes in ``record``'s pixels to ``image``'s (its decoded, downscaled copy), clipped; and (sx, sy)."""
    sx, sy = image.shape[1] / record.width, image.shape[0] / record.height
    scaled = np.asarray(boxes, np.float32).reshape(-1, 4) * np.array([sx, sy, sx, sy], np.float32)
    scaled[:, [0, 2]] = scaled[:, [0, 2]].clip(0, image.shape[1])
    scaled[:, [1, 3]] = scaled[:, [1, 3]].clip(0, image.shape[0])
    return scaled, sx, sy


@dataclass
class ScoringSample:
    image: Tensor  # (3, h, w) normalised, downscaled
    boxes: Tensor  # (P, 4) proposals in the downscaled image's pixels
    scale: tuple[float, float]  # (sx, sy): downscaled = original * scale
    index: int  # record index


class RegionTrainDataset(Dataset):
    """One image and ``regions_per_image`` sampled regions: ``(image (3,h,w), boxes (R,4), labels (R,))``.

    Candidates are the image's proposals plus its (non-difficult) ground-truth boxes, labelled once
    at construction (a flip keeps every IoU). Images without any candidate give empty samples.
    """

    def __init__(
        self,
        records: Sequence[DetectionRecord],
        proposals: Sequence[np.ndarray],
        num_classes: int,
        *,
        regions_per_image: int,
        fg_fraction: float = 0.25,
        fg_iou: float = 0.5,
        bg_iou: tuple[float, float] = (0.1, 0.5),
        shorter_side: int = 480,
        in_memory: bool = True,
        flip: bool = True,
        color_jitter: tuple[float, float, float, float] = (0.2, 0.2, 0.2, 0.02),
        on_bad_image: str = DEFAULT_ON_BAD_IMAGE,
    ) -> None:
        self.records = list(records)
        self.proposals = proposals  # not copied: a cache's proposals are read per image
        self.num_classes = num_classes
        self.regions_per_image = regions_per_image
        self.fg_fraction = fg_fraction
        self.fg_iou = fg_iou
        self.bg_iou = bg_iou
        self.images = ImageSource(self.records, shorter_side, in_memory, on_bad_image)
        steps = [A.HorizontalFlip(p=0.5)] if flip else []
        if any(color_jitter):
            b, c, s, h = color_jitter
            steps.append(A.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h, p=0.8))
        bbox_params = A.BboxParams(format="pascal_voc", label_fields=["region"], clip=True, min_area=0.0)
        self.transform = A.Compose(steps, bbox_params=bbox_params)

    def __len__(self) -> int:
        return len(self.records)

    def candidates(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Candidate boxes (original pixels), their max IoU and labels (background = C)."""
        record = self.records[index]
        keep = ~record.difficult if len(record.difficult) else np.ones(len(record.boxes), bool)
        gt_boxes, gt_labels = record.boxes[keep].reshape(-1, 4), record.labels[keep]
        boxes = np.concatenate([gt_boxes, np.asarray(self.proposals[index], np.float32).reshape(-1, 4)])
        max_iou, labels = label_proposals(boxes, gt_boxes, gt_labels, self.num_classes, self.fg_iou)
        return boxes, max_iou, labels

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        image = self.images(index)
        if image is None:
            return torch.zeros(3, 1, 1), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
        boxes, max_iou, labels = self.candidates(index)
        # Drawn from the global numpy RNG, which the resumable loader seeds per (epoch, sample).
        rng = np.random.default_rng(np.random.randint(0, 2**31 - 1))
        chosen = sample_regions(
            max_iou, labels, self.num_classes, self.regions_per_image, self.fg_fraction, self.bg_iou, rng
        )
        scaled, _, _ = scale_to_image(boxes[chosen], self.records[index], image)
        valid = (scaled[:, 2] - scaled[:, 0] >= 1) & (scaled[:, 3] - scaled[:, 1] >= 1)
        scaled, chosen = scaled[valid], chosen[valid]
        out = self.transform(image=image, bboxes=scaled, region=np.arange(len(scaled)))
        kept = np.asarray(out["region"], np.int64)
        out_boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
        region_labels = torch.from_numpy(labels[chosen][kept])
        return image_to_tensor(out["image"]), torch.from_numpy(out_boxes), region_labels


class RegionScoringDataset(Dataset):
    """Every proposal of each image, for inference (no augmentation)."""

    def __init__(
        self,
        records: Sequence[DetectionRecord],
        proposals: Sequence[np.ndarray],
        shorter_side: int = 480,
        in_memory: bool = False,
        on_bad_image: str = DEFAULT_ON_BAD_IMAGE,
    ) -> None:
        self.records = list(records)
        self.proposals = proposals  # not copied: a cache's proposals are read per image
        self.images = ImageSource(self.records, shorter_side, in_memory, on_bad_image)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> ScoringSample | None:
        image = self.images(index)
        if image is None:
            return None
        record = self.records[index]
        scaled, sx, sy = scale_to_image(self.proposals[index], record, image)
        return ScoringSample(image_to_tensor(image), torch.from_numpy(scaled), (sx, sy), index)


def pad_images(images: Sequence[Tensor]) -> Tensor:
    """Stack ``(3, h, w)`` images into ``(B, 3, H, W)``, zero (the mean pixel) beyond each image."""
    height = max(int(im.shape[1]) for im in images)
    width = max(int(im.shape[2]) for im in images)
    batch = images[0].new_zeros((len(images), 3, height, width))
    for i, im in enumerate(images):
        batch[i, :, : im.shape[1], : im.shape[2]] = im
    return batch


def collate_regions(batch: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """-> ``(images (B,3,H,W), rois (R,5) with batch index, labels (R,))``."""
    images = pad_images([im for im, _, _ in batch])
    rois = [torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, (_, b, _) in enumerate(batch)]
    labels = torch.cat([lab for _, _, lab in batch])
    return images, torch.cat(rois).reshape(-1, 5), labels


def collate_scoring(batch: list[ScoringSample | None]) -> list[ScoringSample | None]:
    return list(batch)
