"""Selective search (Uijlings et al. 2013) through OpenCV contrib, deterministic and filtered.

OpenCV's ``SelectiveSearchSegmentation.process`` ranks its regions by ``rand() * level`` with the
C library's ``rand()``, not OpenCV's own RNG, so ``cv2.setRNGSeed`` has no effect on it and the
order of the boxes changes from call to call (the *set* of boxes does not). We reseed the C
library's generator with ``srand(seed)`` right before every ``process()`` call, under a lock, which
makes the order a function of the image and the settings only: identical in every run and every
process (tested in ``tests/test_proposals_ss.py``). Where no C ``srand`` can be found we fall back
to a canonical order (boxes sorted, then shuffled by a seeded NumPy generator) and warn once.

The paper's detection entry used selective search "with superpixels twice the usual size", which
halves the proposals: that is the ``fast_x2`` / ``quality_x2`` preset (OpenCV's base ``k`` of the
Felzenszwalb segmentation doubled from 150 to 300; larger ``k`` means larger superpixels).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import cv2
import numpy as np

log = logging.getLogger(__name__)

SS_MODES = ("fast", "quality", "single")


@dataclass(frozen=True)
class SelectiveSearchSettings:
    """Everything that determines the boxes; ``asdict()`` of it goes into the cache fingerprint.

    mode: OpenCV strategy set: ``fast`` (HSV+Lab, 3 values of k, 2 strategies), ``quality``
        (5 colour spaces, 5 values of k, 4 strategies) or ``single`` (HSV, one k).
    base_k, inc_k, sigma: Felzenszwalb segmentation parameters; k runs over
        ``base_k, base_k + inc_k, ...``; sigma is the pre-segmentation Gaussian blur.
    max_side: the longer image side is scaled down to this before segmentation (``None``: never);
        boxes are mapped back to the original pixels. Selective search time grows with the pixel
        count, and a 4000 px photo yields no better boxes than its 500 px version.
    min_size: boxes narrower or lower than this (original pixels) are dropped.
    dedup_iou: a box whose IoU with a better-ranked kept box is >= this is dropped
        (1.0: only exact duplicates).
    max_proposals: keep at most this many best-ranked boxes (``None``: all).
    seed: seeds the C ``rand()`` that OpenCV ranks regions with.
    """

    mode: str = "fast"
    base_k: int = 150
    inc_k: int = 150
    sigma: float = 0.8
    max_side: int | None = 500
    min_size: float = 20.0
    dedup_iou: float = 1.0
    max_proposals: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in SS_MODES:
            raise ValueError(f"selective search mode must be one of {SS_MODES}, got {self.mode!r}")
        if self.base_k <= 0 or self.inc_k < 0 or self.sigma < 0:
            raise ValueError(f"need base_k > 0, inc_k >= 0, sigma >= 0; got {self}")
        if self.max_side is not None and self.max_side < 16:
            raise ValueError(f"max_side must be >= 16 or None, got {self.max_side}")
        if not 0.0 < self.dedup_iou <= 1.0:
            raise ValueError(f"dedup_iou must be in (0, 1], got {self.dedup_iou}")
        if self.max_proposals is not None and self.max_proposals <= 0:
            raise ValueError(f"max_proposals must be > 0 or None, got {self.max_proposals}")

    def as_dict(self) -> dict:
        return asdict(self)


SS_PRESETS: dict[str, SelectiveSearchSettings] = {
    "fast": SelectiveSearchSettings(mode="fast"),
    "quality": SelectiveSearchSettings(mode="quality"),
    # The paper's entry: superpixels twice the usual size (base k doubled), about half the boxes.
    "fast_x2": SelectiveSearchSettings(mode="fast", base_k=300),
    "quality_x2": SelectiveSearchSettings(mode="quality", base_k=300),
}


def ss_settings(preset: str = "fast", **overrides: object) -> SelectiveSearchSettings:
    """A preset from ``SS_PRESETS`` with some fields replaced (e.g. ``max_proposals=2000``)."""
    if preset not in SS_PRESETS:
        raise ValueError(f"unknown selective search preset {preset!r}; choose from {sorted(SS_PRESETS)}")
    unknown = set(overrides) - set(SS_PRESETS[preset].as_dict())
    if unknown:
        raise ValueError(f"unknown selective search settings {sorted(unknown)}")
    return replace(SS_PRESETS[preset], **overrides)


def _find_c_srand() -> Callable[[int], None] | None:
    """The ``srand`` of the C runtime OpenCV was linked against, or None if there is none."""
    names = ["ucrtbase", "msvcrt"] if sys.platform == "win32" else [None, ctypes.util.find_library("c")]
    for name in names:
        try:
            srand = ctypes.CDLL(name).srand
        except (OSError, AttributeError, TypeError):
            continue
        srand.argtypes = [ctypes.c_uint]
        srand.restype = None
        return srand
    return None


_C_SRAND = _find_c_srand()
# srand + process must be atomic: another thread's rand() in between would shift the sequence.
_PROCESS_LOCK = threading.Lock()


def _opencv_rects(image_bgr: np.ndarray, settings: SelectiveSearchSettings) -> np.ndarray:
    """OpenCV's selective search on one BGR uint8 image: (N, 4) int rects ``x, y, w, h``, ranked."""
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(image_bgr)
    if settings.mode == "fast":
        search.switchToSelectiveSearchFast(settings.base_k, settings.inc_k, settings.sigma)
    elif settings.mode == "quality":
        search.switchToSelectiveSearchQuality(settings.base_k, settings.inc_k, settings.sigma)
    else:
        search.switchToSingleStrategy(settings.base_k, settings.sigma)
    with _PROCESS_LOCK:
        if _C_SRAND is not None:
            # glibc treats srand(0) as srand(1): shift so that seeds 0 and 1 differ.
            _C_SRAND(settings.seed % 0xFFFFFFFF + 1)
        rects = search.process()
    rects = np.asarray(rects, dtype=np.int64).reshape(-1, 4)
    if _C_SRAND is None:
        rects = _canonical_order(rects, settings.seed)
    return rects


