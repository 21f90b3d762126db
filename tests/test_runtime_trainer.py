"""backbone.runtime.trainer.fit: a SIGTERM mid-epoch saves a checkpoint from which the resumed run
ends bit-identical to an uninterrupted one (small MLP with dropout and noisy data, in-process)."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from backbone.ema import ModelEma
from backbone.runtime.checkpoint import load_checkpoint
from backbone.runtime.errors import UserError
from backbone.runtime.loader import ResumableLoader
from backbone.runtime.log import read_metrics
from backbone.runtime.optim import build_lr_scheduler, build_optimizer, lr_factor_fn
from backbone.runtime.trainer import NonFiniteLoss, StepOutput, fit


class Blobs(Dataset):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int):
        label = index % 2
        point = torch.randn(4) * 0.5 + (1.0 if label else -1.0)  # "augmentation" from the global RNG
        return point, label


def make_parts(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.BatchNorm1d(16), nn.Linear(16, 2))
    loader = ResumableLoader(Blobs(), 8, seed=3)
    optimizer = build_optimizer(model, lr=0.1, weight_decay=1e-3)
    scheduler = build_lr_scheduler(optimizer, lr_factor_fn("cosine", len(loader), 3, warmup_epochs=0.5))
    return model, loader, optimizer, scheduler, ModelEma(model, decay=0.9)


def run(run_dir, resume=False, kill_at_step=None, nan_at_step=None, parts=None):
    model, loader, optimizer, scheduler, ema = parts or make_parts()
    calls = {"n": 0}

    def compute_loss(net: nn.Module, batch) -> StepOutput:
        calls["n"] += 1
        if kill_at_step is not None and calls["n"] == kill_at_step:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step, as from a scheduler
        x, y = batch
        loss = nn.functional.cross_entropy(net(x), y)
        if calls["n"] == nan_at_step:
            loss = loss * float("nan")
        return StepOutput(loss=loss, batch_size=len(y), metrics={"cls": float(loss.detach())})

    result = fit(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        train_loader=loader,
        compute_loss=compute_loss,
        epochs=3,
        run_dir=run_dir,
        config={"lr": 0.1},
        ema=ema,
        evaluate=lambda m: {"acc": 1.0},
        resume=resume,
        log_interval=2,
    )
    return result, model, ema


def test_sigterm_mid_epoch_then_resume_is_bit_identical(tmp_path):
    _, reference, reference_ema = run(tmp_path / "a")
    stopped, _, _ = run(tmp_path / "b", kill_at_step=7)  # 5 steps per epoch: epoch 2, step 2
    assert stopped.stopped and stopped.stop_reason == "SIGTERM"
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["global_step"]) == (1, 2, 7)
    resumed, model, ema = run(tmp_path / "b", resume=True)
    assert not resumed.stopped and resumed.global_step == 15
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    for name, value in reference_ema.state_dict().items():
        assert torch.equal(ema.state_dict()[name], value), name
    assert not torch.equal(ckpt["model"]["0.weight"], model.state_dict()["0.weight"])  # it did train on
    epochs_a = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if r["kind"] == "epoch"]
    epochs_b = [r for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["train_loss"] for r in epochs_a] == [r["train_loss"] for r in epochs_b]  # partial sums kept
    assert (tmp_path / "b" / "curves.png").is_file()


def test_resume_without_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        run(tmp_path / "empty", resume=True)


def test_non_finite_loss_stops_before_the_update_and_keeps_the_last_checkpoint(tmp_path):
    parts = make_parts()
    model, ema = parts[0], parts[4]
    with pytest.raises(NonFiniteLoss) as caught:
        run(tmp_path / "nan", nan_at_step=8, parts=parts)  # 5 steps per epoch: epoch 2, batch 3
    message = str(caught.value)
    assert "\n" not in message
    assert "loss nan, cls nan" in message and "epoch 2/3, batch 3 of 5 (global step 8" in message
    assert f"last good checkpoint {tmp_path / 'nan' / 'checkpoint.pt'} is kept" in message
    ckpt = load_checkpoint(tmp_path / "nan" / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["global_step"]) == (1, 0, 5)
    for name, value in [*model.state_dict().items(), *ema.module.state_dict().items()]:
        if value.is_floating_point():
            assert torch.isfinite(value).all(), name  # the bad batch never reached the weights


def test_non_finite_loss_before_any_checkpoint_says_so(tmp_path):
    with pytest.raises(NonFiniteLoss, match="batch 2 of 5 .*no checkpoint was written yet"):
        run(tmp_path / "early", nan_at_step=2)
