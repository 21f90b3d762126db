"""Detection data sets, all read into ``DetectionRecord`` / ``DetectionDataset`` (see ``records.py``).

Every reader returns ``(dataset, report)``; ``report`` (a ``LoadReport``) lists what was clipped,
dropped, fixed or skipped, with counts and file names. ``open_detection_dataset`` picks the reader
from what is on disk.
"""

from __future__ import annotations

import re
from pathlib import Path

from detect.datasets.coco import dataset_to_coco, read_coco, write_coco_json
from detect.datasets.common import DatasetError, LoadReport, OnError
from detect.datasets.ilsvrc import read_ilsvrc_det, read_synset_mapping
from detect.datasets.records import DetectionDataset, DetectionRecord
from detect.datasets.voc import VOC_CLASSES, parse_voc_xml, read_name_list, read_voc, read_xml_folder

__all__ = [
    "VOC_CLASSES",
    "DatasetError",
    "DetectionDataset",
    "DetectionRecord",
    "LoadReport",
    "dataset_to_coco",
    "detect_format",
    "open_detection_dataset",
    "parse_voc_xml",
    "read_coco",
    "read_ilsvrc_det",
    "read_name_list",
    "read_synset_mapping",
    "read_voc",
    "read_xml_folder",
    "write_coco_json",
]


def detect_format(path: str | Path) -> str:
    """``coco`` (a .json file), ``voc`` (ImageSets/Main), ``ilsvrc`` (Data/DET), ``folder``
    (``images/`` + ``annotations/``, or XML files directly in ``path``)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".json":
        return "coco"
    if not path.is_dir():
        raise DatasetError(path, "not found (expected a COCO .json file or a data set directory)")
    if (path / "ImageSets" / "Main").is_dir():
        return "voc"
    if (path / "Data" / "DET").is_dir() or (path / "Annotations" / "DET").is_dir():  # images may be absent
        return "ilsvrc"
    if (path / "annotations").is_dir() and ((path / "images").is_dir() or not any(path.glob("*.xml"))):
        return "folder"
    if next(path.glob("*.xml"), None) is not None:
        return "folder"
    raise DatasetError(
        path, "unrecognised layout (no ImageSets/Main, Data/DET, images/+annotations/ or *.xml)"
    )


def open_detection_dataset(
    path: str | Path,
    image_set: str | None = None,
    class_names: list[str] | None = None,
    image_root: str | Path | None = None,
    names_file: str | Path | None = None,
    synsets: str | Path | None = None,
    on_error: OnError = "raise",
    require_images: bool = True,
) -> tuple[DetectionDataset, LoadReport]:
    """Read any supported layout. ``image_set``: VOC ``ImageSets/Main`` set (required) or ILSVRC list
    (default ``val``; read over the folders its leading word names: ``train_3`` -> train, ``val1`` -> val);
    ``names_file``: split list for a folder (``.csv`` with ``filename`` or ``.txt``);
    ``image_root``: where a COCO file's images live (default: next to the JSON).
    ``require_images=False`` (scoring): absent image files are fine where the annotation gives the
    size; present ones are still read. Training keeps the default: every image must be there."""
    path = Path(path)
    kind = detect_format(path)
    if kind == "coco":
        return read_coco(path, image_root=image_root, on_error=on_error, require_images=require_images)
    if kind == "voc":
        if image_set is None:
            sets = sorted(p.stem for p in (path / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
            raise DatasetError(
                path, f"VOC layout needs an image set (one of: {', '.join(sets) or 'none found'})"
            )
        return read_voc(
            path, image_set, class_names or VOC_CLASSES, on_error=on_error, require_images=require_images
        )
    if kind == "ilsvrc":
        image_set = image_set or "val"
        # The folder is the word the set name starts with: train_K -> train, R-CNN's val1/val2 -> val.
        split = re.sub(r"[^A-Za-z].*", "", image_set) or image_set
        return read_ilsvrc_det(
            path,
            split,
            image_set,
            synsets=synsets,
            on_error=on_error,
            require_images=require_images,
        )
    names = read_name_list(names_file) if names_file is not None else None
    options = {"on_error": on_error, "name": path.name, "require_images": require_images}
    if (path / "annotations").is_dir() and ((path / "images").is_dir() or not any(path.glob("*.xml"))):
        return read_xml_folder(path / "images", path / "annotations", names, class_names, **options)
    return read_xml_folder(path, None, names, class_names, **options)
