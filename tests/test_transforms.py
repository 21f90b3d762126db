"""Training augmentation (paper's recipe), evaluation crop and the 1/10/144 multi-crop geometry."""

from __future__ import annotations

import random

import cv2
import numpy as np
import pytest
import torch

from backbone import IMAGENET_MEAN, IMAGENET_STD
from backbone.transforms import (
    INTERPOLATIONS,
    CropSpec,
    MultiCropTransform,
    ProgressiveResizeTransform,
    eval_resize_size,
    eval_transform,
    multi_crop,
    multi_crop_specs,
    normalize_crops,
    progressive_size,
    train_transform,
)


def coordinate_image(height: int, width: int) -> np.ndarray:
    """Pixel (y, x) holds (10x, 10y, 7): crops can be located exactly."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 10, ys * 10, np.full_like(xs, 7)], axis=-1).astype(np.uint8)


def test_train_output_is_normalised_chw_tensor():
    grey = np.full((50, 70, 3), 128, np.uint8)
    out = train_transform(32, photometric_p=0.0)(grey, sample_seed=(0, 0, 0))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = (128 / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(out.mean(dim=(1, 2)).numpy(), expected, atol=1e-5)


def test_train_augmentation_is_a_pure_function_of_the_sample_seed():
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    transform = train_transform(32)
    a = transform(image, sample_seed=(1, 2, 3))
    transform(image, sample_seed=(9, 9, 9))  # other draws in between change nothing
    assert torch.equal(a, transform(image, sample_seed=(1, 2, 3)))
    assert not torch.equal(a, transform(image, sample_seed=(1, 2, 4)))


def test_progressive_size_ramps_in_multiples_of_16_and_ends_at_full_size():
    sizes = [progressive_size(e, 10, 96, 128, ramp=(0.2, 0.7)) for e in range(10)]
    # flat at 96 until 20% of the epochs, 128 from 70% on; 96 + 32 * (e/10 - 0.2) / 0.5 in between
    assert sizes == [96, 96, 96, 96, 96, 112, 112, 128, 128, 128]
    assert progressive_size(0, 10, 100, 100, ramp=(0.0, 0.5)) == 100


def test_progressive_resize_transform_follows_the_epoch_and_the_sample_seed():
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    transform = ProgressiveResizeTransform(train_transform, lambda epoch: 24 + 8 * epoch)
    assert transform(image, sample_seed=(0, 0, 1)).shape == (3, 24, 24)
    transform.set_epoch(2)
    a = transform(image, sample_seed=(0, 2, 1))
    assert a.shape == (3, 40, 40)
    transform.set_epoch(0)
    transform.set_epoch(2)  # a size already built is reused, draws unchanged
    assert torch.equal(a, transform(image, sample_seed=(0, 2, 1)))


def test_train_crops_interpolations_and_flips_follow_the_paper():
    transform = train_transform(32)
    transform.compose.save_applied_params = True
    image = np.zeros((100, 100, 3), np.uint8)
    areas, ratios, interpolations, flips = [], [], set(), 0
    for i in range(300):
        rng = np.random.default_rng([0, 0, i])  # what ImageTransform does with sample_seed=(0, 0, i)
        transform.compose.set_random_state(rng, random.Random(int(rng.integers(2**63))))
        applied = transform.compose(image=image)["applied_transforms"]
        crop = dict(applied)["RandomResizedCrop"]
        x1, y1, x2, y2 = crop["crop_coords"]
        areas.append((x2 - x1) * (y2 - y1) / 100**2)
        ratios.append((x2 - x1) / (y2 - y1))
        interpolations.add(crop["interpolation"])
        flips += "HorizontalFlip" in dict(applied)
    assert interpolations == set(INTERPOLATIONS.values())  # all four drawn per sample
    assert 0.08 - 0.01 <= min(areas) < 0.2 and max(areas) > 0.9 and max(areas) <= 1.0
    assert 3 / 4 - 0.05 <= min(ratios) < 0.85 and 1.2 < max(ratios) <= 4 / 3 + 0.05
    assert 100 < flips < 200  # flipped with probability 1/2


def test_eval_transform_is_resize_then_centre_crop_and_equals_one_crop():
    image = coordinate_image(16, 24)
    out = eval_transform(14)(image)
    assert eval_resize_size(14) == 16 and eval_resize_size(224) == 256 and eval_resize_size(128) == 146
    expected = normalize_crops(torch.from_numpy(image[1:15, 5:19][None]))[0]
    torch.testing.assert_close(out, expected)


def test_ten_crops_are_four_corners_centre_and_mirrors():
    image = coordinate_image(16, 24)  # shorter side already 16 = 14 / 0.875: no resize
    specs = multi_crop_specs(16, 24, 14, 10)
    boxes = [(0, 0, 14, 14), (10, 0, 24, 14), (0, 2, 14, 16), (10, 2, 24, 16), (5, 1, 19, 15)]
    assert specs == [CropSpec(16, box, flip) for flip in (False, True) for box in boxes]
    crops = multi_crop(image, 14, 10)
    assert crops.shape == (10, 14, 14, 3) and crops.dtype == np.uint8
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        np.testing.assert_array_equal(crops[k], image[y0:y1, x0:x1])
        np.testing.assert_array_equal(crops[k + 5], image[y0:y1, x0:x1][:, ::-1])
    assert multi_crop(image, 14, 1).shape == (1, 14, 14, 3)
    np.testing.assert_array_equal(multi_crop(image, 14, 1)[0], crops[4])


def test_144_crops_geometry_on_a_tiny_landscape_image():
    # crop = train size = 7 -> shorter sides 256, 288, 320, 352 x 7/224 = 8, 9, 10, 11.
    image = coordinate_image(8, 12)
    specs = multi_crop_specs(8, 12, 7, 144)
    assert len(specs) == 144 == 4 * 3 * 6 * 2
    assert [s.shorter_side for s in specs[::36]] == [8, 9, 10, 11]
    first_scale = specs[:36]
    squares = [(0, 0), (2, 0), (4, 0)]  # left, centre, right 8x8 squares of the 8x12 image
    expected = []
    for sx, sy in squares:
        boxes = [(sx, sy, sx + 7, sy + 7), (sx + 1, sy, sx + 8, sy + 7), (sx, sy + 1, sx + 7, sy + 8)]
        boxes += [(sx + 1, sy + 1, sx + 8, sy + 8), (sx, sy, sx + 7, sy + 7), (sx, sy, sx + 8, sy + 8)]
        expected += [CropSpec(8, box, flip) for box in boxes for flip in (False, True)]
    assert first_scale == expected
    crops = multi_crop(image, 7, 144)
    assert crops.shape == (144, 7, 7, 3)
    for k, spec in enumerate(first_scale):
        x0, y0, x1, y1 = spec.box
        region = image[y0:y1, x0:x1]
        if x1 - x0 > 7:  # the whole square, resized to the crop size
            region = cv2.resize(region, (7, 7), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(crops[k], region[:, ::-1] if spec.flip else region)
    # At shorter side 11 the image is 11 x round(12 * 11 / 8) = 11 x 16: squares at x = 0, 2, 5.
    assert [specs[108 + 12 * j].box for j in range(3)] == [(0, 0, 7, 7), (2, 0, 9, 7), (5, 0, 12, 7)]


def test_144_crops_use_top_centre_bottom_squares_for_portrait_images():
    specs = multi_crop_specs(12, 8, 7, 144)
    whole_squares = [s.box for s in specs[:36] if s.box[2] - s.box[0] == 8 and not s.flip]
    assert whole_squares == [(0, 0, 8, 8), (0, 2, 8, 10), (0, 4, 8, 12)]


def test_144_crop_scales_follow_the_training_size():
    specs = multi_crop_specs(300, 400, 224, 144)
    assert sorted({s.shorter_side for s in specs}) == [256, 288, 320, 352]
    assert sorted({s.shorter_side for s in multi_crop_specs(300, 400, 128, 144)}) == [146, 165, 183, 201]
    # 300x400 at shorter side 256 is 256 x 341: squares at x = 0, 42, 85.
    assert [specs[12 * j + 10].box for j in range(3)] == [
        (0, 0, 256, 256),
        (42, 0, 298, 256),
        (85, 0, 341, 256),
    ]
    with pytest.raises(ValueError, match="num_crops"):
        multi_crop_specs(10, 10, 8, 5)


def test_multi_crop_transform_and_normalisation_layout():
    image = coordinate_image(20, 30)
    crops = MultiCropTransform(14, 10)(image)
    assert crops.shape == (10, 14, 14, 3) and crops.dtype == torch.uint8
    batch = normalize_crops(torch.stack([crops, crops]))
    assert batch.shape == (20, 3, 14, 14) and batch.is_contiguous(memory_format=torch.channels_last)
    red = (crops[0, :, :, 0].float() / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    torch.testing.assert_close(batch[0, 0], red)


def test_image_to_tensor_is_the_normalisation_the_detection_pipelines_use() -> None:
    from backbone.transforms import image_to_tensor, normalize_crops
    from detect.proposals import multibox_data
    from detect.rcnn import data as rcnn_data

    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    tensor = image_to_tensor(image)
    assert tensor.shape == (3, 5, 7) and tensor.dtype == torch.float32 and tensor.is_contiguous()
    expected = (image / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(tensor.permute(1, 2, 0).numpy(), expected, rtol=1e-5, atol=1e-5)
    # Bit for bit what the copies in detect/ compute, so they can import this one instead.
    assert torch.equal(tensor, multibox_data.image_to_tensor(image))
    assert torch.equal(tensor, rcnn_data.image_to_tensor(image))
    assert torch.equal(tensor, normalize_crops(torch.from_numpy(image))[0])
