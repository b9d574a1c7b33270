"""The optics of the synthetic defocus: tone curve, aperture PSFs, layered blur, sensor noise.

Conventions used throughout :mod:`kpac_cli.synth`:

* Images are ``HxWx3`` float32. *Encoded* images are in ``[0, 1]`` like a photo file; *linear*
  images are proportional to scene radiance and may exceed 1 (boosted highlights) until the
  sensor clips them.
* The tone curve is a pure power law: ``linear = encoded ** gamma`` and
  ``encoded = linear ** (1 / gamma)`` ("sRGB-ish" for ``gamma = 2.2``; exactly invertible).
* A *signed blur radius* is in pixels: positive behind the focal plane (farther than focus),
  negative in front of it (nearer), 0 in focus. The PSF of a point at signed radius ``r`` is
  the aperture shape scaled to radius ``|r|``; for a disc that is the circle of confusion.
* PSF kernels are ``(2P+1)x(2P+1)`` arrays with the optical axis at the centre pixel, array
  row = image y (down), column = image x (right), summing to 1.
"""

from __future__ import annotations

import math
import numpy as np
import scipy.fft as sfft

__all__ = [
    "decode",
    "encode",
    "boost_highlights",
    "aperture_psf",
    "layer_levels",
    "layer_weights",
    "render_defocus",
    "add_sensor_noise",
]

# Below this radius the circle of confusion fits inside one pixel: the PSF is a delta.
_DELTA_RADIUS = 0.5


def decode(encoded: np.ndarray, gamma: float) -> np.ndarray:
    """Encoded ``[0, 1]`` values to linear light: ``clip(x, 0, 1) ** gamma`` (float32)."""
    x = np.clip(np.asarray(encoded, dtype=np.float32), 0.0, 1.0)
    return x if gamma == 1 else np.power(x, np.float32(gamma), dtype=np.float32)


def encode(linear: np.ndarray, gamma: float) -> np.ndarray:
    """Linear light to encoded ``[0, 1]``: ``clip(x, 0, 1) ** (1 / gamma)`` (float32)."""
    x = np.clip(np.asarray(linear, dtype=np.float32), 0.0, 1.0)
    return x if gamma == 1 else np.power(x, np.float32(1.0 / gamma), dtype=np.float32)


