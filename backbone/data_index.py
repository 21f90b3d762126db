"""Listing classification samples: class folders, validation label files, splits and duplicates.

Everything here works on ``(path, label)`` lists and never decodes an image; ``backbone.data``
builds data sets on top. Listings are sorted, so results do not depend on file-system order.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from backbone.runtime.errors import UserError
from backbone.runtime.paths import link_escape

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jpe"}
)
MAX_LOGGED_DUPLICATE_GROUPS = 20
LABEL_FILE_NAMES = ("LOC_val_solution.csv", "val_labels.txt", "labels.txt", "val.txt")

Sample = tuple[str, int]


class DatasetError(UserError, ValueError):
    """A classification data set that cannot be read as asked; ``str()`` is one line naming the
    folder or file and the problem (tools print it and exit 2)."""


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(directory: Path, recursive: bool = True) -> tuple[list[str], int]:
    """Sorted image paths under ``directory`` and the number of other files ignored."""
    found, ignored = [], 0
    walker = (
        os.walk(directory, followlinks=True) if recursive else [(str(directory), [], os.listdir(directory))]
    )
    for folder, subfolders, files in walker:
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in files:
            full = os.path.join(folder, name)
            if _is_image_name(name):
                found.append(full)
            elif recursive or os.path.isfile(full):
                ignored += 1
    return sorted(found), ignored


def scan_class_folders(directory: str | Path) -> tuple[list[Sample], list[str]]:
    """``(samples, class_names)`` of an ImageFolder tree: one sub-folder per class (sorted names,
    label = position), images found recursively, other files counted in the log."""
    directory = Path(directory)
    class_names = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
    if not class_names:
        raise DatasetError(f"{directory}: no class folders found")
    samples: list[Sample] = []
    ignored_total = 0
    for label, name in enumerate(class_names):
        paths, ignored = list_images(directory / name)
        ignored_total += ignored
        if not paths:
            logger.warning("%s: class folder %r holds no images", directory, name)
        samples.extend((path, label) for path in paths)
    if ignored_total:
        logger.info("%s: ignored %d files without an image extension", directory, ignored_total)
    if not samples:
        raise DatasetError(f"{directory}: no images found in {len(class_names)} class folders")
    return samples, class_names


def find_val_label_file(root: Path, val_dir: Path) -> Path | None:
    """The label file of a flat validation folder: ``LOC_val_solution.csv`` in ``root`` or up to
    three parents (the Kaggle ILSVRC layout), or a text file by a conventional name."""
    for folder in [val_dir, root, *list(root.resolve().parents)[:3]]:
        for name in LABEL_FILE_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def _parse_label(token: str, class_names: Sequence[str], where: str) -> int:
    if token in class_names:
        return class_names.index(token)
    if token.isdigit() and int(token) < len(class_names):
        return int(token)
    raise DatasetError(
        f"{where}: unknown class {token!r} (not a class folder name or index < {len(class_names)})"
    )


def _read_label_rows(label_file: Path) -> list[tuple[str, str, str]]:
    """``(image id, label token, location)`` rows of a LOC_val_solution CSV or a 'name label' file."""
    rows = []
    with open(label_file, newline="") as handle:
        if label_file.suffix.lower() == ".csv":
            for number, row in enumerate(csv.reader(handle), start=1):
                if not row or (number == 1 and row[0].strip().lower() == "imageid"):
                    continue
                if len(row) < 2 or not row[1].split():
                    raise DatasetError(f"{label_file}:{number}: expected 'ImageId,PredictionString'")
                rows.append((row[0].strip(), row[1].split()[0], f"{label_file}:{number}"))
        else:
            for number, line in enumerate(handle, start=1):
                parts = line.split()
                if not parts or parts[0].startswith("#"):
                    continue
                if len(parts) != 2:
                    raise DatasetError(
                        f"{label_file}:{number}: expected 'filename label', got {line.strip()!r}"
                    )
                rows.append((parts[0], parts[1], f"{label_file}:{number}"))
    return rows


def read_val_labels(label_file: str | Path, val_dir: str | Path, class_names: Sequence[str]) -> list[Sample]:
    """Samples of a flat validation folder labelled by ``label_file``.

    Entries match image files by full name or by stem (``ILSVRC2012_val_00000001`` matches
    ``ILSVRC2012_val_00000001.JPEG``). Labelled names with no image, and images with no label, are
    counted in the log and left out; names can never point outside ``val_dir``.
    """
    label_file, val_dir = Path(label_file), Path(val_dir)
    if not label_file.is_file():
        raise DatasetError(f"{label_file}: label file not found")
    paths, _ = list_images(val_dir, recursive=False)
    by_name = {os.path.basename(p): p for p in paths}
    by_stem = {os.path.splitext(name)[0]: p for name, p in by_name.items()}
    labelled: dict[str, int] = {}
    missing = 0
    for image_id, token, where in _read_label_rows(label_file):
        label = _parse_label(token, class_names, where)
        path = by_name.get(image_id) or by_stem.get(image_id)
        if path is None:
            missing += 1
        else:
            labelled[path] = label
    if missing:
        logger.warning("%s: %d labelled images are not in %s", label_file, missing, val_dir)
    unlabelled = len(paths) - len(labelled)
    if unlabelled:
        logger.warning("%s: %d images have no label in %s and are left out", val_dir, unlabelled, label_file)
    if not labelled:
        raise DatasetError(f"{label_file}: no entry matches an image in {val_dir}")
    return sorted(labelled.items())


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic per-class split: ``(train indices, val indices)``, both sorted.

    Each class's samples (in the given order) are permuted by a generator seeded with
    ``(seed, label)`` and ``round(n * val_fraction)`` of them held out (at least one, and never all,
    when the class has two or more samples), so every class keeps its share.
    """
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[int(label)].append(index)
    train, val = [], []
    for label, indices in sorted(by_class.items()):
        order = np.random.default_rng([seed, label]).permutation(len(indices))
        n_val = int(round(len(indices) * val_fraction))
        if len(indices) >= 2:
            n_val = min(max(n_val, 1), len(indices) - 1)
        val.extend(indices[i] for i in order[:n_val])
        train.extend(indices[i] for i in order[n_val:])
    return sorted(train), sorted(val)


