"""The proposal shard file, and a cache's proposals read per image from its shards.

A shard (``shard_00000.npz``) is written by ``np.savez``: an uncompressed zip whose members are
``.npy`` files stored as they are. Its per-image arrays are small (``image_ids``, ``counts``,
``seconds``, ``fingerprint``, ``status``, ``status_detail``); ``boxes`` (``sum(counts)``, 4) and
``scores`` hold all of its images' proposals, image after image. Validating a shard reads only the
small arrays and the two big arrays' headers, which give the byte offset of their data in the file
(:func:`stored_array`). :class:`LazyProposals` then reads one image's slice with ``os.pread``, so a
split's cache (ILSVRC DET: ~480k images x ~2,000 boxes, ~15 GB) stays on disk. Nothing is unpickled
anywhere: an array holding objects makes its shard unreadable (recomputed by the next build).
"""

from __future__ import annotations

import logging
import operator
import os
import struct
import threading
import weakref
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from backbone.runtime.errors import UserError
from backbone.runtime.files import atomic_write
from detect.proposals.methods import ImageStatus

log = logging.getLogger(__name__)

PER_IMAGE = ("image_ids", "counts", "seconds", "fingerprint", "status", "status_detail")
FLOAT32 = np.dtype("<f4")
NO_PROBLEM: ImageStatus = ("", "")  # one shared tuple: a status list costs a pointer per image


class ProposalCacheError(UserError, ValueError):
    """A cache that cannot be used (stale, incomplete, unreadable) or an image that failed; one line."""


def shard_path(cache_dir: Path, shard: int) -> Path:
    return cache_dir / f"shard_{shard:05d}.npz"


def write_shard(
    path: Path,
    fingerprint: str,
    image_ids: np.ndarray,
    results: list[tuple[np.ndarray, np.ndarray, float]],
    status: list[ImageStatus] | None = None,
) -> None:
    counts = np.array([len(b) for b, _, _ in results], dtype=np.int64)
    status = status or [NO_PROBLEM] * len(results)
    arrays = {
        "image_ids": np.asarray(image_ids, dtype=np.int64),
        "counts": counts,
        "boxes": np.concatenate([b for b, _, _ in results]).astype(FLOAT32).reshape(-1, 4),
        "scores": np.concatenate([s for _, s, _ in results]).astype(FLOAT32),
        "seconds": np.array([t for _, _, t in results], dtype=np.float64),
        "fingerprint": np.array(fingerprint),
        # Unicode arrays, not objects: still read with allow_pickle=False.
        "status": np.array([kind for kind, _ in status], dtype=str),
        "status_detail": np.array([detail for _, detail in status], dtype=str),
    }
    # Uncompressed (np.savez): readers find each array's data at a fixed offset of the file.
    atomic_write(path, lambda handle: np.savez(handle, **arrays))


@dataclass(frozen=True)
class StoredArray:
    """Where a member of an uncompressed ``.npz`` keeps its data."""

    offset: int  # of the first element, in bytes from the start of the file
    shape: tuple[int, ...]
    dtype: np.dtype


def stored_array(handle: BinaryIO, archive: zipfile.ZipFile, name: str) -> StoredArray:
    """The layout of member ``name``; ValueError when compressed, Fortran-ordered or of objects."""
    info = archive.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{name} is compressed")
    # The local header's name and extra field lengths may differ from the central directory's.
    handle.seek(info.header_offset)
    local = handle.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise ValueError(f"{name}: no zip local header")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    handle.seek(info.header_offset + 30 + name_length + extra_length)
    version = np.lib.format.read_magic(handle)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"{name}: .npy format {version}")
    shape, fortran_order, dtype = readers[version](handle)
    if dtype.hasobject or (fortran_order and len(shape) > 1):
        raise ValueError(f"{name}: holds objects or is Fortran-ordered")
    return StoredArray(handle.tell(), shape, dtype)


@dataclass
class ShardIndex:
    """A validated shard: its per-image arrays, and where its boxes and scores are (not read)."""

    path: Path
    arrays: dict[str, np.ndarray]
    boxes: StoredArray
    scores: StoredArray


