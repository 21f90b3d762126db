"""Decode any image file to RGB uint8, whatever its extension claims.

Real data sets hold PNG bytes behind ``.jpg`` names, RGBA and palette PNGs, grayscale and CMYK
JPEGs and 16-bit images. OpenCV sniffs the format from the bytes, so the extension never matters;
this module normalises the channel layout, says what it converted or repaired (``DecodedImage.notes``)
and turns every failure into one error type that names the file. What a caller does with a bad
image (skip it, or stop) is ``backbone.bad_images``' policy.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from backbone.runtime.errors import UserError

# Decoding is done in the data-loader workers; OpenCV's own thread pool would fight them.
cv2.setNumThreads(1)

# Larger images are refused, not decoded reduced: OpenCV can reduce only JPEGs while decoding
# (IMREAD_REDUCED_*; a PNG is decoded whole first), and every stage after decoding works in the
# file's own pixels (annotation boxes, proposals, detections), so a reduced decode would have to be
# undone everywhere. 100 megapixels (a 10000 x 10000 image: 300 MB as RGB) is above any camera
# photo of the data sets here; a 20000 x 20000 image (1.2 GB as RGB) is refused from its header.
MAX_IMAGE_PIXELS = 100_000_000
# read_image_header compares against MAX_IMAGE_PIXELS itself; PIL's own check would warn (from
# loader threads, where warnings cannot be filtered safely) or raise before the size is known.
Image.MAX_IMAGE_PIXELS = None

_EXTENSION_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".png": "PNG", ".bmp": "BMP"}
_EXTENSION_FORMATS |= {".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}
_MODE_NOTES = {
    "RGBA": "RGBA composited on white",
    "LA": "grayscale + alpha composited on white",
    "P": "palette expanded to RGB",
    "PA": "palette + alpha composited on white",
    "L": "grayscale replicated to RGB",
    "1": "1-bit replicated to RGB",
    "CMYK": "CMYK converted to RGB",
}
_JPEG_START, _JPEG_END = b"\xff\xd8", b"\xff\xd9"
_PNG_SIGNATURE, _PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"


class ImageDecodeError(UserError, ValueError):
    """The file is missing, empty, truncated, too large or not an image. ``str()`` is one line
    naming it (a UserError: uncaught, a tool prints that line and exits with code 2)."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class ImageHeader:
    width: int
    height: int
    format: str  # PIL's name: JPEG, PNG, MPO (a JPEG with extra frames), ...
    mode: str  # PIL's: RGB, RGBA, P, L, CMYK, I;16, ...

    def notes(self, path: str | Path) -> list[str]:
        """What decoding to RGB changes about this file: its content format and colour mode."""
        notes = []
        expected = _EXTENSION_FORMATS.get(Path(path).suffix.lower())
        same = self.format == expected or (expected == "JPEG" and self.format == "MPO")
        if expected is not None and not same:
            notes.append(f"{self.format} content behind {Path(path).suffix}")
        if self.mode in _MODE_NOTES:
            notes.append(_MODE_NOTES[self.mode])
        elif self.mode.startswith("I;16"):
            notes.append("16-bit grayscale scaled to 8 bits")
        return notes


@dataclass(frozen=True)
class DecodedImage:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    notes: tuple[str, ...] = ()  # conversions made, e.g. "RGBA composited on white"
    partial: str = ""  # "" or what was decoded of a damaged file (the rest is grey)


