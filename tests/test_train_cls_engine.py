"""EMA math, learning-rate schedules, the aux-weighted loss, MixUp/CutMix, evaluation and the SGD setup."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from backbone import GoogLeNetOutputs
from backbone.ema import ModelEma
from backbone.engine import batch_mix, classification_loss, classification_step, evaluate
from backbone.runtime.optim import build_lr_scheduler, build_optimizer, lr_factor_fn


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)


def test_ema_lerps_float_state_and_copies_integer_buffers():
    model = Tiny()
    ema = ModelEma(model, decay=0.9, warmup=False)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        model.lin.weight.add_(1.0)
        model.bn.running_mean.fill_(2.0)
        model.bn.num_batches_tracked.fill_(7)
    ema.update(model, step=1)
    state = ema.module.state_dict()
    expected_weight = 0.9 * before["lin.weight"] + 0.1 * model.lin.weight
    assert torch.allclose(state["lin.weight"], expected_weight)
    assert torch.allclose(state["bn.running_mean"], torch.full((2,), 0.2))  # float buffer: averaged
    assert state["bn.num_batches_tracked"].item() == 7  # integer buffer: copied
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    assert model.lin.weight.requires_grad  # the live model is untouched


def test_ema_warmup_decay_follows_timm_formula():
    ema = ModelEma(Tiny(), decay=0.999, warmup=True, warmup_gamma=1.0, warmup_power=2 / 3)
    assert ema.decay_at(1) == pytest.approx(1 - 2 ** (-2 / 3))
    assert ema.decay_at(10) == pytest.approx(1 - 11 ** (-2 / 3))
    assert ema.decay_at(10**9) == 0.999  # capped at the configured decay
    with pytest.raises(ValueError):
        ModelEma(Tiny(), decay=1.0)


def test_paper_schedule_is_a_staircase_of_096_every_8_epochs():
    f = lr_factor_fn("paper", iters_per_epoch=10, epochs=100)
    assert f(0) == 1.0 and f(79) == 1.0  # epoch 7.9
    assert f(80) == pytest.approx(0.96) and f(159) == pytest.approx(0.96)
    assert f(160) == pytest.approx(0.96**2) and f(800) == pytest.approx(0.96**10)


def test_step_cosine_and_warmup():
    step = lr_factor_fn("step", 4, 10, gamma=0.1, milestones=(3, 6))
    assert [step(i) for i in (11, 12, 23, 24)] == pytest.approx([1.0, 0.1, 0.1, 0.01])
    cosine = lr_factor_fn("cosine", 10, 10, min_factor=0.1)
    assert cosine(0) == 1.0 and cosine(50) == pytest.approx(0.55) and cosine(100) == pytest.approx(0.1)
    warm = lr_factor_fn("constant", 10, 5, warmup_epochs=2, warmup_factor=0.1)
    assert warm(0) == pytest.approx(0.1) and warm(10) == pytest.approx(0.55) and warm(20) == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor_fn("exp", 10, 5)


def test_scheduler_steps_per_iteration_and_round_trips():
    model = Tiny()
    optimizer = build_optimizer(model, lr=0.5, weight_decay=1e-4)
    scheduler = build_lr_scheduler(optimizer, lr_factor_fn("paper", 2, 40, step_epochs=1))
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.5, 0.5, 0.48, 0.48, 0.5 * 0.96**2])
    fresh_opt = build_optimizer(model, lr=0.5)
    fresh = build_lr_scheduler(fresh_opt, lr_factor_fn("paper", 2, 40, step_epochs=1))
    fresh.load_state_dict(scheduler.state_dict())
    assert fresh.get_last_lr() == scheduler.get_last_lr()


def test_sgd_momentum_and_no_decay_on_biases_and_norms():
    optimizer = build_optimizer(Tiny(), lr=0.1, weight_decay=5e-4)
    decayed, plain = optimizer.param_groups
    assert optimizer.defaults["momentum"] == 0.9
    assert decayed["weight_decay"] == 5e-4 and [p.ndim for p in decayed["params"]] == [2]
    assert plain["weight_decay"] == 0.0 and len(plain["params"]) == 3  # lin.bias, bn.weight, bn.bias


def test_adamw_keeps_the_same_decay_groups_and_an_unknown_kind_is_named():
    optimizer = build_optimizer(Tiny(), lr=1e-3, weight_decay=0.01, kind="adamw")
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    with pytest.raises(ValueError, match=r"optim.kind: must be one of sgd, adamw, got 'adam'"):
        build_optimizer(Tiny(), lr=0.1, kind="adam")


def test_loss_is_main_plus_weighted_aux():
    torch.manual_seed(0)
    targets = torch.tensor([0, 2, 1])
    main, aux1, aux2 = (torch.randn(3, 4) for _ in range(3))
    ce = nn.functional.cross_entropy
    for weight in (0.3, 1.0, 0.0):
        loss, parts = classification_loss(GoogLeNetOutputs(main, aux1, aux2), targets, aux_weight=weight)
        expected = ce(main, targets) + weight * (ce(aux1, targets) + ce(aux2, targets))
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        assert parts["loss_main"] == pytest.approx(ce(main, targets).item(), rel=1e-6)
    loss, parts = classification_loss(GoogLeNetOutputs(main, None, None), targets)  # no aux heads
    assert loss.item() == pytest.approx(ce(main, targets).item()) and parts["loss_aux"] == 0.0


def test_loss_takes_soft_targets_as_probabilities():
    torch.manual_seed(0)
    labels = torch.tensor([0, 2, 1])
    outputs = GoogLeNetOutputs(*(torch.randn(3, 4) for _ in range(3)))
    one_hot = nn.functional.one_hot(labels, 4).float()
    hard, _ = classification_loss(outputs, labels, label_smoothing=0.1)
    soft, _ = classification_loss(outputs, one_hot, label_smoothing=0.1)
    assert soft.item() == pytest.approx(hard.item(), rel=1e-6)


def test_batch_mix_is_off_by_default_and_rejects_negative_alpha():
    assert batch_mix(5) is None
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        batch_mix(5, cutmix_alpha=-1.0)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_batch_mix_blends_pairs_of_images_and_their_labels(kind):
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous()
    labels = torch.tensor([0, 1, 2, 3])
    mix = batch_mix(4, **{f"{kind}_alpha": 1.0})
    torch.manual_seed(3)
    mixed, targets = mix(images, labels)
    torch.manual_seed(3)
    again, _ = mix(images, labels)
    assert torch.equal(mixed, again)  # the draws follow torch's global RNG (restored on resume)
    assert targets.shape == (4, 4) and torch.allclose(targets.sum(1), torch.ones(4))
    # Each image is its own label's share of itself plus one partner's: the pixel mean of image i
    # (pixel value = label) is the target-weighted mean of the labels.
    label_mean = targets @ torch.arange(4, dtype=torch.float32)
    assert torch.allclose(mixed.mean(dim=(1, 2, 3)), label_mean, atol=1e-5)
    assert (targets > 0).sum(1).max() <= 2 and not torch.equal(mixed, images)


def test_step_mixes_before_the_forward_and_logs_top1_of_the_unmixed_label():
    seen = {}

    class Recorder(nn.Module):
        def forward(self, x):
            seen["images"] = x
            return GoogLeNetOutputs(torch.zeros(x.shape[0], 3), None, None)

    def swap(images, labels):  # a stand-in mix: the second half of the batch gets the first's images
        targets = nn.functional.one_hot(labels.flip(0), 3).float()
        return images.flip(0), targets

    images = torch.arange(2, dtype=torch.float32).view(2, 1, 1, 1).expand(2, 3, 4, 4)
    step = classification_step(torch.device("cpu"), mix=swap)
    out = step(Recorder(), (images, torch.tensor([0, 1])))
    assert torch.equal(seen["images"][:, 0, 0, 0], torch.tensor([1.0, 0.0]))
    assert out.loss.item() == pytest.approx(math.log(3)) and out.metrics["top1"] == 50.0


class FixedLogits(nn.Module):
    """Returns preset logits for each batch (keyed by the first pixel, which holds the row index)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> GoogLeNetOutputs:
        rows = x[:, 0, 0, 0].long()
        return GoogLeNetOutputs(self.logits[rows], None, None)


