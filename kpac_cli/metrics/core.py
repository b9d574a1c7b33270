"""Full-reference image metrics with stated conventions: PSNR, SSIM, MAE, quantisation.

Conventions (the ones the DPDD defocus-deblurring literature uses, e.g. IFAN, Restormer,
DRBNet, LaKDNet):

* Images are float arrays in [0, 1], ``(H, W, C)`` with channels last (or ``(H, W)``
  grey), or unsigned integers (divided by their type's maximum); ``pred`` and ``target``
  must have the same shape. The data range is 1. Float values far outside it (0-255 data)
  are refused rather than scored.
* PSNR and MAE pool all pixels *and* channels of one image; a data set's score is the
  mean of the per-image scores.
* SSIM is scikit-image's :func:`skimage.metrics.structural_similarity` with
  ``data_range=1`` and ``channel_axis=-1`` (per-channel SSIM, averaged): by default its
  7x7 uniform window with the sample covariance (``window='uniform'``); optionally the
  Gaussian window of Wang et al. 2004 (``window='gaussian'``: ``gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False``). The two give different numbers, so always
  report which one was used.
* The paper evaluates 8-bit images: :func:`quantize` both images to 8 bits first
  (16 bits or none are options).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from skimage.metrics import structural_similarity

__all__ = ["mae", "psnr", "quantize", "ssim", "to_float", "SSIM_WINDOWS"]

SSIM_WINDOWS = ("uniform", "gaussian")
#: Side in pixels of scikit-image's SSIM window: 7 (uniform); 11 (Gaussian: 2 * int(3.5 * 1.5 + 0.5) + 1).
_SSIM_WINDOW_SIDE = {"uniform": 7, "gaussian": 11}


def to_float(image: np.ndarray) -> np.ndarray:
    """Convert an image to float64 in [0, 1] by its integer dtype's full range.

    ``uint8`` is divided by 255, ``uint16`` by 65535 (other unsigned integer types by
    their maximum); floating-point input is returned as float64 unchanged (assumed to be
    in [0, 1] already); booleans become 0/1.
    """
    img = np.asarray(image)
    if img.dtype == np.bool_:
        return img.astype(np.float64)
    if np.issubdtype(img.dtype, np.unsignedinteger):
        return img.astype(np.float64) / np.iinfo(img.dtype).max
    if np.issubdtype(img.dtype, np.floating):
        return img.astype(np.float64, copy=False)
    raise TypeError(f"unsupported image dtype {img.dtype}: use unsigned integers or floats in [0, 1]")


def quantize(image: np.ndarray, bit_depth: int | None = 8) -> np.ndarray:
    """Quantise a [0, 1] float image to ``bit_depth`` bits and back to [0, 1].

    Values are clipped to [0, 1] (NaN counts as 0), scaled by ``2**bit_depth - 1`` and
    rounded half up (``floor(x + 0.5)``, so 0.5 -> 1), then divided again: exactly what
    writing the image to a file of that bit depth and reading it back gives
    (:func:`kpac_cli.images.write_image`). ``bit_depth=None`` returns the float image
    unchanged (not even clipped), for evaluating raw network outputs.

    Raises
    ------
    ValueError
        Float values far outside [0, 1] (below -1 or above 2, e.g. 0-255 data), which
        clipping would turn into a black or white image.
    """
    img = to_float(image)
    if bit_depth is None:
        return img
    if isinstance(bit_depth, bool) or not isinstance(bit_depth, numbers.Real) or int(bit_depth) != bit_depth \
            or not 1 <= bit_depth <= 32:
        raise ValueError(f"bit_depth must be an integer in 1..32 or None, got {bit_depth!r}")
    if np.asarray(image).dtype.kind == "f":
        _check_range(img, "image", 1.0)  # clipping 0-255 data would turn every pixel white
    peak = float(2 ** int(bit_depth) - 1)
    img = np.nan_to_num(img, nan=0.0, posinf=1.0, neginf=0.0)  # as the image writer does
    return np.floor(np.clip(img, 0.0, 1.0) * peak + 0.5) / peak


def _check_range(img: np.ndarray, what: str, data_range: float) -> None:
    """Refuse float values more than one data range outside ``[0, data_range]``.

    Unclipped results overshoot a little (ringing, raw network outputs) and are scored as
    they are; values this far out are another convention (0-255 data scored with the data
    range 1), which would give a wrong number without a word. NaN and infinity pass, and so
    does an empty image (refused where its shape is checked)."""
    if img.size == 0:
        return
    lo, hi = float(np.min(img)), float(np.max(img))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        finite = img[np.isfinite(img)]
        if finite.size == 0:
            return
        lo, hi = float(finite.min()), float(finite.max())
    if -data_range <= lo and hi <= 2 * data_range:
        return
    hint = " (0-255 data? divide by 255, or pass uint8 arrays)" if data_range == 1 and 2 < hi <= 255 else ""
    raise ValueError(
        f"{what} values run from {lo:.4g} to {hi:.4g}, far outside the data range 0..{data_range:g}{hint}"
    )


def _metric_input(image: np.ndarray, what: str, data_range: float) -> np.ndarray:
    """``image`` as float64 for a metric of ``data_range``, refusing inputs it would misjudge."""
    img = np.asarray(image)
    if img.dtype.kind in "ub" and data_range != 1:
        # to_float maps integer images to [0, 1]: a data range of 255 would add 48 dB to PSNR
        raise ValueError(
            f"{what} is {img.dtype}, which is scored in [0, 1] (divided by its type's maximum), so its data "
            f"range is 1, not {data_range:g}: leave data_range at 1"
        )
    out = to_float(img)
    if img.dtype.kind == "f":
        _check_range(out, what, data_range)
    return out


def _pair(pred: np.ndarray, target: np.ndarray, data_range: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    if not (math.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range must be a positive number, got {data_range}")
    p, t = _metric_input(pred, "prediction", data_range), _metric_input(target, "target", data_range)
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and target {t.shape} have different shapes")
    if p.ndim not in (2, 3):
        raise ValueError(f"images must be (H, W) or (H, W, C), got shape {p.shape}")
    if p.size == 0:
        raise ValueError(f"images are empty (shape {p.shape})")
    return p, t


def psnr(pred: np.ndarray, target: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range**2 / MSE)``.

    The MSE is over all pixels and channels. Identical images give ``inf``. Equals
    :func:`skimage.metrics.peak_signal_noise_ratio` with the same ``data_range`` for float
    images; integer images are scaled to [0, 1] first (:func:`to_float`), so they take the
    default ``data_range=1`` (and then equal scikit-image's with its default, the type's range).

    Raises
    ------
    ValueError
        Different shapes; integer images with ``data_range`` other than 1; float values
        more than one data range outside ``[0, data_range]`` (e.g. 0-255 data with the
        data range 1).
    """
    p, t = _pair(pred, target, data_range)
    mse = float(np.mean((p - t) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def mae(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean absolute error over all pixels and channels (in units of the data range 1).

    Float values far outside [0, 1] are refused as for :func:`psnr`."""
    p, t = _pair(pred, target)
    return float(np.mean(np.abs(p - t)))


def ssim(pred: np.ndarray, target: np.ndarray, window: str = "uniform", data_range: float = 1.0) -> float:
    """Structural similarity (mean SSIM) via scikit-image.

    Parameters
    ----------
    pred, target : (H, W, C) or (H, W) array_like
        Float images in [0, 1] (or unsigned integers, converted by :func:`to_float`).
        Both sides must be at least 7 pixels (uniform) or 11 pixels (Gaussian).
    window : {'uniform', 'gaussian'}
        ``'uniform'`` (default): 7x7 uniform window with the sample covariance, as
        scikit-image does by default and as IFAN/Restormer/DRBNet/LaKDNet report.
        ``'gaussian'``: 11x11 Gaussian window, sigma 1.5, population covariance
        (Wang et al. 2004, MATLAB ``ssim``).
    data_range : float
        Dynamic range of float images (1 for [0, 1]); sets ``C1 = (0.01 L)**2`` and
        ``C2 = (0.03 L)**2``. Integer images are scaled to [0, 1], so they take 1; values
        refused as for :func:`psnr`.

    Returns
    -------
    float
        Mean SSIM over the valid (uncropped) pixels, averaged over channels.
    """
    p, t = _pair(pred, target, data_range)
    kwargs: dict = {"data_range": data_range, "channel_axis": -1 if p.ndim == 3 else None}
    if window == "gaussian":
        kwargs.update(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    elif window != "uniform":
        raise ValueError(f"window must be one of {SSIM_WINDOWS}, got {window!r}")
    side = _SSIM_WINDOW_SIDE[window]
    if p.ndim == 3 and p.shape[0] in (1, 3, 4) and p.shape[2] > 4:
        # (C, H, W) read as (H, W, C) would be "too small": say what is wrong
        raise ValueError(f"images must be channels last, (H, W, C); got shape {p.shape}, which looks channels "
                         "first: np.moveaxis(image, 0, -1)")
    if min(p.shape[:2]) < side:  # scikit-image's own message advises arguments no user can pass
        h, w = p.shape[:2]
        raise ValueError(f"image too small for SSIM ({window} window {side}x{side} needs at least {side} pixels a side): {w}x{h}")
    return float(structural_similarity(p, t, **kwargs))
