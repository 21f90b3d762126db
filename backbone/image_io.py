"""Decode any image file to RGB uint8, whatever its extension claims.

Real data sets hold PNG bytes behind ``.jpg`` names, RGBA and palette PNGs, grayscale and CMYK
JPEGs and 16-bit images. OpenCV sniffs the format from the bytes, so the extension never matters;
this module only normalises the channel layout and turns every failure into one error type that
names the file.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

# Decoding is done in the data-loader workers; OpenCV's own thread pool would fight them.
cv2.setNumThreads(1)


class ImageDecodeError(ValueError):
    """The file is missing, empty, truncated or not an image. ``str()`` is one line naming it."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def read_image_rgb(path: str | Path) -> np.ndarray:
    """Return the image at ``path`` as an ``(H, W, 3)`` uint8 RGB array.

    Alpha is composited onto white (transparent pixels would otherwise decode to arbitrary colours),
    grayscale is replicated to three channels and 16-bit data is scaled to 8 bits.
    """
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as err:
        raise ImageDecodeError(path, f"cannot read file ({err.strerror or err})") from err
    if data.size == 0:
        raise ImageDecodeError(path, "file is empty")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise ImageDecodeError(path, "not a decodable image (corrupt, truncated or unknown format)")
    if image.dtype == np.uint16:
        image = (image / 257.0).round().astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageDecodeError(path, f"unsupported pixel type {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    channels = image.shape[2]
    if channels == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 4:
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        rgb = image[:, :, 2::-1].astype(np.float32)
        return (rgb * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    raise ImageDecodeError(path, f"unsupported channel count {channels}")
