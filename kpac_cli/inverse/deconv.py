"""Applying kernels to images: blur, non-blind Wiener deconvolution, a crude radius estimate,
and the disc-Wiener baseline for defocus (:func:`deblur_disc`).

Images are float arrays, ``(H, W)`` or ``(H, W, C)`` with channels last, in any range
(normally [0, 1]); every channel is processed independently with the same kernel. Results
(except :func:`deblur_disc`'s) are not clipped, so the ringing of an inverse kernel stays visible and measurable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.signal import fftconvolve

from ..images.base import checked_photo
from .kernels import disc_psf, kernel_to_otf

__all__ = ["convolve", "wiener_deconvolve", "choose_snr", "deblur_disc", "DiscDeblurResult", "estimate_disc_radius"]

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


_PRIORS = ("flat", "gradient")

# Candidate signal-to-noise ratios for choose_snr: 10**0 .. 10**4 in quarter decades. GCV
# can take the quantisation of 8-bit photos for signal and pick a higher snr, which only
# amplifies that noise (up to 3 dB worse in tests on linear-light disc blur).
_SNR_GRID = np.logspace(0.0, 4.0, 17)
# The most a result chosen by GCV may lie outside [0, 1] in linear light (root mean square over
# pixels and channels). Where the disc fits, the result stays within about 0.003 at any snr;
# where it does not (blur varying with depth, a wrong radius), GCV's premise fails with it and
# it could pick the weakest regularisation, whose ringing scored 6-9 dB on photos whose input
# scored 21-27 dB. The choice is then lowered until the result keeps within this.
_OVERSHOOT_LIMIT = 0.01
# Candidate radii for estimate_disc_radius, in pixels.
_RADII = np.arange(1.0, 12.01, 0.25)


def _extend(img: np.ndarray, pad: int | None) -> tuple[np.ndarray, int]:
    """The image extended for FFT deconvolution, and the offset of the image in it."""
    H, W = img.shape[:2]
    if pad is None:
        # Even (mirror) extension to 2H x 2W: periodic without any seam, so the FFT sees
        # no artificial edge; for a symmetric PSF and a blur computed with mirrored
        # borders this makes the deconvolution exact up to the regularisation.
        return np.pad(img, _pad_width(img, 0, H, 0, W), mode="symmetric"), 0
    p = int(pad)
    if p < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    return np.pad(img, _pad_width(img, p, p, p, p), mode="symmetric"), p


def _regulariser(shape: tuple[int, int], prior: str) -> np.ndarray:
    """The frequency weight of ``1/snr`` on the rfft2 half-plane of a ``shape`` grid.

    ``'flat'``: 1 (a white signal spectrum). ``'gradient'``: the power of the finite-difference
    gradient, ``(2 sin(pi fy))**2 + (2 sin(pi fx))**2``, i.e. a signal spectrum falling as
    ``1 / f**2`` like that of natural images (0 at DC, where nothing needs regularising).
    """
    if prior == "flat":
        return np.ones((shape[0], shape[1] // 2 + 1))
    if prior == "gradient":
        fy = np.fft.fftfreq(shape[0])[:, None]
        fx = np.fft.rfftfreq(shape[1])[None, :]
        return (2 * np.sin(np.pi * fy)) ** 2 + (2 * np.sin(np.pi * fx)) ** 2
    raise ValueError(f"prior must be one of {_PRIORS}, got {prior!r}")


def _check_psf(psf: np.ndarray) -> np.ndarray:
    k = np.asarray(psf, dtype=np.float64)
    if k.ndim != 2:
        raise ValueError(f"psf must be 2-D, got shape {k.shape}")
    return k


def _channels(img: np.ndarray) -> list[np.ndarray]:
    return [img] if img.ndim == 2 else [img[..., c] for c in range(img.shape[2])]


def wiener_deconvolve(
    image: np.ndarray,
    psf: np.ndarray,
    snr: float = 1000.0,
    *,
    pad: int | None = None,
    prior: str = "flat",
) -> np.ndarray:
    """Non-blind Wiener deconvolution of a uniformly blurred image, per channel.

    In the frequency domain the estimate is ``X = conj(K) B / (|K|**2 + R / snr)``; with the
    default ``prior='flat'`` (``R = 1``) this is the same filter as
    :func:`kpac_cli.inverse.wiener_inverse`, applied on the whole (padded) image grid rather
    than as a truncated spatial kernel.

    Parameters
    ----------
    image : (H, W) or (H, W, C) array_like
        Blurred float image, channels last. The blur model is linear: for a defocus that
        happened in linear light, pass linear values (see :func:`deblur_disc`).
    psf : (h, w) array_like
        The blur kernel, centre at ``(h // 2, w // 2)``, normally summing to 1.
    snr : float, optional
        Signal-to-noise power ratio (> 0); lower it for noisier images
        (:func:`choose_snr` picks it from the image).
    pad : int, optional
        Edge handling. By default (``None``) the image is mirror-extended to twice its
        size (even extension), which is periodic and seamless, so the FFT's circular
        boundary adds no ringing. An integer instead mirror-pads ``pad`` pixels on each
        side (``numpy.pad`` mode ``'symmetric'``): less memory, but the seam where the
        padding wraps around can ring into the image at high ``snr``; ``0`` gives plain
        circular deconvolution.
    prior : {'flat', 'gradient'}, optional
        The assumed signal spectrum: ``'flat'`` (white, a constant noise-to-signal ratio
        ``1/snr``), or ``'gradient'``: falling as ``1 / f**2`` like natural images', i.e.
        ``R`` is the power of the finite-difference gradient (at most 8), so high
        frequencies are regularised more than low ones (Tikhonov regularisation of the
        gradient).

    Returns
    -------
    out : ndarray of float64, same shape as ``image`` (not clipped)
    """
    img = _check_image(image)
    k = _check_psf(psf)
    if not snr > 0:
        raise ValueError(f"snr must be > 0, got {snr}")
    H, W = img.shape[:2]
    padded, top = _extend(img, pad)
    shape = padded.shape[:2]
    K = kernel_to_otf(k, shape)[:, : shape[1] // 2 + 1]  # rfft2 half-plane
    G = np.conj(K) / (np.abs(K) ** 2 + _regulariser(shape, prior) / snr)
    # One channel at a time keeps the peak memory at one complex plane.
    outs = [np.fft.irfft2(np.fft.rfft2(ch) * G, s=shape)[top : top + H, top : top + W] for ch in _channels(padded)]
    return outs[0] if img.ndim == 2 else np.stack(outs, axis=-1)


def choose_snr(
    image: np.ndarray,
    psf: np.ndarray,
    *,
    prior: str = "gradient",
    candidates: np.ndarray | None = None,
) -> float:
    """The Wiener ``snr`` for one image, by generalised cross-validation (GCV).

    For the linear filter ``H = |K|**2 / (|K|**2 + R / snr)`` of :func:`wiener_deconvolve`,
    GCV picks the ``snr`` minimising ``mean(|(1 - H) B|**2) / mean(1 - H)**2`` over the
    frequencies of the (mirror-extended) blurred image ``B``, summed over channels: the
    predicted error of re-blurring the estimate, without knowing the noise level (Golub,
    Heath and Wahba 1979). Noisier images get a lower ``snr``. With ``prior='flat'`` GCV
    tends to under-regularise natural images; ``'gradient'`` (the default) suits them.

    Parameters
    ----------
    image : (H, W) or (H, W, C) array_like
        Blurred float image, channels last (all channels share one ``snr``).
    psf : (h, w) array_like
        The blur kernel, as for :func:`wiener_deconvolve`.
    prior : {'flat', 'gradient'}
        As for :func:`wiener_deconvolve`.
    candidates : 1-D array_like, optional
        The ``snr`` values to try; default ``10**0`` to ``10**4`` in quarter decades.

    Returns
    -------
    snr : float
        The best candidate.
    """
    img = _check_image(image)
    k = _check_psf(psf)
    snrs = _SNR_GRID if candidates is None else np.asarray(candidates, dtype=np.float64)
    if snrs.ndim != 1 or snrs.size == 0 or not np.all(snrs > 0):
        raise ValueError("candidates must be a non-empty 1-D array of positive values")
    padded, _ = _extend(img, None)
    shape = padded.shape[:2]
    K2 = np.abs(kernel_to_otf(k, shape)[:, : shape[1] // 2 + 1]) ** 2
    power = sum(np.abs(np.fft.rfft2(ch)) ** 2 for ch in _channels(padded))
    # Columns 1 .. W-1 of the half-plane stand for two columns of the full spectrum.
    weight = np.full(K2.shape[1], 2.0)
    weight[0] = 1.0
    if shape[1] % 2 == 0:
        weight[-1] = 1.0
    R = _regulariser(shape, prior)
    n = shape[0] * shape[1]
    scores = []
    for snr in snrs:
        residual = R / (K2 * snr + R)  # 1 - H
        trace = float((residual * weight).sum()) / n
        fit = float((residual**2 * power * weight).sum()) / n
        scores.append(fit / trace**2 if trace > 0 else np.inf)
    return float(snrs[int(np.argmin(scores))])


def _checked_photo(image: np.ndarray) -> np.ndarray:
    """:func:`deblur_disc`'s input convention, enforced: an image of the engine's convention
    (:func:`kpac_cli.images.base.checked_photo`; one NaN would spread over the whole result
    through the FFT), of a shape :func:`_check_image` takes."""
    return _check_image(checked_photo(image))


@dataclass(frozen=True)
class DiscDeblurResult:
    """Outcome of :func:`deblur_disc`: the deblurred ``image`` (clipped to [0, 1]), the disc
    ``radius`` (pixels) and the Wiener ``snr`` that were used (given or chosen).

    ``radius_at_limit`` is ``'smallest'`` or ``'largest'`` when the estimated radius is that
    end of the candidate range; ``snr_at_limit`` is ``'smallest'`` when the strongest
    regularisation offered was used (chosen by GCV, or the last one lowered to);
    ``snr_lowered_from`` is GCV's choice when the ``snr`` used is lower because that choice's
    result rang out of range. Each means the model does not fit the image (blur varying with
    depth or beyond the range, strong noise): the result is then no fair measure of the method. The
    largest ``snr`` is not flagged, since a clean disc blur rightly takes it. All are None for
    values that were given.
    """

    image: np.ndarray
    radius: float
    snr: float
    radius_at_limit: str | None = None
    snr_at_limit: str | None = None
    snr_lowered_from: float | None = None

    @property
    def limit_note(self) -> str | None:
        """One sentence on the estimates at the end of their range, or None."""
        parts = []
        if self.radius_at_limit is not None:
            parts.append(f"radius {self.radius:g} px is the {self.radius_at_limit} candidate ({_RADII[0]:g} to {_RADII[-1]:g} px)")
        if self.snr_lowered_from is not None:
            parts.append(f"snr lowered from {self.snr_lowered_from:g} (chosen by GCV, whose result rang out of range) "
                         f"to {self.snr:g}")
        if self.snr_at_limit is not None:
            parts.append(f"snr {self.snr:g} is the {self.snr_at_limit} candidate ({_SNR_GRID[0]:g} to {_SNR_GRID[-1]:g})")
        if not parts:
            return None
        return ("estimate at the end of its range or lowered: " + "; ".join(parts)
                + ": the disc model does not fit this image (a blur beyond the range or varying with depth, or strong "
                "noise), so this result is no fair measure of the method")


def deblur_disc(
    image: np.ndarray,
    radius: float | None = None,
    snr: float | None = None,
    *,
    gamma: float = 2.2,
    prior: str = "gradient",
) -> DiscDeblurResult:
    """The classical baseline for defocus: Wiener deconvolution with one disc PSF.

    Defocus happens in linear light, so an encoded photo (values in [0, 1]) is decoded
    with ``x ** gamma``, the radius is estimated on the linear values if not given
    (:func:`estimate_disc_radius`, which finds the disc's spectral zeros only where the
    blur is a convolution), the image is deconvolved with :func:`disc_psf` of that radius
    (:func:`wiener_deconvolve`, mirrored borders) using the given ``snr`` or one chosen per
    image by :func:`choose_snr`, and re-encoded with ``x ** (1 / gamma)``.

    Parameters
    ----------
    image : (H, W) or (H, W, C) array_like
        Blurred image, float in [0, 1], encoded with a power-law tone curve of ``gamma``
        (values up to 0.25 outside are clipped; integer arrays, values farther outside and
        NaN/inf raise a ``ValueError``).
    radius : float, optional
        Disc radius in pixels, from 0 to the image's short side minus 1; default: estimated.
    snr : float, optional
        Signal-to-noise power ratio (> 0) of the Wiener filter; default: chosen by GCV.
    gamma : float
        Exponent of the tone curve (2.2: about sRGB); 1 deconvolves the values as they are.
    prior : {'gradient', 'flat'}
        The signal spectrum assumed by the Wiener filter (see :func:`wiener_deconvolve`).

    Returns
    -------
    DiscDeblurResult
        With the estimates that landed at the end of their candidate range flagged
        (:attr:`DiscDeblurResult.limit_note`).
    """
    img = np.clip(_checked_photo(image), 0.0, 1.0)
    if not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if snr is not None and not snr > 0:
        raise ValueError(f"snr must be > 0, got {snr}")
    linear = img**gamma
    r = estimate_disc_radius(linear) if radius is None else float(radius)
    side = min(img.shape[:2])
    # The PSF (2 ceil(r) + 1 wide) must fit the mirror-extended 2H x 2W grid of wiener_deconvolve.
    if math.isfinite(r) and 2 * math.ceil(r) + 1 > 2 * side:
        raise ValueError(f"a disc of radius {r:g} px is too large for a {img.shape[0]}x{img.shape[1]} image "
                         f"(at most {side - 1} px)")
    psf = disc_psf(r)
    lowered_from = None
    if snr is None:
        chosen = choose_snr(linear, psf, prior=prior)
        deconvolved, s = _within_range(linear, psf, chosen, prior)
        lowered_from = chosen if s != chosen else None
    else:
        s = float(snr)
        deconvolved = wiener_deconvolve(linear, psf, s, prior=prior)
    out = np.clip(deconvolved, 0.0, 1.0) ** (1.0 / gamma)
    radius_limit = _end_of_range(r, _RADII) if radius is None else None
    snr_limit = "smallest" if snr is None and s == _SNR_GRID[0] else None
    return DiscDeblurResult(image=out, radius=r, snr=s, radius_at_limit=radius_limit, snr_at_limit=snr_limit,
                            snr_lowered_from=lowered_from)


def _overshoot(linear: np.ndarray) -> float:
    """Root mean square of how far ``linear`` lies outside [0, 1]."""
    outside = np.maximum(linear - 1.0, 0.0) + np.maximum(-linear, 0.0)
    return float(np.sqrt(np.mean(outside**2)))


def _within_range(linear: np.ndarray, psf: np.ndarray, snr: float, prior: str) -> tuple[np.ndarray, float]:
    """(result, snr): the Wiener result at ``snr`` (GCV's choice), or at the next lower candidates
    of the grid in turn until one rings out of range by at most :data:`_OVERSHOOT_LIMIT`; the
    smallest candidate's when none does."""
    candidates = [snr] + [float(c) for c in _SNR_GRID[::-1] if c < snr]
    for candidate in candidates:
        out = wiener_deconvolve(linear, psf, candidate, prior=prior)
        if _overshoot(out) <= _OVERSHOOT_LIMIT:
            break
    return out, candidate


def _end_of_range(value: float, candidates: np.ndarray) -> str | None:
    """``'smallest'`` or ``'largest'`` when ``value`` is that end of ``candidates``, else None."""
    if value == candidates[0]:
        return "smallest"
    if value == candidates[-1]:
        return "largest"
    return None


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
    cand = _RADII if radii is None else np.asarray(radii, dtype=np.float64)
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
