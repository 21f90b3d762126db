"""Region labelling, sampling, warp geometry, per-class NMS and the ensemble average."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detect.rcnn.engine import ensemble_probs, region_probs
from detect.rcnn.model import RegionClassifierArch, build_region_classifier
from detect.rcnn.postprocess import postprocess_detections
from detect.rcnn.regions import context_boxes, label_proposals, sample_regions, warp_regions


def test_label_proposals_by_highest_iou() -> None:
    gt = np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32)
    proposals = np.array([[0, 0, 10, 10], [0, 0, 10, 20], [20, 20, 40, 38], [50, 50, 60, 60]], np.float32)
    max_iou, labels = label_proposals(proposals, gt, np.array([2, 0]), num_classes=3)
    np.testing.assert_allclose(max_iou, [1.0, 0.5, 0.9, 0.0], atol=1e-6)
    assert labels.tolist() == [2, 2, 0, 3]  # IoU exactly 0.5 is foreground; 3 is background
    max_iou, labels = label_proposals(proposals, np.zeros((0, 4)), np.zeros(0), num_classes=3)
    assert labels.tolist() == [3, 3, 3, 3] and max_iou.tolist() == [0, 0, 0, 0]


def test_sample_regions_fractions_and_background_range() -> None:
    rng = np.random.default_rng(0)
    max_iou = np.concatenate([np.full(40, 0.8), np.full(100, 0.3), np.full(100, 0.05)]).astype(np.float32)
    labels = np.concatenate([np.zeros(40), np.full(200, 5)]).astype(np.int64)
    chosen = sample_regions(max_iou, labels, 5, 64, fg_fraction=0.25, bg_iou=(0.1, 0.5), rng=rng)
    assert len(chosen) == 64
    assert (labels[chosen] < 5).sum() == 16
    bg = chosen[labels[chosen] == 5]
    assert (max_iou[bg] >= 0.1).all() and len(set(chosen.tolist())) == 64
    # Too few foreground: background fills the batch.
    few = sample_regions(max_iou[36:], labels[36:], 5, 64, 0.25, (0.1, 0.5), rng)
    assert len(few) == 64 and (labels[36:][few] < 5).sum() == 4
    # No background in range: any background is used.
    only_low = sample_regions(max_iou[140:], labels[140:], 5, 8, 0.25, (0.1, 0.5), rng)
    assert len(only_low) == 8
    assert len(sample_regions(np.zeros(0), np.zeros(0, np.int64), 5, 8, rng=rng)) == 0


def test_context_boxes_keep_padding_at_network_scale() -> None:
    boxes = torch.tensor([[10.0, 20.0, 110.0, 70.0]])
    out = context_boxes(boxes, 224, 16)
    # Warping the dilated box to 224 maps the original box onto [16, 208].
    scale_x = 224 / (out[0, 2] - out[0, 0])
    assert float((boxes[0, 0] - out[0, 0]) * scale_x) == pytest.approx(16.0)
    assert float((out[0, 2] - boxes[0, 2]) * scale_x) == pytest.approx(16.0)
    assert torch.equal(context_boxes(boxes, 224, 0), boxes)
    degenerate = context_boxes(torch.tensor([[5.0, 5.0, 5.0, 5.0]]), 224, 16)
    assert (degenerate[:, 2:] > degenerate[:, :2]).all()


def test_warp_shows_the_box_contents_and_mean_outside() -> None:
    image = torch.zeros(1, 3, 40, 60)
    image[:, :, 10:20, 30:50] = 1.0  # a bright rectangle
    rois = torch.tensor([[0.0, 30.0, 10.0, 50.0, 20.0]])
    tight = warp_regions(image, rois, 16, padding=0)
    assert tight.shape == (1, 3, 16, 16)
    # Bilinear samples in the outermost row/column blend with the pixels beyond the box edge.
    inner = tight[:, :, 1:-1, 1:-1]
    torch.testing.assert_close(inner, torch.ones_like(inner))
    assert tight.mean() > 0.9
    padded = warp_regions(image, rois, 16, padding=4)
    assert padded[0, 0, 5:11, 5:11].min() > 0.99  # the box in the centre (edges blended)
    assert padded[0, 0, 0, :].max() < 0.01  # the context band around it
    # A box far beyond the border: everything outside the image is the mean pixel (0).
    beyond = warp_regions(image, torch.tensor([[0.0, 100.0, 100.0, 140.0, 140.0]]), 8, padding=0)
    assert beyond.abs().max() == 0
    # Degenerate box: still a full warp, no NaN.
    point = warp_regions(image, torch.tensor([[0.0, 35.0, 15.0, 35.0, 15.0]]), 8, padding=2)
    assert torch.isfinite(point).all() and point.shape == (1, 3, 8, 8)


def test_square_warp_keeps_the_aspect_ratio() -> None:
    # The tightest square about a 2:1 box: same centre, side = the longer side, then the context.
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0]])
    square_box = context_boxes(boxes, 32, 0, square=True)
    torch.testing.assert_close(square_box, torch.tensor([[10.0, 10.0, 50.0, 50.0]]))
    padded = context_boxes(boxes, 32, 4, square=True)
    assert float(padded[0, 2] - padded[0, 0]) == pytest.approx(float(padded[0, 3] - padded[0, 1]))
    # A 20 x 10 bright bar on a tight box: the anisotropic warp fills the output with it, the
    # square warp shows it as a band half the output's height, centred, with the mean above and below.
    image = torch.zeros(1, 3, 40, 60)
    image[:, :, 10:20, 30:50] = 1.0
    rois = torch.tensor([[0.0, 30.0, 10.0, 50.0, 20.0]])
    assert warp_regions(image, rois, 16, padding=0).mean() > 0.9
    square = warp_regions(image, rois, 16, padding=0, square=True)[0, 0]
    assert square[5:11, 1:-1].min() > 0.99
    assert square[:3].max() < 0.01 and square[-3:].max() < 0.01
    assert float(square.mean()) == pytest.approx(0.5, abs=0.05)


def test_postprocess_is_per_class_nms_with_threshold_and_top_k() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]], dtype=torch.float32)
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.05, 0.005, 0.945]])
    out = postprocess_detections(boxes, probs, (100, 100), score_threshold=0.1, nms_iou=0.3, max_per_image=10)
    # Class 0: box 1 suppressed by box 0; class 1: box 0 suppressed by box 1 (other class, kept).
    pairs = sorted(zip(out["labels"].tolist(), [round(s, 3) for s in out["scores"].tolist()], strict=True))
    assert pairs == [(0, 0.7), (1, 0.3)]
    top1 = postprocess_detections(boxes, probs, (100, 100), score_threshold=0.0, max_per_image=1)
    assert top1["scores"].tolist() == pytest.approx([0.7])
    clipped = postprocess_detections(torch.tensor([[-5.0, -5.0, 200.0, 50.0]]), probs[:1], (40, 100))
    assert clipped["boxes"][0].tolist() == [0.0, 0.0, 100.0, 40.0]


def test_ensemble_is_the_mean_of_member_softmax() -> None:
    arch = RegionClassifierArch(variant="bn", num_classes=2, input_size=64, padding=4)
    torch.manual_seed(0)
    members = [build_region_classifier(arch).eval() for _ in range(2)]
    for m in members:
        torch.nn.init.normal_(m.backbone.fc.weight, std=0.5)
    image = torch.randn(1, 3, 80, 96)
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [10.0, 20.0, 90.0, 70.0], [5.0, 5.0, 6.0, 6.0]])
    each = [region_probs(m, image, boxes, region_batch=2, channels_last=False) for m in members]
    mean = ensemble_probs(members, image, boxes, region_batch=3, channels_last=False)
    torch.testing.assert_close(mean, (each[0] + each[1]) / 2)
    assert not torch.allclose(each[0], each[1])
    torch.testing.assert_close(mean.sum(1), torch.ones(3))


def test_shared_mode_whole_image_box_reproduces_the_plain_classifier() -> None:
    torch.manual_seed(0)
    arch = RegionClassifierArch(variant="bn", num_classes=3, mode="shared", input_size=64, padding=0)
    model = build_region_classifier(arch).eval()
    torch.nn.init.normal_(model.backbone.fc.weight, std=0.5)
    image = torch.randn(1, 3, 64, 64)
    whole = torch.tensor([[0.0, 0.0, 0.0, 64.0, 64.0]])
    with torch.no_grad():
        shared = model(image, whole).logits
        plain = model.backbone(image).logits
    torch.testing.assert_close(shared, plain, atol=1e-4, rtol=1e-4)
