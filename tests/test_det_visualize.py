"""detect.visualize: boxes drawn where they belong, one PR curve PNG per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from detect.visualize import class_colour, draw_boxes, save_pr_curves


def test_draw_boxes_paints_the_outline_and_leaves_the_input_alone() -> None:
    image = np.zeros((60, 80, 3), np.uint8)
    out = draw_boxes(
        image, np.array([[10, 20, 50, 40]]), np.array([1]), ["a", "b"], np.array([0.9]), thickness=1
    )
    assert image.max() == 0  # a copy was drawn on
    colour = class_colour(1)
    assert tuple(out[30, 10]) == colour and tuple(out[30, 49]) == colour  # left and right edges (x2 - 1)
    assert tuple(out[30, 30]) == (0, 0, 0)  # inside stays untouched


def test_save_pr_curves_one_png_per_class(tmp_path: Path) -> None:
    curves = [(np.array([0.5, 1.0]), np.array([1.0, 0.5])), (np.zeros(0), np.zeros(0))]
    paths = save_pr_curves(curves, [0.75, float("nan")], ["cat / dog", "empty"], tmp_path, title="voc")
    assert [p.name for p in paths] == ["pr_000_cat_dog.png", "pr_001_empty.png"]
    for path in paths:
        with Image.open(path) as png:
            assert png.format == "PNG" and png.size[0] > 100
