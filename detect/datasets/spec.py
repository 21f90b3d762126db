"""A detection data set as a config names it (``DatasetSpec``), and opening it: the one schema
that tools/propose.py and tools/train_multibox.py (and the detector after them) share."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from backbone.runtime.paths import resolve_data_path
from detect.datasets import open_detection_dataset
from detect.datasets.common import LoadReport
from detect.datasets.records import DetectionDataset


@dataclass(frozen=True)
class DatasetSpec:
    path: str  # COCO json, VOC root, ILSVRC root or image+XML folder; "$SHARED_DATA/..." is expanded
    names_file: str | None = None  # split list for a folder (csv with 'filename', or txt)
    image_set: str | None = None  # VOC / ILSVRC image set
    image_root: str | None = None  # COCO images (default: beside the json)


def open_dataset_spec(spec: DatasetSpec) -> tuple[DetectionDataset, LoadReport]:
    """``open_detection_dataset`` on the spec's paths, each with ``$SHARED_DATA`` expanded."""
    return open_detection_dataset(
        resolve_data_path(spec.path),
        image_set=spec.image_set,
        image_root=resolve_data_path(spec.image_root) if spec.image_root else None,
        names_file=resolve_data_path(spec.names_file) if spec.names_file else None,
    )


def open_dataset_specs(specs: tuple[DatasetSpec, ...], name: str = "") -> tuple[DetectionDataset, list[str]]:
    """Several entries as one split (e.g. VOC 2007 + 2012 trainval) and a log line per entry.

    Class names must agree; image ids are kept when unique across the entries, otherwise the
    records are copied with new ids 1..N (the originals, which a proposal cache fingerprints,
    stay untouched).
    """
    if not specs:
        raise ValueError("no data set entry given")
    datasets, lines = [], []
    for spec in specs:
        dataset, report = open_dataset_spec(spec)
        datasets.append(dataset)
        lines.append(f"{spec.path}: {len(dataset.records)} images")
        lines.extend(report.lines())  # what was fixed or skipped: counts and the first few files
    first = datasets[0]
    for spec, dataset in zip(specs[1:], datasets[1:], strict=True):
        if dataset.class_names != first.class_names:
            raise ValueError(
                f"{spec.path}: classes {dataset.class_names} differ from "
                f"{specs[0].path}'s {first.class_names}"
            )
    records = [r for d in datasets for r in d.records]
    if len({r.image_id for r in records}) < len(records):
        records = [dataclasses.replace(r, image_id=i + 1) for i, r in enumerate(records)]
    return DetectionDataset(records, first.class_names, first.category_ids, name or first.name), lines
