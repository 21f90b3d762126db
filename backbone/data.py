"""Classification data sets: ImageFolder layouts (incl. ILSVRC CLS-LOC), splits, robust decoding.

API (what ``tools/train_cls.py`` and ``tools/eval_cls.py`` call)::

    train_ds, val_ds, class_names = build_classification_datasets(
        root,                    # str | Path | None; None -> the built-in synthetic shapes set
        image_size=128,          # training crop size; eval resizes to image_size / 0.875 then centre-crops
        split="auto",            # "auto" | "folders" | "stratified" (see below)
        val_fraction=0.2,        # held-out share per class when the split is derived
        seed=0,                  # split seed (and synthetic data seed)
        augment_seed=None,       # seed of the per-sample augmentation draws (default: seed)
        on_bad_image="skip",     # "error": the first bad image raises BadImageError (one line)
        cache=False,             # True: decode every image once, shorter side ~1.15 x image_size, in RAM
        dedupe=True,             # byte-identical files: drop those under two labels, keep one copy otherwise
        val_labels=None,         # label file for a flat val folder (found automatically if None)
        synthetic_train_size=8000, synthetic_val_size=1600,
        train_scale=None,        # train crop area range; None: (0.08, 1) real data, (0.35, 1) synthetic
        train_transform=None, val_transform=None,   # defaults: backbone.transforms train/eval pipelines
    )
    image, label = train_ds[i]   # float32 (3, S, S) tensor normalised with ImageNet mean/std, int
    train_ds.set_epoch(epoch)    # augmentation is a pure function of (augment_seed, epoch, index)

Layouts under ``root``:

- ``root/CLASS/*.jpg`` (no split shipped): a seeded, per-class stratified split (``val_fraction``).
- ``root/train/CLASS/*`` and ``root/val/CLASS/*``: the given split.
- ILSVRC CLS-LOC (``root`` = ``.../ILSVRC/Data/CLS-LOC``): ``train/nXXXXXXXX/*.JPEG`` and a flat
  ``val/*.JPEG`` labelled by ``LOC_val_solution.csv`` (Kaggle; searched in ``root`` and up to three
  parents) or by a ``val_labels`` text file of ``filename label`` lines (label: class name or index).
- ``root/train`` without ``root/val``: the stratified split of ``root/train``.

``split="auto"`` picks the given split when there is one, else the stratified split; "folders"
requires it; "stratified" always splits the training folders and ignores any ``val``.

Decoding follows ``backbone.bad_images`` (any format behind any extension; ``on_bad_image``). A
truncated JPEG is decoded as far as its data goes; a corrupt, empty or oversized file is skipped:
the sample is replaced by the next decodable one and its path logged with a running count
(``dataset.skipped`` in that process); with ``cache=True`` bad files are found while caching and
removed up front, with one summary in the log. Under ``on_bad_image="error"`` the first bad file
raises ``BadImageError`` (alias ``CorruptImageError``) whose message stays one line even when
raised inside a DataLoader worker. An image file that is a symlink leading outside ``root`` is
refused with one line (``DatasetError``) before anything is decoded. Checkpoints should record
``image_size``, ``class_names`` and the data settings in their meta so ``tools/eval_cls.py`` can
rebuild the same validation set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from backbone.bad_images import DEFAULT_ON_BAD_IMAGE, BadImages, check_on_bad_image
from backbone.data_index import (
    DatasetError,
    check_links_inside,
    dedupe_samples,
    find_val_label_file,
    read_val_labels,
    scan_class_folders,
    stratified_split,
)
from backbone.image_cache import CorruptImageError, DecodedImageCache
from backbone.image_io import ImageDecodeError, decode_image
from backbone.synthetic import SyntheticShapesDataset
from backbone.transforms import eval_transform as make_eval_transform
from backbone.transforms import train_transform as make_train_transform

logger = logging.getLogger(__name__)

SPLITS = ("auto", "folders", "stratified")
CACHE_SHORTER_SIDE_FACTOR = 1.15  # cached images keep a little room above the crop size for eval resizing
MAX_REPLACEMENT_TRIES = 20


class ImageClassificationDataset(Dataset):
    """``(path, label)`` samples decoded on access (or served from a ``DecodedImageCache``).

    ``transform(image, sample_seed=(augment_seed, epoch, index))`` follows ``backbone.transforms``; with
    ``transform=None`` the uint8 RGB image is returned.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        class_names: Sequence[str],
        transform: Callable | None = None,
        on_bad_image: str = DEFAULT_ON_BAD_IMAGE,
        cache: DecodedImageCache | None = None,
        augment_seed: int = 0,
    ) -> None:
        if not samples:
            raise DatasetError("data set has no samples")
        if cache is not None and len(cache) != len(samples):
            raise DatasetError(f"cache holds {len(cache)} images for {len(samples)} samples")
        self.samples = list(samples)
        self.class_names = list(class_names)
        self.transform = transform
        self.bad_images = BadImages(on_bad_image, "data")  # this process's tally (loader workers: theirs)
        self.cache = cache
        self.augment_seed = augment_seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.transform, "set_epoch"):  # e.g. ProgressiveResizeTransform
            self.transform.set_epoch(epoch)

    @property
    def skipped(self) -> dict[str, str]:
        """Path -> problem of the files skipped in this process."""
        return self.bad_images.files("skipped")

    def load_image(self, index: int) -> np.ndarray:
        """The decoded uint8 RGB image of sample ``index`` (raises ``ImageDecodeError``; a truncated
        JPEG decodes as far as it goes only under ``on_bad_image="skip"``)."""
        if self.cache is not None:
            return self.cache[index]
        decoded = decode_image(self.samples[index][0], partial=self.bad_images.partial_allowed)
        self.bad_images.record(self.samples[index][0], decoded)
        return decoded.image

    def _load_or_replace(self, index: int) -> tuple[np.ndarray, int]:
        for attempt in range(MAX_REPLACEMENT_TRIES):
            candidate = (index + attempt) % len(self.samples)
            try:
                return self.load_image(candidate), self.samples[candidate][1]
            except ImageDecodeError as err:
                self.bad_images.skip(err.path, err.problem)  # BadImageError under "error"
        path = self.samples[index][0]
        raise CorruptImageError(
            f"{path}: it and the {MAX_REPLACEMENT_TRIES - 1} samples after it are undecodable"
        )

    def __getitem__(self, index: int):
        image, label = self._load_or_replace(index)
        if self.transform is not None:
            image = self.transform(image, sample_seed=(self.augment_seed, self.epoch, index))
        return image, label


