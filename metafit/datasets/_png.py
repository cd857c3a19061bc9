"""PNG reading for Omniglot's PNG layout: ``alphabet/character/NNNN_DD.png`` files.

The files are read from a zip archive or an extracted folder. PNGs are decoded with Pillow
when it is installed; otherwise a small built-in decoder handles the non-interlaced
grayscale PNGs (bit depth 1, 2, 4 or 8) that Omniglot ships.
"""

from __future__ import annotations

import io
import re
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

try:  # Pillow reads every PNG flavour; without it a small built-in decoder is used.
    from PIL import Image as _PIL_IMAGE
except ImportError:  # pragma: no cover - depends on the environment
    _PIL_IMAGE = None

__all__ = ["decode_png", "decode_png_builtin", "read_png_layout"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _unfilter(rows: np.ndarray, filters: np.ndarray, bpp: int) -> np.ndarray:
    out = rows.astype(np.int64)
    prev = [0] * rows.shape[1]
    for r, f in enumerate(filters):
        line = out[r].tolist()
        if f == 1:
            for i in range(bpp, len(line)):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif f == 2:
            line = [(a + b) & 255 for a, b in zip(line, prev)]
        elif f == 3:
            for i in range(len(line)):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 255
        elif f == 4:
            for i in range(len(line)):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 255
        elif f != 0:
            raise ValueError(f"corrupt PNG: unknown filter type {f}.")
        out[r] = line
        prev = line
    return out.astype(np.uint8)


def decode_png_builtin(data: bytes) -> np.ndarray:
    """Decode a non-interlaced grayscale PNG (bit depth 1, 2, 4 or 8) to uint8 0..255."""
    if data[:8] != _PNG_SIGNATURE:
        raise ValueError("not a PNG file (bad signature).")
    pos, idat, header = 8, [], None
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if ctype == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif ctype == b"IDAT":
            idat.append(body)
        elif ctype == b"IEND":
            break
        pos += 12 + length
    if header is None:
        raise ValueError("corrupt PNG: no IHDR chunk.")
    width, height, depth, color, _, _, interlace = header
    if color != 0 or depth not in (1, 2, 4, 8) or interlace:
        raise ValueError(
            f"the built-in PNG reader handles non-interlaced grayscale PNGs only (got color "
            f"type {color}, bit depth {depth}, interlace {interlace}); install Pillow."
        )
    stride = (width * depth + 7) // 8
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    raw = raw[: height * (stride + 1)].reshape(height, stride + 1)
    rows = raw[:, 1:]
    if raw[:, 0].any():
        rows = _unfilter(rows, raw[:, 0], max(1, depth // 8))
    if depth == 8:
        return np.ascontiguousarray(rows)
    bits = np.unpackbits(rows, axis=1)[:, : width * depth].reshape(height, width, depth)
    weights = (1 << np.arange(depth - 1, -1, -1)).astype(np.uint16)
    values = (bits.astype(np.uint16) * weights).sum(axis=2)
    return (values * (255 // ((1 << depth) - 1))).astype(np.uint8)


def decode_png(data: bytes) -> np.ndarray:
    """Return the image as uint8 gray levels (255 = white paper)."""
    if _PIL_IMAGE is None:
        return decode_png_builtin(data)
    with _PIL_IMAGE.open(io.BytesIO(data)) as im:
        if im.mode == "1":
            return np.asarray(im, dtype=np.uint8) * np.uint8(255)
        return np.asarray(im.convert("L"), dtype=np.uint8)


_PNG_NAME = re.compile(r"(\d+)_(\d+)\.png", re.IGNORECASE)


def read_png_layout(source: Path, kind: str):
    """Read alphabet/character/*.png from a zip or folder.

    Returns (raw uint8 [C, D, h, w], alphabet_of_char, character_names).
    """
    if kind == "zip":
        zf = zipfile.ZipFile(source)
        names = [
            n for n in zf.namelist()
            if n.lower().endswith(".png") and "__MACOSX" not in n
        ]
        entries = [(tuple(n.split("/")), n) for n in names]
        read = zf.read
    else:
        zf = None
        entries = [(p.relative_to(source).parts, p) for p in source.rglob("*.png")]
        entries = [(parts, p) for parts, p in entries if "__MACOSX" not in parts]
        read = Path.read_bytes
    try:
        chars: dict[tuple[str, str], list] = {}
        for parts, ref in entries:
            if len(parts) < 3:
                raise ValueError(
                    f"{source}: {'/'.join(parts)} is not inside an alphabet/character/ folder; "
                    "expected the Omniglot layout alphabet/character/*.png."
                )
            chars.setdefault((parts[-3], parts[-2]), []).append((parts[-1], ref))
        if not chars:
            raise ValueError(f"{source} holds no PNG files in alphabet/character/ folders.")
        keys = _order_characters(chars)
        counts = {len(chars[k]) for k in keys}
        if len(counts) != 1:
            k = min(keys, key=lambda k: len(chars[k]))
            raise ValueError(
                f"{source}: characters have different numbers of drawings ({sorted(counts)}); "
                f"e.g. {k[0]}/{k[1]} has {len(chars[k])}."
            )
        n_drawers = counts.pop()
        images = None
        for ci, key in enumerate(keys):
            for di, (_, ref) in enumerate(sorted(chars[key], key=lambda e: e[0])):
                img = decode_png(read(ref))
                if images is None:
                    images = np.empty((len(keys), n_drawers, *img.shape), dtype=np.uint8)
                if img.shape != images.shape[2:]:
                    raise ValueError(
                        f"{source}: {key[0]}/{key[1]} has an image of shape {img.shape}, "
                        f"others have {images.shape[2:]}."
                    )
                images[ci, di] = img
    finally:
        if zf is not None:
            zf.close()
    return images, [k[0] for k in keys], tuple(f"{a}/{c}" for a, c in keys)


def _order_characters(chars: dict) -> list[tuple[str, str]]:
    """Order by the official character number in NNNN_DD.png when every name has one."""
    numbers = {}
    for key, files in chars.items():
        found = {m.group(1) for m in (_PNG_NAME.fullmatch(f) for f, _ in files) if m}
        if len(found) != 1 or not all(_PNG_NAME.fullmatch(f) for f, _ in files):
            return sorted(chars)
        numbers[key] = int(found.pop())
    if len(set(numbers.values())) != len(numbers):
        return sorted(chars)
    return sorted(chars, key=numbers.__getitem__)
