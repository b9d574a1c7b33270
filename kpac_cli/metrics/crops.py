"""Side-by-side comparison images: input | output | target, plus zoomed crops.

Layout of :func:`compose_comparison` (``n`` panels of ``W`` pixels, ``gap`` pixels apart,
so the width is ``n * W + (n - 1) * gap``)::

    [ label      ][ label      ][ label      ]   optional text strip (labels=...)
    [ input      ][ output     ][ target     ]   full images; the crop window is outlined
    [ zoom input ][ zoom output][ zoom target]   the same window, enlarged (nearest neighbour)

The crop window is the square where the output improves most on the input: the window
maximising the sum over its pixels of ``|input - target| - |output - target|`` (averaged
over channels). Without an input there are two panels (output | target) and the window
is where the output is furthest from the target.

Images are float ``(H, W, 3)`` in [0, 1]; the composite is float32 in [0, 1], ready for
:func:`kpac_cli.images.write_image`. No Typer or rich here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["Comparison", "PANEL_GAP", "best_window", "compose_comparison", "crop_size_for", "improvement_map"]

#: Pixels between panels (and between the two rows), filled with white.
PANEL_GAP = 4
_BOX_COLOUR = np.array([1.0, 0.15, 0.1], dtype=np.float32)


@dataclass(frozen=True)
class Comparison:
    """A composite and where its crop came from.

    image : float32 ``(H', W', 3)`` in [0, 1]
    box : ``(y, x, size)`` of the square crop window in image coordinates
    score : mean per-pixel improvement ``|input - target| - |output - target|`` inside the
        window (with an input), or mean ``|output - target|`` there (without one)
    zoom : integer enlargement of the crops
    """

    image: np.ndarray
    box: tuple[int, int, int]
    score: float
    zoom: int


def _rgb(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"{what} must be (H, W, 3) or (H, W), got shape {a.shape}")
    if a.dtype.kind != "f":
        raise ValueError(f"{what} must be a float image in [0, 1], got dtype {a.dtype}")
    return np.clip(np.nan_to_num(a.astype(np.float32, copy=False), nan=0.0), 0.0, 1.0)


def improvement_map(output: np.ndarray, target: np.ndarray, input: np.ndarray | None = None) -> np.ndarray:
    """Per-pixel ``|input - target| - |output - target|`` (channel mean), or ``|output - target|`` without an input."""
    o, t = np.asarray(output, np.float32), np.asarray(target, np.float32)
    err = np.abs(o - t).mean(axis=2)
    if input is None:
        return err
    return np.abs(np.asarray(input, np.float32) - t).mean(axis=2) - err


def best_window(score: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left ``(y, x)`` of the ``size x size`` window with the largest sum of ``score``.

    Ties go to the first window in row-major order.
    """
    h, w = score.shape
    if not 1 <= size <= min(h, w):
        raise ValueError(f"window size {size} does not fit a {h}x{w} map")
    s = np.zeros((h + 1, w + 1), dtype=np.float64)
    s[1:, 1:] = np.cumsum(np.cumsum(score, axis=0, dtype=np.float64), axis=1)
    sums = s[size:, size:] - s[:-size, size:] - s[size:, :-size] + s[:-size, :-size]
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(y), int(x)


def crop_size_for(height: int, width: int) -> int:
    """Default crop side: a quarter of the shorter side (at least 8 pixels, at most the image)."""
    short = min(height, width)
    return min(short, max(8, short // 4))


def _outline(img: np.ndarray, y: int, x: int, size: int, thickness: int) -> np.ndarray:
    out = img.copy()
    h, w = img.shape[:2]
    y1, x1 = min(h, y + size), min(w, x + size)
    t = thickness
    out[y : min(y + t, y1), x:x1] = _BOX_COLOUR
    out[max(y1 - t, y) : y1, x:x1] = _BOX_COLOUR
    out[y:y1, x : min(x + t, x1)] = _BOX_COLOUR
    out[y:y1, max(x1 - t, x) : x1] = _BOX_COLOUR
    return out


def _label_strip(labels: Sequence[str], panel_w: int, gap: int, total_w: int) -> np.ndarray:
    """A white strip with one black caption per panel (PIL's default font)."""
    from PIL import Image, ImageDraw, ImageFont

    size = int(np.clip(panel_w // 28, 10, 40))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        font = ImageFont.load_default()
    height = int(size * 1.6)
    strip = Image.new("RGB", (total_w, height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, text in enumerate(labels):
        draw.text((i * (panel_w + gap) + size // 3, size // 4), str(text), fill=(0, 0, 0), font=font)
    return np.asarray(strip, dtype=np.float32) / 255.0


def compose_comparison(
    output: np.ndarray,
    target: np.ndarray,
    input: np.ndarray | None = None,
    *,
    labels: Sequence[str] | None = None,
    crop: int | None = None,
    gap: int = PANEL_GAP,
) -> Comparison:
    """Put input | output | target side by side with zoomed crops of the most improved region.

    Parameters
    ----------
    output, target : (H, W, 3) float arrays in [0, 1]
        The result to show and its ground truth (same shape).
    input : (H, W, 3) float array, optional
        The blurry input; without it there are two panels and the crop shows the largest
        remaining error.
    labels : sequence of str, optional
        One caption per panel (e.g. ``["input 23.1 dB", "output 25.4 dB", "target"]``),
        drawn in a strip above the panels; the width does not change.
    crop : int, optional
        Side of the square crop window in pixels (default :func:`crop_size_for`).
    gap : int
        White pixels between panels and rows.

    Returns
    -------
    Comparison
        ``image`` is ``n * W + (n - 1) * gap`` pixels wide (``n`` = 3 with an input, else 2).
    """
    out, tgt = _rgb(output, "output"), _rgb(target, "target")
    inp = None if input is None else _rgb(input, "input")
    for name, a in (("target", tgt), ("input", inp)):
        if a is not None and a.shape != out.shape:
            raise ValueError(f"{name} {a.shape} and output {out.shape} have different shapes")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    h, w = out.shape[:2]
    size = crop_size_for(h, w) if crop is None else int(crop)
    if not 1 <= size <= min(h, w):
        raise ValueError(f"crop size {size} does not fit a {h}x{w} image")
    score_map = improvement_map(out, tgt, inp)
    y, x = best_window(score_map, size)
    score = float(score_map[y : y + size, x : x + size].mean())

    panels = ([inp] if inp is not None else []) + [out, tgt]
    n = len(panels)
    if labels is not None and len(labels) != n:
        raise ValueError(f"{n} panels need {n} labels, got {len(labels)}")
    total_w = n * w + (n - 1) * gap
    zoom = max(1, min(h, w) // size)
    zs = size * zoom
    thickness = max(1, min(h, w) // 150)

    top = np.ones((h, total_w, 3), np.float32)
    bottom = np.ones((zs, total_w, 3), np.float32)
    off = (w - zs) // 2
    for i, p in enumerate(panels):
        x0 = i * (w + gap)
        top[:, x0 : x0 + w] = _outline(p, y, x, size, thickness)
        patch = p[y : y + size, x : x + size]
        bottom[:, x0 + off : x0 + off + zs] = np.repeat(np.repeat(patch, zoom, axis=0), zoom, axis=1)
    rows = []
    if labels is not None:
        rows.append(_label_strip(labels, w, gap, total_w))
    spacer = np.ones((gap, total_w, 3), np.float32)
    rows += [top, spacer, bottom]
    return Comparison(np.ascontiguousarray(np.concatenate(rows, axis=0)), (y, x, size), score, zoom)
