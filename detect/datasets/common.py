"""What every reader shares: the error type, the load report, safe paths, true image sizes, box repair.

Readers never trust what annotations say about an image: its size comes from the file's header
(PIL reads only the header, so a 4000 px JPEG costs microseconds), falling back to a full decode by
``backbone.image_io.read_image_rgb`` when PIL cannot identify the bytes. The header size equals the
decoded size because both ignore EXIF orientation (``read_image_rgb`` decodes with
``IMREAD_IGNORE_ORIENTATION``). An image file that is empty, a directory, not an image or above
``backbone.image_io.MAX_IMAGE_PIXELS`` is an ``ImageFileError``, which ``map_items`` skips (named in
the report) or raises by the ``on_bad_image`` policy (``backbone.bad_images``); a JPEG without its
end marker is kept and reported (decoders use the part present).

Scoring needs only the annotations: with ``require_images=False`` (``tools/eval_det.py``) an image
file that is absent is not an error when the annotation gives a valid size, which is then used
(``image_size``). A file that is present is still read and its own size wins.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np

from backbone.bad_images import DEFAULT_ON_BAD_IMAGE, OnBadImage, check_on_bad_image
from backbone.image_io import ImageDecodeError, looks_truncated_jpeg, read_image_header, read_image_rgb
from backbone.runtime.errors import UserError
from backbone.runtime.paths import link_escape

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
T = TypeVar("T")
R = TypeVar("R")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".JPEG", ".JPG", ".PNG", ".webp", ".tif", ".tiff")
IMAGE_SUFFIXES = frozenset(ext.lower() for ext in IMAGE_EXTENSIONS)

# Every kind of repair or skip a reader can report, with the sentence the summary prints.
REPORT_KINDS: dict[str, str] = {
    "box_clipped": "boxes clipped to the image",
    "box_inverted_dropped": "inverted boxes dropped (x2 < x1 or y2 < y1)",
    "box_zero_area_dropped": "zero-area boxes dropped",
    "box_outside_dropped": "boxes entirely outside the image dropped",
    "box_one_pixel_kept": "XML boxes with xmin == xmax or ymin == ymax kept 1 pixel wide (devkit's +1 rule)",
    "size_zero_fixed": "annotated size 0x0 replaced by the image's real size",
    "size_missing_fixed": "annotated size missing, taken from the image",
    "size_mismatch_fixed": "annotated size disagreeing with the image replaced by the real size",
    "size_from_annotation": "image files absent: size taken from the annotation",
    "size_unknown_no_objects": "image files absent, no size annotated, no objects: kept with size 0x0",
    "content_not_extension": "files whose content format differs from their extension (decoded by content)",
    "content_not_rgb": "images that are not plain RGB (RGBA/palette/grayscale/CMYK/16-bit; decoded to RGB)",
    "jpeg_truncated_kept": "JPEGs without their end marker (truncated?) kept: decoders use the part present",
    "size_from_annotation_bad_image": "image files unreadable: size taken from the annotation",
    "image_without_objects": "images without objects kept",
    "negative_image_no_annotation": "negative images without an annotation file kept with no objects",
    "image_without_annotation_ignored": "images in the folder without an annotation file (not loaded)",
    "difficult_kept": "difficult objects kept (flagged)",
    "crowd_as_difficult": "COCO iscrowd annotations kept as difficult",
    "duplicate_listed_skipped": "names listed more than once in a split list (repeats skipped)",
    "skipped": "files skipped on error",
}

_EXTENSION_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}
_EXTENSION_FORMATS.update({".tif": "TIFF", ".tiff": "TIFF"})
_JPEG_TAIL = 64  # bytes read from a JPEG's end to look for its end marker


class DatasetError(UserError, ValueError):
    """Bad data set input; ``str()`` is one line: ``"FILE: problem"``."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class ImageFileError(DatasetError):
    """An image file that cannot be used (empty, a directory, not an image, too large): a bad image,
    skipped or raised by the ``on_bad_image`` policy rather than by ``on_error``."""


