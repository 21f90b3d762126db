"""The install ends with an OpenCV that holds the contrib modules (selective search)."""

from __future__ import annotations

import cv2
import numpy as np


def test_cv2_has_selective_search() -> None:
    assert hasattr(cv2, "ximgproc") and hasattr(cv2.ximgproc, "segmentation")
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:24, 8:24] = 255
    search.setBaseImage(image)
    search.switchToSingleStrategy()
    boxes = search.process()
    assert len(boxes) > 0


def test_albumentations_imports_beside_contrib_opencv() -> None:
    import albumentations as A

    out = A.HorizontalFlip(p=1.0)(image=np.arange(12, dtype=np.uint8).reshape(2, 2, 3))["image"]
    assert out[0, 0, 0] == 3
