"""Minimal PNG writer (8-bit grayscale), so the demo's pictures need no imaging dependency."""

from __future__ import annotations

import struct
import zlib

import torch


def write_png(path, image: torch.Tensor) -> None:
    """image [H, W] with values in [0, 1] -> 8-bit grayscale PNG at `path`."""
    if image.dim() != 2:
        raise ValueError(f"write_png: image must be [H, W], got {tuple(image.shape)}")
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    height, width = pixels.shape
    raw = b"".join(b"\x00" + bytes(row) for row in pixels.tolist())  # filter type 0 per row

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit, grayscale
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def scatter_image(points: torch.Tensor, extent: float, size: int = 256) -> torch.Tensor:
    """2-D points [N, 2] -> [size, size] density picture of the square [-extent, extent]^2 (white
    background, darker where more points fall; y up)."""
    xy = ((points[:, :2].double() + extent) / (2 * extent) * size).floor().long()
    keep = ((xy >= 0) & (xy < size)).all(1)
    xy = xy[keep]
    counts = torch.zeros(size * size, dtype=torch.float64)
    counts.index_add_(0, (size - 1 - xy[:, 1]) * size + xy[:, 0], torch.ones(len(xy), dtype=torch.float64))
    counts = counts.reshape(size, size)
    return 1 - (counts / counts.max().clamp_min(1)).sqrt()


def image_grid(images: torch.Tensor, columns: int, *, zoom: int = 4, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    """images [N, 1, H, W] (values in [lo, hi]) -> one [rows (H+1) zoom, columns (W+1) zoom] picture."""
    n, _, h, w = images.shape
    rows = -(-n // columns)
    canvas = torch.ones(rows * (h + 1), columns * (w + 1))
    scaled = ((images[:, 0].float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = scaled[i]
    return canvas.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1)
