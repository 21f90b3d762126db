"""ONNX export of a shared-feature (Fast R-CNN style) detector as two files: the trunk, run once per
image, and the region head (RoIAlign of each box on the trunk's map, the remaining stages, softmax).

    trunk.onnx        images (1, 3, H, W) normalised, H and W dynamic  -> features (1, K, h, w)
    region_head.onnx  features (1, K, h, w), boxes (R, 4) xyxy in image pixels, R dynamic -> probs (R, C + 1)

The head carries the context dilation and ``torchvision.ops.roi_align`` (ONNX RoiAlign, half-pixel
coordinates), so ``head(trunk(image), boxes)`` is the detector's own region softmax. BatchNorm is
folded first (``backbone.inference.fuse_for_inference``); SVMs, box regression and NMS stay outside.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from backbone.export import DEFAULT_OPSET, export_module_onnx, onnx_session
from detect.rcnn.model import RegionClassifier, inference_copy


class SharedTrunk(nn.Module):
    def __init__(self, detector: RegionClassifier) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor) -> Tensor:
        return self.detector.trunk_features(images)


class SharedRegionHead(nn.Module):
    def __init__(self, detector: RegionClassifier) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, features: Tensor, boxes: Tensor) -> Tensor:
        net = self.detector.backbone
        names = net.stage_names()
        rois = torch.cat([boxes.new_zeros((boxes.shape[0], 1)), boxes], dim=1)
        x = self.detector.pool_regions(features, rois)
        x = net.forward_stages(x, names[names.index(self.detector.arch.trunk_stage) + 1], names[-1])
        return torch.softmax(net.fc(torch.flatten(net.avgpool(x), 1)), dim=1)


def export_shared_onnx(
    detector: RegionClassifier, out_dir: str | Path, image_size: tuple[int, int], opset: int = DEFAULT_OPSET
) -> tuple[Path, Path]:
    """Write ``trunk.onnx`` and ``region_head.onnx`` for a shared-mode ``detector`` into ``out_dir``."""
    if detector.arch.mode != "shared":
        raise ValueError("export_shared_onnx needs a shared-mode detector")
    if opset < 16:  # RoiAlign's half-pixel coordinates (aligned=True) came with opset 16
        raise ValueError(f"the shared-mode head needs ONNX opset >= 16, got {opset}")
    fused = inference_copy(detector, channels_last=False)
    out_dir = Path(out_dir)
    image = torch.zeros(1, 3, *image_size)
    trunk = export_module_onnx(
        SharedTrunk(fused), out_dir / "trunk.onnx", image, ("images",), ("features",), opset,
        dynamic_axes={"images": {2: "height", 3: "width"}, "features": {2: "fh", 3: "fw"}},
    )  # fmt: skip
    with torch.no_grad():
        features = fused.trunk_features(image)
    boxes = torch.tensor([[0.0, 0.0, image_size[1] / 2, image_size[0] / 2], [4.0, 4.0, 40.0, 30.0]])
    head = export_module_onnx(
        SharedRegionHead(fused), out_dir / "region_head.onnx", (features, boxes), ("features", "boxes"),
        ("probs",), opset, dynamic_axes={"features": {2: "fh", 3: "fw"}, "boxes": {0: "regions"},
                                         "probs": {0: "regions"}},
    )  # fmt: skip
    return trunk, head


def check_shared_onnx(
    detector: RegionClassifier, trunk_path: Path, head_path: Path, image: Tensor, boxes: Tensor
) -> float:
    """Max absolute difference between onnxruntime's trunk + head and the (unfused) detector's own
    region softmax for ``boxes`` on ``image`` ``(1, 3, H, W)``."""
    trunk, head = onnx_session(trunk_path), onnx_session(head_path)
    features = trunk.run(None, {"images": image.numpy().astype(np.float32)})[0]
    probs = head.run(None, {"features": features, "boxes": boxes.numpy().astype(np.float32)})[0]
    detector = detector.eval()
    with torch.no_grad():
        rois = torch.cat([boxes.new_zeros((len(boxes), 1)), boxes], dim=1)
        expected = torch.softmax(detector.backbone.fc(detector.pooled_features(image, rois)), dim=1)
    return float(np.max(np.abs(probs.astype(np.float64) - expected.numpy().astype(np.float64)), initial=0.0))