def _resolve_split(root: Path, split: str) -> str:
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
    has_train, has_val = (root / "train").is_dir(), (root / "val").is_dir()
    if split == "folders" and not (has_train and has_val):
        raise DatasetError(f"{root}: split='folders' needs train/ and val/ subfolders")
    if split == "auto":
        return "folders" if has_train and has_val else "stratified"
    return split


def _val_samples(
    val_dir: Path, root: Path, class_names: list[str], val_labels: str | Path | None
) -> list[tuple[str, int]]:
    """Validation samples from class folders or from flat images plus a label file."""
    if any(entry.is_dir() for entry in val_dir.iterdir()):
        samples, val_classes = scan_class_folders(val_dir)
        unknown = sorted(set(val_classes) - set(class_names))
        if unknown:
            raise DatasetError(f"{val_dir}: class folders not in train/: {', '.join(unknown[:5])}")
        remap = [class_names.index(name) for name in val_classes]
        return [(path, remap[label]) for path, label in samples]
    label_file = Path(val_labels) if val_labels else find_val_label_file(root, val_dir)
    if label_file is None:
        raise DatasetError(
            f"{val_dir}: flat validation images need a label file (LOC_val_solution.csv or val_labels=FILE)"
        )
    return read_val_labels(label_file, val_dir, class_names)


