"""A deterministic synthetic data set: shapes on textured backgrounds, rendered with OpenCV.

It is the built-in default for classification pretraining (``render_object_image``,
``SyntheticShapesDataset``) and the source of the detection demo's scenes (``render_scene``; see
``detect/datasets/synthetic.py`` for the COCO export). Every sample is a pure function of
``(index, seed)``: its random generator is seeded from both through ``numpy.random.SeedSequence``,
and OpenCV's drawing calls are deterministic, so the same pair gives identical pixels in any
process, in any order and with any number of workers. Nothing is stored on disk.

Each object is one of ``SHAPE_CLASSES`` with a random fill (solid, stripes, checker, gradient,
noise, dots), colour (kept apart from the background's), size, rotation, optional outline and
optional occluders; backgrounds are textured with the same generators plus clutter lines. In a scene
the background's cells stay finer than the smallest object: a checker cell or a dot of an object's
size would be an unlabelled square or circle.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

SHAPE_CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "ellipse",
    "hexagon",
)

_SHIFT = 4  # sub-pixel precision of OpenCV drawing: coordinates are fixed point with 4 fraction bits
_SCALE = 1 << _SHIFT
_STREAM_OBJECT, _STREAM_SCENE = 0, 1  # keeps classification and scene samples independent
_MIN_COLOUR_DISTANCE = 70.0  # RGB distance between object and background means: the shape stays visible
_MIN_VISIBLE_FRACTION = 0.6  # a scene object keeps at least this much of its area when others overlap
_SCENE_RADIUS_FRACTIONS = (0.06, 0.2)  # a scene object's radius, as fractions of the shorter side


def _generator(seed: int, index: int, stream: int) -> np.random.Generator:
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return np.random.default_rng(np.random.SeedSequence([seed, index, stream]))


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array([[[rng.integers(0, 180), rng.integers(60, 256), rng.integers(60, 256)]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _contrasting_colour(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    colour = _random_colour(rng)
    for _ in range(30):  # rejection sampling; a handful of tries almost always suffices
        if np.linalg.norm(colour - avoid) >= _MIN_COLOUR_DISTANCE:
            break
        colour = _random_colour(rng)
    return colour


TEXTURE_KINDS: tuple[str, ...] = ("solid", "stripes", "checker", "gradient", "noise", "dots")


def _texture(
    rng: np.random.Generator,
    height: int,
    width: int,
    base: np.ndarray,
    max_period: float | None = None,
    kinds: tuple[str, ...] = TEXTURE_KINDS,
) -> np.ndarray:
    """An (H, W, 3) float32 texture whose mean colour is near ``base``; stripes, checker cells and
    dot spacing have a period of 3 px up to ``max_period`` (default: a sixth of the shorter side)."""
    kind = rng.choice(kinds)
    other = np.clip(base + rng.uniform(-70, 70, 3), 0, 255).astype(np.float32)
    if kind == "solid":
        return np.tile(base.astype(np.float32), (height, width, 1))
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    angle = rng.uniform(0, np.pi)
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u, v = xs * cos + ys * sin, ys * cos - xs * sin  # (H, W) by broadcasting
    if max_period is None:
        max_period = min(height, width) / 6
    period = rng.uniform(3, max(4.0, max_period))
    if kind == "stripes":
        weight = (np.floor(u / period) % 2).astype(np.float32)
    elif kind == "checker":
        weight = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif kind == "gradient":
        weight = (u - u.min()) / max(float(u.max() - u.min()), 1.0)
    elif kind == "noise":
        noise = rng.random((height, width), dtype=np.float32)
        weight = cv2.GaussianBlur(noise, (0, 0), sigmaX=rng.uniform(1.0, 3.0))
        weight = (weight - weight.min()) / max(float(weight.max() - weight.min()), 1e-6)
    else:  # dots on a grid
        cell_u, cell_v = (u / period) % 2 - 1, (v / period) % 2 - 1
        weight = (cell_u**2 + cell_v**2 < 0.4).astype(np.float32)
    return base + (other - base) * weight[:, :, None]


def _regular_polygon(n: int, radius: float, angle: float, inner: float | None = None) -> np.ndarray:
    """Vertices of a regular n-gon (or an n-pointed star when ``inner`` is a radius ratio)."""
    if inner is None:
        theta = angle + np.arange(n) * 2 * np.pi / n
        radii = np.full(n, radius)
    else:
        theta = angle + np.arange(2 * n) * np.pi / n
        radii = np.where(np.arange(2 * n) % 2 == 0, radius, radius * inner)
    return np.stack([radii * np.cos(theta), radii * np.sin(theta)], axis=1)


def _cross_polygon(radius: float, half_width: float, angle: float) -> np.ndarray:
    r, w = radius, half_width
    pts = np.array(
        [
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
            (-w, -r),
        ]
    )
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return pts @ rot.T


def _shape_mask(
    rng: np.random.Generator, label: int, height: int, width: int, cx: float, cy: float, radius: float
) -> np.ndarray:
    """Anti-aliased uint8 mask (0..255) of shape ``SHAPE_CLASSES[label]``, randomly rotated."""
    mask = np.zeros((height, width), np.uint8)
    name = SHAPE_CLASSES[label]
    angle = rng.uniform(0, 2 * np.pi)
    centre = (int(round(cx * _SCALE)), int(round(cy * _SCALE)))
    aa = cv2.LINE_AA
    if name == "circle":
        cv2.circle(mask, centre, int(round(radius * _SCALE)), 255, -1, aa, _SHIFT)
    elif name == "ring":
        cv2.circle(mask, centre, int(round(radius * _SCALE)), 255, -1, aa, _SHIFT)
        cv2.circle(mask, centre, int(round(radius * rng.uniform(0.45, 0.62) * _SCALE)), 0, -1, aa, _SHIFT)
    elif name == "ellipse":
        axes = (int(round(radius * _SCALE)), int(round(radius * rng.uniform(0.42, 0.62) * _SCALE)))
        cv2.ellipse(mask, centre, axes, float(np.degrees(angle)), 0, 360, 255, -1, aa, _SHIFT)
    else:
        if name == "cross":
            points = _cross_polygon(radius, radius * rng.uniform(0.24, 0.34), angle)
        elif name == "star":
            points = _regular_polygon(5, radius, angle, inner=rng.uniform(0.38, 0.5))
        else:
            sides = {"square": 4, "triangle": 3, "hexagon": 6}[name]
            points = _regular_polygon(sides, radius, angle)
        points = np.round((points + (cx, cy)) * _SCALE).astype(np.int32)
        cv2.fillPoly(mask, [points], 255, aa, _SHIFT)
    return mask


def _background(
    rng: np.random.Generator, height: int, width: int, max_period: float | None = None
) -> np.ndarray:
    image = _texture(rng, height, width, _random_colour(rng), max_period)
    for _ in range(rng.integers(0, 6)):  # clutter lines: edges that belong to no object
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p2 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        colour = tuple(float(c) for c in _random_colour(rng))
        cv2.line(image, p1, p2, colour, int(rng.integers(1, 3)), cv2.LINE_AA)
    return image


def _paint(image: np.ndarray, mask: np.ndarray, fill: np.ndarray) -> None:
    alpha = (mask.astype(np.float32) / 255.0)[:, :, None]
    image *= 1 - alpha
    image += fill * alpha


def _paint_object(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> None:
    """Fill ``mask`` with a random texture contrasting with what lies beneath, maybe outlined.

    Only the mask's bounding box (plus a margin for the outline) is textured and composited: the
    full frame would cost 2-3x more for small objects.
    """
    x, y, w, h = cv2.boundingRect(mask)
    if w == 0 or h == 0:
        return
    x0, y0 = max(x - 2, 0), max(y - 2, 0)
    x1, y1 = min(x + w + 2, mask.shape[1]), min(y + h + 2, mask.shape[0])
    region, region_mask = image[y0:y1, x0:x1], mask[y0:y1, x0:x1]  # views: painting writes through
    solid = region_mask > 127
    beneath = region[solid].mean(axis=0) if solid.any() else region.reshape(-1, 3).mean(axis=0)
    colour = _contrasting_colour(rng, beneath)
    _paint(region, region_mask, _texture(rng, y1 - y0, x1 - x0, colour))
    if rng.random() < 0.3:  # an outline, as drawings and real objects often have
        edges = cv2.morphologyEx(region_mask, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
        _paint(region, edges, np.full(3, rng.choice((20.0, 235.0)), np.float32))


def _occluder_mask(
    rng: np.random.Generator, height: int, width: int, cx: float, cy: float, size: float
) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    centre = (int(round(cx * _SCALE)), int(round(cy * _SCALE)))
    # Elongated bars and slivers, so that an occluder never looks like a square, circle or ellipse.
    long_axis = size * rng.uniform(0.6, 1.0)
    axes = (int(round(long_axis * _SCALE)), int(round(long_axis * rng.uniform(0.15, 0.3) * _SCALE)))
    if rng.random() < 0.5:
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA, _SHIFT)
    else:
        box = cv2.boxPoints(
            ((cx, cy), (axes[0] * 2 / _SCALE, axes[1] * 2 / _SCALE), float(rng.uniform(0, 180)))
        )
        cv2.fillPoly(mask, [np.round(box * _SCALE).astype(np.int32)], 255, cv2.LINE_AA, _SHIFT)
    return mask


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Sensor-like noise and, sometimes, blur; then back to uint8."""
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=rng.uniform(0.5, 1.2))
    # Luminance noise, one draw per pixel shared by the channels: a third of the cost of RGB noise.
    image += np.float32(rng.uniform(0, 6)) * rng.standard_normal((*image.shape[:2], 1), dtype=np.float32)
    np.rint(image, out=image)
    np.clip(image, 0, 255, out=image)
    return image.astype(np.uint8)


