"""Synthesising one (sharp, defocused) training pair: :func:`synthesize`.

The pipeline, in order (each step is documented where it is implemented):

1. A signed blur-radius map: given, or from a depth map (given, or :func:`random_depth`)
   through the thin-lens model (:func:`defocus_radius`) with a random focus distance.
2. Decode the sharp photo to linear light (:func:`~kpac_cli.synth.optics.decode`).
3. Boost saturated highlights so they bloom (:func:`~kpac_cli.synth.optics.boost_highlights`).
4. Occlusion-aware, spatially varying defocus by depth-layer compositing with a disc or
   polygonal aperture PSF; half-aperture PSFs for dual-pixel views
   (:func:`~kpac_cli.synth.optics.render_defocus`).
5. Poisson-Gaussian sensor noise and clipping (:func:`~kpac_cli.synth.optics.add_sensor_noise`).
6. Re-encode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .optics import add_sensor_noise, boost_highlights, decode, encode, render_defocus
from .scenes import random_depth

__all__ = ["SynthSettings", "SynthSample", "synthesize", "defocus_radius", "as_float_rgb"]


@dataclass(frozen=True)
class SynthSettings:
    """How defocused pairs are synthesised.

    Attributes
    ----------
    max_radius : float
        Largest blur (circle of confusion) radius in pixels, at the output resolution. The
        signed radius map is clipped to ``[-max_radius, max_radius]``.
    min_radius : float
        Each sample's blur *strength* (the radius of its most defocused parts, see
        :func:`defocus_radius`) is drawn uniformly from ``[min_radius, max_radius]``. It does
        not stop parts of the image from being in focus.
    aperture : {'disc', 'polygon'}
        Aperture shape: a disc, or a regular polygon with ``blades`` sides (random rotation).
    blades : int
        Number of sides of the polygonal aperture.
    layers : int
        Number of depth layers of the compositing (more: finer blur steps, slower; cost is
        linear in it).
    noise_sigma : float
        Sensor noise std at white, in linear light (see
        :func:`~kpac_cli.synth.optics.add_sensor_noise`); 0 disables noise.
    highlight_boost : float
        Linear-light gain (>= 1) given to saturated pixels before blurring so they bloom; the
        result is clipped by the sensor afterwards. 1 disables it.
    dual_pixel : bool
        Also render the left and right dual-pixel views.
    gamma : float
        Exponent of the power-law tone curve between encoded and linear values.
    snap_depth : bool
        When a random depth map is drawn for a photo, snap its object silhouettes to the
        photo's superpixels so blur edges follow image edges (see
        :func:`~kpac_cli.synth.scenes.random_depth`; costs ~5 ms per sample).
    """

    max_radius: float = 12.0
    min_radius: float = 0.0
    aperture: str = "disc"
    blades: int = 6
    layers: int = 8
    noise_sigma: float = 0.005
    highlight_boost: float = 3.0
    dual_pixel: bool = False
    gamma: float = 2.2
    snap_depth: bool = True

    def __post_init__(self) -> None:
        if not (0.0 <= self.min_radius <= self.max_radius) or not math.isfinite(self.max_radius):
            raise ValueError(f"need 0 <= min_radius <= max_radius, got {self.min_radius}, {self.max_radius}")
        if self.aperture not in ("disc", "polygon"):
            raise ValueError(f"aperture must be 'disc' or 'polygon', got {self.aperture!r}")
        if self.blades < 3:
            raise ValueError(f"blades must be >= 3, got {self.blades}")
        if self.layers < 1:
            raise ValueError(f"layers must be >= 1, got {self.layers}")
        # NaN passes a plain comparison: noise would silently be off, a tone curve all NaN
        if not (math.isfinite(self.noise_sigma) and self.noise_sigma >= 0):
            raise ValueError(f"noise_sigma must be a number >= 0, got {self.noise_sigma}")
        if not (math.isfinite(self.highlight_boost) and self.highlight_boost >= 1):  # below 1 would do what 1 does: nothing
            raise ValueError(f"highlight_boost must be a number >= 1 (1: off), got {self.highlight_boost}")
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"gamma must be a number > 0, got {self.gamma}")


@dataclass
class SynthSample:
    """One synthetic pair.

    Attributes
    ----------
    sharp : (H, W, 3) ndarray of float32 in [0, 1]
        The sharp (all-in-focus, noise-free) target, encoded like a photo.
    blurred : (H, W, 3) ndarray of float32 in [0, 1]
        The defocused, noisy input, encoded. With dual-pixel views this is the centre view:
        ``decode(blurred) == (decode(left) + decode(right)) / 2`` (up to float round-off).
    radius : (H, W) ndarray of float32
        Signed blur radius in pixels of the surface seen at each pixel of ``sharp``: positive
        behind the focal plane, negative in front of it, 0 in focus. (Near a defocused
        foreground, a pixel of in-focus background has radius 0 yet is covered by the
        foreground's blur.)
    left, right : (H, W, 3) ndarray of float32 in [0, 1], or None
        Dual-pixel views (``settings.dual_pixel`` only): the images seen through the left and
        right halves of the aperture, each normalised to full brightness (so each is as bright
        as ``blurred``) and each with its own sensor noise (a sub-pixel gets half the light, so
        ``sqrt(2)`` times the relative noise; their mean has the noise of ``blurred``).
    info : dict
        What was drawn at random: ``focus`` (distance, None when ``radius`` was given),
        ``strength`` (pixels), ``rotation`` (aperture rotation, radians), ``depth`` ('given',
        'random' or None).
    """

    sharp: np.ndarray
    blurred: np.ndarray
    radius: np.ndarray
    left: np.ndarray | None = None
    right: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


def as_float_rgb(image: np.ndarray) -> np.ndarray:
    """An image as ``HxWx3`` float32 in [0, 1].

    Integer images are scaled by their dtype's maximum (wider-than-16-bit integers by 255 or
    65535, whichever their values fit), floats are clipped, booleans map to {0, 1}; grey
    (``HxW`` or ``HxWx1``) is replicated to 3 channels, an alpha channel is dropped
    (grey+alpha keeps the grey).
    """
    a = np.asarray(image)
    if a.dtype == bool:
        a = a.astype(np.float32)
    elif np.issubdtype(a.dtype, np.integer):
        top = np.iinfo(a.dtype).max
        if top > 65535:  # e.g. Pillow's 32-bit 'I' mode holding 8- or 16-bit data
            m = int(a.max()) if a.size else 0
            top = 255 if m <= 255 else 65535 if m <= 65535 else top
        a = a.astype(np.float32) / np.float32(top)
    else:
        a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected an HxW or HxWxC image with C in 1..4, got shape {a.shape}")
    if a.shape[2] in (1, 2):
        a = np.repeat(a[..., :1], 3, axis=2)
    elif a.shape[2] == 4:
        a = a[..., :3]
    return np.ascontiguousarray(np.clip(a, 0.0, 1.0), dtype=np.float32)


def defocus_radius(depth: np.ndarray, focus: float, strength: float, max_radius: float | None = None) -> np.ndarray:
    """Signed thin-lens blur radius from a depth map.

    For a thin lens focused at distance ``F``, a point at distance ``Z`` is imaged as a circle of
    confusion of radius ``k * |1/F - 1/Z|`` pixels, with ``k = A f F / (2 (F - f) p)`` for
    aperture diameter ``A``, focal length ``f`` and pixel pitch ``p``: the same ``k`` for every
    pixel. So the signed radius is ``k * (1/F - 1/Z)``: positive behind focus, negative in
    front, linear in inverse depth. ``k`` is set so that the 99.9th percentile of ``|radius|``
    equals ``strength`` (robust to a few outlier depths), then the map is clipped to
    ``+-max_radius`` (default ``strength``).

    Parameters
    ----------
    depth : (H, W) ndarray
        Distance from the camera (positive; larger = farther). Values are clipped below at
        1e-6 of the largest finite one; NaN (unknown) and infinite values are taken as the
        largest finite one.
    focus : float
        Focus distance, same unit as ``depth`` (``inf``: focused at infinity).
    strength : float
        Blur radius in pixels of the most defocused parts of the image.
    max_radius : float, optional
        Clip magnitude.

    Returns
    -------
    radius : (H, W) ndarray of float32
    """
    d = np.asarray(depth, dtype=np.float32)
    if d.ndim != 2:
        raise ValueError(f"depth must be HxW, got shape {d.shape}")
    finite = np.isfinite(d)
    top = float(d[finite].max()) if finite.any() else 0.0
    if top <= 0:
        raise ValueError("depth must contain positive finite distances")
    # NaN would turn the whole map into NaN radii, which no layer of the renderer can hold.
    if math.isnan(focus):
        raise ValueError("focus must be a distance (inf: focused at infinity), got nan")
    if not math.isfinite(strength) or (max_radius is not None and math.isnan(max_radius)):
        raise ValueError(f"strength and max_radius must be finite, got {strength}, {max_radius}")
    floor = 1e-6 * top
    if not finite.all():
        d = np.where(finite, d, np.float32(top))
    d = np.maximum(d, np.float32(floor))
    c = np.float32(1.0 / max(float(focus), floor)) - np.reciprocal(d)
    mag = np.abs(c).ravel()
    kth = int(0.999 * (mag.size - 1))
    ref = float(np.partition(mag, kth)[kth])  # ~99.9th percentile, without sorting
    if ref <= 1e-12 or strength <= 0:
        return np.zeros(d.shape, np.float32)
    lim = strength if max_radius is None else max_radius
    c *= np.float32(strength / ref)
    return np.clip(c, -lim, lim).astype(np.float32, copy=False)


def _focus_at_quantile(depth: np.ndarray, q: float) -> float:
    """The depth at quantile ``q`` of the map, unknown (NaN) depths left out.

    Infinite depths (sky) count as the farthest; a quantile that falls between two of them is
    infinity (focused at infinity), where numpy's interpolation would give NaN.
    """
    known = depth if not np.isnan(depth).any() else depth[~np.isnan(depth)]
    if known.size == 0:
        return math.nan  # defocus_radius says what is wrong with such a map
    with np.errstate(invalid="ignore"):  # inf - inf inside the interpolation
        focus = float(np.quantile(known, q))
    return math.inf if math.isnan(focus) else focus


def synthesize(sharp: np.ndarray, rng: np.random.Generator, settings: SynthSettings = SynthSettings(),
               depth: np.ndarray | None = None, *, radius: np.ndarray | None = None,
               focus: float | None = None) -> SynthSample:
    """Render a realistically defocused (and optionally dual-pixel) version of a sharp photo.

    Parameters
    ----------
    sharp : (H, W, 3) ndarray
        The sharp image, float in [0, 1] and encoded like a photo (integer and grey images are
        accepted, see :func:`as_float_rgb`).
    rng : numpy.random.Generator
        All randomness comes from it, in a fixed order: the same generator state, inputs and
        settings give identical arrays.
    settings : SynthSettings
        Optics, noise and tone-curve parameters.
    depth : (H, W) ndarray, optional
        Distance from the camera (positive, larger = farther; NaN where unknown, see
        :func:`defocus_radius`). When None, a random plausible depth map is drawn
        (:func:`~kpac_cli.synth.scenes.random_depth`).
    radius : (H, W) ndarray, optional
        Use this signed blur-radius map (pixels, positive behind focus) directly instead of
        a depth map; it is clipped to ``+-settings.max_radius``.
    focus : float, optional
        Focus distance (same unit as ``depth``). When None, the depth at a random quantile
        ``q = u**2`` (u uniform) of the map's known (not NaN) depths: photographers tend to
        focus on near subjects.

    Returns
    -------
    SynthSample

    Notes
    -----
    With a depth map, the blur strength (radius of the most defocused 0.1 %) is drawn
    uniformly in ``[settings.min_radius, settings.max_radius]`` and mapped through
    :func:`defocus_radius`. The target ``sharp`` is returned clean: no noise, no boost.
    Cost is dominated by two 4-channel FFTs per occupied depth layer (three with
    ``dual_pixel``).
    """
    s = settings
    img = as_float_rgb(sharp)
    h, w = img.shape[:2]
    info: dict[str, Any] = {"focus": None, "strength": None, "depth": None}
    if radius is not None:
        rad = np.asarray(radius, dtype=np.float32)
        if rad.shape != (h, w):
            raise ValueError(f"radius must be {h}x{w}, got shape {rad.shape}")
        rad = np.clip(np.nan_to_num(rad), -s.max_radius, s.max_radius).astype(np.float32)
    else:
        if depth is None:
            depth = random_depth((h, w), rng, image=img if s.snap_depth else None)
            info["depth"] = "random"
        else:
            depth = np.asarray(depth, dtype=np.float32)
            if depth.shape != (h, w):
                raise ValueError(f"depth must be {h}x{w}, got shape {depth.shape}")
            info["depth"] = "given"
        if focus is None:
            focus = _focus_at_quantile(depth, rng.random() ** 2)
        strength = float(rng.uniform(s.min_radius, s.max_radius))
        rad = defocus_radius(depth, focus, strength, s.max_radius)
        info.update(focus=float(focus), strength=strength)
    # Drawn even for a disc so that the noise that follows does not depend on the aperture.
    rotation = float(rng.uniform(0.0, 2.0 * math.pi / s.blades))
    info["rotation"] = rotation if s.aperture == "polygon" else 0.0

    linear = boost_highlights(decode(img, s.gamma), img, s.highlight_boost)
    views = render_defocus(linear, rad, layers=s.layers, aperture=s.aperture, blades=s.blades,
                           rotation=info["rotation"], dual_pixel=s.dual_pixel)
    if s.dual_pixel:
        left = add_sensor_noise(views[0], s.noise_sigma, rng, gain=2.0)
        right = add_sensor_noise(views[1], s.noise_sigma, rng, gain=2.0)
        centre = 0.5 * (left + right)
        return SynthSample(sharp=img, blurred=encode(centre, s.gamma), radius=rad,
                           left=encode(left, s.gamma), right=encode(right, s.gamma), info=info)
    blurred = add_sensor_noise(views[0], s.noise_sigma, rng)
    return SynthSample(sharp=img, blurred=encode(blurred, s.gamma), radius=rad, info=info)