def _index_shard(path: Path, handle: BinaryIO, fingerprint: str, image_ids: np.ndarray) -> ShardIndex | None:
    with zipfile.ZipFile(handle) as archive:
        names = set(archive.namelist())
        arrays = {}
        for key in (k for k in PER_IMAGE if f"{k}.npy" in names):
            with archive.open(f"{key}.npy") as member:
                arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
        if str(arrays.get("fingerprint")) != fingerprint:
            return None
        if not np.array_equal(arrays.get("image_ids"), image_ids):
            return None
        boxes, scores = (stored_array(handle, archive, key) for key in ("boxes", "scores"))
    total = int(arrays["counts"].sum())
    if len(arrays["counts"]) != len(image_ids) or (arrays["counts"] < 0).any():
        raise ValueError("counts do not match the images")
    if (boxes.shape, boxes.dtype, scores.shape, scores.dtype) != ((total, 4), FLOAT32, (total,), FLOAT32):
        raise ValueError(f"boxes {boxes.shape} / scores {scores.shape} are not {total} float32 proposals")
    if scores.offset + 4 * total > os.fstat(handle.fileno()).st_size:
        raise ValueError("truncated")
    return ShardIndex(path, arrays, boxes, scores)


def read_shard(path: Path, fingerprint: str, image_ids: np.ndarray) -> ShardIndex | None:
    """The shard's index if it exists, belongs to this fingerprint and these images and holds plain
    float32 proposals, else None. Reads the per-image arrays only, never the boxes and scores."""
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as handle:
            return _index_shard(path, handle, fingerprint, image_ids)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        log.warning("%s: unreadable shard (%s), recomputing it", path, err)
        return None


def shard_status(arrays: dict[str, np.ndarray]) -> list[ImageStatus]:
    """Each image's recorded status; shards written before statuses existed hold no bad image."""
    count = len(arrays["image_ids"])
    kinds = arrays.get("status", np.full(count, ""))
    details = arrays.get("status_detail", np.full(count, ""))
    return [(str(k), str(d)) if k else NO_PROBLEM for k, d in zip(kinds, details, strict=True)]


# ---- reading per image ----------------------------------------------------------------------------


def _close_all(handles: dict[int, int]) -> None:
    for fd in handles.values():
        os.close(fd)
    handles.clear()


