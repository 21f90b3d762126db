"""MultiBox: priors, Hungarian matching and loss on hand-worked cases, decoding, model I/O."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from backbone import googlenet
from detect.proposals.multibox import (
    MultiBoxArch,
    build_multibox,
    decode_top_k,
    kmeans_priors,
    load_multibox,
    match_predictions,
    multibox_loss,
    normalise_boxes,
    recall_at_k,
    save_multibox,
)

LOG2 = math.log(2.0)


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def test_matching_prefers_nearest_box_when_confidences_are_equal() -> None:
    preds = t([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]])
    gt = t([[0.5, 0.5, 1, 1]])
    pred_idx, gt_idx = match_predictions(preds, torch.zeros(2), gt, alpha=1.0)
    assert pred_idx.tolist() == [1] and gt_idx.tolist() == [0]


def test_matching_trades_distance_against_confidence() -> None:
    # |l0 - g|^2 = 4 * 0.25^2 = 0.25 ; |l1 - g|^2 = 0.
    # cost_i = alpha/2 * d_i - logit_i: with logits (3, -3):
    #   alpha = 1:  cost0 = 0.125 - 3 = -2.875 < cost1 = 0 + 3 = 3       -> prediction 0
    #   alpha = 100: cost0 = 12.5 - 3 = 9.5   > cost1 = 3                 -> prediction 1
    preds = t([[0.25, 0.25, 0.75, 0.75], [0.5, 0.5, 1, 1]])
    gt = t([[0.5, 0.5, 1, 1]])
    logits = torch.tensor([3.0, -3.0])
    assert match_predictions(preds, logits, gt, alpha=1.0)[0].tolist() == [0]
    assert match_predictions(preds, logits, gt, alpha=100.0)[0].tolist() == [1]


def test_matching_is_a_minimum_cost_bipartite_assignment() -> None:
    generator = torch.Generator().manual_seed(1)
    preds, gt = torch.rand(5, 4, generator=generator), torch.rand(3, 4, generator=generator)
    logits = torch.randn(5, generator=generator)
    cost = 0.5 * 2.0 * torch.cdist(preds, gt) ** 2 - logits[:, None]
    pred_idx, gt_idx = match_predictions(preds, logits, gt, alpha=2.0)
    assert sorted(gt_idx.tolist()) == [0, 1, 2] and len(set(pred_idx.tolist())) == 3
    best = min(sum(cost[p, g] for g, p in enumerate(perm)) for perm in itertools.permutations(range(5), 3))
    assert float(cost[pred_idx, gt_idx].sum()) == pytest.approx(float(best), abs=1e-5)


def test_loss_hand_worked() -> None:
    # Two predictions, logits (0, 0) -> c = 0.5 each; one box equal to prediction 1 after an
    # offset of 0.1 on x2: matched pair (1, 0), |l - g|^2 = 0.01.
    preds = t([[0, 0, 0.5, 0.5], [0.5, 0.5, 0.9, 1]])
    gt = t([[0.5, 0.5, 1, 1]])
    out = multibox_loss(preds[None], torch.zeros(1, 2), [gt], alpha=0.3)
    assert float(out["loc"]) == pytest.approx(0.5 * 0.01)
    assert float(out["conf"]) == pytest.approx(2 * LOG2)  # -log(0.5) positive + -log(1 - 0.5) negative
    assert float(out["loss"]) == pytest.approx(0.3 * 0.005 + 2 * LOG2)


def test_loss_without_ground_truth_is_all_negative_and_batch_averaged() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # c = 0.5, 0.75
    preds = torch.rand(2, 2, 4)
    out = multibox_loss(preds, logits, [t([]), t([])], alpha=1.0)
    image0 = -math.log(0.5) - math.log(0.25)
    image1 = 2 * LOG2
    assert float(out["conf"]) == pytest.approx((image0 + image1) / 2)
    assert float(out["loc"]) == 0.0


def test_loss_gradient_moves_matched_box_toward_ground_truth() -> None:
    preds = t([[0.2, 0.2, 0.6, 0.6]]).requires_grad_(True)
    gt = t([[0.3, 0.2, 0.6, 0.7]])
    multibox_loss(preds[None], torch.zeros(1, 1), [gt], alpha=1.0)["loss"].backward()
    np.testing.assert_allclose(preds.grad.numpy(), (preds - gt).detach().numpy(), atol=1e-6)


def test_kmeans_priors_find_the_clusters_and_handle_few_boxes() -> None:
    rng = np.random.default_rng(0)
    a = np.array([0.1, 0.1, 0.3, 0.3]) + rng.normal(0, 0.005, (40, 4))
    b = np.array([0.5, 0.4, 0.9, 0.95]) + rng.normal(0, 0.005, (40, 4))
    priors = kmeans_priors(np.concatenate([a, b]), 2, seed=0)
    np.testing.assert_allclose(priors, [[0.1, 0.1, 0.3, 0.3], [0.5, 0.4, 0.9, 0.95]], atol=0.01)
    few = kmeans_priors(np.array([[0.2, 0.2, 0.4, 0.5], [0.5, 0.5, 0.9, 0.9]]), 16, seed=0)
    assert few.shape == (16, 4) and len(np.unique(few.round(4), axis=0)) == 16
    assert (few[:, 2:] > few[:, :2]).all() and few.min() >= 0 and few.max() <= 1
    np.testing.assert_array_equal(
        few, kmeans_priors(np.array([[0.2, 0.2, 0.4, 0.5], [0.5, 0.5, 0.9, 0.9]]), 16)
    )
    with pytest.raises(ValueError, match="at least one"):
        kmeans_priors(np.zeros((0, 4)), 4)


def test_normalise_and_decode_round_trip_to_pixels() -> None:
    pixels = np.array([[10, 20, 110, 70]], np.float32)
    norm = normalise_boxes(pixels, width=200, height=100)
    np.testing.assert_allclose(norm, [[0.05, 0.2, 0.55, 0.7]])
    preds = torch.tensor([[0.55, 0.2, 0.05, 0.7], [0.0, 0.0, 1.2, 0.5]])  # inverted x; beyond the image
    boxes, scores = decode_top_k(preds, torch.tensor([2.0, -1.0]), width=200, height=100, top_k=1)
    np.testing.assert_allclose(boxes, [[10, 20, 110, 70]], atol=1e-4)
    assert scores.tolist() == pytest.approx([1 / (1 + math.exp(-2))])
    boxes, _ = decode_top_k(preds, torch.tensor([-2.0, 1.0]), width=200, height=100, top_k=2)
    np.testing.assert_allclose(boxes[0], [0, 0, 200, 50])


def test_decode_top_k_skips_boxes_that_clip_to_slivers() -> None:
    # The best prediction lies left of the image: clipped, it is 0.4 px wide. The next two are kept,
    # so top_k still returns top_k boxes when enough are large enough.
    preds = torch.tensor([[-0.5, 0.1, 0.002, 0.9], [0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9]])
    logits = torch.tensor([3.0, 2.0, 1.0])
    boxes, _ = decode_top_k(preds, logits, width=200, height=100, top_k=2)
    assert boxes[0, 2] - boxes[0, 0] == pytest.approx(0.4)  # without a minimum the sliver leads
    boxes, scores = decode_top_k(preds, logits, width=200, height=100, top_k=2, min_size=8)
    np.testing.assert_allclose(boxes, [[20, 10, 100, 50], [100, 50, 180, 90]], atol=1e-4)
    assert scores.tolist() == pytest.approx(torch.sigmoid(logits[1:]).tolist())
    boxes, _ = decode_top_k(preds, logits, width=200, height=100, top_k=3, min_size=50)
    assert boxes.shape == (0, 4)  # 80 x 40 px boxes are lower than 50 px


def test_recall_at_k_counts_covered_boxes() -> None:
    preds = t([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]])[None]
    gt = [t([[0.5, 0.5, 1, 1], [0, 0, 0.1, 0.1]])]
    assert recall_at_k(preds, torch.tensor([[1.0, 2.0]]), gt, top_k=1) == (1, 2)
    assert recall_at_k(preds, torch.tensor([[2.0, 1.0]]), gt, top_k=1) == (0, 2)


def test_untrained_model_predicts_priors_and_saves_round_trip(tmp_path: Path) -> None:
    priors = kmeans_priors(np.random.default_rng(0).uniform(0, 1, (30, 4)).clip(0, 1), 6)
    arch = MultiBoxArch(
        variant="bn", stage="inception4e", num_priors=6, reduced_channels=8, grid=2, image_size=64
    )
    model = build_multibox(googlenet("bn", num_classes=3), priors, arch).eval()
    images = torch.randn(2, 3, 64, 64)
    boxes, logits = model(images)
    assert boxes.shape == (2, 6, 4) and logits.shape == (2, 6)
    np.testing.assert_allclose(boxes[0].detach().numpy(), priors, atol=1e-6)  # zero-initialised offsets
    # Objectness starts near the prior 0.01: few of the K boxes are objects.
    torch.testing.assert_close(model.head.objectness.bias, torch.full((6,), math.log(0.01 / 0.99)))
    save_multibox(tmp_path / "m.pth", model, arch, {"trained_from": "none"})
    loaded, loaded_arch, meta = load_multibox(tmp_path / "m.pth")
    assert loaded_arch == arch and meta["trained_from"] == "none"
    torch.testing.assert_close(loaded(images)[1], logits)
