"""detect.boxes: the project-wide xyxy conventions."""

from __future__ import annotations

import pytest
import torch

from detect import boxes as B


def test_matched_iou_equals_diagonal_of_matrix() -> None:
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 25.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [5.0, 5.0, 15.0, 25.0], [2.0, 2.0, 3.0, 3.0]])
    matched = B.matched_box_iou(a, b)
    assert torch.allclose(matched, torch.diagonal(B.box_iou(a, b)))
    assert matched.tolist() == pytest.approx([50 / 150, 1.0, 0.0])


def test_matched_iou_degenerate_is_zero_not_nan() -> None:
    a = torch.tensor([[3.0, 3.0, 3.0, 3.0]])
    assert B.matched_box_iou(a, a).tolist() == [0.0]
    with pytest.raises(ValueError, match="equal shapes"):
        B.matched_box_iou(a, torch.zeros(2, 4))


def test_width_has_no_plus_one() -> None:
    assert B.box_area(torch.tensor([[0.0, 0.0, 4.0, 2.0]])).tolist() == [8.0]


def test_xywh_round_trip() -> None:
    xywh = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert B.xywh_to_xyxy(xywh).tolist() == [[1.0, 2.0, 4.0, 6.0]]
    assert torch.equal(B.xyxy_to_xywh(B.xywh_to_xyxy(xywh)), xywh)


def test_clip_allows_the_image_border_as_x2() -> None:
    clipped = B.clip_boxes(torch.tensor([[-5.0, -1.0, 120.0, 50.0]]), height=40, width=100)
    assert clipped.tolist() == [[0.0, 0.0, 100.0, 40.0]]


def test_valid_mask_drops_zero_area_inverted_and_nan() -> None:
    boxes = torch.tensor(
        [[0, 0, 1, 1], [5, 5, 5, 9], [9, 0, 3, 4], [0, 0, float("nan"), 2], [0, 0, 2, 0.5]],
        dtype=torch.float32,
    )
    assert B.valid_box_mask(boxes).tolist() == [True, False, False, False, True]
    assert B.remove_small_boxes(boxes[[0, 4]], 1.0).tolist() == [0]


def test_nms_and_batched_nms() -> None:
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert B.nms(boxes, scores, 0.5).tolist() == [0, 2]
    # Different labels never suppress each other.
    assert B.batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist() == [0, 1, 2]


def test_dedup_keeps_first_occurrence_in_order() -> None:
    boxes = torch.tensor([[0.0, 0, 16, 16], [20, 20, 40, 40], [0.6, 0.1, 16.3, 15.8], [20, 20, 40, 40]])
    assert B.dedup_boxes(boxes).tolist() == [0, 1, 2]
    assert B.dedup_boxes(boxes, scale=1 / 16).tolist() == [0, 1]
    assert B.dedup_boxes(torch.zeros(0, 4)).tolist() == []
