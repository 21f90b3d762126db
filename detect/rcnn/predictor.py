"""One image in, detections out: proposals (the method the model file names), the region classifier
(or an ensemble), postprocessing. What tools/detect_images.py runs; kept apart from training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from backbone.image_cache import shrink_to_shorter_side
from backbone.inference import fuse_for_inference
from backbone.runtime.errors import UserError
from detect.proposals.methods import build_proposer
from detect.proposals.spec import configured_method, spec_from_settings
from detect.rcnn.data import ScoringSample, image_to_tensor
from detect.rcnn.engine import InferenceSettings, detect_sample
from detect.rcnn.model import RegionClassifier, load_detector


def load_detectors(
    paths: Sequence[str | Path], device: torch.device | str = "cpu", fuse: bool = True
) -> tuple[list[RegionClassifier], dict]:
    """The models of an ensemble (BatchNorm folded, channels_last) and the first one's metadata;
    UserError when a file is not a detector or the classes differ."""
    models, metas = [], []
    for path in paths:
        try:
            model, meta = load_detector(path)
        except ValueError as err:  # the loader's one-line "PATH: problem"
            raise UserError(str(err)) from None
        if fuse:
            model.backbone = fuse_for_inference(model.backbone, channels_last=True)
        models.append(model.to(device).eval())
        metas.append(meta)
    for path, meta in zip(paths[1:], metas[1:], strict=True):
        if meta["class_names"] != metas[0]["class_names"]:
            raise UserError(
                f"{path}: classes {meta['class_names']} differ from {paths[0]}'s {metas[0]['class_names']}"
            )
    return models, metas[0]


class Predictor:
    """``predictor(image_rgb) -> {"boxes", "scores", "labels"}`` in the image's pixels."""

    def __init__(self, paths: Sequence[str | Path], device: torch.device | str = "cpu", **settings) -> None:
        self.models, self.meta = load_detectors(paths, device)
        self.class_names: list[str] = self.meta["class_names"]
        spec = spec_from_settings(self.meta["proposals"]["settings"], source=f"{paths[0]} proposals")
        try:
            _, method = configured_method(spec, "predict", "images")
        except ValueError as err:  # e.g. the MultiBox file the model names is not on this machine
            raise UserError(f"{paths[0]}: its proposals cannot be rebuilt here: {err}") from None
        self.propose = build_proposer(method)
        self.settings = InferenceSettings.from_test_config(self.meta["config"]["test"], **settings)
        self.shorter_side = int(self.meta["config"]["data"]["shorter_side"])

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        boxes, _ = self.propose(image)
        small = shrink_to_shorter_side(image, self.shorter_side)
        sx, sy = small.shape[1] / image.shape[1], small.shape[0] / image.shape[0]
        scaled = torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 4)) * torch.tensor(
            [sx, sy, sx, sy]
        )
        sample = ScoringSample(image_to_tensor(small), scaled, (sx, sy), 0)
        dets = detect_sample(self.models, sample, 0, self.settings)
        return {k: dets[k].numpy() for k in ("boxes", "scores", "labels")}
