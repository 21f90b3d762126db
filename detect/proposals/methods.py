"""The proposal methods a cache can hold, each with the fingerprint of everything it depends on.

- :class:`SelectiveSearchMethod`: OpenCV selective search with given settings.
- :class:`MultiBoxMethod`: the top ``top_k`` boxes of a trained MultiBox model file.
- :class:`UnionMethod`: the union of other methods' cached proposals in priority order
  (the paper's entry: MultiBox's 200 boxes, then selective search), near-duplicates removed.

:func:`build_proposer` proposes boxes for one arbitrary image (tools/detect_images.py) with the boxes a
cache of the same method holds for it; the cache's worker processes each build one with
:func:`init_worker` and read, decode and propose one image file per :func:`propose_image` task.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from backbone.image_io import ImageDecodeError, decode_image
from detect.boxes import nms
from detect.proposals.selective_search import SelectiveSearchSettings, selective_search


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class SelectiveSearchMethod:
    settings: SelectiveSearchSettings
    kind: str = "selective_search"

    def fingerprint(self) -> dict[str, Any]:
        # OpenCV's version is part of it: another build may segment or rank differently.
        return {"kind": self.kind, "settings": self.settings.as_dict(), "opencv": cv2.__version__}


@dataclass(frozen=True)
class MultiBoxMethod:
    checkpoint: str
    top_k: int = 200
    min_size: float = 20.0  # pixels, as selective search's: clipped slivers are not proposals
    kind: str = "multibox"

    def fingerprint(self) -> dict[str, Any]:
        if not Path(self.checkpoint).is_file():
            raise FileNotFoundError(f"{self.checkpoint}: MultiBox model file not found")
        # The file's content, not its name: retraining into the same path must invalidate caches.
        sha = file_sha256(self.checkpoint)
        return {"kind": self.kind, "checkpoint_sha256": sha, "top_k": self.top_k, "min_size": self.min_size}


@dataclass(frozen=True)
class UnionMethod:
    """``components``: (cache directory, method) pairs, highest priority first."""

    components: tuple[tuple[str, SelectiveSearchMethod | MultiBoxMethod], ...]
    dedup_iou: float = 0.8
    kind: str = "union"

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "dedup_iou": self.dedup_iou,
            "components": [method.fingerprint() for _, method in self.components],
        }


ProposalMethod = SelectiveSearchMethod | MultiBoxMethod | UnionMethod


def union_proposals(
    parts: list[tuple[np.ndarray, np.ndarray]], dedup_iou: float
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate ranked ``(boxes, scores)`` parts in priority order and drop every box whose IoU
    with an earlier kept box is >= ``dedup_iou`` (greedy, so earlier parts win)."""
    boxes = np.concatenate([b for b, _ in parts]).astype(np.float32).reshape(-1, 4)
    scores = np.concatenate([s for _, s in parts]).astype(np.float32)
    if len(boxes) == 0:
        return boxes, scores
    # NMS with scores falling along the priority order is exactly that greedy pass.
    priority = torch.arange(len(boxes), 0, -1, dtype=torch.float32)
    keep = np.sort(nms(torch.from_numpy(boxes), priority, dedup_iou).numpy())
    return boxes[keep], scores[keep]


# ---- proposing ---------------------------------------------------------------------------------

Proposer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def build_proposer(method: ProposalMethod, threads: int | None = None) -> Proposer:
    """``image (H, W, 3) uint8 RGB -> (boxes (N, 4) float32 xyxy in image pixels, scores (N,) float32)``
    for any method: the same boxes the cache holds for that image (a union proposes with each
    component, then merges as the cache's union does). A MultiBox model is loaded once, here.

    ``threads``: torch and OpenCV threads of this process (set here, process-wide); None leaves them.
    """
    if threads is not None:
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
    if isinstance(method, SelectiveSearchMethod):

        def propose_ss(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            boxes = selective_search(image, method.settings)
            # Selective search has no score; its rank order is kept as a score falling from 1.
            return boxes, (np.arange(len(boxes), 0, -1) / max(len(boxes), 1)).astype(np.float32)

        return propose_ss
    if isinstance(method, MultiBoxMethod):
        from detect.proposals.multibox import load_multibox, multibox_proposals

        model, arch, _ = load_multibox(method.checkpoint)
        model = model.to(memory_format=torch.channels_last)
        return lambda image: multibox_proposals(model, image, arch.image_size, method.top_k, method.min_size)
    if isinstance(method, UnionMethod):
        parts = [build_proposer(component) for _, component in method.components]
        return lambda image: propose_union(image, parts, method.dedup_iou)
    raise TypeError(f"not a proposal method: {method!r}")


def propose_union(
    image: np.ndarray, proposers: list[Proposer], dedup_iou: float
) -> tuple[np.ndarray, np.ndarray]:
    """Every proposer's boxes for ``image``, highest priority first, merged by :func:`union_proposals`."""
    return union_proposals([propose(image) for propose in proposers], dedup_iou)


# ---- worker side ------------------------------------------------------------------------------

_PROPOSER: list[Proposer] = []  # this worker process's proposer, built once by init_worker


def init_worker(method: SelectiveSearchMethod | MultiBoxMethod, threads: int = 1) -> None:
    """Per-process setup: one thread per worker (the pool provides the parallelism) and the proposer
    every :func:`propose_image` task of this process uses."""
    _PROPOSER[:] = [build_proposer(method, threads)]


ImageStatus = tuple[str, str]  # ("", "") decoded whole, ("partial", what) or ("skipped", problem)


def propose_image(task: tuple[int, str, bool]) -> tuple[int, np.ndarray, np.ndarray, float, ImageStatus]:
    """``(index, file_name, partial)`` -> ``(index, boxes, scores, seconds, status)``. A truncated
    JPEG is decoded as far as it goes when ``partial`` (status "partial"); an image that cannot be
    decoded gets no boxes and status ("skipped", problem): the caller applies the bad-image policy."""
    index, file_name, partial = task
    start = time.perf_counter()
    try:
        decoded = decode_image(file_name, partial=partial)
    except ImageDecodeError as err:
        return index, np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.0, ("skipped", err.problem)
    boxes, scores = _PROPOSER[0](decoded.image)
    status = ("partial", decoded.partial) if decoded.partial else ("", "")
    return index, boxes, scores, time.perf_counter() - start, status


def cores_per_rank() -> int:
    """Cores per torchrun process on this node (all cores when not under torchrun): how many
    proposal worker processes one rank runs by default. (Not ``detect.datasets.common.default_workers``,
    the I/O-bound thread count of annotation reading.)"""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, (os.cpu_count() or 1) // max(local_world, 1))


def method_summary(method: ProposalMethod) -> dict[str, Any]:
    """Human-readable description for manifests and logs (no file hashing)."""
    if isinstance(method, UnionMethod):
        components = [directory for directory, _ in method.components]
        return {"kind": method.kind, "dedup_iou": method.dedup_iou, "components": components}
    return asdict(method)
