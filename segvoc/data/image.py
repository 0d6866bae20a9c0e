"""Decoding image and mask files: the one reader of pixels for training, validation, prediction, export and the
dataset check, so that every one of them sees exactly the same RGB values for a file.

``read_image`` defines the pixels of an image file as Pillow decodes it (first frame), turned as its EXIF orientation
says and converted to RGB:

- greyscale is replicated into the three channels; a palette is expanded; alpha and palette transparency are
  dropped, never composited over a background; CMYK goes through Pillow's conversion,
  ``R = (255 - K) - C * (255 - K) / 255`` (rounded), and likewise for G and B;
- 16-bit samples keep their high byte (``v >> 8``, as libpng and Pillow reduce 16-bit colour), so an 8-bit value
  ``k`` stored as ``257 * k`` reads back as ``k``; 32-bit integer and float samples are taken as 8-bit levels,
  rounded and clipped to 0..255.

Complete 8-bit JPEGs (greyscale or colour, and the first picture of the multi-picture JPEGs that phones write) and
PNGs, nearly all images in practice, are decoded by OpenCV instead: its libjpeg-turbo and libpng give the same pixels
(the same default IDCT and upsampling; PNG is lossless) 1.8 times as fast as Pillow's path through ``Image.convert``
on VOC's JPEGs, and decoding is a third to a half of a training sample's cost. "Complete" means the file ends with its
end marker: OpenCV can fill a truncated JPEG with grey and say nothing (``cv2.imread`` does), while Pillow raises, so
a truncated file always goes to Pillow and fails with a clear error.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from segvoc.errors import SegvocError

EXIF_ORIENTATION = 0x0112
_JPEG_END = b"\xff\xd9"
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk: type and CRC
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)  # newer OpenCV decodes straight to RGB: one copy fewer
# EXIF orientation -> the array operation that shows the stored pixels as displayed (TIFF 6.0 / EXIF 2.3)
_UPRIGHT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # turned 180 degrees
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.swapaxes(0, 1),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, -1),  # displayed turned 90 degrees clockwise
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),  # mirrored along the other diagonal
    8: lambda a: np.rot90(a, 1),  # displayed turned 90 degrees anticlockwise
}


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1..8) of an opened image, as Pillow's ``getexif`` reads it (EXIF, or XMP where there
    is no EXIF); 1 (as stored) when there is none or the metadata cannot be parsed."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - malformed metadata loses only the orientation
        return 1
    return value if value in _UPRIGHT else 1


def unreadable_reason(path: Path, exc: BaseException) -> str:
    """Why ``path`` could not be decoded (``exc`` is what the decoder raised), in words for a person."""
    if not path.exists():
        return "the file does not exist"
    if path.is_file() and path.stat().st_size == 0:
        return "the file is empty (0 bytes)"
    if isinstance(exc, Image.DecompressionBombError):
        return f"its header declares an implausibly large image ({exc}), so it is corrupt"
    if isinstance(exc, UnidentifiedImageError):
        return "its content is not an image format Pillow recognises (corrupt, or another kind of file)"
    if "truncated" in str(exc).lower():
        return f"the file is truncated (Pillow: {exc})"
    return f"{type(exc).__name__}: {exc}"


def _opencv(data: bytes, image: Image.Image) -> np.ndarray | None:
    """RGB pixels of a complete 8-bit JPEG (or MPO) or a complete PNG decoded by OpenCV; None for any other file, or
    when OpenCV cannot decode it (Pillow then decodes it, or says why it cannot)."""
    complete = (image.format in ("JPEG", "MPO") and image.mode in ("L", "RGB") and data.endswith(_JPEG_END)) or (
        image.format == "PNG" and data.endswith(_PNG_END)
    )
    if not complete:
        return None
    # the orientation is applied afterwards, from Pillow's reading of it, the same for every file
    buffer = np.frombuffer(data, np.uint8)
    if _IMREAD_RGB is not None:
        return cv2.imdecode(buffer, _IMREAD_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    bgr = cv2.imdecode(buffer, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _pillow(image: Image.Image) -> np.ndarray:
    """RGB pixels of an opened image decoded by Pillow, converted as the module docstring defines."""
    image.load()
    if image.mode.startswith("I;16"):
        gray = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
    elif image.mode in ("I", "F"):
        gray = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
    else:
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # the colours of the palette; the alpha is dropped next
        return np.array(image.convert("RGB"), dtype=np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def read_image(path: str | Path) -> np.ndarray:
    """The pixels of an image file as displayed: a C-contiguous, writable RGB uint8 ``(H, W, 3)`` array, defined in
    the module docstring. Every reader of images goes through this function.

    Raises ``SegvocError`` naming the file and saying why when it is missing or cannot be decoded in full.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            turn = _orientation(image)
            pixels = _opencv(data, image)
            if pixels is None:
                pixels = _pillow(image)
    except Exception as exc:  # noqa: BLE001 - any failure to decode is the file's, reported with its name
        raise SegvocError(f"Cannot read the image {path}: {unreadable_reason(path, exc)}.") from exc
    if turn != 1:
        pixels = np.ascontiguousarray(_UPRIGHT[turn](pixels))
    return pixels


def displayed_size(path: str | Path) -> tuple[int, int] | None:
    """``(height, width)`` of ``read_image(path)``, from the file's header alone; None when the header cannot be
    read (whoever decodes the file reports the error)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = _orientation(image) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - any unreadable header
        return None
    return (width, height) if turned else (height, width)


def displayed_sizes(paths: Sequence[Path]) -> list[tuple[int, int]]:
    """``displayed_size`` of every file, for grouping images of one size into batches; a file whose header cannot
    be read gets a size of its own, ``(-1 - i, 0)``, so it forms a batch alone (its reader reports the error)."""
    return [displayed_size(path) or (-1 - i, 0) for i, path in enumerate(paths)]


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask as class indices ``(H, W)`` uint8: palette (``P``) or grayscale (``L``) PNGs only.

    Palette PNGs are read through their indices, never their colours, so 255 stays the ignore label. Raises
    ``SegvocError`` naming the file when it is missing, not a PNG of one of those modes, or cannot be decoded.
    """
    path = Path(path)
    try:
        with Image.open(path) as mask:
            if mask.mode not in ("P", "L"):
                raise SegvocError(
                    f"The mask {path} is a {mask.mode} image; VOC masks must be palette (P) or grayscale (L) "
                    "PNGs holding class indices. Re-save it with the class indices as pixel values."
                )
            return np.array(mask, dtype=np.uint8)
    except OSError as exc:
        raise SegvocError(f"Cannot read the mask {path} ({exc}); it is missing or not a valid PNG.") from exc
