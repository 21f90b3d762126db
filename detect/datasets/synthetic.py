"""The detection demo's data: synthetic shape scenes written as images plus COCO instances JSON.

Scenes come from ``backbone.synthetic.render_scene`` (deterministic per index and seed). A split
is written once under ``root``::

    root/images/<split>/000000.jpg ...
    root/annotations/instances_<split>.json     # COCO: images, annotations (bbox x,y,w,h), categories

and reused while its parameters match (they are stored in the JSON's ``info``); otherwise it is
rewritten. Splits draw disjoint scene indices (``SPLIT_INDEX_OFFSETS``), so train, val and test
never share a scene. ``build_synthetic_detection_dataset`` returns the split as a
``DetectionDataset`` directly from the generator, without re-reading the JSON.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from backbone.synthetic import SHAPE_CLASSES, render_scene
from detect.datasets.records import DetectionDataset, DetectionRecord

logger = logging.getLogger(__name__)

SPLIT_INDEX_OFFSETS = {"train": 0, "val": 1_000_000, "test": 2_000_000}
IMAGE_FORMATS = ("jpg", "png")
FORMAT_VERSION = 3  # bump when the generator's output changes, so written splits are rebuilt


def _split_offset(split: str, index_offset: int | None) -> int:
    if index_offset is not None:
        return index_offset
    if split not in SPLIT_INDEX_OFFSETS:
        raise ValueError(
            f"split {split!r} has no default index range; pass index_offset (known: train, val, test)"
        )
    return SPLIT_INDEX_OFFSETS[split]


def annotation_path(root: str | Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


def image_root(root: str | Path, split: str) -> Path:
    return Path(root) / "images" / split


def _write_image(path: Path, image_rgb, image_format: str) -> None:
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if image_format == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    ok, data = cv2.imencode(f".{image_format}", image_rgb[:, :, ::-1], params)
    if not ok:
        raise OSError(f"{path}: OpenCV could not encode the image")
    path.write_bytes(data.tobytes())


def write_synthetic_detection_split(
    root: str | Path,
    split: str = "train",
    num_images: int = 200,
    image_size: int | tuple[int, int] = 256,
    seed: int = 0,
    max_objects: int = 6,
    index_offset: int | None = None,
    image_format: str = "jpg",
) -> Path:
    """Write (or reuse) a split; returns the COCO JSON path. Image ids are 1..num_images."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    offset = _split_offset(split, index_offset)
    params = {
        "generator": "backbone.synthetic.render_scene",
        "format_version": FORMAT_VERSION,
        "split": split,
        "num_images": num_images,
        "image_size": image_size if isinstance(image_size, int) else list(image_size),
        "seed": seed,
        "max_objects": max_objects,
        "index_offset": offset,
        "image_format": image_format,
    }
    json_path, images_dir = annotation_path(root, split), image_root(root, split)
    if _is_current(json_path, images_dir, params):
        logger.info("%s: synthetic %s split up to date, reused", json_path, split)
        return json_path
    images_dir.mkdir(parents=True, exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    coco_images, annotations = [], []
    for i in tqdm(range(num_images), desc=f"synthetic {split}", leave=False):
        image, boxes, labels = render_scene(offset + i, image_size, seed, max_objects)
        file_name = f"{i:06d}.{image_format}"
        _write_image(images_dir / file_name, image, image_format)
        height, width = image.shape[:2]
        coco_images.append({"id": i + 1, "file_name": file_name, "width": width, "height": height})
        for box, label in zip(boxes.tolist(), labels.tolist(), strict=True):
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": label + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(SHAPE_CLASSES)
    ]
    # image_root lets any COCO reader (detect.datasets.coco.read_coco) find the images unaided.
    info = {"description": "synthetic shape scenes", "image_root": str(images_dir.resolve()), **params}
    coco = {"info": info, "images": coco_images}
    coco.update(annotations=annotations, categories=categories)
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(coco))
    os.replace(tmp, json_path)  # written last and atomically: its presence means the split is complete
    logger.info("%s: wrote %d images, %d boxes", json_path, num_images, len(annotations))
    return json_path


def _is_current(json_path: Path, images_dir: Path, params: dict) -> bool:
    if not json_path.is_file():
        return False
    try:
        info = json.loads(json_path.read_text()).get("info", {})
    except (OSError, ValueError):
        return False
    if any(info.get(key) != value for key, value in params.items()):
        return False
    names = (f"{i:06d}.{params['image_format']}" for i in range(params["num_images"]))
    return all((images_dir / name).is_file() for name in names)


def build_synthetic_detection_dataset(
    root: str | Path,
    split: str = "train",
    num_images: int = 200,
    image_size: int | tuple[int, int] = 256,
    seed: int = 0,
    max_objects: int = 6,
    index_offset: int | None = None,
    image_format: str = "jpg",
) -> DetectionDataset:
    """Write (or reuse) the split and return it as a ``DetectionDataset`` (category ids 1..C)."""
    json_path = write_synthetic_detection_split(
        root, split, num_images, image_size, seed, max_objects, index_offset, image_format
    )
    return read_synthetic_detection_split(json_path, image_root(root, split), split)


def read_synthetic_detection_split(json_path: Path, images_dir: Path, split: str) -> DetectionDataset:
    """The written split as records (boxes from the JSON's ``[x, y, w, h]``, labels = category id - 1)."""
    coco = json.loads(Path(json_path).read_text())
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    images_dir = Path(images_dir).resolve()
    records = []
    for entry in coco["images"]:
        anns = by_image.get(entry["id"], [])
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], np.float32)
        records.append(
            DetectionRecord(
                image_id=entry["id"],
                file_name=str(images_dir / entry["file_name"]),
                width=entry["width"],
                height=entry["height"],
                boxes=boxes.reshape(-1, 4),
                labels=np.array([a["category_id"] - 1 for a in anns], np.int64),
                difficult=np.zeros(len(anns), bool),
            )
        )
    names = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    return DetectionDataset(records, names, list(range(1, len(names) + 1)), f"synthetic_{split}")
