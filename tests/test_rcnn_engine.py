"""One scoring pass, several detection variants: each equals what a model carrying only that
extra detects; bf16 scoring stays close to fp32."""

from __future__ import annotations

import dataclasses

import torch

from detect.rcnn.box_regression import BoxRegressor
from detect.rcnn.data import ScoringSample
from detect.rcnn.engine import InferenceSettings, detect_sample, detect_sample_variants, score_regions
from detect.rcnn.model import RegionClassifierArch, build_region_classifier
from detect.rcnn.svm import LinearSVMs

BOXES = torch.tensor([[0.0, 0.0, 40.0, 40.0], [10.0, 20.0, 90.0, 70.0], [30.0, 5.0, 60.0, 75.0]])


def tiny_model():
    torch.manual_seed(0)
    model = build_region_classifier(
        RegionClassifierArch(variant="bn", num_classes=2, input_size=64, padding=4)
    )
    torch.nn.init.normal_(model.backbone.fc.weight, std=0.5)
    return model.eval()


def sample() -> ScoringSample:
    torch.manual_seed(1)
    return ScoringSample(torch.randn(3, 80, 96), BOXES.clone(), (0.5, 0.5), 0)


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))


def test_variants_of_one_pass_equal_separate_models() -> None:
    model = tiny_model()
    settings = InferenceSettings(region_batch=2, score_threshold=0.0, channels_last=False)
    plain = detect_sample([model], sample(), 7, settings)
    # A regressor that shifts every box by 10% of its width and SVMs with random weights.
    weight = torch.zeros(2, 1025, 4)
    weight[:, -1, 0] = 0.1
    model.box_regressor = BoxRegressor(weight)
    with_boxes = detect_sample([model], sample(), 7, settings)
    model.svms = LinearSVMs(torch.randn(2, 1025) * 0.05)
    final = detect_sample([model], sample(), 7, settings)
    svm_only = build_region_classifier(model.arch)
    svm_only.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith(("box_", "svms"))}
    )
    svm_only.svms = model.svms
    expected_svm = detect_sample([svm_only.eval()], sample(), 7, settings)

    every = dataclasses.replace(settings, variants=("final", "softmax", "softmax+bbox", "svm"))
    got = detect_sample_variants([model], sample(), 7, every)
    assert same(got["final"], final) and same(got["softmax"], plain)
    assert same(got["softmax+bbox"], with_boxes) and same(got["svm"], expected_svm)
    assert not same(got["final"], got["softmax"]) and got["final"]["image_id"] == 7
    # The regression moved the boxes to the right: x1 grows by 0.1 of the (original-pixel) width.
    assert not torch.equal(got["softmax+bbox"]["boxes"], got["softmax"]["boxes"])


def test_bf16_scoring_is_close_to_fp32() -> None:
    model = tiny_model()
    image = torch.randn(1, 3, 80, 96)
    fp32 = score_regions(model, image, BOXES, region_batch=2, channels_last=False).probs
    bf16 = score_regions(model, image, BOXES, region_batch=2, channels_last=False, precision="bf16").probs
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0)
