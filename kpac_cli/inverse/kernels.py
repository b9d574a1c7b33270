"""Blur kernels (PSFs), their Wiener inverses, and kernel rescaling (the paper's Sec. 3).

Conventions used throughout :mod:`kpac_cli.inverse`:

* A kernel is a 2-D float64 array whose centre is the element ``(h // 2, w // 2)`` (the
  convention of ``scipy.ndimage`` and of :func:`kpac_cli.inverse.convolve`). The
  functions here always return odd-sized kernels, so the centre is unambiguous.
* Blur kernels are normalised to sum to 1 (a blur keeps the mean brightness).
* "Upsampling by s" (written ``k↑s`` in the paper) *stretches* a kernel:
  ``(k↑s)(x) = k(x / s)``. Stretching multiplies the sum by about ``s**2``, so the
  area-preserving version of a blur of ``s`` times the size is ``(k↑s) / s**2``.
* "Dilating by d" inserts ``d - 1`` zeros between taps, as an atrous convolution with
  dilation rate ``d`` does; it keeps the sum.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "disc_psf",
    "gaussian_psf",
    "wiener_inverse",
    "upsample_kernel",
    "dilate_kernel",
    "centre_crop",
    "centre_pad",
]


def _odd_size(size: int | None, default: int) -> int:
    n = default if size is None else int(size)
    if n < 1 or n % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd integer, got {size}")
    return n


def disc_psf(radius: float, size: int | None = None, *, supersample: int = 16) -> np.ndarray:
    """Anti-aliased uniform disc: the thin-lens defocus PSF (circle of confusion).

    Parameters
    ----------
    radius : float
        Radius of the disc in pixels (>= 0). ``0`` gives a discrete delta.
    size : int, optional
        Odd side length of the returned kernel; default ``2 * ceil(radius) + 1``, the
        smallest odd size holding the whole disc.
    supersample : int, optional
        Each pixel's value is the fraction of its area inside the disc, estimated on a
        ``supersample x supersample`` grid of sub-pixel samples (anti-aliasing).

    Returns
    -------
    psf : (size, size) ndarray of float64
        Non-negative, sums to 1, centred on ``(size // 2, size // 2)``.
    """
    radius = float(radius)
    if not math.isfinite(radius) or radius < 0:
        raise ValueError(f"radius must be finite and >= 0, got {radius}")
    ss = int(supersample)
    if ss < 1:  # no sub-pixel samples: every pixel's coverage would be 0 / 0
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    n = _odd_size(size, 2 * math.ceil(radius) + 1)
    c = n // 2
    if radius == 0:
        psf = np.zeros((n, n))
        psf[c, c] = 1.0
        return psf
    # Sub-pixel sample offsets, symmetric about each pixel centre.
    sub = (np.arange(ss) + 0.5) / ss - 0.5
    coords = (np.arange(n) - c)[:, None] + sub[None, :]  # (n, ss)
    y = coords[:, None, :, None]
    x = coords[None, :, None, :]
    inside = (y**2 + x**2) <= radius**2
    psf = inside.mean(axis=(2, 3))
    if psf.sum() == 0:  # a disc smaller than the sampling grid: fall back to a delta
        psf[c, c] = 1.0
    return psf / psf.sum()


def gaussian_psf(sigma: float, size: int | None = None) -> np.ndarray:
    """Isotropic Gaussian PSF, sampled at pixel centres.

    Parameters
    ----------
    sigma : float
        Standard deviation in pixels (>= 0). ``0`` gives a discrete delta.
    size : int, optional
        Odd side length; default ``2 * ceil(3 * sigma) + 1``.

    Returns
    -------
    psf : (size, size) ndarray of float64
        Sums to 1, centred on ``(size // 2, size // 2)``.
    """
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    n = _odd_size(size, 2 * math.ceil(3 * sigma) + 1)
    c = n // 2
    if sigma == 0:
        psf = np.zeros((n, n))
        psf[c, c] = 1.0
        return psf
    r = np.arange(n) - c
    g = np.exp(-(r**2) / (2 * sigma**2))
    psf = np.outer(g, g)
    return psf / psf.sum()


def centre_pad(k: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Zero-pad a kernel to ``size`` keeping its centre element at the new centre."""
    k = np.asarray(k, dtype=np.float64)
    hs, ws = (size, size) if np.isscalar(size) else size
    h, w = k.shape
    if hs < h or ws < w:
        raise ValueError(f"cannot pad a {h}x{w} kernel to the smaller size {hs}x{ws}")
    out = np.zeros((hs, ws))
    top, left = hs // 2 - h // 2, ws // 2 - w // 2
    out[top : top + h, left : left + w] = k
    return out


def centre_crop(k: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Crop a kernel to ``size`` around its centre element (inverse of :func:`centre_pad`)."""
    k = np.asarray(k)
    hs, ws = (size, size) if np.isscalar(size) else size
    h, w = k.shape
    if hs > h or ws > w:
        raise ValueError(f"cannot crop a {h}x{w} kernel to the larger size {hs}x{ws}")
    top, left = h // 2 - hs // 2, w // 2 - ws // 2
    return k[top : top + hs, left : left + ws]


def kernel_to_otf(k: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """DFT of a centred kernel on a grid of ``shape``, with its centre moved to index (0, 0).

    Moving the centre to the origin makes the transform of a symmetric kernel real and
    makes multiplication in frequency equal to centred ('same') circular convolution.
    """
    k = np.asarray(k, dtype=np.float64)
    h, w = k.shape
    if h > shape[0] or w > shape[1]:
        raise ValueError(f"kernel {h}x{w} does not fit the {shape[0]}x{shape[1]} grid")
    buf = np.zeros(shape)
    buf[:h, :w] = k
    buf = np.roll(buf, (-(h // 2), -(w // 2)), axis=(0, 1))
    return np.fft.fft2(buf)


def wiener_inverse(k: np.ndarray, snr: float = 1000.0, size: int | None = None) -> np.ndarray:
    """Wiener inverse kernel ``k†`` of a blur kernel (the paper's inverse kernels, Sec. 3).

    Computes, on a ``size x size`` periodic grid,

    .. math:: k^\\dagger = \\mathcal{F}^{-1}\\left[\\frac{\\overline{K}}{|K|^2 + 1/\\mathrm{SNR}}\\right],
              \\qquad K = \\mathcal{F}[k],

    the Wiener deconvolution filter written as a spatial kernel (the form the paper uses
    for its inverse kernels; ``1/SNR`` is a constant noise-to-signal power ratio that
    keeps the division finite at the zeros of ``K``).

    Parameters
    ----------
    k : (h, w) array_like
        Blur kernel, centre at ``(h // 2, w // 2)``; normally sums to 1.
    snr : float, optional
        Signal-to-noise power ratio (> 0). Larger values give a sharper inverse with more
        ringing; ``snr -> inf`` is the plain (pseudo-)inverse.
    size : int, optional
        Odd side length of the grid and of the returned kernel. An inverse kernel has
        unbounded support, so ``size`` also truncates it (the grid is periodic: energy
        beyond ``size // 2`` wraps around). Default ``max(4 * max(h, w) + 1, 15)``.

    Returns
    -------
    kinv : (size, size) ndarray of float64
        The inverse kernel, centred. ``convolve(convolve(x, k), kinv) ≈ x`` in the
        frequencies where ``|K|**2 >> 1/snr``.
    """
    k = np.asarray(k, dtype=np.float64)
    if k.ndim != 2:
        raise ValueError(f"kernel must be 2-D, got shape {k.shape}")
    if not snr > 0:
        raise ValueError(f"snr must be > 0, got {snr}")
    n = _odd_size(size, max(4 * max(k.shape) + 1, 15))
    K = kernel_to_otf(k, (n, n))
    kinv = np.real(np.fft.ifft2(np.conj(K) / (np.abs(K) ** 2 + 1.0 / snr)))
    # Undo the move to the origin: index 0 goes back to the centre (n odd).
    return np.fft.fftshift(kinv)


def _output_half_width(n: int, s: float) -> tuple[int, bool]:
    """Half-width M of the stretched kernel, and whether its two end samples coincide.

    One period of the stretched (periodic) interpolant spans ``s * n`` output samples.
    ``M = floor(s * n / 2)`` covers it; when ``s * n`` is an even integer the end samples
    at ``+-n/2`` are the same point of the period, counted twice.
    """
    sn = s * n
    m = int(math.floor(sn / 2 + 1e-9))
    shared_ends = abs(sn - round(sn)) < 1e-9 and round(sn) % 2 == 0
    return m, shared_ends


def _fourier_weights(n: int, t: np.ndarray) -> np.ndarray:
    """Trigonometric (periodic band-limited) interpolation weights, shape (len(t), n).

    Sample ``j`` (centred index ``j - n // 2``) gets weight ``D(t - (j - n // 2))``, with
    ``D`` the periodic sinc (Dirichlet kernel) of period ``n``: ``sin(pi x) / (n sin(pi x
    / n))`` for odd ``n``, and ``sin(pi x) / (n tan(pi x / n))`` for even ``n`` (the
    Nyquist term split symmetrically, so a real kernel stays real). This is what
    zero-padding the DFT computes, evaluated at arbitrary positions.
    """
    c = n // 2
    x = t[:, None] - (np.arange(n) - c)[None, :]
    num = np.sin(np.pi * x)
    den = n * (np.sin(np.pi * x / n) if n % 2 else np.tan(np.pi * x / n))
    near = np.abs(den) < 1e-12  # x a multiple of n: the limit is 1
    w = np.divide(num, den, out=np.ones_like(x), where=~near)
    return w


def _lanczos_weights(n: int, t: np.ndarray, a: int = 3) -> np.ndarray:
    c = n // 2
    x = t[:, None] - (np.arange(n) - c)[None, :]
    w = np.sinc(x) * np.sinc(x / a)
    w[np.abs(x) >= a] = 0.0
    # Normalise each output's weights (as image resamplers do) so constants stay constant.
    tot = w.sum(1, keepdims=True)
    return np.divide(w, tot, out=np.zeros_like(w), where=np.abs(tot) > 1e-12)


def upsample_kernel(k: np.ndarray, s: float, method: str = "fourier") -> np.ndarray:
    """Stretch a kernel by a factor ``s`` (the paper's ``k↑s``), *without* renormalising.

    The output samples ``(k↑s)[m] = k_c(m / s)`` at centred integer positions ``m``,
    where ``k_c`` is a continuous interpolant of the samples of ``k``. The sum grows by
    about ``s**2``; divide by ``s**2`` for an area-preserving kernel (the paper's
    ``k↑s / s²``, e.g. the disc blur of ``s`` times the radius).

    Parameters
    ----------
    k : (h, w) array_like
        Kernel with centre at ``(h // 2, w // 2)``; odd sizes recommended.
    s : float
        Stretch factor (> 0; non-integer values allowed).
    method : {'fourier', 'lanczos'}
        ``'fourier'``: periodic band-limited interpolation, i.e. zero-padding the DFT of
        ``k`` (for integer ``s`` and odd ``s * n`` this is exactly DFT zero-padding).
        ``'lanczos'``: Lanczos-3 interpolation, a spatial method without wrap-around.

    Returns
    -------
    ks : ndarray of float64
        Odd-sized, centred; side ``2 * M + 1`` with ``M = floor(s * (n + 2) / 2)``: the
        input is first padded with one ring of zeros, then about ``s * (n + 2)`` samples
        per axis are taken (one period of the Fourier interpolant; when that period is an
        even number of samples its shared end sample is split half-half between the
        first and last row/column, so the sum is kept exactly).
    """
    k = np.asarray(k, dtype=np.float64)
    if k.ndim != 2:
        raise ValueError(f"kernel must be 2-D, got shape {k.shape}")
    s = float(s)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"upsampling factor must be a finite number > 0, got {s}")
    if method == "fourier":
        weights = _fourier_weights
    elif method == "lanczos":
        weights = _lanczos_weights
    else:
        raise ValueError(f"method must be 'fourier' or 'lanczos', got {method!r}")
    # A kernel is zero outside its array: one ring of explicit zeros keeps the periodic
    # (Fourier) interpolant from joining opposite edges and gives both methods room for
    # the stretched tails.
    k = np.pad(k, 1)
    axes = []
    for n in k.shape:
        m, shared_ends = _output_half_width(n, s)
        t = np.arange(-m, m + 1) / s
        w = weights(n, t)
        if shared_ends and method == "fourier":
            # The first and last output samples are one sample of the period: give each
            # half of it, so the result is symmetric and holds exactly one period (this
            # keeps the sum and the DFT samples of the Fourier interpolant).
            w[0] *= 0.5
            w[-1] *= 0.5
        axes.append(w)
    # Separable interpolation: rows, then columns.
    return axes[0] @ k @ axes[1].T


def dilate_kernel(k: np.ndarray, d: int) -> np.ndarray:
    """Insert ``d - 1`` zeros between the taps of a kernel (an atrous/dilated kernel).

    Parameters
    ----------
    k : (h, w) array_like
        Kernel with centre at ``(h // 2, w // 2)``.
    d : int
        Dilation rate (>= 1); ``1`` returns a copy.

    Returns
    -------
    kd : (d * (h - 1) + 1, d * (w - 1) + 1) ndarray of float64
        ``kd[d * i, d * j] = k[i, j]`` and zero elsewhere; same sum as ``k``. For odd
        ``h, w`` the centre tap stays at the centre. Convolving with ``kd`` is what an
        atrous convolution with dilation ``d`` and weights ``k`` computes.
    """
    k = np.asarray(k, dtype=np.float64)
    if k.ndim != 2:
        raise ValueError(f"kernel must be 2-D, got shape {k.shape}")
    if int(d) != d or d < 1:
        raise ValueError(f"dilation must be a positive integer, got {d}")
    d = int(d)
    h, w = k.shape
    out = np.zeros((d * (h - 1) + 1, d * (w - 1) + 1))
    out[::d, ::d] = k
    return out
