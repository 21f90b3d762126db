"""Mixed precision in the training loop: bf16 autocast reaches the forward pass while the weights
stay fp32, fp16 loss scaling is checkpointed and restored, bad values are one-line errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backbone.runtime.checkpoint import load_checkpoint
from backbone.runtime.errors import UserError
from backbone.runtime.loader import ResumableLoader
from backbone.runtime.optim import build_lr_scheduler, build_optimizer, lr_factor_fn
from backbone.runtime.precision import MixedPrecision
from backbone.runtime.trainer import StepOutput, fit


class Blobs(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int):
        label = index % 2
        generator = torch.Generator().manual_seed(index)
        return torch.randn(8, generator=generator) * 0.5 + (1.0 if label else -1.0), label


def train(run_dir, precision: str, epochs: int = 2, resume: bool = False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    loader = ResumableLoader(Blobs(), 16, seed=1)
    optimizer = build_optimizer(model, lr=0.2)
    scheduler = build_lr_scheduler(optimizer, lr_factor_fn("constant", len(loader), epochs))
    output_dtypes, losses = set(), []

    def compute_loss(net: nn.Module, batch) -> StepOutput:
        x, y = batch
        logits = net(x)
        output_dtypes.add(logits.dtype)
        loss = nn.functional.cross_entropy(logits.float(), y)
        losses.append(float(loss.detach()))
        return StepOutput(loss=loss, batch_size=len(y))

    fit(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        train_loader=loader,
        compute_loss=compute_loss,
        epochs=epochs,
        run_dir=run_dir,
        config={"precision": precision},
        precision=precision,
        resume=resume,
    )
    return model, output_dtypes, losses


def test_bf16_autocasts_the_forward_pass_and_keeps_fp32_weights(tmp_path):
    model, dtypes, losses = train(tmp_path, "bf16")
    assert dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0]  # it learns
    assert load_checkpoint(tmp_path / "checkpoint.pt")["grad_scaler"] is None


def test_fp32_runs_without_autocast(tmp_path):
    _, dtypes, _ = train(tmp_path, "fp32", epochs=1)
    assert dtypes == {torch.float32}


def test_fp16_loss_scale_is_checkpointed_and_restored(tmp_path):
    train(tmp_path, "fp16", epochs=1)
    saved = load_checkpoint(tmp_path / "checkpoint.pt")["grad_scaler"]
    assert saved["scale"] > 0 and saved["_growth_tracker"] == 4  # 4 steps without overflow
    restored = MixedPrecision("fp16", torch.device("cpu"))
    restored.load_state_dict(saved)
    assert restored.state_dict() == saved
    _, dtypes, _ = train(tmp_path, "fp16", epochs=2, resume=True)
    assert dtypes == {torch.float16}
    assert load_checkpoint(tmp_path / "checkpoint.pt")["grad_scaler"]["_growth_tracker"] == 8


def test_unknown_precision_is_a_user_error():
    with pytest.raises(UserError, match="precision must be one of"):
        MixedPrecision("int8", torch.device("cpu"))
