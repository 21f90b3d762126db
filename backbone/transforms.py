"""Image pipelines for classification: the paper's training augmentation, evaluation and multi-crop.

Training (Szegedy et al. 2014, section 6): a crop covering 8%-100% of the image area with aspect
ratio in [3/4, 4/3], resized to the training size with an interpolation drawn per sample among
bilinear, area, nearest and cubic; photometric distortions (brightness, contrast, saturation, hue
in random order, in the spirit of Howard 2013); horizontal flip; ImageNet normalisation.

Evaluation: the shorter side resized to ``image_size / 0.875`` (256 for 224), then a centre crop.

Multi-crop (``multi_crop_specs`` / ``multi_crop``): 1 crop (as evaluation), 10 crops (4 corners and
centre of that resized image, and their mirrors) and the paper's 144 crops: the shorter side
resized to 256, 288, 320 and 352 (scaled by ``train_size / 224``, so a 128-px model is tested the
same way); the left, centre and right squares (top, centre, bottom for portrait images); from each
square its 4 corners and centre at crop size plus the whole square resized to crop size; each
also mirrored: 4 x 3 x 6 x 2 = 144.

Every transform is an ``ImageTransform``: ``transform(image_uint8_rgb, sample_seed=None)``. With a
``sample_seed`` (any tuple of non-negative ints, e.g. ``(seed, epoch, index)``) the random draws are
a pure function of it, so augmentation does not depend on worker count, order or resumption.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# albumentations asks PyPI for a newer version on every import (in every spawned worker); training
# must not touch the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from backbone import IMAGENET_MEAN, IMAGENET_STD

INTERPOLATIONS: dict[str, int] = {
    "bilinear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "nearest": cv2.INTER_NEAREST,
    "cubic": cv2.INTER_CUBIC,
}
EVAL_CROP_FRACTION = 0.875  # 224 / 256: the usual ratio of crop to resized shorter side
PAPER_SCALES = (256, 288, 320, 352)  # shorter sides of the 144-crop test for a 224-px model
PAPER_TRAIN_SIZE = 224
CROP_COUNTS = (1, 10, 144)
_MEAN_255 = np.asarray(IMAGENET_MEAN, np.float32) * 255.0
_STD_255 = np.asarray(IMAGENET_STD, np.float32) * 255.0


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB -> ``(3, H, W)`` float32 ImageNet-normalised (the mean pixel becomes 0).

    The one numpy-side ImageNet normalisation, for pipelines that resize with OpenCV themselves
    (MultiBox samples, R-CNN regions); ``normalize_crops`` is its batched NHWC counterpart.
    """
    return torch.from_numpy((image.astype(np.float32) - _MEAN_255) / _STD_255).permute(2, 0, 1).contiguous()


class ImageTransform:
    """An albumentations ``Compose`` called as ``transform(image, sample_seed=None) -> output``."""

    def __init__(self, compose: A.Compose) -> None:
        self.compose = compose

    def __call__(self, image: np.ndarray, sample_seed: Sequence[int] | None = None):
        if sample_seed is not None:
            rng = np.random.default_rng(list(sample_seed))
            # One shared stream for all transforms (set_random_seed would give each the same seed,
            # correlating e.g. the flip with the brightness draw).
            self.compose.set_random_state(rng, random.Random(int(rng.integers(2**63))))
        return self.compose(image=image)["image"]

    def __repr__(self) -> str:
        return f"ImageTransform({self.compose!r})"


def eval_resize_size(image_size: int) -> int:
    """Shorter side before the evaluation centre crop: 256 for 224, 146 for 128."""
    return int(round(image_size / EVAL_CROP_FRACTION))


def _normalize_to_tensor() -> list:
    return [A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0), ToTensorV2()]


def train_transform(
    image_size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    interpolations: Sequence[str] = ("bilinear", "area", "nearest", "cubic"),
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.05,
    photometric_p: float = 0.8,
    hflip_p: float = 0.5,
) -> ImageTransform:
    """The paper's training augmentation, ending in a normalised float32 CHW tensor."""
    unknown = set(interpolations) - set(INTERPOLATIONS)
    if unknown or not interpolations:
        raise ValueError(
            f"interpolations must be a non-empty subset of {sorted(INTERPOLATIONS)}, got {interpolations}"
        )
    crops = [
        A.RandomResizedCrop(
            size=(image_size, image_size), scale=scale, ratio=ratio, interpolation=INTERPOLATIONS[name], p=1.0
        )
        for name in interpolations
    ]
    steps = [
        A.OneOf(crops, p=1.0),  # uniform choice: the interpolation is drawn per sample
        A.ColorJitter(
            brightness=(1 - brightness, 1 + brightness),
            contrast=(1 - contrast, 1 + contrast),
            saturation=(1 - saturation, 1 + saturation),
            hue=(-hue, hue),
            p=photometric_p,
        ),
        A.HorizontalFlip(p=hflip_p),
        *_normalize_to_tensor(),
    ]
    return ImageTransform(A.Compose(steps))


