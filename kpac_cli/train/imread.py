"""Reading training images at their full bit depth, as integer arrays.

Conventions: :func:`read_array` returns ``(H, W, 3)`` ``uint8`` or ``uint16`` (native byte
order), never rescaled; :func:`to_float` maps an integer sample ``k`` to ``k / dtype_max``.
Grey images are replicated to 3 channels and alpha is dropped.

Why not ``imageio`` or plain Pillow for PNG: Pillow stores 16-bit RGB PNGs (DPDD is all
16-bit RGB PNG) as 8-bit RGB and silently drops the low byte. Its PNG decoder does undo the
row filters correctly for 48-bit pixels, though, and the raw mode only chooses which byte of
each sample is kept: ``RGB;16B`` keeps the high byte, ``RGB;16L`` (little-endian) the other
one. Decoding twice and combining the two gives every 16 bits exactly, at C speed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = frozenset({".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".webp"})


class ImageReadError(Exception):
    """An image that cannot be read; the message names the file."""


def _rgb(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"unexpected image array shape {a.shape}")
    c = a.shape[2]
    if c in (1, 2):  # grey, grey + alpha
        a = np.repeat(a[:, :, :1], 3, axis=2)
    elif c >= 3:
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        tile = list(im.tile)
        wide = (
            im.format == "PNG"
            and im.mode in ("RGB", "RGBA")
            and len(tile) == 1
            and isinstance(tile[0].args, str)
            and tile[0].args.endswith(";16B")
        )
        if not wide:
            if im.mode in ("I;16", "I;16B", "I;16L"):
                return _rgb(np.asarray(im).astype(np.uint16))
            if im.mode not in ("RGB", "L", "RGBA", "LA"):
                im = im.convert("RGB")
            a = np.asarray(im)
            if a.dtype != np.uint8:
                raise ImageReadError(f"{path}: unsupported pixel type {a.dtype} (mode {im.mode})")
            return _rgb(a)
        hi = np.asarray(im)
    with Image.open(path) as im:
        t = im.tile[0]
        im.tile = [t._replace(args=t.args[:-3] + "16L")]
        lo = np.asarray(im)
    return _rgb((hi.astype(np.uint16) << 8) | lo.astype(np.uint16))


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    a = tifffile.imread(path)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # planar configuration
    if a.dtype == np.uint8 or a.dtype == np.uint16:
        return _rgb(a)
    if np.issubdtype(a.dtype, np.floating):
        # Float TIFFs are taken as [0, 1] and stored at 16 bits, plenty for training targets.
        return _rgb(np.round(np.clip(np.nan_to_num(a), 0, 1) * 65535).astype(np.uint16))
    raise ImageReadError(f"{path}: unsupported TIFF sample type {a.dtype}")


def read_array(path: str | Path) -> np.ndarray:
    """Decode an image file to ``(H, W, 3)`` uint8 or uint16 without changing its values."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            return _read_tiff(path)
        return _read_pillow(path)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except Exception as e:  # noqa: BLE001 - decoder errors come in many types
        raise ImageReadError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def quantise(a: np.ndarray, bit_depth: int) -> np.ndarray:
    """Store at ``bit_depth`` (8 or 16): 16-bit data is rounded to 8 bits when 8 is asked.

    8-bit data is kept as it is for ``bit_depth=16`` (:func:`to_float` scales by the dtype).
    """
    if bit_depth == 8 and a.dtype == np.uint16:
        # round(k * 255 / 65535) == round(k / 257), exact in integers
        return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return a


def to_float(a: np.ndarray) -> np.ndarray:
    """Integer image -> float32 in [0, 1] (``k / dtype_max``)."""
    scale = np.float32(1.0 / np.iinfo(a.dtype).max)
    return a.astype(np.float32) * scale


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder`` (hidden files skipped), sorted by name."""
    folder = Path(folder)
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )
