"""Dual-pixel views as a model trained on vignetting-free views expects them.

The two photodiodes under each microlens of a dual-pixel sensor see opposite halves of the
aperture, so each view has its own vignetting: on a Pixel 4 capture the left/right
brightness ratio runs from 0.95 to 1.6 across the frame. Synthetic training views have none,
and a model trained on them reads the imbalance as disparity (on that capture kpac-dual lost
1.6 dB to the input; with balanced views it gains 0.3 dB). Defocus disparity lives at the
scale of the blur (a few pixels), vignetting at the scale of the frame, so one smooth gain map
per view separates them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

#: Gaussian smoothing of the gain maps, as a fraction of the image's longer side ...
SMOOTHING = 0.03
#: ... and at least this many pixels, well above defocus disparities (a few pixels), so that
#: small images and crops keep their disparity cues.
MIN_SIGMA_PX = 48.0
_GRID = 128  # the gain maps are estimated on a grid of about this many cells along the longer side


def balance_views(views: np.ndarray, smoothing: float = SMOOTHING) -> np.ndarray:
    """Equalise the low-frequency brightness of the two views of a dual-pixel image.

    Parameters
    ----------
    views : (H, W, 6) float array
        Left RGB then right RGB, any linear or gamma-encoded scale (a multiplicative gain
        stays multiplicative under a power-law encoding).
    smoothing : float
        Standard deviation of the Gaussian low-pass, as a fraction of ``max(H, W)``, at
        least ``MIN_SIGMA_PX`` pixels.

    Returns
    -------
    (H, W, 6) float32 array: each view multiplied by a smooth gain map (the same for its three
    channels) that brings its low-pass luminance to the mean of both views' low-passes. Views
    that are already balanced (e.g. identical) come back unchanged.
    """
    if views.ndim != 3 or views.shape[2] != 6:
        raise ValueError(f"expected (H, W, 6) left+right views, got shape {views.shape}")
    h, w = views.shape[:2]
    views = np.asarray(views, dtype=np.float32)
    lum = views.reshape(h, w, 2, 3).mean(axis=3)
    factor = max(1, max(h, w) // _GRID)
    ph, pw = -h % factor, -w % factor
    cells = np.pad(lum, ((0, ph), (0, pw), (0, 0)), mode="edge")
    cells = cells.reshape((h + ph) // factor, factor, (w + pw) // factor, factor, 2).mean(axis=(1, 3))
    sigma = max(smoothing * max(h, w), MIN_SIGMA_PX) / factor
    low = gaussian_filter(cells, (sigma, sigma, 0), mode="nearest")
    eps = 1e-3 * max(float(low.max()), 1e-12)  # dark regions keep a gain near 1
    gain = (low.mean(axis=2, keepdims=True) + eps) / (low + eps)
    if np.all(gain == 1):
        return views.copy()
    up = F.interpolate(torch.from_numpy(np.ascontiguousarray(gain.transpose(2, 0, 1)))[None], size=(h + ph, w + pw),
                       mode="bilinear", align_corners=False)[0, :, :h, :w].numpy()
    out = views.reshape(h, w, 2, 3) * up.transpose(1, 2, 0)[..., None]
    return out.reshape(h, w, 6)
