"""The region classifier: GoogLeNet scoring proposals as one of C classes or background (index C).

Two modes, one interface ``model(images, rois) -> GoogLeNetOutputs`` (``images`` ``(B, 3, H, W)``
normalised, ``rois`` ``(R, 5)`` rows ``(batch index, x1, y1, x2, y2)`` in those pixels):

- ``crop`` (R-CNN, the paper's entry): every region is warped with context padding to
  ``input_size`` and run through the whole network.
- ``shared`` (Fast R-CNN style): the trunk runs once per image up to ``trunk_stage``; each region is
  RoI-aligned on that map to the size the stage has at ``input_size`` and goes through the
  remaining stages and the classifier. Aux heads that sit inside the trunk are not used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from backbone.googlenet import AUX_AFTER, GoogLeNet, GoogLeNetOutputs
from backbone.inference import fuse_for_inference
from backbone.runtime.checkpoint import unwrap_model
from backbone.weights import atomic_torch_save, read_weights_file
from detect.rcnn.box_regression import BoxRegressor
from detect.rcnn.regions import context_boxes, warp_regions
from detect.rcnn.svm import LinearSVMs

DETECTOR_FORMAT = "googlenet-rcnn-v1"


@dataclass(frozen=True)
class RegionClassifierArch:
    """Everything needed to rebuild the network (stored in the model file)."""

    variant: str
    num_classes: int  # object classes; the network has num_classes + 1 outputs
    aux_logits: bool = True
    mode: Literal["crop", "shared"] = "crop"
    input_size: int = 224
    padding: int = 16  # context pixels at network scale around each warped region
    # anisotropic: R-CNN's warp of the box itself; square: the tightest square about it (keeps aspect)
    warp: Literal["anisotropic", "square"] = "anisotropic"
    trunk_stage: str = "inception4e"  # shared mode: the last stage run once per image
    sampling_ratio: int = 2
    transform_input: bool = False


class RegionClassifier(nn.Module):
    def __init__(self, backbone: GoogLeNet, arch: RegionClassifierArch) -> None:
        super().__init__()
        if backbone.num_classes != arch.num_classes + 1:
            backbone.reset_classifier(arch.num_classes + 1)
        if arch.mode == "shared":
            names = backbone.stage_names()
            if arch.trunk_stage not in names or arch.trunk_stage == names[-1]:
                raise ValueError(f"trunk_stage must be one of {', '.join(names[:-1])}")
            trunk = names[: names.index(arch.trunk_stage) + 1]
            # Aux heads inside the trunk would see whole images, not regions: drop them.
            for stage, head in AUX_AFTER.items():
                if stage in trunk and getattr(backbone, head, None) is not None:
                    setattr(backbone, head, None)
            self.roi_size, self.feature_stride = self._feature_geometry(backbone, arch)
        self.backbone = backbone
        self.arch = arch
        # Fitted after training (R-CNN's extras, optional); saved with the weights.
        self.box_regressor: BoxRegressor | None = None
        self.svms: LinearSVMs | None = None

    @staticmethod
    def _feature_geometry(backbone: GoogLeNet, arch: RegionClassifierArch) -> tuple[int, int]:
        with torch.no_grad():
            weight = next(backbone.parameters())  # probe where the backbone lives (a GPU, the meta device)
            probe = weight.new_zeros(1, 3, arch.input_size, arch.input_size)
            was_training = backbone.training
            feats = backbone.eval().forward_features(probe, arch.trunk_stage)
            backbone.train(was_training)
        size = int(feats.shape[-1])
        return size, arch.input_size // size

    @property
    def num_classes(self) -> int:
        return self.arch.num_classes

    def forward(self, images: Tensor, rois: Tensor) -> GoogLeNetOutputs:
        if self.arch.mode == "crop":
            return self.backbone(self.warp(images, rois))
        return self.forward_shared(images, rois)

    def warp(self, images: Tensor, rois: Tensor) -> Tensor:
        arch = self.arch
        square = arch.warp == "square"
        crops = warp_regions(images, rois, arch.input_size, arch.padding, arch.sampling_ratio, square)
        return crops.contiguous(memory_format=torch.channels_last) if _is_channels_last(images) else crops

    def forward_shared(self, images: Tensor, rois: Tensor) -> GoogLeNetOutputs:
        return self.classify_features(self.trunk_features(images), rois)

    def trunk_features(self, images: Tensor) -> Tensor:
        """Shared mode: the feature map of ``trunk_stage``, once per image."""
        return self.backbone.forward_features(images, self.arch.trunk_stage)

    def pool_regions(self, features: Tensor, rois: Tensor) -> Tensor:
        """RoIAlign of each (context-dilated) region on the trunk's map, at the size the next stage
        sees for a whole ``input_size`` image: a region the size of the image reproduces the plain network."""
        arch = self.arch
        boxes = context_boxes(rois[:, 1:].float(), arch.input_size, arch.padding, arch.warp == "square")
        rois = torch.cat([rois[:, :1].float(), boxes], dim=1)
        scale = 1.0 / self.feature_stride
        # In fp32 whatever the autocast: bf16 box coordinates would be rounded to 2-4 px.
        return roi_align(features.float(), rois, self.roi_size, scale, arch.sampling_ratio, aligned=True)

    def classify_features(self, features: Tensor, rois: Tensor) -> GoogLeNetOutputs:
        """Shared mode: the stages after the trunk and the classifier, per region."""
        net = self.backbone
        names = net.stage_names()
        x = self.pool_regions(features, rois)
        aux: dict[str, Tensor] = {}
        for name in names[names.index(self.arch.trunk_stage) + 1 :]:
            x = getattr(net, name)(x)
            head = AUX_AFTER.get(name)
            if head is not None and self.training and getattr(net, head, None) is not None:
                aux[head] = getattr(net, head)(x)
        return GoogLeNetOutputs(net.forward_head(x), aux.get("aux1"), aux.get("aux2"))

    def pooled_features(self, images: Tensor, rois: Tensor, trunk: Tensor | None = None) -> Tensor:
        """The 1024-d pooled features of each region: the classifier's input (``fc`` of them gives the
        logits in eval mode), also used by SVMs and box regression. Shared mode reuses ``trunk``
        (``trunk_features(images)``) when given."""
        net = self.backbone
        names = net.stage_names()
        if self.arch.mode == "crop":
            x = net.forward_features(self.warp(images, rois), names[-1])
        else:
            trunk = self.trunk_features(images) if trunk is None else trunk
            x = self.pool_regions(trunk, rois)
            x = net.forward_stages(x, names[names.index(self.arch.trunk_stage) + 1], names[-1])
        return torch.flatten(net.avgpool(x), 1)


def inference_copy(model: RegionClassifier, channels_last: bool = True) -> RegionClassifier:
    """An eval-mode copy of ``model`` (DDP-unwrapped) with BatchNorm folded (``fuse_for_inference``)
    and its extras kept; the original is left untouched."""
    model = unwrap_model(model)
    fused = RegionClassifier(fuse_for_inference(model.backbone, channels_last=channels_last), model.arch)
    fused.box_regressor, fused.svms = model.box_regressor, model.svms
    return fused.eval()


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def save_detector(path: str | Path, model: RegionClassifier, meta: dict[str, Any]) -> None:
    """A plain-dict file (weights_only loadable): weights, architecture and inference metadata."""
    model = getattr(model, "module", model)
    blob = {
        "format": DETECTOR_FORMAT,
        "model": model.state_dict(),
        "arch": asdict(model.arch),
        "meta": dict(meta),
    }
    atomic_torch_save(blob, path)


def build_region_classifier(arch: RegionClassifierArch) -> RegionClassifier:
    backbone = GoogLeNet(
        variant=arch.variant,
        num_classes=arch.num_classes + 1,
        aux_logits=arch.aux_logits,
        transform_input=arch.transform_input,
        init_weights=False,
    )
    return RegionClassifier(backbone, arch)


def load_detector(path: str | Path) -> tuple[RegionClassifier, dict[str, Any]]:
    """Rebuild a detector saved by :func:`save_detector`; ``ValueError`` naming the file otherwise."""
    blob = read_weights_file(path)
    if blob.get("format") != DETECTOR_FORMAT:
        raise ValueError(f"{path}: not a detector model file (train one with tools/train_det.py)")
    arch = RegionClassifierArch(**blob["arch"])
    model = build_region_classifier(arch)
    state = blob["model"]
    if "box_regressor.weight" in state:
        model.box_regressor = BoxRegressor(torch.zeros_like(state["box_regressor.weight"]))
    if "svms.weight" in state:
        model.svms = LinearSVMs(torch.zeros_like(state["svms.weight"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), dict(blob["meta"])
