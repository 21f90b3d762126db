"""One scoring pass, several detection variants: each equals what a model carrying only that
extra detects; bf16 scoring stays close to fp32; images without proposals or objects; test-time flip."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import torch

from detect.datasets.records import DetectionRecord
from detect.rcnn.box_regression import BoxRegressor
from detect.rcnn.data import RegionTrainDataset, ScoringSample, collate_regions
from detect.rcnn.engine import (
    InferenceSettings,
    detect_sample,
    detect_sample_variants,
    mirror_boxes,
    rcnn_step,
    score_regions,
)
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


def test_an_image_without_proposals_gives_no_detections() -> None:
    model = tiny_model()
    settings = InferenceSettings(region_batch=2, score_threshold=0.0, channels_last=False)
    empty = ScoringSample(torch.randn(3, 80, 96), torch.zeros(0, 4), (0.5, 0.5), 0)
    dets = detect_sample([model], empty, 3, settings)
    assert dets["image_id"] == 3 and dets["boxes"].shape == (0, 4) and len(dets["scores"]) == 0


def test_training_images_without_objects_or_proposals(tmp_path) -> None:
    path = tmp_path / "empty.png"
    cv2.imwrite(str(path), np.full((40, 60, 3), 90, np.uint8))
    records = [DetectionRecord(1, str(path), 60, 40), DetectionRecord(2, str(path), 60, 40)]
    proposals = [np.array([[0, 0, 30, 20], [10, 10, 50, 40]], np.float32), np.zeros((0, 4), np.float32)]
    ds = RegionTrainDataset(records, proposals, 2, regions_per_image=4, in_memory=False)
    _, boxes, labels = ds[0]  # no objects: every region is background (index C = 2)
    assert len(labels) == 4 and (labels == 2).all() and len(boxes) == 4
    _, boxes, labels = ds[1]  # neither objects nor proposals: an empty sample
    assert len(labels) == 0 and boxes.shape == (0, 4)
    # A batch of empty samples is a zero step, not an error.
    model = tiny_model().train()
    out = rcnn_step(torch.device("cpu"), channels_last=False)(model, collate_regions([ds[1], ds[1]]))
    assert out.batch_size == 0 and float(out.loss.detach()) == 0.0


def test_bf16_scoring_in_shared_mode_keeps_box_coordinates() -> None:
    torch.manual_seed(0)
    arch = RegionClassifierArch(variant="bn", num_classes=2, mode="shared", input_size=64, padding=4)
    model = build_region_classifier(arch).eval()
    torch.nn.init.normal_(model.backbone.fc.weight, std=0.5)
    image = torch.randn(1, 3, 600, 700)
    # Two boxes 1 px apart at x ~ 500, where bf16 coordinates would be rounded to the same value.
    boxes = torch.tensor([[301.0, 200.0, 501.0, 400.0], [302.0, 200.0, 502.0, 400.0]])
    fp32 = score_regions(model, image, boxes, region_batch=2, channels_last=False).probs
    bf16 = score_regions(model, image, boxes, region_batch=2, channels_last=False, precision="bf16").probs
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0)


def test_flip_averages_the_image_and_its_mirror() -> None:
    model = tiny_model()
    model.box_regressor = BoxRegressor(torch.randn(2, 1025, 4) * 0.01)
    image, width = torch.randn(1, 3, 80, 96), 96
    mirrored_boxes = mirror_boxes(BOXES, width)
    torch.testing.assert_close(mirror_boxes(mirrored_boxes, width), BOXES)
    assert torch.equal(mirrored_boxes[0], torch.tensor([56.0, 0.0, 96.0, 40.0]))

    def scores(img, boxes, flip=False):
        return score_regions(model, img, boxes, region_batch=2, channels_last=False, flip=flip)

    direct, mirror = scores(image, BOXES), scores(image.flip(-1), mirrored_boxes)
    both = scores(image, BOXES, flip=True)
    torch.testing.assert_close(both.probs, (direct.probs + mirror.probs) / 2)
    torch.testing.assert_close(both.refined, (direct.refined + mirror_boxes(mirror.refined, width)) / 2)
    assert not torch.allclose(direct.probs, mirror.probs)  # the views differ: averaging does something
    # Flip-averaged scores do not depend on which of the two views came in.
    other = scores(image.flip(-1), mirrored_boxes, flip=True)
    torch.testing.assert_close(other.probs, both.probs)
    torch.testing.assert_close(mirror_boxes(other.refined, width), both.refined)


def test_inference_settings_from_a_config_section_with_overrides():
    section = {"region_batch": 8, "score_threshold": 0.2, "nms_iou": 0.4, "max_per_image": 5}
    section |= {"precision": "bf16", "flip": True, "metrics": ["voc"]}  # metrics: not a setting
    settings = InferenceSettings.from_test_config(section, flip=None, precision="fp32", variants=("svm",))
    assert settings == InferenceSettings(8, 0.2, 0.4, 5, True, "fp32", True, ("svm",))