def check_regular_file(path: str | Path) -> int:
    """The size in bytes of the regular file at ``path``; ImageDecodeError for anything else: a
    directory, a device or pipe (``/dev/zero`` would be read forever), a missing or empty file."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except OSError as err:
        raise ImageDecodeError(path, f"cannot read file ({err.strerror or err})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageDecodeError(path, "is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):
        raise ImageDecodeError(path, "not a regular file (device, pipe or socket)")
    if info.st_size == 0:
        raise ImageDecodeError(path, "file is empty (zero bytes)")
    return info.st_size


def check_pixel_limit(path: str | Path, width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(
            path,
            f"image is {width} x {height} = {width * height:,} pixels, above the limit of "
            f"{MAX_IMAGE_PIXELS:,} (backbone.image_io.MAX_IMAGE_PIXELS): refused",
        )


def read_image_header(path: str | Path) -> ImageHeader | None:
    """Size, format and mode from the file's header (PIL reads a few KB, never the pixels); None
    when PIL does not know the format (OpenCV may still decode it). Raises ImageDecodeError for a
    file that is not a regular, non-empty file, or whose size is above ``MAX_IMAGE_PIXELS``."""
    check_regular_file(path)
    try:
        with Image.open(path) as image:
            header = ImageHeader(int(image.size[0]), int(image.size[1]), str(image.format), str(image.mode))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    if header.width <= 0 or header.height <= 0:
        raise ImageDecodeError(path, f"image has no pixels ({header.width}x{header.height})")
    check_pixel_limit(path, header.width, header.height)
    return header


def looks_truncated_jpeg(data: bytes | np.ndarray) -> bool:
    """A JPEG whose last non-zero bytes are not its end marker: cut off while written or copied.
    Zeros after the marker are padding (copies padded to whole disk blocks have thousands)."""
    array = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data
    if bytes(array[:2]) != _JPEG_START:
        return False
    nonzero = np.flatnonzero(array)
    end = int(nonzero[-1]) + 1 if len(nonzero) else 0
    return bytes(array[max(0, end - 2) : end]) != _JPEG_END


def decode_image(path: str | Path, partial: bool = True) -> DecodedImage:
    """The image at ``path`` as ``(H, W, 3)`` uint8 RGB, with what was converted or repaired.

    Alpha is composited onto white (transparent pixels would otherwise decode to arbitrary colours),
    grayscale is replicated to three channels and 16-bit data is scaled to 8 bits. A truncated JPEG
    is decoded as far as its data goes when ``partial`` (the rest grey, as ``cv2.imread`` does:
    ``DecodedImage.partial`` says so), else it is an ImageDecodeError like every other damaged file.
    """
    header = read_image_header(path)
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as err:
        raise ImageDecodeError(path, f"cannot read file ({err.strerror or err})") from err
    flags = cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION
    image = cv2.imdecode(data, flags)
    repaired = ""
    if looks_truncated_jpeg(data):  # decoded or not: zeros after the cut decode as (wrong) pixels
        if not partial:
            raise ImageDecodeError(path, "truncated JPEG (the data ends before the end marker)")
        if image is None:
            # cv2.imdecode gives up where cv2.imread (whose file reader supplies a fake end marker)
            # decodes the part present: supply the marker ourselves.
            image = cv2.imdecode(np.concatenate([data, np.frombuffer(_JPEG_END, np.uint8)]), flags)
        if image is None:
            raise ImageDecodeError(path, "truncated JPEG with nothing decodable (cut inside its header)")
        repaired = "truncated JPEG: decoded as far as its data goes"
    elif image is None:
        if bytes(data[:8]) == _PNG_SIGNATURE and not bytes(data[-12:]).endswith(_PNG_END):
            raise ImageDecodeError(path, "truncated PNG (the data ends before the IEND chunk)")
        elif header is not None:
            raise ImageDecodeError(path, f"corrupt {header.format} data (its header reads, not its pixels)")
        else:
            raise ImageDecodeError(path, "not a decodable image (corrupt or unknown format)")
    if header is None:  # a format only OpenCV knows: the size is known only now
        check_pixel_limit(path, image.shape[1], image.shape[0])
    notes = header.notes(path) if header is not None else []
    return DecodedImage(_to_rgb(path, image, notes), tuple(notes), repaired)


def _to_rgb(path: str | Path, image: np.ndarray, notes: list[str]) -> np.ndarray:
    if image.dtype == np.uint16:
        if not any("16-bit" in note for note in notes):
            notes.append("16-bit scaled to 8 bits")
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
        # round((rgb * a + 255 * (255 - a)) / 255) in uint16: the numerator is 65025 - a * (255 - rgb),
        # which never overflows, and 255 is odd so (x + 127) // 255 rounds exactly (no ties).
        alpha = image[:, :, 3:4].astype(np.uint16)
        rgb = image[:, :, 2::-1].astype(np.uint16)
        return ((65025 + 127 - alpha * (255 - rgb)) // 255).astype(np.uint8)
    raise ImageDecodeError(path, f"unsupported channel count {channels}")


def read_image_rgb(path: str | Path) -> np.ndarray:
    """``decode_image(path).image``: for callers that take one image as given (a truncated JPEG
    decoded as far as it goes); data set code goes through ``backbone.bad_images.BadImages``."""
    return decode_image(path).image
