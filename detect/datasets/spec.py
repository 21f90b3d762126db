"""A detection data set as a config names it (``DatasetSpec``), and opening it: the one schema
that tools/propose.py and tools/train_multibox.py (and the detector after them) share."""

from __future__ import annotations

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
