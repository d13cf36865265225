"""Reading any image Pillow opens as 8-bit RGB, and writing results atomically."""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import BdcError

__all__ = ["read_image", "write_image", "atomic_write"]

Image.MAX_IMAGE_PIXELS = None  # bdcodec applies its own --max-pixels limit


def read_image(data: bytes, name: str = "input", max_pixels: int | None = None) -> tuple[np.ndarray, bool, list[str]]:
    """Decode image bytes to uint8 (H, W, 3).

    Returns ``(pixels, gray, notes)``: ``gray`` is True for single-channel sources
    (they are decoded back to grayscale); ``notes`` lists lossy conversions (alpha
    dropped).  EXIF orientation is applied; 16-bit, float, palette and CMYK images
    are converted to 8-bit RGB.
    """
    notes = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise BdcError(f"{name}: {im.width}x{im.height} is above the limit of {max_pixels} pixels")
            im.load()
            im = ImageOps.exif_transpose(im)
    except BdcError:
        raise
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BdcError(f"{name}: cannot read image ({reason})") from None
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        if np.asarray(im.getchannel("A")).min() < 255:
            notes.append(f"{name}: alpha channel dropped")
    gray = mode in ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        if mode == "F":
            peak = 1.0 if arr.max() <= 1.0 else 255.0
        arr = np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8)
        im = Image.fromarray(arr, "L")
    im = im.convert("RGB")
    return np.array(im, dtype=np.uint8), gray, notes


def write_image(pixels: np.ndarray, path: str, gray: bool = False, fmt: str | None = None) -> bytes:
    """Encode pixels to bytes in the format of ``path``'s suffix (PNG by default)."""
    im = Image.fromarray(pixels, "RGB")
    if gray:
        im = im.convert("L")
    ext = Path(path).suffix.lower().lstrip(".")
    if fmt is None:
        fmt = Image.registered_extensions().get(f".{ext}", "PNG") if ext else "PNG"
    buf = io.BytesIO()
    try:
        im.save(buf, format=fmt)
    except (KeyError, OSError, ValueError) as exc:
        raise BdcError(f"cannot write {path} as {fmt}: {exc}") from None
    return buf.getvalue()


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise BdcError(f"output folder does not exist: {folder}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