def boost_highlights(linear: np.ndarray, encoded: np.ndarray, boost: float,
                     lo: float = 0.98, hi: float = 1.0) -> np.ndarray:
    """Give clipped highlights back some of the radiance the sensor cut off.

    A photo stores a light bulb or a specular glint as 1.0, but the scene was brighter, and
    when it is defocused its energy spreads into a bright bokeh disc instead of a grey smudge.
    Each channel whose *encoded* value is ``>= hi`` is multiplied by ``boost`` in linear
    light; between ``lo`` and ``hi`` the factor ramps linearly from 1, so there is no seam (and
    JPEG-fuzzed clipped areas, 250..255, still count). Only clipped channels are boosted: a
    channel the sensor did not clip was measured, so an in-focus pixel comes back (clipped by
    the sensor again) with its colour unchanged, and a white highlight is boosted evenly (its
    hue kept). The ramp is kept narrow because an in-focus boosted channel is clipped back to
    1.0, i.e. it ends up up to ``1 - lo`` brighter than in the target. ``boost <= 1`` returns
    ``linear`` unchanged.

    Parameters
    ----------
    linear : (H, W, 3) ndarray
        The image in linear light.
    encoded : (H, W, 3) ndarray
        The same image encoded (used to find saturated channels as a photo file shows them).
    boost : float
        Linear-light gain of fully saturated channels.
    """
    if boost <= 1.0:
        return linear
    t = np.clip((encoded - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    if not t.any():
        return linear
    return linear * (1.0 + (np.float32(boost) - 1.0) * t)


def aperture_psf(radius: float, *, aperture: str = "disc", blades: int = 6, rotation: float = 0.0,
                 half: str | None = None, pad: int | None = None) -> np.ndarray:
    """The defocus PSF for blur radius ``radius`` pixels, anti-aliased, summing to 1.

    Parameters
    ----------
    radius : float
        Radius of the circle of confusion in pixels (the sign is ignored). For a polygon it is
        the circumradius (blade tips touch the circle of that radius).
    aperture : {'disc', 'polygon'}
        A circular aperture or a regular polygon of ``blades`` sides (an iris diaphragm).
    blades : int
        Number of polygon sides (>= 3).
    rotation : float
        Polygon rotation in radians.
    half : {None, 'left', 'right'}
        Keep only the part of the aperture left (x < 0) or right (x > 0) of the vertical line
        through the centre, as a dual-pixel sub-pixel sees it. The halves are split with an
        anti-aliased edge so that ``left + right`` equals the full aperture exactly. Each half
        is normalised to sum to 1 on its own (each view is exposed to full brightness).
    pad : int, optional
        Half-size of the returned kernel; default ``ceil(radius) + 1``.

    Returns
    -------
    psf : (2*pad+1, 2*pad+1) ndarray of float32

    Notes
    -----
    The coverage of each pixel is approximated from the signed distance ``s`` of its centre to
    the aperture edge as ``clip(0.5 - s, 0, 1)``: exact for straight edges aligned with the grid
    and a good approximation otherwise (it is what makes a small disc's energy vary smoothly
    with its radius instead of in steps). Below radius 0.5 the kernel is a delta.
    """
    r = abs(float(radius))
    p = int(math.ceil(r)) + 1 if pad is None else int(pad)
    k = np.zeros((2 * p + 1, 2 * p + 1), np.float32)
    if r < _DELTA_RADIUS:  # in focus: both sub-pixels (and the full aperture) see a delta
        k[p, p] = 1.0
        return k
    yy, xx = np.mgrid[-p:p + 1, -p:p + 1].astype(np.float64)
    if aperture == "disc":
        sdist = np.hypot(xx, yy) - r
    elif aperture == "polygon":
        n = int(blades)
        if n < 3:
            raise ValueError(f"a polygonal aperture needs at least 3 blades, got {n}")
        apothem = r * math.cos(math.pi / n)
        angles = rotation + (np.arange(n) + 0.5) * (2 * math.pi / n)
        # Signed distance of a convex polygon ~ the largest distance past any edge line.
        sdist = np.max(xx[..., None] * np.cos(angles) + yy[..., None] * np.sin(angles), axis=-1) - apothem
    else:
        raise ValueError(f"aperture must be 'disc' or 'polygon', got {aperture!r}")
    cover = np.clip(0.5 - sdist, 0.0, 1.0)
    if half == "left":
        cover *= np.clip(0.5 - xx, 0.0, 1.0)
    elif half == "right":
        cover *= np.clip(0.5 + xx, 0.0, 1.0)
    elif half is not None:
        raise ValueError(f"half must be None, 'left' or 'right', got {half!r}")
    k[:] = cover / cover.sum()
    return k


def layer_levels(rmin: float, rmax: float, layers: int) -> np.ndarray:
    """Signed radii of the depth layers covering ``[rmin, rmax]``, ascending.

    The focal plane (radius 0) is always a level when the range straddles it, so in-focus
    content is rendered exactly sharp. On each side of it the levels are spaced uniformly in
    ``sqrt(|r|)``: blur differences matter most at small radii (r = 0 vs 1.5 is a big visual
    change, r = 10 vs 11.5 is not). ``layers`` is the target count; straddling ranges get at
    least one level on each side plus 0, so up to ``max(layers, 3)`` levels.
    """
    rmin, rmax = float(rmin), float(rmax)
    if rmax - rmin < 1e-6:
        return np.array([rmin], np.float64)
    n = max(int(layers), 2)

    def side(extent: float, m: int) -> np.ndarray:  # m levels in (0, extent], sqrt-spaced
        t = np.arange(1, m + 1) / m
        return extent * t * t

    if rmin < 0.0 < rmax:
        n_neg = int(round((n - 1) * -rmin / (rmax - rmin)))
        n_neg = min(max(n_neg, 1), max(n - 2, 1))
        n_pos = max(n - 1 - n_neg, 1)
        return np.concatenate([-side(-rmin, n_neg)[::-1], [0.0], side(rmax, n_pos)])
    if rmin >= 0.0:  # all on one side of the focal plane
        t = np.linspace(math.sqrt(rmin), math.sqrt(rmax), n)
        return t * t
    return -(layer_levels(-rmax, -rmin, n)[::-1])


def layer_weights(radius: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split each pixel between the two levels bracketing its radius (linear interpolation).

    Returns ``(lo, w_hi, used)``: the index of the lower level per pixel, the weight of the
    upper one (the lower gets ``1 - w_hi``), and per level whether any pixel uses it. Interpolating
    instead of rounding avoids visible bands where a smooth depth ramp crosses a level.
    """
    r = np.clip(radius, levels[0], levels[-1])
    if len(levels) == 1:
        z = np.zeros(r.shape, np.intp)
        return z, np.zeros(r.shape, np.float32), np.array([True])
    lo = np.clip(np.searchsorted(levels, r, side="right") - 1, 0, len(levels) - 2)
    w = ((r - levels[lo]) / (levels[lo + 1] - levels[lo])).astype(np.float32)
    n = len(levels)
    used = np.bincount(lo.ravel(), weights=(1.0 - w).ravel(), minlength=n) > 0
    used[1:] |= np.bincount(lo.ravel(), weights=w.ravel(), minlength=n)[:n - 1] > 0
    return lo, w, used


def _kernel_spectrum(psf: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """rFFT of ``psf`` placed with its centre at index (0, 0) of a ``shape`` buffer (wrapped)."""
    p = psf.shape[0] // 2
    buf = np.zeros(shape, np.float32)
    buf[:psf.shape[0], :psf.shape[1]] = psf
    buf = np.roll(buf, (-p, -p), axis=(0, 1))
    return sfft.rfft2(buf, workers=1)


def _check_render_inputs(linear: np.ndarray, radius: np.ndarray) -> None:
    """Refuse what :func:`render_defocus` would otherwise crop silently or fail on obscurely
    (a NaN radius has no depth layer: the layer search would never end)."""
    shape, rshape = np.shape(linear), np.shape(radius)
    if len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"linear must be an HxWx3 image, got shape {shape}")
    if rshape != shape[:2]:
        raise ValueError(f"radius must be {shape[0]}x{shape[1]} like the image, got shape {rshape}")
    if not np.isfinite(radius).all():
        raise ValueError("radius must be finite everywhere (it holds NaN or inf)")


def render_defocus(linear: np.ndarray, radius: np.ndarray, *, layers: int = 8, aperture: str = "disc",
                   blades: int = 6, rotation: float = 0.0, dual_pixel: bool = False) -> list[np.ndarray]:
    """Spatially varying, occlusion-aware defocus blur by depth-layer compositing.

    1. The signed radius range is cut into :func:`layer_levels`; each pixel is split between
       its two bracketing levels (:func:`layer_weights`), giving per-layer soft masks ``M_k``.
    2. Each layer's premultiplied colour ``M_k * I`` and its mask ``M_k`` are convolved with the
       layer's aperture PSF (FFT convolution, zero padding): ``B_k = psf_k * (M_k I)``,
       ``A_k = psf_k * M_k``.
    3. The layers are composited back to front (largest signed radius = farthest first) with
       the premultiplied *over* operator: ``C = B_k + (1 - A_k) C`` and
       ``Acc = A_k + (1 - A_k) Acc``. A defocused near layer thus spreads over what lies behind
       it, while a sharp near layer (``A_k`` exactly 0 or 1) keeps a crisp silhouette.
    4. ``C / Acc`` is returned: dividing by the accumulated coverage fills the holes the
       occluders leave in farther layers (no dark halos around a sharp foreground) and makes
       the zero-padded borders a normalised convolution (no dark frame). A flat image stays
       exactly flat.

    With ``dual_pixel`` the steps run twice with the half-aperture PSFs, giving the left and
    right sub-pixel views. Behind the focal plane (r > 0) the left view sees the *left* half
    of the aperture and the right view the right half; in front of it (r < 0) the image of
    the aperture is flipped, so they swap. This is what makes the defocus disparity change
    sign across the focal plane. Each view is normalised to full brightness.

    Parameters
    ----------
    linear : (H, W, 3) ndarray
        Linear-light image (may exceed 1).
    radius : (H, W) ndarray
        Signed blur radius per pixel (positive behind focus).
    layers : int
        Target number of depth layers (see :func:`layer_levels`).
    aperture, blades, rotation
        Aperture shape (see :func:`aperture_psf`).
    dual_pixel : bool
        Render the left and right views instead of the full-aperture image.

    Returns
    -------
    views : list of (H, W, 3) float32 ndarray
        ``[full]``, or ``[left, right]`` with ``dual_pixel``; their mean is the full-aperture
        image of a dual-pixel sensor (the centre view).
    """
    _check_render_inputs(linear, radius)
    h, w = radius.shape
    img = np.ascontiguousarray(np.asarray(linear, dtype=np.float32).transpose(2, 0, 1))  # 3xHxW
    levels = layer_levels(float(radius.min()), float(radius.max()), layers)
    lo, w_hi, used = layer_weights(radius, levels)
    n_views = 2 if dual_pixel else 1
    colour = [np.zeros((3, h, w), np.float32) for _ in range(n_views)]
    cover = [np.zeros((h, w), np.float32) for _ in range(n_views)]
    for k in range(len(levels) - 1, -1, -1):  # far to near
        if not used[k]:
            continue
        mask = np.where(lo == k, 1.0 - w_hi, 0.0).astype(np.float32)
        if k > 0:
            mask += np.where(lo == k - 1, w_hi, 0.0)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            continue
        r = float(levels[k])
        delta = abs(r) < _DELTA_RADIUS
        p = 0 if delta else int(math.ceil(abs(r))) + 1
        # Only the layer's bounding box grown by the PSF radius can change: convolve just that
        # (object layers are often small, and small radii need little padding).
        y0, y1 = max(int(rows[0]) - p, 0), min(int(rows[-1]) + 1 + p, h)
        x0, x1 = max(int(cols[0]) - p, 0), min(int(cols[-1]) + 1 + p, w)
        box = (slice(y0, y1), slice(x0, x1))
        bh, bw = y1 - y0, x1 - x0
        stack = np.empty((4, bh, bw), np.float32)
        stack[3] = mask[box]
        np.multiply(img[:, y0:y1, x0:x1], stack[3], out=stack[:3])
        if delta:
            outs = [stack] * n_views  # a delta PSF: no convolution, same for both views
        else:
            if dual_pixel:
                # Behind focus (r > 0): left view <- left half; in front: flipped.
                halves = ("left", "right") if r > 0 else ("right", "left")
                psfs = [aperture_psf(r, aperture=aperture, blades=blades, rotation=rotation, half=s)
                        for s in halves]
            else:
                psfs = [aperture_psf(r, aperture=aperture, blades=blades, rotation=rotation)]
            # >= p zero rows/cols after the box keep the circular FFT convolution linear.
            shape = (sfft.next_fast_len(max(bh + p, 2 * p + 1), real=True),
                     sfft.next_fast_len(max(bw + p, 2 * p + 1), real=True))
            spec = sfft.rfft2(stack, s=shape, workers=1)
            outs = [sfft.irfft2(spec * _kernel_spectrum(psf, shape), s=shape, workers=1,
                                overwrite_x=True)[:, :bh, :bw] for psf in psfs]
        for v, out in enumerate(outs):
            a = np.clip(out[3], 0.0, 1.0)  # FFT round-off can leave tiny negatives
            keep = 1.0 - a
            cv, av = colour[v][:, y0:y1, x0:x1], cover[v][box]
            cv *= keep
            cv += out[:3]
            av *= keep
            av += a
    result = []
    for v in range(n_views):
        c = colour[v] / np.maximum(cover[v], 1e-6)
        # Zero the float32 FFT round-off (~1e-7) where there is no light: the tone curve would
        # otherwise lift it to ~1e-4 in encoded values.
        c[c < 1e-6] = 0.0
        result.append(np.ascontiguousarray(c.transpose(1, 2, 0), dtype=np.float32))
    return result


def add_sensor_noise(linear: np.ndarray, sigma: float, rng: np.random.Generator, *,
                     gain: float = 1.0) -> np.ndarray:
    """Poisson-Gaussian sensor noise in linear light (Gaussian approximation), then clipping.

    The variance at level ``x`` is ``gain * sigma**2 * (0.9 * x + 0.1)``: mostly shot noise
    (grows with the signal) plus a read-noise floor, so the std at white (``x = 1``) is
    ``sigma``. A dual-pixel sub-pixel collects half the light and is normalised back by 2, so
    its views use ``gain = 2``; their mean then has the single-image noise. The result is
    clipped to ``[0, 1]`` (the sensor saturates; this also clips boosted highlights).
    """
    x = np.asarray(linear, dtype=np.float32)
    if sigma > 0:
        var = np.float32(gain * sigma * sigma) * (0.9 * np.clip(x, 0.0, None) + 0.1)
        x = x + np.sqrt(var) * rng.standard_normal(x.shape, dtype=np.float32)
    return np.clip(x, 0.0, 1.0)