def _synthetic_datasets(
    image_size: int,
    seed: int,
    augment_seed: int,
    train_size: int,
    val_size: int,
    train_tf: Callable,
    val_tf: Callable,
) -> tuple[Dataset, Dataset, list[str]]:
    render_size = int(round(image_size * CACHE_SHORTER_SIDE_FACTOR))
    train = SyntheticShapesDataset(train_size, render_size, seed, 0, train_tf, augment_seed)
    # Validation indices follow the training ones: same distribution, no shared sample.
    val = SyntheticShapesDataset(val_size, render_size, seed, train_size, val_tf, augment_seed)
    return train, val, list(SyntheticShapesDataset.class_names)


def build_classification_datasets(
    root: str | Path | None,
    image_size: int,
    split: str = "auto",
    val_fraction: float = 0.2,
    seed: int = 0,
    augment_seed: int | None = None,
    on_bad_image: str = DEFAULT_ON_BAD_IMAGE,
    cache: bool = False,
    dedupe: bool = True,
    val_labels: str | Path | None = None,
    synthetic_train_size: int = 8000,
    synthetic_val_size: int = 1600,
    train_scale: tuple[float, float] | None = None,
    train_transform: Callable | None = None,
    val_transform: Callable | None = None,
    cache_threads: int | None = None,
) -> tuple[Dataset, Dataset, list[str]]:
    """``(train_ds, val_ds, class_names)`` for ``root`` (see the module docstring)."""
    augment = seed if augment_seed is None else augment_seed
    check_on_bad_image(on_bad_image)
    train_tf = train_transform or _default_train_transform(image_size, root is None, train_scale)
    val_tf = val_transform or make_eval_transform(image_size)
    if root is None:
        return _synthetic_datasets(
            image_size, seed, augment, synthetic_train_size, synthetic_val_size, train_tf, val_tf
        )
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: data set folder not found")
    mode = _resolve_split(root, split)
    train_dir = root / "train" if (root / "train").is_dir() else root
    train_samples, class_names = scan_class_folders(train_dir)
    check_links_inside([path for path, _ in train_samples], root)
    if mode == "folders":
        val_samples = _val_samples(root / "val", root, class_names, val_labels)
        check_links_inside([path for path, _ in val_samples], root)
        if dedupe:
            train_samples, val_samples = dedupe_samples(train_samples, val_samples, class_names)
    else:
        if not 0.0 < val_fraction < 1.0:
            raise DatasetError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if dedupe:
            train_samples, _ = dedupe_samples(train_samples, [], class_names)
        train_idx, val_idx = stratified_split([label for _, label in train_samples], val_fraction, seed)
        val_samples = [train_samples[i] for i in val_idx]
        train_samples = [train_samples[i] for i in train_idx]
    for split_name, samples in (("training", train_samples), ("validation", val_samples)):
        if not samples:
            raise DatasetError(
                f"{root}: no {split_name} images left (after the split and removing duplicates)"
            )
    logger.info(
        "%s: %d classes, %d train / %d val images (%s split)",
        root,
        len(class_names),
        len(train_samples),
        len(val_samples),
        mode,
    )
    datasets = []
    for samples, transform in ((train_samples, train_tf), (val_samples, val_tf)):
        image_cache = None
        if cache:
            side = int(round(image_size * CACHE_SHORTER_SIDE_FACTOR))
            image_cache = DecodedImageCache.build(
                [path for path, _ in samples], side, on_bad_image, num_threads=cache_threads
            )
            samples = [samples[i] for i in image_cache.kept_indices]
        datasets.append(
            ImageClassificationDataset(samples, class_names, transform, on_bad_image, image_cache, augment)
        )
    return datasets[0], datasets[1], class_names


def default_train_scale(synthetic: bool) -> tuple[float, float]:
    """Crop area range: the paper's 8%-100% for photos. An 8% crop of a synthetic image often
    misses its single object entirely, hence 35% there."""
    return (0.35, 1.0) if synthetic else (0.08, 1.0)


def _default_train_transform(image_size: int, synthetic: bool, scale: tuple[float, float] | None) -> Callable:
    return make_train_transform(image_size, scale=tuple(scale or default_train_scale(synthetic)))


__all__ = [
    "CorruptImageError",
    "DatasetError",
    "ImageClassificationDataset",
    "build_classification_datasets",
    "default_train_scale",
    "SPLITS",
]