@dataclass
class LoadReport:
    """What a reader fixed, kept or skipped: ``events[kind]`` lists one file name per occurrence."""

    name: str = ""
    events: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, file: str | Path) -> None:
        if kind not in REPORT_KINDS:
            raise KeyError(f"unknown report kind {kind!r}")
        self.events.setdefault(kind, []).append(str(file))

    def extend(self, events: Iterable[tuple[str, str]]) -> None:
        for kind, file in events:
            self.add(kind, file)

    def count(self, kind: str) -> int:
        return len(self.events.get(kind, []))

    def counts(self) -> dict[str, int]:
        return {kind: len(files) for kind, files in self.events.items() if files}

    def files(self, kind: str) -> list[str]:
        """Distinct file names of ``kind`` in first-seen order."""
        return list(dict.fromkeys(self.events.get(kind, [])))

    def lines(self, max_files: int = 5) -> list[str]:
        """Human-readable summary, one line per kind that occurred, naming up to ``max_files`` files."""
        out = []
        for kind, description in REPORT_KINDS.items():
            if not self.events.get(kind):
                continue
            names = self.files(kind)
            shown = ", ".join(Path(n).name if kind != "skipped" else n for n in names[:max_files])
            more = f", ... ({len(names) - max_files} more files)" if len(names) > max_files else ""
            out.append(f"{self.name}: {description}: {self.count(kind)} ({shown}{more})")
        return out

    def log(self, log: logging.Logger = logger) -> None:
        for line in self.lines():
            log.info(line)


def resolve_inside(root: str | Path, name: str, source: str | Path) -> Path:
    """``root / name`` as an absolute path, refusing names that escape ``root``.

    ``name`` comes from an annotation file (``source``), so ``..`` components and absolute paths
    that leave the image root are rejected. Symlinked folders the user placed (e.g. ``images ->
    /mnt/big``) are followed as usual; a symlinked *file* leading outside the root is refused
    (``backbone.runtime.paths.link_escape``).
    """
    if not name or "\x00" in name:
        raise DatasetError(source, f"empty or invalid image file name {name!r}")
    root_abs = os.path.abspath(root)
    candidate = os.path.normpath(os.path.join(root_abs, name))
    if os.path.commonpath([root_abs, candidate]) != root_abs:
        raise DatasetError(source, f"file name {name!r} resolves outside the image root {root_abs}")
    target = link_escape(candidate, root_abs)
    if target is not None:
        problem = f"symlink leads outside the image root {root_abs} (to {target}): refused"
        raise DatasetError(candidate, problem)
    return Path(candidate)


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    events: tuple[tuple[str, str], ...]  # report events about the content (format, colour mode)


def read_image_info(path: Path) -> ImageInfo:
    """True ``(width, height)`` of an image file from its header; decodes only if PIL cannot read it.
    ImageFileError (a bad image) when the file is missing, empty, a directory, not an image or too large."""
    try:
        header = read_image_header(path)
        if header is None:
            decoded = read_image_rgb(path)
            return ImageInfo(int(decoded.shape[1]), int(decoded.shape[0]), ())
    except ImageDecodeError as err:
        if err.problem == "file not found":  # a data set error (on_error), not a bad image
            raise DatasetError(path, "image file not found") from None
        raise ImageFileError(path, err.problem) from None
    events = [(kind, str(path)) for kind in _content_events(path, header.format, header.mode)]
    if header.format in ("JPEG", "MPO") and _jpeg_end_missing(path):
        events.append(("jpeg_truncated_kept", str(path)))
    return ImageInfo(header.width, header.height, tuple(events))


def _content_events(path: Path, fmt: str, mode: str) -> list[str]:
    expected = _EXTENSION_FORMATS.get(path.suffix.lower())
    kinds = []
    if expected is not None and fmt != expected and not (expected == "JPEG" and fmt == "MPO"):
        kinds.append("content_not_extension")
    if mode != "RGB":
        kinds.append("content_not_rgb")
    return kinds