def render_object_image(index: int, size: int = 144, seed: int = 0) -> tuple[np.ndarray, int]:
    """One classification sample: ``(image (size, size, 3) uint8 RGB, label)``.

    The label is ``index % len(SHAPE_CLASSES)``, so any run of consecutive indices is class-balanced.
    The object fills roughly 20%-70% of the image; half the samples have one or two occluders that
    hide at most about a third of the object.
    """
    rng = _generator(seed, index, _STREAM_OBJECT)
    label = index % len(SHAPE_CLASSES)
    image = _background(rng, size, size)
    radius = size * rng.uniform(0.22, 0.42)
    cx, cy = size * rng.uniform(0.35, 0.65, 2)
    mask = _shape_mask(rng, label, size, size, cx, cy, radius)
    _paint_object(rng, image, mask)
    if rng.random() < 0.5:
        area = float(np.count_nonzero(mask > 127))
        for _ in range(int(rng.integers(1, 3))):
            for _attempt in range(5):  # shrink the occluder until the object stays recognisable
                angle, dist = rng.uniform(0, 2 * np.pi), radius * rng.uniform(0.6, 1.2)
                occ = _occluder_mask(
                    rng, size, size, cx + dist * np.cos(angle), cy + dist * np.sin(angle), radius * 0.6
                )
                hidden = np.count_nonzero((occ > 127) & (mask > 127))
                if hidden <= 0.3 * area:
                    _paint_object(rng, image, occ)
                    mask = np.where(occ > 127, 0, mask).astype(np.uint8)
                    break
    return _finish(rng, image), label


