"""Pascal VOC style XML: the VOC devkit layout and any folder of images with an XML per image.

``read_voc`` reads ``JPEGImages/ Annotations/ ImageSets/Main/<set>.txt``. ``read_xml_folder`` is the
general form: an image directory, an XML directory (the same one when the XML sits beside each
image, as in ``fruit/``) and an optional list of names (``raccoon/``'s CSV split lists). Both
return ``(DetectionDataset, LoadReport)``. Image ids are 1-based positions in list order.
With ``require_images=False`` the image files may be absent: sizes then come from the XML's
``<size>`` (see ``common.image_size``), for scoring on a machine without the images.
"""

from __future__ import annotations

import csv
import logging
import math
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backbone.bad_images import OnBadImage
from detect.datasets.common import (
    IMAGE_SUFFIXES,
    DatasetError,
    LoadReport,
    OnError,
    default_workers,
    find_image,
    first_listed,
    image_size,
    map_items,
    repair_boxes,
    resolve_inside,
)
from detect.datasets.records import DetectionDataset, DetectionRecord

logger = logging.getLogger(__name__)

# How to name classes an annotation uses but the class list lacks (config key and flag).
CLASSES_HINT = "not in the classes given; list every class in `classes` (--classes) or leave it unset"
VOC_CLASSES_HINT = "not among VOC's 20 classes; set `classes` (--classes) to this data set's class names"

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip


@dataclass
class XmlAnnotation:
    """One parsed XML file, boxes still in the file's 1-based inclusive pixel indices."""

    path: Path
    filename: str | None
    size: tuple[int, int] | None  # (width, height) as annotated
    names: list[str]
    boxes: np.ndarray  # (N, 4) xmin, ymin, xmax, ymax
    difficult: np.ndarray  # (N,) bool


def _number(element: ET.Element, tag: str, path: Path) -> float:
    text = element.findtext(tag)
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DatasetError(path, f"malformed XML: <{tag}> is {text!r}, not a number") from None
    if not math.isfinite(value):  # float() accepts 'nan' and 'inf'; no size, box or flag can be one
        raise DatasetError(path, f"malformed XML: <{tag}> is {text!r}, not a finite number")
    return value


