"""Decode a data set once, at reduced size, into one shared in-memory buffer.

On 2 cores, JPEG decoding and resizing a large photo costs more than augmenting it; small data sets
(flowers: 4,300 images) fit in memory once their shorter side is cut to ~1.15x the crop size. The
images live in one flat uint8 array with offsets, so forked DataLoader workers share its pages
(a list of arrays would be copied page by page as reference counts change).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
from tqdm import tqdm

from backbone.bad_images import DEFAULT_ON_BAD_IMAGE, BadImageError, BadImages

logger = logging.getLogger(__name__)


# The one-line error of ``on_bad_image: error`` (this name predates backbone.bad_images).
CorruptImageError = BadImageError


def shrink_to_shorter_side(image: np.ndarray, shorter_side: int) -> np.ndarray:
    """Downscale (never upscale) so the shorter side is ``shorter_side``, keeping the aspect ratio."""
    height, width = image.shape[:2]
    if min(height, width) <= shorter_side:
        return image
    scale = shorter_side / min(height, width)
    size = (max(shorter_side, int(round(width * scale))), max(shorter_side, int(round(height * scale))))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


class DecodedImageCache:
    """Images ``0..N-1`` (the decodable subset of the paths given to ``build``) as uint8 RGB."""

    def __init__(self, buffer: np.ndarray, offsets: np.ndarray, shapes: np.ndarray, kept_indices: list[int]):
        self.buffer = buffer
        self.offsets = offsets  # (N + 1,) int64 start of each image in buffer
        self.shapes = shapes  # (N, 3) int32
        self.kept_indices = kept_indices  # positions, in the paths given to build, of the images held

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> np.ndarray:
        start, end = self.offsets[index], self.offsets[index + 1]
        view = self.buffer[start:end].reshape(self.shapes[index])
        view.flags.writeable = False  # shared by every sample and worker: never modified in place
        return view

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)

    @classmethod
    def build(
        cls,
        paths: Sequence[str],
        shorter_side: int,
        on_bad_image: str = DEFAULT_ON_BAD_IMAGE,
        num_threads: int | None = None,
        bad_images: BadImages | None = None,
    ) -> DecodedImageCache:
        """Decode ``paths`` in threads (OpenCV releases the GIL). Bad files follow ``on_bad_image``
        (``backbone.bad_images``): skipped ones are left out (``kept_indices`` says which remain)
        and the summary is logged once; ``bad_images`` (default: a new tally) collects them."""
        bad = bad_images or BadImages(on_bad_image, "caching images")

        def load(path: str) -> np.ndarray | None:
            image = bad.read(path)
            return None if image is None else shrink_to_shorter_side(image, shorter_side)

        images: list[np.ndarray] = []
        kept: list[int] = []
        workers = num_threads or min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:
            results = pool.map(load, paths)
            for index, result in enumerate(
                tqdm(results, total=len(paths), desc="caching images", leave=False)
            ):
                if result is not None:
                    images.append(np.ascontiguousarray(result))
                    kept.append(index)
        if bad_images is None:
            bad.log_summary(logger)
        if not images:
            raise BadImageError(f"none of the {len(paths)} images could be decoded")
        sizes = np.array([image.size for image in images], np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        buffer = np.empty(int(offsets[-1]), np.uint8)
        for image, start in zip(images, offsets[:-1], strict=True):
            buffer[start : start + image.size] = image.ravel()
        shapes = np.array([image.shape for image in images], np.int32)
        logger.info(
            "cached %d images (shorter side <= %d) in %.1f MB; %d bad images skipped",
            len(images),
            shorter_side,
            buffer.nbytes / 1e6,
            len(paths) - len(images),
        )
        return cls(buffer, offsets, shapes, kept)
