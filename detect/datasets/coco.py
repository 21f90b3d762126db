"""COCO instances JSON, the interchange format: read through pycocotools, write from any data set.

Reading keeps COCO's image ids, orders classes by category id, clips/drops boxes like every other
reader and takes image sizes from the image files (from the JSON's ``width``/``height`` when a file is
absent and ``require_images=False``). ``iscrowd`` annotations become ``difficult``
(neither positives nor false positives in the VOC-style metrics); writing emits ``difficult`` as
``iscrowd=1`` (mmdetection's VOC-to-COCO converter does the same for its ignored boxes), so a
round trip keeps the flag and COCOeval treats those boxes as ignore regions.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from backbone.bad_images import OnBadImage
from detect.datasets.common import (
    DatasetError,
    LoadReport,
    OnError,
    default_workers,
    image_size,
    map_items,
    repair_boxes,
    resolve_inside,
)
from detect.datasets.records import DetectionDataset, DetectionRecord


def load_json(path: str | Path) -> Any:
    """``json.load`` with one-line errors naming the file."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise DatasetError(path, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(path, f"malformed JSON ({err})") from None
    except RecursionError:  # "[[[[..." deeper than the parser's stack
        raise DatasetError(path, "malformed JSON (nested too deeply)") from None
    except OSError as err:  # a directory, no permission
        raise DatasetError(path, f"cannot read ({err.strerror or err})") from None


def _unique_integers(values: list, what: str, path: Path) -> None:
    """Ids must be distinct integers: pycocotools indexes by id, so a repeat silently overwrites."""
    odd = next((v for v in values if not isinstance(v, int)), None)
    if odd is not None:
        raise DatasetError(path, f"malformed COCO JSON: {what} ids must be unique integers (got {odd!r})")
    repeated = next((v for v, n in Counter(values).items() if n > 1), None)
    if repeated is not None:
        raise DatasetError(
            path, f"malformed COCO JSON: {what} ids must be unique integers (id {repeated} twice)"
        )


