"""Test inputs made on the spot: small images of every kind, and the bad inputs users have."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.samples import synthetic_scene


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def scene(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(synthetic_scene(h, w, seed))


def good_images(n: int, seed: int = 0) -> dict[str, bytes]:
    """`n` ordinary RGB photos-to-be of assorted sizes and aspect ratios."""
    sizes = [(120, 160), (200, 150), (96, 256), (180, 180), (150, 230), (240, 128)]
    return {f"img{i:03d}.{'png' if i % 2 else 'jpg'}": (png if i % 2 else jpeg)(scene(*sizes[i % len(sizes)], seed + i))
            for i in range(n)}


def converted_images() -> dict[str, bytes]:
    """Unusual but valid inputs that must be converted to RGB, not refused."""
    base = scene(130, 170, 7)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray((np.arange(130 * 170).reshape(130, 170) % 256).astype(np.uint8)))
    gray16 = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)
    palette_t = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_t.info["transparency"] = 0
    return {
        "gray.png": png(base.convert("L")),
        "bilevel.png": png(base.convert("1")),
        "rgba.png": png(rgba),
        "cmyk.jpg": jpeg(base.convert("CMYK")),
        "gray16.png": png(gray16),
        "palette.png": png(base.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)),
        "palette_transparent.png": png(palette_t),
    }


def bad_inputs() -> dict[str, tuple[bytes, str]]:
    """Inputs that must be refused, with a word their recorded reason must contain."""
    good = jpeg(scene(140, 180, 3))
    return {
        "zero.jpg": (b"", "empty"),
        "truncated.jpg": (good[: len(good) // 2], "truncated"),
        "notes.png": (b"these are not the pixels you are looking for\n" * 20, "not a readable image"),
        "tiny.png": (png(scene(12, 40, 4)), "too small"),
        "bomb.png": (png(Image.new("L", (1500, 1400))), "decompression bomb"),
        "sliver.png": (png(scene(40, 900, 5)), "aspect"),
    }
