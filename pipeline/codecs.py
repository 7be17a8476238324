"""Bytes <-> arrays, shared by every stage: images decoded the way users expect, lossless PNG,
and ``.npy`` (never pickled: written and read with ``allow_pickle=False``)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps


class BadImage(ValueError):
    """An input that cannot become a training image; the message is the recorded reason."""


def decode_image(data: bytes, max_pixels: int, min_side: int = 1, max_aspect: float = 0.0,
                 upright: bool = True) -> np.ndarray:
    """Decode to RGB uint8 ``(H, W, 3)``, upright (EXIF; ``upright=False`` keeps the stored
    orientation), converting what users expect converted.

    Grayscale, 1-bit, palette, CMYK, YCbCr, LAB -> RGB; alpha is composited over white; 16- and
    32-bit integer images are scaled to 8 bits. Raises `BadImage` for empty, truncated, non-image
    and float data, for images over `max_pixels` (decompression bombs: checked from the header,
    before any pixel is decoded), under `min_side`, or more elongated than `max_aspect`.
    """
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except Exception as e:  # PIL raises many types for non-images
        raise BadImage(f"not a readable image: {type(e).__name__}: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise BadImage(f"decompression bomb: {w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}")
    if min(w, h) < min_side:
        raise BadImage(f"too small: {w}x{h}, the shorter side must be >= {min_side}")
    if max_aspect and max(w, h) / max(1, min(w, h)) > max_aspect:
        raise BadImage(f"extreme aspect ratio {w}x{h} (> {max_aspect}:1)")
    try:
        img.load()
        return _to_rgb(ImageOps.exif_transpose(img) if upright else img)
    except BadImage:
        raise
    except Exception as e:
        raise BadImage(f"corrupt or truncated image: {type(e).__name__}: {e}") from None


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        if mode == "I" and arr.max(initial=0) <= 255 and arr.min(initial=0) >= 0:
            gray = arr.astype(np.uint8)
        elif arr.min(initial=0) >= 0 and arr.max(initial=0) <= 65535:
            gray = np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)
        else:
            raise BadImage(f"unsupported 32-bit integer range in mode {mode}")
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        raise BadImage("floating-point images are not supported (no canonical 8-bit mapping)")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()

def png_bytes(image: np.ndarray, compress_level: int = 1) -> bytes:
    """Lossless PNG of an ``(H, W, 3)`` uint8 image."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()
def decode_png(data: bytes) -> np.ndarray:
    """``(H, W, 3)`` uint8 from PNG bytes."""
    with Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert("RGB"))  # writable: users may modify samples in place
def npy_bytes(array: np.ndarray) -> bytes:
    """``.npy`` bytes of an array (never pickled)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()
def load_npy(data: bytes | bytearray) -> np.ndarray:
    """Array from ``.npy`` bytes; object arrays (pickles) are refused. The array is a view of a
    writable buffer (`bytearray`) without a copy, and a writable copy of read-only bytes."""
    head = io.BytesIO(memoryview(data)[:4096])  # .npy headers are short (padded to 64 bytes)
    version = np.lib.format.read_magic(head)
    if isinstance(data, bytes) or version not in ((1, 0), (2, 0)):
        return np.load(io.BytesIO(data), allow_pickle=False)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(head)
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    count = int(np.prod(shape, dtype=np.int64))
    array = np.frombuffer(data, dtype=dtype, count=count, offset=head.tell())
    return array.reshape(shape[::-1]).transpose() if fortran else array.reshape(shape)