def _check_coco_structure(data: Any, path: Path) -> None:
    if not isinstance(data, dict):
        raise DatasetError(path, "malformed COCO JSON: top level is not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(path, f"malformed COCO JSON: '{key}' missing or not a list")
    required = {"images": ("id", "file_name"), "annotations": ("image_id", "category_id", "bbox")}
    required["categories"] = ("id", "name")
    for key, fields in required.items():
        for index, entry in enumerate(data[key]):
            if not isinstance(entry, dict) or any(f not in entry for f in fields):
                raise DatasetError(
                    path, f"malformed COCO JSON: {key}[{index}] lacks one of {', '.join(fields)}"
                )
    _unique_integers([image["id"] for image in data["images"]], "image", path)
    _unique_integers([category["id"] for category in data["categories"]], "category", path)
    names = Counter(str(category["name"]) for category in data["categories"])
    repeated = next((name for name, n in names.items() if n > 1), None)
    if repeated is not None:  # metrics are reported per class name
        raise DatasetError(path, f"malformed COCO JSON: category name {repeated!r} is used twice")
    for index, image in enumerate(data["images"]):
        for key in ("width", "height"):
            if key in image and not isinstance(image[key], (int, float)):
                raise DatasetError(path, f"malformed COCO JSON: images[{index}].{key} is not a number")
            if key in image and not math.isfinite(image[key]):  # JSON's NaN / Infinity
                raise DatasetError(path, f"malformed COCO JSON: images[{index}].{key} is not a finite number")
    for index, ann in enumerate(data["annotations"]):
        for key in ("image_id", "category_id"):  # pycocotools indexes by them: "1" would match nothing
            if not isinstance(ann[key], int):
                raise DatasetError(
                    path, f"malformed COCO JSON: annotations[{index}].{key} is {ann[key]!r}, not an integer"
                )
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
            raise DatasetError(path, f"malformed COCO JSON: annotations[{index}].bbox is not 4 numbers")


def coco_from_dict(data: dict, source: str | Path = "<memory>") -> COCO:
    """A pycocotools ``COCO`` index over an in-memory dict (its progress prints are silenced)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def read_coco(
    json_path: str | Path,
    image_root: str | Path | None = None,
    on_error: OnError = "raise",
    workers: int | None = None,
    require_images: bool = True,
    on_bad_image: OnBadImage = "skip",
) -> tuple[DetectionDataset, LoadReport]:
    """Read a COCO instances file whose ``file_name``s live under ``image_root``.

    Default root: ``info.image_root`` when the file has one (``write_coco_json`` records it, so a
    converted file finds its images from anywhere), else the JSON's own folder.
    ``require_images=False``: an absent image file takes its size from the JSON (see ``image_size``).
    """
    json_path = Path(json_path)
    data = load_json(json_path)
    _check_coco_structure(data, json_path)
    if image_root is None:
        recorded = data.get("info", {}).get("image_root") if isinstance(data.get("info"), dict) else None
        image_root = Path(recorded) if recorded else json_path.parent
    image_root = Path(image_root)
    coco = coco_from_dict(data, json_path)
    category_ids = sorted(coco.getCatIds())
    label_of = {cat_id: i for i, cat_id in enumerate(category_ids)}
    class_names = [coco.cats[c]["name"] for c in category_ids]
    report = LoadReport(name=json_path.name)
    orphans = sorted({a["image_id"] for a in data["annotations"]} - set(coco.imgs))
    if orphans:
        raise DatasetError(
            json_path, f"malformed COCO JSON: annotations refer to unknown image id {orphans[0]}"
        )

    def build(image: dict) -> tuple[DetectionRecord, list[tuple[str, str]]]:
        source = f"{json_path}[image {image['id']}]"
        image_path = resolve_inside(image_root, str(image["file_name"]), json_path)
        annotated = (
            (int(image["width"]), int(image["height"])) if "width" in image and "height" in image else None
        )
        anns = coco.imgToAnns.get(image["id"], [])
        width, height, events = image_size(image_path, annotated, source, require_images, needed=bool(anns))
        unknown = sorted({a["category_id"] for a in anns if a["category_id"] not in label_of})
        if unknown:
            raise DatasetError(json_path, f"image {image['id']}: unknown category id(s) {unknown}")
        xywh = np.asarray([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        boxes, keep, box_events = repair_boxes(xyxy, width, height, source)
        events += box_events
        labels = np.asarray([label_of[anns[i]["category_id"]] for i in keep], np.int64)
        crowd = np.asarray([bool(anns[i].get("iscrowd", 0)) for i in keep], bool)
        events += [("crowd_as_difficult", source)] * int(crowd.sum())
        if len(keep) == 0:
            events.append(("image_without_objects", source))
        record = DetectionRecord(int(image["id"]), str(image_path), width, height, boxes, labels, crowd)
        return record, events

    images = [coco.imgs[i] for i in sorted(coco.imgs)]
    records = []
    for _, built, error in map_items(build, images, workers or default_workers(), on_error, on_bad_image):
        if error is not None:
            report.add("skipped", f"{error.path}: {error.problem}")
        else:
            records.append(built[0])
            report.extend(built[1])
    return DetectionDataset(records, class_names, category_ids, json_path.stem), report


def dataset_to_coco(dataset: DetectionDataset, image_root: str | Path | None = None) -> dict:
    """COCO instances dict of ``dataset``; ``file_name`` relative to ``image_root`` when given (and
    the root recorded as ``info.image_root``), else absolute."""
    root = Path(image_root).resolve() if image_root is not None else None
    images, annotations = [], []
    for record in dataset.records:
        file_name = record.file_name
        if root is not None:
            try:
                file_name = Path(record.file_name).resolve().relative_to(root).as_posix()
            except ValueError:
                raise DatasetError(record.file_name, f"image is not inside the image root {root}") from None
        images.append(
            {
                "id": int(record.image_id),
                "file_name": file_name,
                "width": record.width,
                "height": record.height,
            }
        )
        for box, label, difficult in zip(record.boxes, record.labels, record.difficult, strict=True):
            x1, y1, x2, y2 = (round(float(v), 4) for v in box)
            w, h = round(x2 - x1, 4), round(y2 - y1, 4)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int(record.image_id),
                    "category_id": int(dataset.category_ids[int(label)]),
                    "bbox": [x1, y1, w, h],
                    "area": round(w * h, 4),
                    "iscrowd": int(bool(difficult)),
                }
            )
    categories = [
        {"id": int(c), "name": n} for c, n in zip(dataset.category_ids, dataset.class_names, strict=True)
    ]
    info: dict = {"description": f"{dataset.name} (boxes: continuous pixels; difficult objects as iscrowd=1)"}
    if root is not None:
        info["image_root"] = str(root)
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


def common_image_root(dataset: DetectionDataset) -> Path:
    """The deepest directory holding every image of ``dataset``."""
    if not dataset.records:
        return Path.cwd()
    return Path(os.path.commonpath([str(Path(r.file_name).resolve().parent) for r in dataset.records]))


def write_coco_json(
    dataset: DetectionDataset, path: str | Path, image_root: str | Path | None = None
) -> Path:
    """Write ``dataset`` as COCO JSON (atomically: a partial file never replaces a good one);
    ``file_name``s relative to ``image_root`` (default: ``common_image_root(dataset)``)."""
    image_root = image_root if image_root is not None else common_image_root(dataset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dataset_to_coco(dataset, image_root)), encoding="utf-8")
    tmp.replace(path)
    return path
