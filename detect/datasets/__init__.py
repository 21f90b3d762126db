"""Detection data sets, all read into ``DetectionRecord`` / ``DetectionDataset`` (see ``records.py``).

Every reader returns ``(dataset, report)``; ``report`` (a ``LoadReport``) lists what was clipped,
dropped, fixed or skipped, with counts and file names. ``open_detection_dataset`` picks the reader
from what is on disk.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from backbone.bad_images import OnBadImage, check_on_bad_image
from detect.datasets.coco import dataset_to_coco, read_coco, write_coco_json
from detect.datasets.common import DatasetError, LoadReport, OnError
from detect.datasets.ilsvrc import read_ilsvrc_det, read_synset_mapping
from detect.datasets.layout import looks_like_folder_dataset, resolve_folder_layout
from detect.datasets.records import DetectionDataset, DetectionRecord
from detect.datasets.voc import VOC_CLASSES, parse_voc_xml, read_name_list, read_voc, read_xml_folder

__all__ = [
    "VOC_CLASSES",
    "class_list",
    "DatasetError",
    "DetectionDataset",
    "DetectionRecord",
    "LoadReport",
    "dataset_to_coco",
    "detect_format",
    "is_voc_year_folder",
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


def detect_format(path: str | Path, annotations: str | Path | None = None) -> str:
    """``coco`` (a .json file), ``voc`` (ImageSets/Main), ``ilsvrc`` (Data/DET), ``folder`` (images
    with their XML beside them or in a folder of any name, see ``layout.py``; also any directory
    when its ``annotations`` folder is given)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".json":
        return "coco"
    if not path.is_dir():
        raise DatasetError(path, "not found (expected a COCO .json file or a data set directory)")
    if (path / "ImageSets" / "Main").is_dir():
        return "voc"
    if (path / "Data" / "DET").is_dir() or (path / "Annotations" / "DET").is_dir():  # images may be absent
        return "ilsvrc"
    if annotations is not None or looks_like_folder_dataset(path):
        return "folder"
    raise DatasetError(
        path, "unrecognised layout (no ImageSets/Main, Data/DET, images or *.xml in it or its subfolders)"
    )


def is_voc_year_folder(path: str | Path) -> bool:
    """A Pascal VOC devkit year folder (``VOCdevkit/VOC2007``): named ``VOC<year>``, with
    ``Annotations/`` and ``ImageSets/Main/`` (``JPEGImages/`` may be absent when scoring). Only such
    a folder defaults to VOC's 20 classes; other sets in the VOC layout have their own names."""
    path = Path(os.path.abspath(path))
    layout = (path / "Annotations").is_dir() and (path / "ImageSets" / "Main").is_dir()
    return layout and re.fullmatch(r"VOC\d{4}", path.name) is not None


# The options each layout reads, and how a user names them (config key / command-line flag).
_OPTIONS_USED = {
    "coco": {"image_root"},
    "voc": {"image_set", "class_names"},
    "ilsvrc": {"image_set", "synsets"},
    "folder": {"image_root", "annotations", "names_file", "class_names"},
}
_OPTION_NAMES = {
    "image_set": "image_set (--image-set)",
    "image_root": "image_root (--image-root)",
    "annotations": "annotations (--annotations)",
    "names_file": "names_file (--names-file)",
    "class_names": "classes (--classes)",
    "synsets": "synsets (--synsets)",
}
_LAYOUT_NAMES = {  # (one, several)
    "coco": ("a COCO JSON file", "COCO files"),
    "voc": ("a VOC-layout folder", "VOC-layout folders"),
    "ilsvrc": ("an ILSVRC DET root", "ILSVRC roots"),
    "folder": ("a folder of images + XML", "image + XML folders"),
}


def check_options_used(path: Path, kind: str, given: dict[str, object]) -> None:
    """A one-line error for an option the ``kind`` reader would ignore, rather than ignoring it."""
    for option, value in given.items():
        if value is not None and option not in _OPTIONS_USED[kind]:
            users = [_LAYOUT_NAMES[k][1] for k, used in _OPTIONS_USED.items() if option in used]
            raise DatasetError(
                path,
                f"{_OPTION_NAMES[option]} is not used for {_LAYOUT_NAMES[kind][0]}, only for "
                f"{' and '.join(users)}: remove it",
            )


def class_list(text: str) -> tuple[str, ...]:
    """``--classes A,B,C`` (an argparse ``type``): the names in label order, spaces trimmed."""
    return tuple(name.strip() for name in text.split(","))


def checked_class_names(path: Path, class_names: list[str] | tuple[str, ...] | None) -> list[str] | None:
    if class_names is None:
        return None
    names = [str(name).strip() for name in class_names]
    if not names or not all(names):
        raise DatasetError(path, f"classes (--classes) must be non-empty names, got {list(class_names)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DatasetError(path, f"classes (--classes) names {', '.join(map(repr, repeated))} more than once")
    return names


def open_detection_dataset(
    path: str | Path,
    image_set: str | None = None,
    class_names: list[str] | tuple[str, ...] | None = None,
    image_root: str | Path | None = None,
    names_file: str | Path | None = None,
    synsets: str | Path | None = None,
    on_error: OnError = "raise",
    require_images: bool = True,
    annotations: str | Path | None = None,
    on_bad_image: OnBadImage = "skip",
) -> tuple[DetectionDataset, LoadReport]:
    """Read any supported layout. ``image_set``: VOC ``ImageSets/Main`` set (required) or ILSVRC list
    (default ``val``; read over the folders its leading word names: ``train_3`` -> train, ``val1`` -> val);
    ``names_file``: split list for a folder (``.csv`` with ``filename`` or ``.txt``);
    ``image_root``: the folder of the images of a COCO file (default: next to the JSON) or of a
    folder layout (default: found, see ``layout.py``); ``annotations``: a folder layout's XML folder
    (default: found). ``class_names`` (VOC, folder): the classes in label order; default VOC's 20
    for a VOC year folder (``is_voc_year_folder``), else the names found, sorted.
    An option the layout does not use is an error naming it, never ignored.
    ``require_images=False`` (scoring): absent image files are fine where the annotation gives the
    size; present ones are still read. Training keeps the default: every image must be there.
    ``on_bad_image`` (``backbone.bad_images``): an image file that is empty, a directory, not an
    image or too large is skipped (named in the report) or, with ``"error"``, raised."""
    path = Path(path)
    kind = detect_format(path, annotations)
    given = {"image_set": image_set, "class_names": class_names, "image_root": image_root}
    given |= {"names_file": names_file, "synsets": synsets, "annotations": annotations}
    check_options_used(path, kind, given)
    class_names = checked_class_names(path, class_names)
    images = {"require_images": require_images, "on_bad_image": check_on_bad_image(on_bad_image)}
    if kind == "coco":
        return read_coco(path, image_root=image_root, on_error=on_error, **images)
    if kind == "voc":
        if image_set is None:
            sets = sorted(p.stem for p in (path / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
            raise DatasetError(
                path, f"VOC layout needs an image set (one of: {', '.join(sets) or 'none found'})"
            )
        if class_names is None and is_voc_year_folder(path):
            class_names = list(VOC_CLASSES)
        return read_voc(path, image_set, class_names, on_error=on_error, **images)
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
            **images,
        )
    names = read_name_list(names_file) if names_file is not None else None
    layout = resolve_folder_layout(path, image_root, annotations, require_images)
    options = {"on_error": on_error, "name": path.name, **images}
    options["names_source"] = names_file
    return read_xml_folder(layout.images, layout.annotations, names, class_names, **options)