class LazyProposals(Sequence):
    """Proposals aligned with a record list, read from the shards when asked: ``proposals[i]`` is image
    ``i``'s ``(boxes (N, 4) float32 pixel xyxy, scores (N,))`` in rank order, a fresh array each time.

    Held in memory, under 50 bytes per image: ``image_ids``, ``counts`` (proposals per image),
    ``seconds`` (extraction time) and ``status`` (``("", "")``, ``("partial", what)`` or
    ``("skipped", problem)``). ``boxes`` and ``scores`` are sequences of one of the two. Up to
    ``open_shards`` shard files stay open (least recently used closed first); reads use ``os.pread``,
    which moves no file position, so forked data loader workers share the open files safely.
    """

    def __init__(self, image_ids: np.ndarray, shards: Sequence[ShardIndex], open_shards: int = 8) -> None:
        self.image_ids = np.asarray(image_ids, np.int64)
        counts = [s.arrays["counts"].astype(np.int64) for s in shards]
        self.counts = np.concatenate(counts) if counts else np.zeros(0, np.int64)
        seconds = [s.arrays["seconds"] for s in shards]
        self.seconds = np.concatenate(seconds) if seconds else np.zeros(0)
        self.status = [status for s in shards for status in shard_status(s.arrays)]
        # Image i: shard _shard_of[i], proposals _first[i] .. _first[i] + counts[i] of that shard.
        self._shard_of = np.repeat(np.arange(len(shards), dtype=np.int32), [len(c) for c in counts])
        self._first = np.concatenate([np.cumsum(c) - c for c in counts]) if counts else self.counts.copy()
        self._paths = [str(s.path) for s in shards]
        self._boxes_at = [s.boxes.offset for s in shards]
        self._scores_at = [s.scores.offset for s in shards]
        self.open_shards = open_shards
        self._sorted_ids: np.ndarray | None = None
        self._start_handles()

    def _start_handles(self) -> None:
        self._handles: OrderedDict[int, int] = OrderedDict()  # shard -> file descriptor
        self._lock = threading.Lock()
        self._pid = os.getpid()
        weakref.finalize(self, _close_all, self._handles)

    def __getstate__(self) -> dict[str, Any]:
        # Open files do not travel to another process (spawned loader workers): it opens its own.
        return {k: v for k, v in self.__dict__.items() if k not in ("_handles", "_lock", "_pid")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._start_handles()

    def close(self) -> None:
        with self._lock:
            _close_all(self._handles)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[override]
        return self.read(index, boxes=True, scores=True)  # type: ignore[return-value]

    def by_image_id(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        """The proposals of the image with this id; KeyError if the cache has none."""
        if self._sorted_ids is None:
            self._sorted_ids = np.argsort(self.image_ids, kind="stable")
        at = int(np.searchsorted(self.image_ids, image_id, sorter=self._sorted_ids))
        if at == len(self) or self.image_ids[self._sorted_ids[at]] != image_id:
            raise KeyError(image_id)
        return self[int(self._sorted_ids[at])]

    @property
    def boxes(self) -> ProposalColumn:
        return ProposalColumn(self, "boxes")

    @property
    def scores(self) -> ProposalColumn:
        return ProposalColumn(self, "scores")

    def read(self, index: int, *, boxes: bool, scores: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Image ``index``'s boxes and/or scores (None for the one not asked for)."""
        i = operator.index(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"image {i} of {len(self)}")
        i %= len(self)
        shard, first, count = int(self._shard_of[i]), int(self._first[i]), int(self.counts[i])
        out_boxes = np.empty((count, 4), FLOAT32) if boxes else None
        out_scores = np.empty(count, FLOAT32) if scores else None
        if count == 0:
            return out_boxes, out_scores
        with self._lock_for_this_process():
            fd = self._handle(shard)
            if out_boxes is not None:
                self._pread(fd, shard, out_boxes, self._boxes_at[shard] + 16 * first)
            if out_scores is not None:
                self._pread(fd, shard, out_scores, self._scores_at[shard] + 4 * first)
        return out_boxes, out_scores

    def _lock_for_this_process(self) -> threading.Lock:
        if os.getpid() != self._pid:
            # A forked child: the parent's lock may have been held at the fork; its files stay usable.
            self._lock, self._pid = threading.Lock(), os.getpid()
        return self._lock

    def _handle(self, shard: int) -> int:
        fd = self._handles.pop(shard, None)
        if fd is None:
            fd = os.open(self._paths[shard], os.O_RDONLY)
            while len(self._handles) >= max(self.open_shards, 1):
                os.close(self._handles.popitem(last=False)[1])
        self._handles[shard] = fd
        return fd

    def _pread(self, fd: int, shard: int, out: np.ndarray, offset: int) -> None:
        data = os.pread(fd, out.nbytes, offset)
        if len(data) != out.nbytes:
            raise ProposalCacheError(f"{self._paths[shard]}: shard ends early (changed while in use?)")
        out.reshape(-1)[:] = np.frombuffer(data, FLOAT32)


class ProposalColumn(Sequence):
    """Every image's boxes (or scores) of a :class:`LazyProposals`, read on access."""

    def __init__(self, proposals: LazyProposals, name: str) -> None:
        self.proposals = proposals
        self.name = name

    @property
    def counts(self) -> np.ndarray:
        return self.proposals.counts

    def __len__(self) -> int:
        return len(self.proposals)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        boxes, scores = self.proposals.read(index, boxes=self.name == "boxes", scores=self.name == "scores")
        return boxes if self.name == "boxes" else scores  # type: ignore[return-value]