@dataclass
class SceneLayout:
    """A rendered scene with what produced it: ``owner[y, x]`` is the index of the object a pixel
    shows (-1: background) and ``full_areas[k]`` object k's pixel count before any occlusion."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    boxes: np.ndarray  # (N, 4) float32 xyxy, tight on the visible pixels
    labels: np.ndarray  # (N,) int64
    owner: np.ndarray  # (H, W) int32
    full_areas: np.ndarray  # (N,) int64


def render_scene(
    index: int, size: int | tuple[int, int] = 256, seed: int = 0, max_objects: int = 6
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One detection sample: ``(image (H, W, 3) uint8 RGB, boxes (N, 4) float32 xyxy, labels (N,) int64)``.

    ``size`` is ``S`` or ``(H, W)``. Between 1 and ``max_objects`` objects are placed; each keeps at
    least 60% of its area visible (placements that would hide more of an earlier object are
    redrawn, and an object that cannot be placed is left out). Boxes are the tight extent of each
    object's visible pixels in continuous coordinates (``x2 = last column + 1``), the convention
    of ``detect/datasets/records.py``.
    """
    layout = render_scene_layout(index, size, seed, max_objects)
    return layout.image, layout.boxes, layout.labels


def render_scene_layout(
    index: int, size: int | tuple[int, int] = 256, seed: int = 0, max_objects: int = 6
) -> SceneLayout:
    """``render_scene`` plus the per-pixel object map (for tests, masks and debugging)."""
    height, width = (size, size) if isinstance(size, int) else size
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    rng = _generator(seed, index, _STREAM_SCENE)
    short = min(height, width)
    min_radius, max_radius = short * _SCENE_RADIUS_FRACTIONS[0], short * _SCENE_RADIUS_FRACTIONS[1]
    # Cells at most half the side of the smallest square (sqrt(2) x its radius): never object-sized.
    image = _background(rng, height, width, max_period=min_radius * np.sqrt(2) / 2)
    owner = np.full((height, width), -1, np.int32)  # which object each pixel shows (-1: background)
    full_areas: list[int] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(0, len(SHAPE_CLASSES)))
        for _attempt in range(10):
            radius = rng.uniform(min_radius, max_radius)
            cx = rng.uniform(0.7 * radius, width - 0.7 * radius)
            cy = rng.uniform(0.7 * radius, height - 0.7 * radius)
            mask = _shape_mask(rng, label, height, width, cx, cy, radius)
            solid = mask > 127
            if np.count_nonzero(solid) < 16:
                continue
            covered = np.bincount(owner[solid & (owner >= 0)], minlength=len(full_areas))
            visible = np.bincount(owner[owner >= 0], minlength=len(full_areas)) - covered
            if all(visible[k] >= _MIN_VISIBLE_FRACTION * full_areas[k] for k in range(len(full_areas))):
                _paint_object(rng, image, mask)
                owner[solid] = len(full_areas)
                full_areas.append(int(np.count_nonzero(solid)))
                labels.append(label)
                break
    boxes = np.zeros((len(labels), 4), np.float32)
    for k in range(len(labels)):
        ys, xs = np.nonzero(owner == k)
        boxes[k] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return SceneLayout(
        _finish(rng, image), boxes, np.asarray(labels, np.int64), owner, np.asarray(full_areas, np.int64)
    )