def _jpeg_end_missing(path: Path) -> bool:
    """Small reads at the file's end: a JPEG cut short has no end marker (``looks_truncated_jpeg``);
    the reads grow only while they find nothing but zero padding."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(2)
            for tail in (_JPEG_TAIL, 1 << 16, size):
                handle.seek(max(2, size - tail))
                data = handle.read().rstrip(b"\x00")
                if data or tail >= size:
                    return looks_truncated_jpeg(head + data)
    except OSError:
        return False
    return False


def first_listed(keys: Iterable[object], list_file: str | Path, report: LoadReport) -> list[int]:
    """Positions of each key's first occurrence; every repeat is reported against ``list_file``
    (an image listed twice would count its objects twice in the metrics)."""
    seen: set[object] = set()
    kept = []
    for position, key in enumerate(keys):
        if key in seen:
            report.add("duplicate_listed_skipped", list_file)
        else:
            seen.add(key)
            kept.append(position)
    return kept


def find_image(image_dir: Path, stem: str, source: str | Path) -> Path | None:
    """The file ``image_dir/stem.EXT`` for the first known image extension that exists."""
    for ext in IMAGE_EXTENSIONS:
        candidate = resolve_inside(image_dir, stem + ext, source)
        if candidate.is_file():
            return candidate
    return None


def repair_boxes(
    boxes: np.ndarray, width: int, height: int, source: str
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Clip ``(N, 4)`` xyxy boxes to the image and drop the degenerate ones.

    Returns ``(clipped boxes float32, indices kept, report events)``. Inverted and zero-area boxes
    are dropped as annotated; boxes that clipping leaves empty (entirely outside) are dropped too.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if not np.isfinite(boxes).all():
        raise DatasetError(source, "box coordinate is not a finite number")
    events: list[tuple[str, str]] = []
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    inverted = (widths < 0) | (heights < 0)
    zero_area = ~inverted & ((widths == 0) | (heights == 0))
    limits = np.array([width, height, width, height], np.float64)
    clipped = np.clip(boxes, 0.0, limits)
    changed = (clipped != boxes).any(axis=1) & ~inverted & ~zero_area
    empty_after = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    outside = changed & empty_after
    events += [("box_inverted_dropped", source)] * int(inverted.sum())
    events += [("box_zero_area_dropped", source)] * int(zero_area.sum())
    events += [("box_outside_dropped", source)] * int(outside.sum())
    events += [("box_clipped", source)] * int((changed & ~outside).sum())
    keep = np.flatnonzero(~inverted & ~zero_area & ~outside)
    return clipped[keep].astype(np.float32), keep, events


def checked_size(
    annotated: tuple[int, int] | None, real: tuple[int, int], source: str
) -> list[tuple[str, str]]:
    """Report events for an annotated ``(width, height)`` versus the image's real one."""
    if annotated is None:
        return [("size_missing_fixed", source)]
    if annotated == (0, 0):
        return [("size_zero_fixed", source)]
    if annotated != real:
        return [("size_mismatch_fixed", source)]
    return []


def valid_size(size: tuple[int, int] | None) -> bool:
    return size is not None and size[0] > 0 and size[1] > 0


def image_size(
    image_path: Path,
    annotated: tuple[int, int] | None,
    source: str,
    require_images: bool = True,
    needed: bool = True,
) -> tuple[int, int, list[tuple[str, str]]]:
    """``(width, height, report events)`` of the image an annotation (``source``) describes.

    The image file is read whenever it exists (its size wins; a disagreeing annotated size is
    reported as fixed) and whenever ``require_images``. Otherwise an absent file takes the
    annotated size when it is valid (both > 0); with no valid size the image still loads as 0x0
    when the size is not ``needed`` (no boxes to clip), else it is an error naming the file.
    """
    if require_images or image_path.is_file():
        try:
            info = read_image_info(image_path)
        except ImageFileError:
            if require_images or not valid_size(annotated):
                raise
            # Scoring needs no pixels: a damaged file is as good as an absent one with a valid size.
            assert annotated is not None
            return int(annotated[0]), int(annotated[1]), [("size_from_annotation_bad_image", source)]
        events = [*info.events, *checked_size(annotated, (info.width, info.height), source)]
        return info.width, info.height, events
    if valid_size(annotated):
        assert annotated is not None
        return int(annotated[0]), int(annotated[1]), [("size_from_annotation", source)]
    if not needed:
        return 0, 0, [("size_unknown_no_objects", source)]
    given = "no size" if annotated is None else f"size {annotated[0]}x{annotated[1]}"
    raise DatasetError(image_path, f"image file not found, and its annotation has {given} to use instead")


def map_items(
    function: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    on_error: OnError,
    on_bad_image: OnBadImage = DEFAULT_ON_BAD_IMAGE,
) -> Iterator[tuple[T, R | None, DatasetError | None]]:
    """Apply ``function`` to each item in threads (I/O bound: headers, XML), in input order.

    Yields ``(item, result, None)`` or, for an error that is skipped, ``(item, None, error)``; the
    first error (in input order) that is not skipped propagates. A bad image (``ImageFileError``)
    is skipped by ``on_bad_image="skip"``, any other error by ``on_error="skip"``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    check_on_bad_image(on_bad_image)

    def guarded(item: T) -> tuple[R | None, DatasetError | None]:
        try:
            return function(item), None
        except DatasetError as err:
            return None, err

    items = list(items)
    executor = ThreadPoolExecutor(max_workers=workers) if workers > 1 and len(items) >= 32 else None
    try:
        # Bounded batches: a 450k-image ILSVRC list never holds 450k futures at once.
        batch = max(256, 64 * workers)
        for begin in range(0, len(items), batch):
            part = items[begin : begin + batch]
            results = executor.map(guarded, part) if executor is not None else map(guarded, part)
            for item, (result, error) in zip(part, results, strict=True):
                bad_image = isinstance(error, ImageFileError)
                if error is not None and (on_bad_image if bad_image else on_error) in ("raise", "error"):
                    raise error
                yield item, result, error
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def default_workers() -> int:
    # Header reads and XML parsing wait on the disk, not the CPU: a few threads beyond the cores help.
    return min(8, (os.cpu_count() or 1) * 4)