def progressive_size(
    epoch: int, epochs: int, min_size: int, max_size: int, ramp: tuple[float, float], multiple: int = 16
) -> int:
    """Training size for ``epoch`` under progressive resizing (as FFCV's ImageNet recipes): ``min_size``
    until the fraction ``ramp[0]`` of the epochs, then linearly up to ``max_size`` at ``ramp[1]``,
    rounded down to a multiple of ``multiple`` (never below ``min_size``); ``max_size`` after."""
    start, end = ramp
    progress = min(max((epoch / max(epochs, 1) - start) / max(end - start, 1e-9), 0.0), 1.0)
    size = min_size + (max_size - min_size) * progress
    return max_size if progress >= 1.0 else max(min_size, int(size) // multiple * multiple)


class ProgressiveResizeTransform:
    """A training transform whose output size follows the epoch (``set_epoch``): small, cheap
    images early, the full size at the end. Wraps one ``ImageTransform`` per size, built on demand
    by ``make_transform(size)``; ``size_for_epoch(epoch)`` is the schedule."""

    def __init__(
        self, make_transform: Callable[[int], ImageTransform], size_for_epoch: Callable[[int], int]
    ) -> None:
        self.make_transform = make_transform
        self.size_for_epoch = size_for_epoch
        self._by_size: dict[int, ImageTransform] = {}
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.size = self.size_for_epoch(epoch)
        if self.size not in self._by_size:
            self._by_size[self.size] = self.make_transform(self.size)
        self.current = self._by_size[self.size]

    def set_random_state(self, np_rng: np.random.Generator, py_rng: random.Random) -> None:
        self.current.compose.set_random_state(np_rng, py_rng)

    def __call__(self, image: np.ndarray, sample_seed: Sequence[int] | None = None):
        return self.current(image, sample_seed)

    def __repr__(self) -> str:
        return f"ProgressiveResizeTransform(size={self.size}, {self.current!r})"


class EvalTransform:
    """Resize the shorter side to ``eval_resize_size(image_size)``, centre crop, normalise:
    ``transform(image) -> (3, S, S)`` float32. It is exactly the 1-crop test of ``multi_crop``, so
    validation during training and ``tools/eval_cls.py --crops 1`` give the same numbers."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, image: np.ndarray, sample_seed: Sequence[int] | None = None) -> torch.Tensor:
        crop = multi_crop(image, self.image_size, 1)[0].astype(np.float32)
        crop -= _MEAN_255
        crop /= _STD_255
        return torch.from_numpy(crop.transpose(2, 0, 1).copy())

    def __repr__(self) -> str:
        return f"EvalTransform(image_size={self.image_size})"


def eval_transform(image_size: int) -> EvalTransform:
    """The evaluation pipeline: shorter side to ``image_size / 0.875``, centre crop, normalise."""
    return EvalTransform(image_size)


@dataclass(frozen=True)
class CropSpec:
    """One test crop: resize the image so its shorter side is ``shorter_side``, cut ``box``
    (x0, y0, x1, y1, exclusive ends) from it, resize that to the crop size if it is larger, and
    mirror it when ``flip``."""

    shorter_side: int
    box: tuple[int, int, int, int]
    flip: bool


def resized_shape(height: int, width: int, shorter_side: int) -> tuple[int, int]:
    """(H, W) after scaling so the shorter side equals ``shorter_side`` (aspect ratio kept)."""
    if height <= width:
        return shorter_side, max(shorter_side, int(round(width * shorter_side / height)))
    return max(shorter_side, int(round(height * shorter_side / width))), shorter_side


def _five_boxes(x0: int, y0: int, width: int, height: int, crop: int) -> list[tuple[int, int, int, int]]:
    """Top-left, top-right, bottom-left, bottom-right and centre crops of a region."""
    cx, cy = x0 + (width - crop) // 2, y0 + (height - crop) // 2
    corners = [
        (x0, y0),
        (x0 + width - crop, y0),
        (x0, y0 + height - crop),
        (x0 + width - crop, y0 + height - crop),
    ]
    return [(x, y, x + crop, y + crop) for x, y in [*corners, (cx, cy)]]


def multi_crop_specs(
    height: int, width: int, crop_size: int, num_crops: int, train_size: int | None = None
) -> list[CropSpec]:
    """The crops of the 1-, 10- or 144-crop test for an image of ``height`` x ``width``.

    ``train_size`` (default ``crop_size``) sets the 144-crop scales: ``PAPER_SCALES * train_size / 224``.
    Order: per scale, per square, the 6 crops (4 corners, centre, whole square), each unflipped then
    flipped; for 10 crops the 5 crops unflipped, then the same 5 flipped.
    """
    if num_crops not in CROP_COUNTS:
        raise ValueError(f"num_crops must be one of {CROP_COUNTS}, got {num_crops}")
    if num_crops in (1, 10):
        side = eval_resize_size(crop_size)
        rh, rw = resized_shape(height, width, side)
        if num_crops == 1:
            return [CropSpec(side, _five_boxes(0, 0, rw, rh, crop_size)[4], False)]
        boxes = _five_boxes(0, 0, rw, rh, crop_size)
        return [CropSpec(side, box, flip) for flip in (False, True) for box in boxes]
    train_size = train_size or crop_size
    specs = []
    for paper_side in PAPER_SCALES:
        side = int(round(paper_side * train_size / PAPER_TRAIN_SIZE))
        rh, rw = resized_shape(height, width, side)
        long_extent = max(rh, rw) - side
        for offset in (0, long_extent // 2, long_extent):
            sx, sy = (offset, 0) if rw >= rh else (0, offset)
            for box in [*_five_boxes(sx, sy, side, side, crop_size), (sx, sy, sx + side, sy + side)]:
                specs.extend(CropSpec(side, box, flip) for flip in (False, True))
    return specs


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    shrinking = height * width < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def multi_crop(
    image: np.ndarray, crop_size: int, num_crops: int, train_size: int | None = None
) -> np.ndarray:
    """Cut the crops of ``multi_crop_specs`` from a uint8 RGB image: ``(N, crop, crop, 3)`` uint8."""
    height, width = image.shape[:2]
    specs = multi_crop_specs(height, width, crop_size, num_crops, train_size)
    out = np.empty((len(specs), crop_size, crop_size, 3), np.uint8)
    resized: dict[int, np.ndarray] = {}  # one resize per scale, shared by its crops
    for i, spec in enumerate(specs):
        if spec.shorter_side not in resized:
            resized[spec.shorter_side] = _resize(image, *resized_shape(height, width, spec.shorter_side))
        x0, y0, x1, y1 = spec.box
        crop = _resize(resized[spec.shorter_side][y0:y1, x0:x1], crop_size, crop_size)
        out[i] = crop[:, ::-1] if spec.flip else crop
    return out


class MultiCropTransform:
    """``transform(image) -> (N, crop, crop, 3) uint8 tensor``; normalise batches with
    ``normalize_crops`` (uint8 keeps worker-to-main transfer 4x smaller than float)."""

    def __init__(self, crop_size: int, num_crops: int, train_size: int | None = None) -> None:
        if num_crops not in CROP_COUNTS:
            raise ValueError(f"num_crops must be one of {CROP_COUNTS}, got {num_crops}")
        self.crop_size, self.num_crops, self.train_size = crop_size, num_crops, train_size

    def __call__(self, image: np.ndarray, sample_seed: Sequence[int] | None = None) -> torch.Tensor:
        return torch.from_numpy(multi_crop(image, self.crop_size, self.num_crops, self.train_size))


def normalize_crops(crops: torch.Tensor) -> torch.Tensor:
    """``(..., H, W, 3)`` uint8 crops -> ``(M, 3, H, W)`` float32 ImageNet-normalised, channels_last.

    Leading dimensions are flattened into M. Permuting NHWC to NCHW is already channels_last in
    memory, so no copy is needed beyond the float conversion.
    """
    crops = crops.reshape(-1, *crops.shape[-3:])
    out = (crops.float() - torch.from_numpy(_MEAN_255)) / torch.from_numpy(_STD_255)
    return out.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