_warned_no_srand = False


def _canonical_order(rects: np.ndarray, seed: int) -> np.ndarray:
    """Fallback ranking where ``srand`` is unreachable: sort, then a seeded shuffle."""
    global _warned_no_srand
    if not _warned_no_srand:
        log.warning("C srand not found: selective search boxes use a seeded canonical order, not OpenCV's")
        _warned_no_srand = True
    rects = rects[np.lexsort(rects.T[::-1])]
    return rects[np.random.default_rng(seed).permutation(len(rects))]


def filter_ranked_boxes(
    boxes: np.ndarray, min_size: float, dedup_iou: float, max_proposals: int | None
) -> np.ndarray:
    """Indices of ranked ``boxes`` (N, 4 xyxy, best first) that survive the filters, in rank order:
    at least ``min_size`` wide and high, not a (near-)duplicate of a better box, at most
    ``max_proposals`` of them."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = np.flatnonzero((widths >= min_size) & (heights >= min_size))
    if dedup_iou >= 1.0:
        _, first = np.unique(boxes[keep], axis=0, return_index=True)
        keep = keep[np.sort(first)]
    elif len(keep):
        # Imported here: torch + torchvision double the start-up time of a pure selective-search process.
        import torch

        from detect.boxes import nms

        # Greedy suppression in rank order is NMS with scores that decrease along the ranking.
        rank_scores = torch.arange(len(keep), 0, -1, dtype=torch.float32)
        kept = nms(torch.from_numpy(boxes[keep]).float(), rank_scores, dedup_iou)
        keep = keep[np.sort(kept.numpy())]
    return keep[:max_proposals] if max_proposals is not None else keep


def selective_search(image_rgb: np.ndarray, settings: SelectiveSearchSettings) -> np.ndarray:
    """Ranked proposals for one ``(H, W, 3)`` uint8 RGB image: ``(N, 4)`` float32 xyxy in the
    image's continuous pixel coordinates, best-ranked first. Same image and settings, same output."""
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image_rgb.shape} {image_rgb.dtype}")
    height, width = image_rgb.shape[:2]
    scale = 1.0
    image_bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
    if settings.max_side is not None and max(height, width) > settings.max_side:
        scale = settings.max_side / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image_bgr = cv2.resize(image_bgr, size, interpolation=cv2.INTER_AREA)
    rects = _opencv_rects(image_bgr, settings)
    # A rect covers pixels x .. x+w-1, i.e. continuous [x, x+w); map back through the exact
    # per-axis scale that the resize used.
    scale_x, scale_y = image_bgr.shape[1] / width, image_bgr.shape[0] / height
    boxes = np.stack(
        [
            rects[:, 0] / scale_x,
            rects[:, 1] / scale_y,
            (rects[:, 0] + rects[:, 2]) / scale_x,
            (rects[:, 1] + rects[:, 3]) / scale_y,
        ],
        axis=1,
    ).astype(np.float32)
    np.clip(boxes[:, 0::2], 0, width, out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0, height, out=boxes[:, 1::2])
    keep = filter_ranked_boxes(boxes, settings.min_size, settings.dedup_iou, settings.max_proposals)
    return boxes[keep]