class SyntheticShapesDataset(Dataset):
    """A fixed-length classification set generated per index: no disk, identical in every worker.

    Sample ``i`` is ``render_object_image(index_offset + i, render_size, seed)``; disjoint index
    ranges (``index_offset``) give disjoint train and validation sets. ``transform`` is called as
    ``transform(image, sample_seed)`` (see ``backbone.transforms.ImageTransform``) so augmentation
    is a pure function of ``(augment_seed, epoch, index)`` (``augment_seed`` defaults to ``seed``);
    ``set_epoch`` changes it between epochs.
    Returns ``(transform(image) or the uint8 image, label)``.
    """

    class_names: list[str] = list(SHAPE_CLASSES)

    def __init__(
        self,
        length: int,
        render_size: int = 144,
        seed: int = 0,
        index_offset: int = 0,
        transform=None,
        augment_seed: int | None = None,
    ):
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.length = length
        self.render_size = render_size
        self.seed = seed
        self.index_offset = index_offset
        self.transform = transform
        self.augment_seed = seed if augment_seed is None else augment_seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.transform, "set_epoch"):  # e.g. ProgressiveResizeTransform
            self.transform.set_epoch(epoch)

    @property
    def targets(self) -> list[int]:
        return [(self.index_offset + i) % len(SHAPE_CLASSES) for i in range(self.length)]

    def load_image(self, index: int) -> np.ndarray:
        """The untransformed uint8 RGB image of sample ``index``."""
        return render_object_image(self.index_offset + index, self.render_size, self.seed)[0]

    def __getitem__(self, index: int) -> tuple[np.ndarray | torch.Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        image, label = render_object_image(self.index_offset + index, self.render_size, self.seed)
        if self.transform is not None:
            image = self.transform(
                image, sample_seed=(self.augment_seed, self.epoch, self.index_offset + index)
            )
        return image, label
