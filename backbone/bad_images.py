"""One policy for images that do not decode as they are, shared by every tool that decodes images.

The option is ``on_bad_image`` (a config key where a tool has a config, ``--on-bad-image``
otherwise):

- ``skip`` (default): decode what can be decoded, skip the rest. A truncated JPEG is decoded up to
  where its data stops (the rest grey, as ``cv2.imread`` does), counted as decoded partially; an
  empty, corrupt or oversized file, a directory or a truncated PNG is skipped. Each such file is
  logged with its problem when met, and the run logs one summary of what it skipped and repaired:
  ``train: 2 images skipped: a.jpg (file is empty (zero bytes)), b.png (truncated PNG ...)``.
- ``error``: the first bad image, a truncated JPEG included, stops the tool with one line naming the
  file and the problem (``BadImageError``, a UserError: exit code 2).

Lossless conversions (RGBA, palette, grayscale, CMYK, 16-bit, PNG behind ``.jpg``) are never bad:
they are counted as converted and appear in the summary.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from backbone.image_io import DecodedImage, ImageDecodeError, decode_image
from backbone.runtime.errors import UserError

logger = logging.getLogger(__name__)

OnBadImage = Literal["skip", "error"]
ON_BAD_IMAGE: tuple[str, ...] = get_args(OnBadImage)
DEFAULT_ON_BAD_IMAGE: OnBadImage = "skip"
SUMMARY_NAMES = 5  # file names a summary line shows; each file was logged on its own when met

# Kinds of event, in summary order, with the words the summary uses.
KINDS = {"skipped": "skipped", "partial": "decoded partially", "converted": "converted to RGB"}


class BadImageError(UserError, ValueError):
    """A bad image under ``on_bad_image: error``. ``str()`` is ``"PATH: problem"``.

    torch re-raises a DataLoader worker's exception as ``type(msg)`` with the worker traceback in
    ``msg``; this class recovers its own one-line message from that text, so the user still sees one
    line naming the file.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if "\n" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip().splitlines()[0]
        super().__init__(message)


def check_on_bad_image(value: str, option: str = "on_bad_image") -> OnBadImage:
    """``value`` when it is a policy, else a UserError naming ``option`` (config key or flag)."""
    if value not in ON_BAD_IMAGE:
        raise UserError(f"{option}: must be one of {', '.join(ON_BAD_IMAGE)}, got {value!r}")
    return value  # type: ignore[return-value]


Event = tuple[str, str, str]  # (kind, path, detail): plain tuples cross process boundaries


class BadImages:
    """A run's policy and its tally of bad and converted images (thread-safe).

    ``read(path)`` returns the RGB image, or None for a skipped file; ``skip`` applies the policy
    to a problem met elsewhere (a proposal worker, a cache). Each skipped or partial file is logged
    once when first met (``name`` says what is being read); ``log_summary`` logs the totals once.
    """

    def __init__(self, on_bad_image: str = DEFAULT_ON_BAD_IMAGE, name: str = "") -> None:
        self.on_bad_image = check_on_bad_image(on_bad_image)
        self.name = name
        self._events: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}
        self._lock = threading.Lock()

    @property
    def partial_allowed(self) -> bool:
        return self.on_bad_image == "skip"

    def read(self, path: str | Path) -> np.ndarray | None:
        try:
            decoded = decode_image(path, partial=self.partial_allowed)
        except ImageDecodeError as err:
            self.skip(err.path, err.problem)
            return None
        self.record(path, decoded)
        return decoded.image

    def skip(self, path: str | Path, problem: str) -> None:
        """Count and name a bad file under ``skip``; BadImageError under ``error``."""
        if self.on_bad_image == "error":
            raise BadImageError(f"{path}: {problem}")
        self.add("skipped", path, problem)

    def record(self, path: str | Path, decoded: DecodedImage) -> None:
        if decoded.partial:
            self.add("partial", path, decoded.partial)
        if decoded.notes:
            self.add("converted", path, "; ".join(decoded.notes))

    def add(self, kind: str, path: str | Path, detail: str, log_each: bool = True) -> None:
        with self._lock:
            seen = self._events[kind]
            if str(path) in seen:
                return
            seen[str(path)] = detail
            count = len(seen)
        if kind != "converted" and log_each:
            prefix = f"{self.name}: " if self.name else ""
            logger.warning("%s%s %s (%s); %d so far", prefix, KINDS[kind], path, detail, count)

    def merge(self, events: Iterable[Event], log_each: bool = False) -> None:
        """Take events met and logged elsewhere (another process, a cache). Under ``error`` a
        skipped or partial file raises BadImageError: a cache built under ``skip`` is no excuse."""
        for kind, path, detail in events:
            if kind != "converted" and self.on_bad_image == "error":
                raise BadImageError(f"{path}: {detail}")
            self.add(kind, path, detail, log_each)

    def events(self) -> list[Event]:
        with self._lock:
            events = self._events.items()
            return [(kind, path, detail) for kind, seen in events for path, detail in seen.items()]

    def count(self, kind: str) -> int:
        return len(self._events[kind])

    def files(self, kind: str) -> dict[str, str]:
        """Path -> detail of ``kind``, in the order met."""
        with self._lock:
            return dict(self._events[kind])

    def summary_lines(self) -> list[str]:
        """One line per kind met: ``2 images skipped: a.jpg (file is empty ...), b.jpg (...)``."""
        prefix = f"{self.name}: " if self.name else ""
        lines = []
        for kind, words in KINDS.items():
            seen = self.files(kind)
            if not seen:
                continue
            shown = ", ".join(f"{path} ({detail})" for path, detail in list(seen.items())[:SUMMARY_NAMES])
            more = f", and {len(seen) - SUMMARY_NAMES} more" if len(seen) > SUMMARY_NAMES else ""
            noun = "image" if len(seen) == 1 else "images"
            lines.append(f"{prefix}{len(seen)} {noun} {words}: {shown}{more}")
        return lines

    def log_summary(self, log: logging.Logger = logger) -> None:
        for line in self.summary_lines():
            level = logging.INFO if " converted to RGB: " in line else logging.WARNING
            log.log(level, line)