def test_evaluate_counts_top1_and_top5():
    num = 8
    logits = torch.zeros(num, 6)
    labels = torch.arange(num) % 6
    for i in range(num):
        logits[i, labels[i]] = 1.0 if i < 3 else 0.5  # rank 1 for the first three ...
        if i >= 3:
            logits[i, (labels[i] + 1) % 6] = 1.0  # ... rank 2 for the others
    logits[7] = 0.0
    logits[7, (labels[7] + 1) % 6] = 1.0
    logits[7, labels[7]] = -1.0  # rank 6 (last): outside the top 5
    images = torch.arange(num, dtype=torch.float32).view(num, 1, 1, 1).expand(num, 3, 2, 2)
    batches = [(images[:5], labels[:5]), (images[5:], labels[5:])]
    metrics = evaluate(FixedLogits(logits), batches, torch.device("cpu"))
    assert metrics["count"] == 8
    assert metrics["top1"] == pytest.approx(100 * 3 / 8)
    assert metrics["top5"] == pytest.approx(100 * 7 / 8)
    assert math.isfinite(metrics["loss"])
    five = evaluate(FixedLogits(logits[:, :5]), [(images, labels.clamp(max=4))], torch.device("cpu"))
    assert "top5" not in five and five["count"] == 8  # 5 classes: top-5 is always 100%
