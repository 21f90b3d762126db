"""Selective search: determinism (in-process and across processes), presets, scaling, filters."""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest

from detect.proposals.selective_search import (
    SS_PRESETS,
    SelectiveSearchSettings,
    filter_ranked_boxes,
    selective_search,
    ss_settings,
)


def blocky_image(seed: int = 0, height: int = 96, width: int = 128) -> np.ndarray:
    """Coloured blocks plus noise: a few hundred selective-search regions on a tiny image."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    image = cv2.resize(blocks, (width, height), interpolation=cv2.INTER_NEAREST).astype(np.float64)
    return np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)


def digest(boxes: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(boxes, dtype=np.float32).tobytes()).hexdigest()


SETTINGS = ss_settings("fast", min_size=4)


def test_raw_opencv_order_changes_between_calls_but_not_the_set() -> None:
    """Why reseeding is needed: OpenCV ranks with C rand(), which cv2.setRNGSeed does not touch."""
    image = blocky_image()[:, :, ::-1].copy()
    runs = []
    for _ in range(2):
        cv2.setRNGSeed(0)
        search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        search.setBaseImage(image)
        search.switchToSelectiveSearchFast()
        runs.append(np.asarray(search.process()))
    assert len(runs[0]) > 50
    assert not np.array_equal(runs[0], runs[1])
    assert {tuple(r) for r in runs[0]} == {tuple(r) for r in runs[1]}


def test_same_image_same_boxes_same_order_in_process() -> None:
    image = blocky_image()
    first = selective_search(image, SETTINGS)
    libc_rand = ctypes.CDLL(None).rand
    for _ in range(7):  # whatever else consumed C rand() in between must not matter
        libc_rand()
    second = selective_search(image, SETTINGS)
    assert len(first) > 50
    np.testing.assert_array_equal(first, second)


def test_seed_changes_the_order_only() -> None:
    image = blocky_image()
    a = selective_search(image, SETTINGS)
    b = selective_search(image, ss_settings("fast", min_size=4, seed=1))
    assert not np.array_equal(a, b)
    assert {tuple(r) for r in a} == {tuple(r) for r in b}


def test_same_boxes_same_order_across_processes() -> None:
    script = textwrap.dedent(
        """
        import ctypes, hashlib, sys
        import numpy as np
        sys.path.insert(0, sys.argv[1])
        from test_proposals_ss import SETTINGS, blocky_image, digest
        from detect.proposals.selective_search import selective_search
        for _ in range(int(sys.argv[2])):
            ctypes.CDLL(None).rand()
        print(digest(selective_search(blocky_image(), SETTINGS)))
        """
    )
    expected = digest(selective_search(blocky_image(), SETTINGS))
    tests_dir = os.path.dirname(__file__)
    # Two processes at once (each pays the torch import), differing in hash seed and in how much
    # of C rand() was consumed before.
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", script, tests_dir, burn],
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for hash_seed, burn in (("1", "0"), ("2", "13"))
    ]
    for run in runs:
        stdout, stderr = run.communicate(timeout=120)
        assert run.returncode == 0, stderr
        assert stdout.strip() == expected


def test_superpixels_x2_preset_doubles_base_k_and_gives_fewer_boxes() -> None:
    assert SS_PRESETS["fast_x2"].base_k == 2 * SS_PRESETS["fast"].base_k
    assert SS_PRESETS["fast_x2"].inc_k == SS_PRESETS["fast"].inc_k
    image = blocky_image(seed=3)
    assert len(selective_search(image, ss_settings("fast_x2", min_size=4))) < len(
        selective_search(image, SETTINGS)
    )


def test_downscaled_boxes_map_back_to_original_pixels() -> None:
    small = blocky_image(seed=1)
    # Nearest x4 upscaling, then INTER_AREA back down, reproduces the small image exactly, so the
    # boxes found on the large image must be the small image's boxes times four.
    large = cv2.resize(small, (128 * 4, 96 * 4), interpolation=cv2.INTER_NEAREST)
    on_small = selective_search(small, ss_settings("fast", min_size=0, max_side=None))
    on_large = selective_search(large, ss_settings("fast", min_size=0, max_side=128))
    np.testing.assert_allclose(on_large, on_small * 4)
    assert on_large[:, 2].max() <= 512 and on_large[:, 3].max() <= 384


def test_boxes_are_valid_xyxy_inside_the_image() -> None:
    image = blocky_image(seed=2, height=90, width=70)
    boxes = selective_search(image, ss_settings("quality", min_size=0))
    assert boxes.dtype == np.float32 and boxes.shape[1] == 4
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 70).all() and (boxes[:, 3] <= 90).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_filters_min_size_duplicates_near_duplicates_and_cap() -> None:
    boxes = np.array(
        [
            [0, 0, 50, 50],  # kept
            [0, 0, 5, 50],  # too narrow
            [0, 0, 50, 50],  # exact duplicate of the first
            [1, 1, 50, 50],  # near duplicate (IoU 0.96)
            [60, 60, 100, 100],  # kept
            [0, 60, 40, 100],  # kept, but beyond a cap of 2 when near duplicates go
        ],
        dtype=np.float32,
    )
    assert filter_ranked_boxes(boxes, 10, 1.0, None).tolist() == [0, 3, 4, 5]
    assert filter_ranked_boxes(boxes, 10, 0.9, None).tolist() == [0, 4, 5]
    assert filter_ranked_boxes(boxes, 10, 0.9, 2).tolist() == [0, 4]
    assert filter_ranked_boxes(boxes, 0, 1.0, None).tolist() == [0, 1, 3, 4, 5]


def test_cap_keeps_the_best_ranked_boxes() -> None:
    image = blocky_image()
    all_boxes = selective_search(image, SETTINGS)
    capped = selective_search(image, ss_settings("fast", min_size=4, max_proposals=20))
    np.testing.assert_array_equal(capped, all_boxes[:20])


@pytest.mark.parametrize(
    "bad",
    [{"mode": "slow"}, {"base_k": 0}, {"max_side": 4}, {"dedup_iou": 0.0}, {"max_proposals": 0}],
)
def test_bad_settings_raise(bad: dict) -> None:
    with pytest.raises(ValueError):
        SelectiveSearchSettings(**bad)
    with pytest.raises(ValueError, match="unknown selective search preset"):
        ss_settings("fastest")
    with pytest.raises(ValueError, match="unknown selective search settings"):
        ss_settings("fast", k=3)
