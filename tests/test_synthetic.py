"""The synthetic shapes generator: determinism (also across processes), labels, boxes, COCO export."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from backbone import synthetic
from backbone.image_io import read_image_rgb
from backbone.synthetic import (
    SHAPE_CLASSES,
    SyntheticShapesDataset,
    render_object_image,
    render_scene,
    render_scene_layout,
)
from detect.datasets.coco import read_coco
from detect.datasets.synthetic import (
    annotation_path,
    build_synthetic_detection_dataset,
    image_root,
    write_synthetic_detection_split,
)

_DIGEST_SNIPPET = """
import hashlib
from backbone.synthetic import render_object_image, render_scene
h = hashlib.sha256()
for i in (3, 11):
    image, label = render_object_image(i, 48, 7)
    h.update(image.tobytes()); h.update(bytes([label]))
image, boxes, labels = render_scene(5, 96, 7, 4)
h.update(image.tobytes()); h.update(boxes.tobytes()); h.update(labels.tobytes())
print(h.hexdigest())
"""


def _digest_here() -> str:
    h = hashlib.sha256()
    for i in (3, 11):
        image, label = render_object_image(i, 48, 7)
        h.update(image.tobytes())
        h.update(bytes([label]))
    image, boxes, labels = render_scene(5, 96, 7, 4)
    h.update(image.tobytes())
    h.update(boxes.tobytes())
    h.update(labels.tobytes())
    return h.hexdigest()


def test_same_index_and_seed_give_identical_output_in_another_process():
    render_object_image(11, 48, 7)  # draw something else first: no hidden global state
    here = _digest_here()
    there = subprocess.run(
        [sys.executable, "-c", _DIGEST_SNIPPET], capture_output=True, text=True, check=True
    )
    assert there.stdout.strip() == here


def test_samples_differ_across_index_and_seed_and_labels_cycle_over_classes():
    assert len(SHAPE_CLASSES) >= 6
    images = [render_object_image(i, 48, 0) for i in range(2 * len(SHAPE_CLASSES))]
    assert [label for _, label in images] == list(range(len(SHAPE_CLASSES))) * 2
    assert not np.array_equal(images[0][0], images[1][0])
    assert not np.array_equal(render_object_image(0, 48, 0)[0], render_object_image(0, 48, 1)[0])
    image = images[0][0]
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    assert image.std() > 5  # textured, not blank


def test_object_is_distinct_from_background():
    # The object sits around the centre; its colour is kept away from the background's.
    image, _ = render_object_image(2, 96, 3)
    centre = image[40:56, 40:56].reshape(-1, 3).mean(0)
    corners = np.concatenate([image[:8, :8].reshape(-1, 3), image[-8:, -8:].reshape(-1, 3)]).mean(0)
    assert np.linalg.norm(centre - corners) > 20


def test_scene_boxes_are_valid_and_tight_on_visible_pixels():
    for index in range(6):
        image, boxes, labels = render_scene(index, (80, 120), 1, 5)
        assert image.shape == (80, 120, 3)
        assert boxes.dtype == np.float32 and labels.dtype == np.int64
        assert 1 <= len(boxes) <= 5 and len(boxes) == len(labels)
        assert np.all(boxes[:, 0] >= 0) and np.all(boxes[:, 2] <= 120) and np.all(boxes[:, 3] <= 80)
        assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
        assert np.all((labels >= 0) & (labels < len(SHAPE_CLASSES)))
    with pytest.raises(ValueError, match="max_objects"):
        render_scene(0, 64, 0, 0)


def test_scene_boxes_are_tight_and_objects_stay_mostly_visible():
    seen_overlap = False
    for index in range(8):
        layout = render_scene_layout(index, 96, 4, 6)
        for k, box in enumerate(layout.boxes):
            ys, xs = np.nonzero(layout.owner == k)
            np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            visible = len(xs)
            assert visible >= 0.6 * layout.full_areas[k]
            seen_overlap |= visible < layout.full_areas[k]
        image, boxes, labels = render_scene(index, 96, 4, 6)
        np.testing.assert_array_equal(image, layout.image)
        np.testing.assert_array_equal(boxes, layout.boxes)
    assert seen_overlap  # occlusion between objects does happen


def _widest_one_tone_region(texture: np.ndarray) -> float:
    """The radius of the largest disc that fits inside one tone (the image border counts as an edge)."""
    widest = 0.0
    for tone in np.unique(texture.reshape(-1, 3), axis=0):
        mask = np.pad(np.all(texture == tone, axis=2).astype(np.uint8), 1)
        widest = max(widest, float(cv2.distanceTransform(mask, cv2.DIST_L2, 5).max()))
    return widest


@pytest.mark.parametrize("kind", ["checker", "dots"])
def test_texture_cells_stay_within_the_period_cap(kind):
    # A checker cell fits a disc of radius period / 2, a dot 0.63 x period, the gaps between dots
    # 0.78 x period: nothing wider than the cap allows.
    base = np.array([100.0, 150.0, 200.0], np.float32)
    for seed in range(5):
        texture = synthetic._texture(np.random.default_rng(seed), 160, 160, base, 6.0, (kind,))
        assert 1 <= _widest_one_tone_region(texture) <= 0.8 * 6.0 + 1
    # Without the cap the same kind draws object-sized cells (period up to a sixth of the side).
    widths = [
        _widest_one_tone_region(synthetic._texture(np.random.default_rng(s), 160, 160, base, None, (kind,)))
        for s in range(5)
    ]
    assert max(widths) > 10


def test_scene_background_cells_are_finer_than_the_smallest_square(monkeypatch):
    caps = []
    texture = synthetic._texture

    def recording_texture(rng, height, width, base, max_period=None, kinds=synthetic.TEXTURE_KINDS):
        caps.append((height, width, max_period))
        return texture(rng, height, width, base, max_period, kinds)

    monkeypatch.setattr(synthetic, "_texture", recording_texture)
    render_scene(0, 160, 0, 3)
    height, width, cap = caps[0]  # the background's; the objects' own fills follow
    smallest_square_side = 160 * synthetic._SCENE_RADIUS_FRACTIONS[0] * np.sqrt(2)
    assert (height, width) == (160, 160) and cap <= smallest_square_side / 2


def test_classification_dataset_is_indexed_and_disjoint_by_offset():
    train = SyntheticShapesDataset(16, 40, seed=0)
    val = SyntheticShapesDataset(8, 40, seed=0, index_offset=16)
    assert len(train) == 16 and train.targets == [i % len(SHAPE_CLASSES) for i in range(16)]
    image, label = val[0]
    assert np.array_equal(image, render_object_image(16, 40, 0)[0]) and label == 16 % len(SHAPE_CLASSES)
    with pytest.raises(IndexError):
        train[16]


def test_detection_split_written_as_coco_and_reused(tmp_path):
    dataset = build_synthetic_detection_dataset(
        tmp_path, "val", num_images=4, image_size=64, seed=3, image_format="png"
    )
    json_path = annotation_path(tmp_path, "val")
    coco = COCO(str(json_path))
    assert len(coco.getImgIds()) == 4 and [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(
        SHAPE_CLASSES
    )
    assert dataset.class_names == list(SHAPE_CLASSES) and dataset.category_ids == list(range(1, 9))
    for record in dataset.records:
        image, boxes, labels = render_scene(1_000_000 + record.image_id - 1, 64, 3, 6)
        np.testing.assert_array_equal(read_image_rgb(record.file_name), image)  # PNG: lossless
        np.testing.assert_allclose(record.boxes, boxes)
        np.testing.assert_array_equal(record.labels, labels)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=record.image_id))
        np.testing.assert_allclose(
            [a["bbox"] for a in anns], np.c_[boxes[:, :2], boxes[:, 2:] - boxes[:, :2]]
        )
    theirs, _ = read_coco(json_path)  # the project's COCO reader finds the images by itself
    assert [r.file_name for r in theirs.records] == [r.file_name for r in dataset.records]
    np.testing.assert_allclose(
        np.concatenate([r.boxes for r in theirs.records]), np.concatenate([r.boxes for r in dataset.records])
    )
    first = json_path.stat().st_mtime_ns
    write_synthetic_detection_split(tmp_path, "val", num_images=4, image_size=64, seed=3, image_format="png")
    assert json_path.stat().st_mtime_ns == first  # same parameters: reused
    write_synthetic_detection_split(tmp_path, "val", num_images=4, image_size=64, seed=4, image_format="png")
    assert json.loads(json_path.read_text())["info"]["seed"] == 4  # parameters changed: rewritten
    (image_root(tmp_path, "val") / "000002.png").unlink()
    write_synthetic_detection_split(tmp_path, "val", num_images=4, image_size=64, seed=4, image_format="png")
    assert (image_root(tmp_path, "val") / "000002.png").is_file()  # a missing image triggers a rewrite


def test_splits_draw_disjoint_scenes(tmp_path):
    train = build_synthetic_detection_dataset(tmp_path, "train", num_images=2, image_size=48)
    test = build_synthetic_detection_dataset(tmp_path, "test", num_images=2, image_size=48)
    a, b = read_image_rgb(train.records[0].file_name), read_image_rgb(test.records[0].file_name)
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError, match="index_offset"):
        write_synthetic_detection_split(tmp_path, "extra", num_images=1, image_size=48)
