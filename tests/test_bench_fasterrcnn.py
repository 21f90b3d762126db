"""benchmarks/bench_fasterrcnn.py: torchvision's FasterRCNN around our GoogLeNet trains (one step on
two synthetic scenes changes the weights it should, and only those) and detects inside the image."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from backbone import googlenet
from backbone.synthetic import SHAPE_CLASSES, render_scene

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fasterrcnn.py"


def load_bench():
    if "bench_fasterrcnn" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_fasterrcnn", BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_fasterrcnn"] = module  # dataclasses look their module up while it executes
        spec.loader.exec_module(module)
    return sys.modules["bench_fasterrcnn"]


def test_fasterrcnn_around_googlenet_trains_and_detects_in_bounds() -> None:
    bench = load_bench()
    classes = len(SHAPE_CLASSES)
    net = googlenet("bn", num_classes=5, aux_logits=True)
    model = bench.build_fasterrcnn(net, classes, anchor_sizes=(16, 32, 64))
    assert model.backbone.out_channels == 832
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())

    height, width = 96, 128
    scenes = [render_scene(i, (height, width), seed=3) for i in range(2)]
    samples = [bench.Sample(image, boxes, labels) for image, boxes, labels in scenes]
    batch = [bench.to_inputs(samples[0], flip=False), bench.to_inputs(samples[1], flip=True)]
    flipped = batch[1][1]["boxes"]
    assert torch.allclose(flipped[:, [2, 0]], width - torch.from_numpy(scenes[1][1][:, [0, 2]]))

    model.eval()  # untrained: random scores, but every box must be a box of the image
    with torch.no_grad():
        out = model([batch[0][0]])[0]
    boxes = out["boxes"]
    assert len(boxes) > 0 and boxes.shape[1] == 4
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert ((out["labels"] >= 1) & (out["labels"] <= classes)).all()

    stem = net.conv1.conv.weight.detach().clone()
    trunk = net.inception4e.branch1.conv.weight.detach().clone()
    rpn = model.rpn.head.conv[0][0].weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    model.train()
    loss = bench.train_step(model, optimizer, batch)
    assert np.isfinite(loss) and loss > 0
    assert torch.equal(net.conv1.conv.weight, stem)  # frozen through maxpool2
    assert not torch.equal(net.inception4e.branch1.conv.weight, trunk)
    assert not torch.equal(model.rpn.head.conv[0][0].weight, rpn)
