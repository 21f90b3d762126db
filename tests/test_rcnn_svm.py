"""The linear SVMs separate a toy set, and hard-negative mining finds the negatives that matter."""

from __future__ import annotations

import torch

from detect.rcnn.svm import fit_svms


def test_svms_separate_a_toy_set_with_hard_negative_mining() -> None:
    gen = torch.Generator().manual_seed(0)
    dim = 8
    centres = torch.eye(dim)[:2] * 4  # class 0 along axis 0, class 1 along axis 1
    positives = torch.cat([centres[c] + 0.3 * torch.randn(50, dim, generator=gen) for c in (0, 1)])
    labels = torch.cat([torch.zeros(50), torch.ones(50)]).long()
    easy = -2 + 0.3 * torch.randn(3000, dim, generator=gen)  # far from both
    hard = centres[0] * 0.5 + 0.3 * torch.randn(40, dim, generator=gen)  # half-way towards class 0
    negatives = torch.cat([easy, hard])
    max_iou = torch.zeros(len(negatives), 2)
    hard_rows = slice(len(positives) + len(easy), None)

    def errors(rounds: int) -> tuple[float, float, float]:
        svms = fit_svms(positives, labels, negatives, max_iou, 2, initial_negatives=100, rounds=rounds)
        margins = svms.margins(torch.cat([positives, negatives]))[:, 0]
        missed = (margins[: len(positives)][labels == 0] <= 0).float().mean()
        false_alarms = (margins[len(positives) :] >= 0).float().mean()
        hard_wrong = (margins[hard_rows] >= 0).float().mean()
        return float(missed), float(false_alarms), float(hard_wrong)

    missed, false_alarms, hard_wrong = errors(rounds=4)
    assert missed < 0.03 and false_alarms < 0.01 and hard_wrong < 0.1
    # Without mining the 100 random negatives hold almost none of the hard ones.
    assert errors(rounds=1)[2] > hard_wrong + 0.3
    svms = fit_svms(positives, labels, negatives, max_iou, 2, initial_negatives=100)
    probs = svms(positives[:3])
    assert probs.shape == (3, 3) and torch.all((probs >= 0) & (probs <= 1))
