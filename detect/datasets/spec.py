"""A detection data set as a config names it (``DatasetSpec``), and opening it: the one schema
that tools/propose.py and tools/train_multibox.py (and the detector after them) share."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from backbone.runtime.paths import resolve_data_path
from detect.datasets import open_detection_dataset
from detect.datasets.common import DatasetError, LoadReport
from detect.datasets.records import DetectionDataset


@dataclass(frozen=True)
class DatasetSpec:
    """One data set entry of a config; an option its layout does not use is an error when opened."""

    path: str  # COCO json, VOC root, ILSVRC root or image+XML folder; "$SHARED_DATA/..." is expanded
    names_file: str | None = None  # split list for a folder (csv with 'filename', or txt)
    image_set: str | None = None  # VOC / ILSVRC image set
    image_root: str | None = None  # folder of the images: COCO (default: beside the json) or folder layout
    annotations: str | None = None  # folder layout: folder of the XML files (default: found by content)
    # Class names in label order (VOC layout, folder); default: VOC's 20 for a VOC year folder, else
    # the names found in the annotations, sorted.
    classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # Entries rebuilt from a checkpoint's plain config dict carry lists: keep the spec hashable.
        if isinstance(self.classes, list):
            object.__setattr__(self, "classes", tuple(self.classes))


def _data_path(value: str | None) -> Path | None:
    return resolve_data_path(value) if value else None


def open_dataset_spec(spec: DatasetSpec, on_bad_image: str = "skip") -> tuple[DetectionDataset, LoadReport]:
    """``open_detection_dataset`` on the spec's paths, each with ``$SHARED_DATA`` expanded; bad
    image files follow ``on_bad_image`` (``backbone.bad_images``)."""
    return open_detection_dataset(
        resolve_data_path(spec.path),
        image_set=spec.image_set,
        class_names=spec.classes,
        image_root=_data_path(spec.image_root),
        names_file=_data_path(spec.names_file),
        annotations=_data_path(spec.annotations),
        on_bad_image=on_bad_image,
    )


def open_dataset_specs(
    specs: tuple[DatasetSpec, ...], name: str = "", on_bad_image: str = "skip"
) -> tuple[DetectionDataset, list[str]]:
    """Several entries as one split (e.g. VOC 2007 + 2012 trainval) and a log line per entry.

    Class names must agree; image ids are kept when unique across the entries, otherwise the
    records are copied with new ids 1..N (the originals, which a proposal cache fingerprints,
    stay untouched).
    """
    if not specs:
        raise ValueError("no data set entry given")
    datasets, lines = [], []
    for spec in specs:
        dataset, report = open_dataset_spec(spec, on_bad_image)
        datasets.append(dataset)
        lines.append(f"{spec.path}: {len(dataset.records)} images")
        lines.extend(report.lines())  # what was fixed or skipped: counts and the first few files
    first = datasets[0]
    for spec, dataset in zip(specs[1:], datasets[1:], strict=True):
        if dataset.class_names != first.class_names:
            raise DatasetError(
                spec.path,
                f"classes {dataset.class_names} differ from {specs[0].path}'s {first.class_names}; "
                "set the same `classes` on every entry",
            )
    records = [r for d in datasets for r in d.records]
    if len({r.image_id for r in records}) < len(records):
        records = [dataclasses.replace(r, image_id=i + 1) for i, r in enumerate(records)]
    return DetectionDataset(records, first.class_names, first.category_ids, name or first.name), lines
