"""Box regression: the encoding round-trips and ridge recovers a known shift and scale."""

from __future__ import annotations

import torch

from detect.rcnn.box_regression import decode_boxes, encode_boxes, fit_box_regressor


def test_encode_decode_round_trip() -> None:
    proposals = torch.tensor([[10.0, 10.0, 50.0, 30.0], [0.0, 0.0, 5.0, 100.0]])
    targets = torch.tensor([[12.0, 8.0, 60.0, 33.0], [1.0, 10.0, 4.0, 90.0]])
    deltas = encode_boxes(proposals, targets)
    torch.testing.assert_close(decode_boxes(proposals, deltas), targets, atol=1e-4, rtol=1e-4)


def test_ridge_recovers_a_known_shift_and_scale_per_class() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 400
    xy = torch.rand(n, 2, generator=gen) * 200
    wh = 20 + torch.rand(n, 2, generator=gen) * 80
    proposals = torch.cat([xy, xy + wh], dim=1)
    labels = torch.randint(0, 2, (n,), generator=gen)
    # Class 0: ground truth 10% of the width to the right; class 1: 20% taller. Features carry a
    # constant, so the regressor only has to learn the bias (plus ignore noise features).
    true = torch.tensor([[0.1, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, float(torch.log(torch.tensor(1.2)))]])
    targets = decode_boxes(proposals, true[labels][:, None, :])[:, 0]
    features = torch.cat([torch.ones(n, 1), torch.randn(n, 15, generator=gen)], dim=1)
    regressor = fit_box_regressor(features, proposals, targets, labels, num_classes=3, ridge=1.0)
    refined = regressor(features, proposals)  # (N, C, 4)
    picked = refined[torch.arange(n), labels]
    torch.testing.assert_close(picked, targets, atol=0.5, rtol=0.01)
    # Class 2 had no samples: it leaves proposals where they are.
    torch.testing.assert_close(refined[:, 2], proposals, atol=1e-3, rtol=1e-4)
    # Before regression the boxes were off by several pixels.
    assert (proposals - targets).abs().max() > 5
