"""Scoring on a real dual-pixel capture laid out like Xin et al.'s Pixel 4 data (ICCV 2021).

Conventions: ``left/NAME.png`` and ``right/NAME.png`` are 16-bit PNGs of the raw green
channel, 14-bit linear with black level 1024; ``target/NAME.png`` is the all-in-focus image of
the centre 2/3 of the frame at a different brightness, so a least-squares gain is fitted to
the prediction before PSNR is taken (linear light, data range 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..images import read_image
from .core import psnr

BLACK_LEVEL = 1024
WHITE = 2**14 - 1


def read_dual_pixel_capture(root: str | Path, name: str = "005") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left and right views (linear, black level removed, 1 = 14-bit white) and the target
    (scaled to a maximum of 1), all (H, W) float arrays."""
    root = Path(root)
    left, right = (np.clip(read_image(root / side / f"{name}.png")[0][..., 0] * 65535.0 - BLACK_LEVEL, 0, None) / WHITE
                   for side in ("left", "right"))
    target = read_image(root / "target" / f"{name}.png")[0][..., 0]
    return left, right, target / target.max()


def psnr_with_gain(linear: np.ndarray, target: np.ndarray) -> float:
    """PSNR of the centre crop of a full-frame linear image against the target, after the
    least-squares gain that best matches their brightness."""
    h, w = linear.shape[:2]
    th, tw = target.shape[:2]
    y0, x0 = (h - th) // 2, (w - tw) // 2
    crop = linear[y0 : y0 + th, x0 : x0 + tw]
    gain = float(np.sum(crop * target) / np.sum(crop * crop))
    return psnr(np.clip(gain * crop, 0, 1), target)


@dataclass(frozen=True)
class GammaEncoding:
    """How a linear capture is shown to a network trained on gamma-encoded RGB: divided by
    ``scale`` (the combined view's 99.9th percentile, so highlights clip as in a photo),
    gamma 1/2.2, replicated to three channels; :meth:`decode` takes the output's mean channel
    back to linear light on the capture's scale."""

    scale: float

    @classmethod
    def for_combined(cls, combined: np.ndarray) -> "GammaEncoding":
        return cls(float(np.percentile(combined, 99.9)))

    def encode(self, linear: np.ndarray) -> np.ndarray:
        return np.repeat((np.clip(linear / self.scale, 0, 1) ** (1 / 2.2))[..., None], 3, axis=2).astype(np.float32)

    def decode(self, rgb: np.ndarray) -> np.ndarray:
        return (np.clip(rgb.mean(axis=2), 0, 1) ** 2.2) * self.scale