def _file_digest(path: str, limit: int | None = None) -> str | None:
    """blake2b of the file's first ``limit`` bytes (all when None); None if it cannot be read."""
    try:
        digest = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as handle:
            if limit is not None:
                digest.update(handle.read(limit))
            else:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        return digest.hexdigest()
    except OSError:
        return None  # unreadable files are reported when they are decoded


def _refine(groups: list[list[int]], paths: Sequence[str], limit: int | None) -> list[list[int]]:
    """Split each group by file digest, keeping only sub-groups of two or more."""
    refined = []
    for group in groups:
        by_digest: dict[str, list[int]] = defaultdict(list)
        for index in group:
            digest = _file_digest(paths[index], limit)
            if digest is not None:
                by_digest[digest].append(index)
        refined.extend(g for g in by_digest.values() if len(g) > 1)
    return refined


def find_duplicate_groups(paths: Sequence[str]) -> list[list[int]]:
    """Groups (indices into ``paths``) of byte-identical files.

    Cheap tests first, so large sets stay fast: file sizes, then a hash of the first 8 KB of
    same-size files (JPEG headers and first scans already differ between photos), and a full hash
    only for files that agree on both.
    """
    by_size: dict[int, list[int]] = defaultdict(list)
    for index, path in enumerate(paths):
        try:
            by_size[os.path.getsize(path)].append(index)
        except OSError:
            continue
    groups = [group for group in by_size.values() if len(group) > 1]
    return _refine(_refine(groups, paths, 8192), paths, None)


def dedupe_samples(
    train: Sequence[Sample], val: Sequence[Sample], class_names: Sequence[str]
) -> tuple[list[Sample], list[Sample]]:
    """Drop byte-identical files: every copy of a file listed under two labels (its label is
    ambiguous), and all but one copy of a file repeated under one label (preferring the validation
    copy, so no image is both trained on and tested). Each removal is logged with its paths."""
    start = time.perf_counter()
    entries = [(path, label, "val") for path, label in val] + [
        (path, label, "train") for path, label in train
    ]
    drop: set[int] = set()
    conflicts = repeats = 0
    groups = find_duplicate_groups([path for path, _, _ in entries])
    for number, group in enumerate(groups):
        labels = {entries[i][1] for i in group}
        if len(labels) > 1:
            drop.update(group)
            conflicts += len(group)
            action = "dropped identical files listed under different labels"
        else:
            keep = min(group)  # val entries come first, then by listing order
            drop.update(i for i in group if i != keep)
            repeats += len(group) - 1
            action = "kept one of identical files under one label"
        if number < MAX_LOGGED_DUPLICATE_GROUPS:  # a huge set would flood the log
            listing = ", ".join(f"{entries[i][0]} ({class_names[entries[i][1]]})" for i in sorted(group))
            logger.warning("%s: %s", action, listing)
    if len(groups) > MAX_LOGGED_DUPLICATE_GROUPS:
        logger.warning("... and %d more groups of identical files", len(groups) - MAX_LOGGED_DUPLICATE_GROUPS)
    if drop:
        logger.warning(
            "dedupe: dropped %d files listed under two labels and %d repeated copies (%.1f s)",
            conflicts,
            repeats,
            time.perf_counter() - start,
        )
    kept_val = [(p, lb) for i, (p, lb, split) in enumerate(entries) if split == "val" and i not in drop]
    kept_train = [(p, lb) for i, (p, lb, split) in enumerate(entries) if split == "train" and i not in drop]
    return kept_train, kept_val


def check_links_inside(paths: Sequence[str], root: str | Path) -> None:
    """A one-line DatasetError for the first image file that is a symlink leading outside ``root``
    (``backbone.runtime.paths.link_escape``); one lstat per file, so large sets stay fast."""
    for path in paths:
        target = link_escape(path, root)
        if target is not None:
            raise DatasetError(f"{path}: symlink leads outside the data root {root} (to {target}): refused")