def parse_voc_xml(path: str | Path) -> XmlAnnotation:
    """Parse one VOC/ILSVRC annotation file; malformed content raises a one-line ``DatasetError``."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise DatasetError(path, "annotation file not found") from None
    except ET.ParseError as err:
        raise DatasetError(path, f"malformed XML ({err})") from None
    except OSError as err:  # a directory named *.xml, no permission
        raise DatasetError(path, f"cannot read annotation file ({err.strerror or err})") from None
    if root.tag != "annotation":
        raise DatasetError(path, f"malformed XML: root element is <{root.tag}>, expected <annotation>")
    size_el = root.find("size")
    size = None
    if size_el is not None and size_el.find("width") is not None:
        size = (int(_number(size_el, "width", path)), int(_number(size_el, "height", path)))
    names, boxes, difficult = [], [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        if not name or box is None:
            raise DatasetError(path, "malformed XML: <object> without <name> or <bndbox>")
        names.append(name)
        boxes.append([_number(box, tag, path) for tag in ("xmin", "ymin", "xmax", "ymax")])
        difficult.append(
            bool(int(_number(obj, "difficult", path))) if obj.find("difficult") is not None else False
        )
    return XmlAnnotation(
        path=path,
        filename=(root.findtext("filename") or "").strip() or None,
        size=size,
        names=names,
        boxes=np.asarray(boxes, np.float64).reshape(-1, 4),
        difficult=np.asarray(difficult, bool),
    )


def record_from_xml(
    annotation: XmlAnnotation,
    image_path: Path,
    image_id: int,
    class_index: dict[str, int],
    require_images: bool = True,
    unknown_hint: str = CLASSES_HINT,
) -> tuple[DetectionRecord, list[tuple[str, str]]]:
    """Build a record: real image size (the annotated one for an absent file when not
    ``require_images``), VOC boxes to continuous coordinates, repaired boxes. A name outside
    ``class_index`` is an error ending in ``unknown_hint`` (how to name it)."""
    source = str(annotation.path)
    width, height, events = image_size(
        image_path, annotation.size, source, require_images, needed=len(annotation.names) > 0
    )
    unknown = sorted({n for n in annotation.names if n not in class_index})
    if unknown:
        raise DatasetError(source, f"unknown class name(s) {', '.join(map(repr, unknown))}: {unknown_hint}")
    # 1-based inclusive indices -> continuous: x1 = xmin - 1, x2 = xmax (the devkit's +1 width).
    continuous = annotation.boxes - np.array([1.0, 1.0, 0.0, 0.0])
    boxes, keep, box_events = repair_boxes(continuous, width, height, source)
    events += box_events
    kept = annotation.boxes[keep]
    points = (kept[:, 0] == kept[:, 2]) | (kept[:, 1] == kept[:, 3])  # legal, but often a labelling slip
    events += [("box_one_pixel_kept", source)] * int(points.sum())
    labels = np.asarray([class_index[annotation.names[i]] for i in keep], np.int64)
    difficult = annotation.difficult[keep]
    if len(keep) == 0:
        events.append(("image_without_objects", source))
    events += [("difficult_kept", source)] * int(difficult.sum())
    record = DetectionRecord(image_id, str(image_path), width, height, boxes, labels, difficult)
    return record, events


def _collect(
    items: list[tuple[int, Path, Path | None]],
    class_names: list[str] | None,
    on_error: OnError,
    workers: int,
    report: LoadReport,
    image_lookup: Callable[[XmlAnnotation], Path] | None,
    require_images: bool = True,
    on_bad_image: OnBadImage = "skip",
) -> tuple[list[DetectionRecord], list[str]]:
    """Parse ``(image_id, xml_path, image_path | None)`` items (image path found by ``image_lookup``
    when None) and build records; class names are discovered (sorted) when not given."""
    parsed = []
    for item, annotation, error in map_items(lambda it: parse_voc_xml(it[1]), items, workers, on_error):
        if error is not None:
            report.add("skipped", f"{error.path}: {error.problem}")
        else:
            parsed.append((item, annotation))
    hint = CLASSES_HINT
    if class_names is None:
        class_names = sorted({n for _, a in parsed for n in a.names})
        logger.info(
            "%s: %d classes found in the annotations, in sorted order (set `classes` to choose them): %s",
            report.name,
            len(class_names),
            ", ".join(class_names),
        )
    elif tuple(class_names) == VOC_CLASSES:
        hint = VOC_CLASSES_HINT
    class_index = {name: i for i, name in enumerate(class_names)}

    def build(entry: tuple[tuple[int, Path, Path | None], XmlAnnotation]) -> tuple[DetectionRecord, list]:
        (image_id, _, image_path), annotation = entry
        if image_path is None:
            assert image_lookup is not None, "items without an image path need an image_lookup"
            image_path = image_lookup(annotation)
        return record_from_xml(annotation, image_path, image_id, class_index, require_images, hint)

    records = []
    for _, built, error in map_items(build, parsed, workers, on_error, on_bad_image):
        if error is not None:
            report.add("skipped", f"{error.path}: {error.problem}")
        else:
            record, events = built
            report.extend(events)
            records.append(record)
    return records, class_names


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DatasetError(path, "list file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(path, f"cannot read list file ({err})") from None


def read_voc(
    root: str | Path,
    image_set: str,
    class_names: list[str] | tuple[str, ...] | None = VOC_CLASSES,
    on_error: OnError = "raise",
    workers: int | None = None,
    require_images: bool = True,
    on_bad_image: OnBadImage = "skip",
) -> tuple[DetectionDataset, LoadReport]:
    """Read a VOC devkit year directory (``.../VOC2007``) for ``ImageSets/Main/<image_set>.txt``
    (``JPEGImages/`` may be absent when not ``require_images``). ``class_names=None``: the names
    found in the annotations, sorted (a set in VOC's layout with its own classes)."""
    root = Path(root)
    list_file = root / "ImageSets" / "Main" / f"{image_set}.txt"
    report = LoadReport(name=f"{root.name}/{image_set}")
    names = [line.split()[0] for line in _read_lines(list_file) if line.strip()]
    names = [names[i] for i in first_listed(names, list_file, report)]
    image_dir = root / "JPEGImages"
    items = [
        (
            i + 1,
            resolve_inside(root / "Annotations", f"{name}.xml", list_file),
            resolve_inside(image_dir, f"{name}.jpg", list_file),
        )
        for i, name in enumerate(names)
    ]
    names_in = list(class_names) if class_names is not None else None
    records, names_out = _collect(
        items, names_in, on_error, workers or default_workers(), report, None, require_images, on_bad_image
    )
    return DetectionDataset(records, names_out, list(range(1, len(names_out) + 1)), report.name), report


def read_name_list(path: str | Path) -> list[str]:
    """Image names from a split list: a ``.csv`` with a ``filename`` column (one row per box, so
    names are de-duplicated in order) or a text file with one name per line (first token)."""
    path = Path(path)
    if path.suffix.lower() != ".csv":
        return [line.split()[0] for line in _read_lines(path) if line.strip()]
    rows = list(csv.DictReader(_read_lines(path)))
    if not rows or "filename" not in rows[0]:
        raise DatasetError(path, "CSV split list needs a 'filename' column")
    return list(dict.fromkeys(row["filename"].strip() for row in rows if row["filename"].strip()))


def read_xml_folder(
    image_dir: str | Path,
    xml_dir: str | Path | None = None,
    names: list[str] | None = None,
    class_names: list[str] | None = None,
    on_error: OnError = "raise",
    workers: int | None = None,
    name: str = "",
    require_images: bool = True,
    names_source: str | Path | None = None,
    on_bad_image: OnBadImage = "skip",
) -> tuple[DetectionDataset, LoadReport]:
    """Read images with one VOC XML each.

    ``names``: image file names or stems to read (in this order; a repeat of an image is skipped
    and reported against ``names_source``, the list file); default: every ``*.xml`` in
    ``xml_dir`` (sorted). The image for ``STEM.xml`` is ``image_dir/STEM.<ext>`` (any common
    extension), else the XML's ``<filename>``; names never resolve outside ``image_dir``.
    ``class_names``: default the sorted set of names found (an unknown name is then impossible).
    ``require_images=False``: images (and ``image_dir``) may be absent; an absent image is taken to
    be the XML's ``<filename>`` (else ``STEM.jpg``) with the XML's size.
    """
    image_dir = Path(image_dir)
    xml_dir = Path(xml_dir) if xml_dir is not None else image_dir
    if require_images and not image_dir.is_dir():
        raise DatasetError(image_dir, "image directory not found")
    if not xml_dir.is_dir():
        raise DatasetError(xml_dir, "annotation directory not found")
    report = LoadReport(name=name or image_dir.name)
    items: list[tuple[int, Path, Path | None]] = []
    if names is None:
        xml_files = sorted(xml_dir.glob("*.xml"))
        if not xml_files:
            raise DatasetError(xml_dir, "no *.xml annotation files found")
        items = [(i + 1, path, None) for i, path in enumerate(xml_files)]
    else:
        for i, entry in enumerate(names):
            is_file_name = Path(entry).suffix.lower() in IMAGE_SUFFIXES
            image_path = resolve_inside(image_dir, entry, image_dir) if is_file_name else None
            stem = entry[: -len(Path(entry).suffix)] if is_file_name else entry
            items.append((i + 1, resolve_inside(xml_dir, f"{stem}.xml", xml_dir), image_path))
        kept = first_listed([xml_path for _, xml_path, _ in items], names_source or xml_dir, report)
        items = [(n + 1, items[i][1], items[i][2]) for n, i in enumerate(kept)]  # ids stay 1..N

    def lookup(annotation: XmlAnnotation) -> Path:
        found = find_image(image_dir, annotation.path.stem, annotation.path)
        if found is None and annotation.filename:
            found = resolve_inside(image_dir, annotation.filename, annotation.path)
        if not require_images and (found is None or not found.is_file()):
            return found or resolve_inside(image_dir, f"{annotation.path.stem}.jpg", annotation.path)
        if found is None or not found.exists():  # a directory there is a bad image: read_image_info says so
            raise DatasetError(annotation.path, f"image for this annotation not found in {image_dir}")
        return found

    if names is None and image_dir.is_dir():  # report images without XML: not part of the data set
        stems = {path.stem for _, path, _ in items}
        for path in sorted(image_dir.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.stem not in stems:
                report.add("image_without_annotation_ignored", path)
    records, class_names = _collect(
        items,
        class_names,
        on_error,
        workers or default_workers(),
        report,
        lookup,
        require_images,
        on_bad_image,
    )
    return DetectionDataset(records, class_names, list(range(1, len(class_names) + 1)), report.name), report
