"""The one record format every detection data set is read into.

Boxes are float32 ``xyxy`` in continuous pixel coordinates: a box covers ``[x1, x2) x [y1, y2)``,
so its width is ``x2 - x1``. COCO's ``[x, y, w, h]`` maps to it directly. Pascal VOC / ILSVRC XML
stores 1-based inclusive pixel indices; they are converted as ``x1 = xmin - 1, x2 = xmax`` (as
detectron2 does), which makes ``x2 - x1`` equal the devkits' ``xmax - xmin + 1``: the "+1 pixel"
convention is carried by the conversion, so IoU code never adds 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class DetectionRecord:
    """One image and its ground truth. ``labels`` index ``DetectionDataset.class_names``."""

    image_id: int
    file_name: str  # absolute path, resolved inside the data set's image root
    width: int  # taken from the decoded image, not trusted from annotations
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # (N, 4) xyxy
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))  # (N,) in [0, C)
    difficult: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))  # (N,)


@dataclass
class DetectionDataset:
    """A split: its records, class names (contiguous labels 0..C-1) and, for COCO export, the
    category id of each class (``category_ids[label]``)."""

    records: list[DetectionRecord]
    class_names: list[str]
    category_ids: list[int]
    name: str = ""
