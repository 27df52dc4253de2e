"""A minimal PNG writer (grayscale or RGB uint8), so the demo writes images without optional dependencies."""

from __future__ import annotations

import struct
import zlib

import numpy as np


def write_png(path, image: np.ndarray) -> None:
    """Write ``image`` ([H, W] grayscale or [H, W, 3] RGB, uint8) as a PNG file."""
    img = np.ascontiguousarray(image, dtype=np.uint8)
    if img.ndim == 2:
        color_type, channels = 0, 1
    elif img.ndim == 3 and img.shape[2] == 3:
        color_type, channels = 2, 3
    else:
        raise ValueError(f"write_png needs [H, W] or [H, W, 3] uint8, got shape {img.shape}")
    h, w = img.shape[:2]
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
                + chunk(b"IEND", b""))
    del channels
