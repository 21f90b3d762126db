"""Mixed-precision training: ``torch.autocast`` for the forward pass, loss scaling for fp16.

- ``fp32``: no autocast (the default, and what every test of exact resume uses).
- ``bf16``: autocast to bfloat16 on CPU or GPU. On a CPU with AVX512-BF16 (this project's 2-core
  build machine) a GoogLeNet training step at 128 px runs about 1.8x faster than fp32; weights,
  optimizer state and BatchNorm statistics stay fp32. bf16 keeps fp32's exponent range, so no loss
  scaling is needed.
- ``fp16``: autocast to float16 with ``torch.amp.GradScaler``, whose state is saved in the
  checkpoint so a resumed run continues with the same scale. Meant for GPUs; it runs on a CPU (so
  it can be tested there) but slowly, hence a warning.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from typing import Any

import torch

from backbone.runtime.errors import UserError

logger = logging.getLogger(__name__)
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """``with mp.autocast(): loss = ...`` then ``mp.backward_and_step(loss, optimizer, ...)``."""

    def __init__(self, precision: str, device: torch.device) -> None:
        if precision not in PRECISIONS:
            raise UserError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "fp16" and device.type != "cuda":
            logger.warning("precision fp16 on %s is slow (no fast fp16 kernels); use bf16 there", device)
        self.precision = precision
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=_DTYPES[self.precision])

    def backward_and_step(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        parameters: Iterable[torch.Tensor],
        grad_clip_norm: float | None = None,
    ) -> None:
        """Backpropagate ``loss``, clip the (unscaled) gradients if asked, and step ``optimizer``."""
        if self.scaler is None:
            loss.backward()
            if grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(parameters, grad_clip_norm)
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        if grad_clip_norm is not None:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip_norm)
        self.scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        self.scaler.update()

    def state_dict(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
