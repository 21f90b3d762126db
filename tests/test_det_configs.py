"""Every train_det config in the tree loads, and its model builds (full-scale ones on the meta device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tool_loader import load_tool

from backbone.runtime.config import load_config
from backbone.runtime.errors import UserError
from detect.rcnn.build import build_detector, build_optimizer, initial_backbone

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DET_CONFIGS = sorted(
    p for p in (CONFIGS / "det").glob("*.yaml") if not p.stem.startswith(("proposals", "multibox"))
)
DET_CONFIGS += [CONFIGS / "demo" / "detector.yaml"]
train_det = load_tool("train_det")


@pytest.mark.parametrize("path", DET_CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_builds_its_model(path: Path) -> None:
    cfg = load_config(path, train_det.TrainDetConfig)
    m = cfg.model
    with torch.device("meta"):
        model, _ = build_detector(
            None, m.init_kind, m.variant, 200, mode=m.mode, input_size=m.input_size, trunk_stage=m.trunk_stage
        )
    assert next(model.parameters()).device.type == "meta"
    optimizer = build_optimizer(model, cfg.optim.lr, cfg.optim.head_lr_mult, cfg.optim.momentum, 0.0)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(cfg.optim.lr * cfg.optim.head_lr_mult)
    assert cfg.sampler.regions_per_batch % cfg.sampler.images_per_batch == 0
    # The forward pass runs on whatever device the model is on: here the meta device, no CPU assumed.
    images = torch.zeros(1, 3, 96, 96, device="meta")
    rois = torch.tensor([[0.0, 0.0, 0.0, 50.0, 50.0]] * 2, device="meta")
    out = model.train()(images, rois)
    assert out.logits.device.type == "meta" and tuple(out.logits.shape) == (2, 201)


def test_torchvision_init_kind_without_init_is_an_error_not_a_random_model() -> None:
    with pytest.raises(UserError, match=r"model.init_kind torchvision needs model.init") as info:
        initial_backbone(None, "torchvision", "torchvision", 20)
    assert "\n" not in str(info.value)
