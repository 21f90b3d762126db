"""Polyak averaging of the weights (an exponential moving average), as timm's ModelEmaV3.

After every optimizer step: ``ema = decay * ema + (1 - decay) * model`` on floating-point state
(parameters and float buffers such as BatchNorm running statistics, via ``lerp``), while integer
buffers (``num_batches_tracked``) are copied. With warm-up, the decay starts near 0 and rises as
``1 - (1 + step / gamma) ** -power`` towards ``decay``, so a short run's average is not dominated
by the random initialisation. The averaged copy is what train_cls evaluates and exports.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from backbone.runtime.checkpoint import unwrap_model


class ModelEma:
    """Keeps an averaged copy of a model (in eval mode, without gradients) on the model's device."""

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9998,
        min_decay: float = 0.0,
        warmup: bool = True,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
    ) -> None:
        if not 0.0 <= min_decay <= decay < 1.0:
            raise ValueError(f"need 0 <= min_decay <= decay < 1, got min_decay={min_decay}, decay={decay}")
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        self.module.requires_grad_(False)
        self.decay = decay
        self.min_decay = min_decay
        self.warmup = warmup
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power

    def decay_at(self, step: int) -> float:
        """The decay used for the update after optimizer step number ``step`` (1-based)."""
        if not self.warmup:
            return self.decay
        warm = 1.0 - (1.0 + step / self.warmup_gamma) ** -self.warmup_power
        return max(min(self.decay, warm), self.min_decay)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Blend the model's current state into the average (call after each optimizer step)."""
        weight = 1.0 - self.decay_at(step)
        ema_float, model_float = [], []
        model_state = unwrap_model(model).state_dict()
        for name, ema_value in self.module.state_dict().items():
            model_value = model_state[name]
            if ema_value.is_floating_point():
                ema_float.append(ema_value)
                model_float.append(model_value.to(ema_value.dtype))
            else:
                ema_value.copy_(model_value)
        if ema_float:
            torch._foreach_lerp_(ema_float, model_float, weight)

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Make the average equal to the model (e.g. after loading pretrained weights)."""
        self.module.load_state_dict(unwrap_model(model).state_dict())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
