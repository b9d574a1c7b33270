"""Reading evaluation images at their full bit depth, as float in [0, 1].

Pillow (and so imageio's default plugin) reduces 16-bit-per-channel colour PNGs to 8 bits
by dropping the low byte, which would silently change every DPDD target (16-bit RGB PNGs).
PNGs are therefore decoded here with a small NumPy decoder (zlib + the five PNG row
filters) whenever they are 16-bit colour; everything else goes through tifffile (TIFF) or
imageio.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .core import to_float

__all__ = ["read_image", "read_png"]

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # PNG colour type -> samples per pixel


def _png_header(data: bytes) -> tuple[int, int, int, int, int] | None:
    if not data.startswith(_PNG_SIG) or data[12:16] != b"IHDR":
        return None
    w, h, depth, ctype, _comp, _filt, interlace = struct.unpack(">IIBBBBB", data[16:29])
    return w, h, depth, ctype, interlace


def _unfilter(ftype: np.ndarray, filt: np.ndarray) -> np.ndarray:
    """Undo the PNG row filters. ``filt``: (h, w, bpp) uint8; returns the same shape."""
    h, w, bpp = filt.shape
    if ftype.max(initial=0) > 4:
        raise ValueError("corrupt PNG: unknown row filter type")
    rec = np.zeros((h + 1, w + 1, bpp), dtype=np.int32)  # one zero row/column of padding
    f = filt.astype(np.int32)
    if ftype.max(initial=0) <= 2:
        # None/Sub/Up only: each row is a vectorised operation.
        for r in range(h):
            if ftype[r] == 0:
                rec[r + 1, 1:] = f[r]
            elif ftype[r] == 1:
                rec[r + 1, 1:] = np.cumsum(f[r], axis=0) & 255
            else:
                rec[r + 1, 1:] = (f[r] + rec[r, 1:]) & 255
        return rec[1:, 1:].astype(np.uint8)
    # Average/Paeth depend on the reconstructed left neighbour, so rows cannot be
    # vectorised; but pixel (r, x) only depends on (r, x-1), (r-1, x) and (r-1, x-1), so
    # all pixels of one anti-diagonal r + x = d are independent: sweep the diagonals.
    t_all = ftype.astype(np.int32)
    for d in range(h + w - 1):
        r = np.arange(max(0, d - w + 1), min(h - 1, d) + 1)
        x = d - r
        a = rec[r + 1, x]
        b = rec[r, x + 1]
        c = rec[r, x]
        t = t_all[r][:, None]
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        pred = np.where(
            t == 0, 0, np.where(t == 1, a, np.where(t == 2, b, np.where(t == 3, (a + b) >> 1, paeth)))
        )
        rec[r + 1, x + 1] = (f[r, x] + pred) & 255
    return rec[1:, 1:].astype(np.uint8)


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Decode a non-interlaced 8- or 16-bit grey/grey+alpha/RGB/RGBA PNG exactly.

    Returns
    -------
    ndarray
        ``uint8`` or ``uint16``; ``(H, W)`` for grey, ``(H, W, C)`` otherwise.

    Raises
    ------
    ValueError
        Not a PNG, or a kind this decoder does not handle (palette, bit depths below 8,
        interlaced): read those with imageio, which handles them correctly.
    """
    data = Path(path).read_bytes()
    hdr = _png_header(data)
    if hdr is None:
        raise ValueError(f"{path}: not a PNG file")
    w, h, depth, ctype, interlace = hdr
    if depth not in (8, 16) or ctype not in _CHANNELS or interlace:
        raise ValueError(
            f"{path}: PNG kind not handled here (bit depth {depth}, colour type {ctype}, interlace {interlace})"
        )
    idat = []
    pos = 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat.append(data[pos + 8 : pos + 8 + length])
        elif kind == b"IEND":
            break
        pos += 12 + length
    ch = _CHANNELS[ctype]
    bpp = ch * depth // 8
    try:
        raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    except zlib.error as e:
        raise ValueError(f"{path}: corrupt PNG image data ({e})") from e
    stride = 1 + w * bpp
    if raw.size < h * stride:
        raise ValueError(f"{path}: truncated PNG image data")
    rows = raw[: h * stride].reshape(h, stride)
    out = _unfilter(rows[:, 0], rows[:, 1:].reshape(h, w, bpp))
    if depth == 16:
        out = out.reshape(h, w * bpp).view(">u2").astype(np.uint16)
    out = out.reshape(h, w, ch)
    return out[:, :, 0] if ch == 1 else out


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image for evaluation as float64 in [0, 1] at its full bit depth.

    ``uint8`` files are divided by 255 and ``uint16`` by 65535 (:func:`to_float`). An
    alpha channel is dropped (metrics compare colour only); grey images stay ``(H, W)``.
    Float TIFFs are taken as already in [0, 1].
    """
    p = Path(path)
    suffix = p.suffix.lower()
    arr: np.ndarray | None = None
    if suffix == ".png":
        with open(p, "rb") as fh:
            hdr = _png_header(fh.read(33))
        if hdr is not None and hdr[2] == 16 and hdr[3] in (2, 4, 6) and not hdr[4]:
            arr = read_png(p)
    elif suffix in (".tif", ".tiff"):
        import tifffile

        arr = tifffile.imread(p)
    if arr is None:
        import imageio.v3 as iio

        arr = iio.imread(p)
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] in (2, 4):
        arr = arr[:, :, :-1]  # drop alpha
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return to_float(arr)
