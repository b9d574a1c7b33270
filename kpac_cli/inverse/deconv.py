"""Applying kernels to images: blur, non-blind Wiener deconvolution, a crude radius estimate.

Images are float arrays, ``(H, W)`` or ``(H, W, C)`` with channels last, in any range
(normally [0, 1]); every channel is processed independently with the same kernel. Results
are not clipped, so the ringing of an inverse kernel stays visible and measurable.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import fftconvolve

from .kernels import disc_psf, kernel_to_otf

__all__ = ["convolve", "wiener_deconvolve", "estimate_disc_radius"]

_PAD_MODES = ("symmetric", "reflect", "edge", "wrap", "constant")


def _check_image(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float64)
    if img.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {img.shape}")
    return img


def _pad_width(img: np.ndarray, top: int, bottom: int, left: int, right: int):
    return [(top, bottom), (left, right)] + [(0, 0)] * (img.ndim - 2)


def convolve(image: np.ndarray, kernel: np.ndarray, *, mode: str = "symmetric") -> np.ndarray:
    """'Same'-size 2-D convolution of every channel with a centred kernel (via FFT).

    Parameters
    ----------
    image : (H, W) or (H, W, C) array_like
        Float image, channels last.
    kernel : (h, w) array_like
        Kernel with centre at ``(h // 2, w // 2)``. This is a true convolution (the
        kernel is flipped), as in the blur model ``b = k * x``.
    mode : str, optional
        How the image is extended beyond its border, one of ``numpy.pad``'s modes
        ``'symmetric'`` (default; mirror including the edge pixel), ``'reflect'``,
        ``'edge'``, ``'wrap'`` (circular convolution) or ``'constant'`` (zeros).

    Returns
    -------
    out : ndarray of float64, same shape as ``image``
    """
    img = _check_image(image)
    k = np.asarray(kernel, dtype=np.float64)
    if k.ndim != 2:
        raise ValueError(f"kernel must be 2-D, got shape {k.shape}")
    if mode not in _PAD_MODES:
        raise ValueError(f"mode must be one of {_PAD_MODES}, got {mode!r}")
    kh, kw = k.shape
    cy, cx = kh // 2, kw // 2
    # With 'valid' convolution, padding kh-1-cy above and cy below puts the kernel's
    # centre element on each output pixel.
    padded = np.pad(img, _pad_width(img, kh - 1 - cy, cy, kw - 1 - cx, cx), mode=mode)
    if img.ndim == 3:
        k = k[:, :, None]
    return fftconvolve(padded, k, mode="valid", axes=(0, 1))


def wiener_deconvolve(
    image: np.ndarray,
    psf: np.ndarray,
    snr: float = 1000.0,
    *,
    pad: int | None = None,
) -> np.ndarray:
    """Non-blind Wiener deconvolution of a uniformly blurred image, per channel.

    In the frequency domain the estimate is ``X = conj(K) B / (|K|**2 + 1/snr)``, the
    same filter as :func:`kpac_cli.inverse.wiener_inverse` but applied on the whole
    (padded) image grid rather than as a truncated spatial kernel.

    Parameters
    ----------
    image : (H, W) or (H, W, C) array_like
        Blurred float image, channels last.
    psf : (h, w) array_like
        The blur kernel, centre at ``(h // 2, w // 2)``, normally summing to 1.
    snr : float, optional
        Signal-to-noise power ratio (> 0); lower it for noisier images.
    pad : int, optional
        Edge handling. By default (``None``) the image is mirror-extended to twice its
        size (even extension), which is periodic and seamless, so the FFT's circular
        boundary adds no ringing. An integer instead mirror-pads ``pad`` pixels on each
        side (``numpy.pad`` mode ``'symmetric'``): less memory, but the seam where the
        padding wraps around can ring into the image at high ``snr``; ``0`` gives plain
        circular deconvolution.

    Returns
    -------
    out : ndarray of float64, same shape as ``image`` (not clipped)
    """
    img = _check_image(image)
    k = np.asarray(psf, dtype=np.float64)
    if k.ndim != 2:
        raise ValueError(f"psf must be 2-D, got shape {k.shape}")
    if not snr > 0:
        raise ValueError(f"snr must be > 0, got {snr}")
    H, W = img.shape[:2]
    if pad is None:
        # Even (mirror) extension to 2H x 2W: periodic without any seam, so the FFT sees
        # no artificial edge; for a symmetric PSF and a blur computed with mirrored
        # borders this makes the deconvolution exact up to the regularisation.
        widths = _pad_width(img, 0, H, 0, W)
        top = left = 0
    else:
        p = int(pad)
        if p < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        widths = _pad_width(img, p, p, p, p)
        top = left = p
    padded = np.pad(img, widths, mode="symmetric")
    shape = padded.shape[:2]
    K = kernel_to_otf(k, shape)[:, : shape[1] // 2 + 1]  # rfft2 half-plane
    G = np.conj(K) / (np.abs(K) ** 2 + 1.0 / snr)
    # One channel at a time keeps the peak memory at one complex plane.
    chans = [padded] if img.ndim == 2 else [padded[..., c] for c in range(img.shape[2])]
    outs = [np.fft.irfft2(np.fft.rfft2(ch) * G, s=shape)[top : top + H, left : left + W] for ch in chans]
    return outs[0] if img.ndim == 2 else np.stack(outs, axis=-1)


def _radial_log_power(gray: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged log power spectrum of a Hann-windowed square crop."""
    n = min(gray.shape)
    top, left = (gray.shape[0] - n) // 2, (gray.shape[1] - n) // 2
    crop = gray[top : top + n, left : left + n]
    crop = crop - crop.mean()
    win = np.hanning(n)
    power = np.abs(np.fft.fft2(crop * np.outer(win, win))) ** 2
    f = np.fft.fftfreq(n)
    rho = np.hypot(f[:, None], f[None, :])
    edges = np.linspace(0, 0.5, n_bins + 1)
    idx = np.digitize(rho.ravel(), edges) - 1
    ok = (idx >= 0) & (idx < n_bins)
    sums = np.bincount(idx[ok], power.ravel()[ok], minlength=n_bins)
    counts = np.bincount(idx[ok], minlength=n_bins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    keep = counts > 0
    return centres[keep], np.log(sums[keep] / counts[keep] + 1e-20)


def _detrended(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    # Remove a straight line in log-frequency: natural images have power ~ f**-2 and the
    # envelope of a disc's spectrum also falls as a power law, so only the dips are left.
    A = np.stack([np.ones_like(x), np.log(x)], axis=1)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    return y - A @ coef


def estimate_disc_radius(
    image: np.ndarray,
    radii: np.ndarray | None = None,
    *,
    snr: float = 300.0,
) -> float:
    """Crude global estimate of a uniform disc (defocus) blur radius, in pixels.

    Method (spectral zeros): the spectrum of a disc blur has rings of zeros at spatial
    frequencies ``j_{1,m} / (2 pi r)`` cycles/pixel (``j_{1,m}`` the zeros of the Bessel
    function J1), which show up as dips in the radially averaged log power spectrum of
    the blurred image. For every candidate radius, the detrended log power spectrum of
    the image is correlated with the detrended ``log(|K_r|**2 + 1/snr)`` of that disc
    (computed numerically from :func:`disc_psf`), and the radius with the highest
    correlation wins.

    This is deliberately simple and crude: it assumes ONE disc blur over the whole image
    (real defocus varies with depth, so the result is at best a dominant radius), it is
    confused by strong noise, JPEG blocking, periodic textures and non-disc apertures,
    and it returns a value on the ``radii`` grid only. Use it for synthetic tests and
    rough guesses, not as a blur-map estimator.

    Parameters
    ----------
    image : (H, W) or (H, W, C) array_like
        Blurred float image; colour is averaged to grey. Needs at least 32 x 32 pixels.
    radii : 1-D array_like, optional
        Candidate radii in pixels; default 1 to 12 in steps of 0.25.
    snr : float, optional
        Signal-to-noise power ratio used to floor the model spectrum (a noise floor).

    Returns
    -------
    radius : float
        The best candidate from ``radii``.
    """
    img = _check_image(image)
    gray = img.mean(axis=2) if img.ndim == 3 else img
    if min(gray.shape) < 32:
        raise ValueError(f"image too small to estimate a blur radius: {gray.shape}")
    cand = np.arange(1.0, 12.01, 0.25) if radii is None else np.asarray(radii, dtype=np.float64)
    if cand.ndim != 1 or cand.size == 0 or np.any(cand <= 0):
        raise ValueError("radii must be a non-empty 1-D array of positive values")
    n = min(gray.shape)
    rho, logp = _radial_log_power(gray, n_bins=n // 2)
    # Skip the lowest frequencies (dominated by image content and the window) and the
    # highest (aliasing, noise, interpolation artefacts of the camera pipeline).
    band = (rho > 2.0 / n) & (rho < 0.45)
    rho, logp = rho[band], logp[band]
    target = _detrended(logp, rho)
    grid = 256
    f = np.fft.fftfreq(grid)
    fr = np.hypot(f[:, None], f[None, :])
    scores = []
    for r in cand:
        K = np.abs(kernel_to_otf(disc_psf(r), (grid, grid))) ** 2
        # Radial profile of the model by averaging in the same frequency bins.
        prof = np.interp(rho, *_radial_profile(fr, K))
        model = _detrended(np.log(prof + 1.0 / snr), rho)
        denom = np.linalg.norm(model) * np.linalg.norm(target)
        scores.append(float(model @ target / denom) if denom > 0 else -np.inf)
    return float(cand[int(np.argmax(scores))])


def _radial_profile(fr: np.ndarray, values: np.ndarray, n_bins: int = 128) -> tuple[np.ndarray, np.ndarray]:
    edges = np.linspace(0, 0.5, n_bins + 1)
    idx = np.digitize(fr.ravel(), edges) - 1
    ok = (idx >= 0) & (idx < n_bins)
    sums = np.bincount(idx[ok], values.ravel()[ok], minlength=n_bins)
    counts = np.bincount(idx[ok], minlength=n_bins)
    keep = counts > 0
    return 0.5 * (edges[1:] + edges[:-1])[keep], sums[keep] / counts[keep]
