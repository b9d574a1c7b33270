"""Procedural content: random depth maps for photos, and dead-leaves scenes with their depth.

Depth convention: a depth map is ``HxW`` float32 *distance* from the camera (any unit,
strictly positive, larger = farther). Random geometry is built in inverse depth
("disparity"), because a plane in the scene is exactly a linear function of image position
there, and the defocus radius of a thin lens is linear in inverse depth too.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
import scipy.fft as sfft

__all__ = ["random_depth", "dead_leaves", "smooth_field", "pink_noise", "superpixels"]


def resize_scene(image: np.ndarray, depth: np.ndarray | None, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """A sharp scene (HWC float image) and its depth map (or None) resized to ``shape``: the
    image anti-aliased, the depth by nearest neighbour so occlusion edges stay sharp."""
    from skimage.transform import resize

    image = resize(image, shape, order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)
    if depth is not None:
        depth = resize(depth, shape, order=0, anti_aliasing=False, preserve_range=True).astype(np.float32)
    return image, depth


def scale_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """An RGB scene (HWC float in [0, 1], gamma-encoded) with its colours moved ``factor`` times
    as far from each pixel's grey (its Rec. 709 luma) as they were, clipped to [0, 1]: 1 leaves
    it unchanged, 0 makes it grey. Other channel counts are returned unchanged."""
    if image.ndim != 3 or image.shape[2] != 3:
        return image
    from ..images import luma

    grey = luma(image)
    return np.clip(grey[:, :, None] + np.float32(factor) * (image - grey[:, :, None]), 0.0, 1.0).astype(np.float32)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised coordinates: y in [-0.5, 0.5] top to bottom, x scaled by the same factor."""
    s = 1.0 / max(h, w)
    y = (np.arange(h, dtype=np.float32) - (h - 1) / 2) * s
    x = (np.arange(w, dtype=np.float32) - (w - 1) / 2) * s
    return y[:, None], x[None, :]


def smooth_field(shape: tuple[int, int], rng: np.random.Generator, *, waves: int = 6,
                 max_freq: float = 3.0) -> np.ndarray:
    """A smooth random field (sum of a few random plane waves), zero-mean, std ~1, float32.

    ``max_freq`` is in cycles per image size; cheap to evaluate at any size.
    """
    h, w = shape
    y, x = _grid(h, w)
    out = np.zeros((h, w), np.float32)
    for _ in range(waves):
        f = rng.uniform(0.3, max_freq)
        th = rng.uniform(0, 2 * math.pi)
        ph = rng.uniform(0, 2 * math.pi)
        # cos(a + b) = cos a cos b - sin a sin b: two outer products instead of HxW cosines.
        a = np.float32(2 * math.pi * f * math.cos(th)) * x
        b = np.float32(2 * math.pi * f * math.sin(th)) * y + np.float32(ph)
        out += np.cos(b) * np.cos(a) - np.sin(b) * np.sin(a)
    return out * np.float32(math.sqrt(2.0 / waves))


def pink_noise(shape: tuple[int, int], rng: np.random.Generator, beta: float = 2.0) -> np.ndarray:
    """Zero-mean, unit-std noise with power spectrum ``1 / f**beta`` (natural images: ~2)."""
    h, w = shape
    fy = sfft.fftfreq(h)[:, None]
    fx = sfft.rfftfreq(w)[None, :]
    f = np.sqrt(fy * fy + fx * fx)
    f[0, 0] = 1.0
    amp = (f ** (-beta / 2)).astype(np.float32)
    amp[0, 0] = 0.0
    spec = sfft.rfft2(rng.standard_normal((h, w), dtype=np.float32), workers=1) * amp
    out = sfft.irfft2(spec, s=(h, w), workers=1).astype(np.float32)
    return out / max(float(out.std()), 1e-8)


def _blob_mask(cy: float, cx: float, r: float, rng: np.random.Generator,
               y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A star-convex blob (radius modulated by a few angular harmonics), boolean HxW."""
    dy, dx = y - cy, x - cx
    theta = np.arctan2(dy, dx)
    edge = np.full_like(theta, r)
    for k in range(1, 5):
        edge += r * rng.uniform(0, 0.25 / k) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    aspect = rng.uniform(0.5, 2.0)  # elongate: people, trees, bottles, ...
    rho = np.sqrt(dy * dy / aspect + dx * dx * aspect)
    return rho < edge


def _box_mask(cy: float, cx: float, r: float, rng: np.random.Generator,
              y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A rotated rectangle (man-made objects), boolean HxW."""
    th = rng.uniform(0, math.pi)
    a, b = r * rng.uniform(0.4, 1.2), r * rng.uniform(0.4, 1.2)
    u = (x - cx) * math.cos(th) + (y - cy) * math.sin(th)
    v = -(x - cx) * math.sin(th) + (y - cy) * math.cos(th)
    return (np.abs(u) < a) & (np.abs(v) < b)


def superpixels(image: np.ndarray, *, work_side: int = 128, segments: int = 120) -> np.ndarray:
    """SLIC superpixel labels of ``image`` (HxW int), computed at a reduced size for speed.

    The image is resampled so its long side is at most ``work_side`` and the labels are
    scaled back by nearest neighbour, so label edges follow the image's strong edges to within
    ``long side / work_side`` pixels. Deterministic.
    """
    from skimage.segmentation import slic

    h, w = image.shape[:2]
    step = max(1.0, max(h, w) / work_side)
    sh, sw = max(1, round(h / step)), max(1, round(w / step))
    yi = np.minimum((np.arange(sh) * (h / sh) + 0.5 * h / sh).astype(np.intp), h - 1)
    xi = np.minimum((np.arange(sw) * (w / sw) + 0.5 * w / sw).astype(np.intp), w - 1)
    small = np.ascontiguousarray(image[yi][:, xi], dtype=np.float64)
    labels = slic(small, n_segments=segments, compactness=8.0, max_num_iter=5, start_label=0,
                  channel_axis=-1 if small.ndim == 3 else None)
    ys = np.minimum((np.arange(h) * (sh / h)).astype(np.intp), sh - 1)
    xs = np.minimum((np.arange(w) * (sw / w)).astype(np.intp), sw - 1)
    return np.ascontiguousarray(labels[ys][:, xs])


def random_depth(shape: tuple[int, int], rng: np.random.Generator, *, max_objects: int = 4,
                 image: np.ndarray | None = None) -> np.ndarray:
    """A random, plausible depth map: a tilted background plane plus nearer objects.

    * Background: a plane in inverse depth ``d = d0 + gx x + gy y`` (usually nearer at the
      bottom, like the ground or a table), with a little smooth unevenness.
    * Objects: 0..``max_objects`` blobs or rotated boxes, each nearer than the background
      behind it, with a small tilt of its own. Their silhouettes are sharp depth
      discontinuities (occlusion boundaries); where objects overlap, the nearer one wins.
      Some objects are "standing": their silhouette continues to the bottom edge.
    * With ``image``, each object's silhouette is snapped to the image's superpixels
      (:func:`superpixels`: a superpixel joins the object when the random shape covers more
      than half of it), so depth edges, and hence blur edges, run along the photo's own
      edges as they do in a real photo, rather than cutting through a face or a wall.

    Parameters
    ----------
    shape : (H, W)
        Size of the map.
    rng : numpy.random.Generator
        Source of randomness (the map is a deterministic function of its state).
    max_objects : int
        Upper bound on the number of objects.
    image : (H, W, 3) ndarray, optional
        The photo the map is for; its edges guide the object silhouettes.

    Returns
    -------
    depth : (H, W) ndarray of float32
        Distance from the camera (positive, larger = farther; the unit is arbitrary).
    """
    h, w = shape
    y, x = _grid(h, w)
    d0 = rng.uniform(0.05, 0.4)
    gy = d0 * rng.uniform(-0.2, 1.5)
    gx = d0 * rng.uniform(-0.5, 0.5)
    disp = d0 + gy * y + gx * x + (0.08 * d0) * smooth_field((h, w), rng, waves=4, max_freq=2.0)
    disp = np.maximum(disp, 0.2 * d0).astype(np.float32)
    n_obj = int(rng.integers(0, max_objects + 1))
    scale = max(h, w)
    labels = seg_size = None
    if image is not None and n_obj > 0:
        if image.shape[:2] != (h, w):
            raise ValueError(f"image {image.shape[:2]} does not match the depth map {shape}")
        labels = superpixels(image)
        seg_size = np.bincount(labels.ravel())
    for _ in range(n_obj):
        cy, cx = rng.uniform(-0.4, 0.4), rng.uniform(-0.45, 0.45) * w / scale
        r = rng.uniform(0.06, 0.3)
        blob = rng.random() < 0.6
        standing = rng.random() < 0.35  # standing on the ground: extends down to the bottom edge
        # Work in the object's bounding box (shapes reach at most ~2.2 r from their centre).
        ext = 2.3 * r * scale
        py, px = cy * scale + (h - 1) / 2, cx * scale + (w - 1) / 2
        y0, y1 = max(int(py - ext), 0), h if standing else min(int(py + ext) + 2, h)
        x0, x1 = max(int(px - ext), 0), min(int(px + ext) + 2, w)
        if y0 >= y1 or x0 >= x1:
            continue
        yb, xb = y[y0:y1], x[:, x0:x1]
        mask = _blob_mask(cy, cx, r, rng, yb, xb) if blob else _box_mask(cy, cx, r, rng, yb, xb)
        if standing:
            mask |= (np.abs(xb - cx) < r * rng.uniform(0.3, 0.8)) & (yb > cy)
        if not mask.any():
            continue
        if labels is not None:
            inside = np.bincount(labels[y0:y1, x0:x1][mask], minlength=seg_size.size)
            keep = inside > 0.5 * seg_size
            if keep.any():
                full = keep[labels]
                rows, cols = np.flatnonzero(full.any(axis=1)), np.flatnonzero(full.any(axis=0))
                y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
                yb, xb, mask = y[y0:y1], x[:, x0:x1], full[y0:y1, x0:x1]
        sub = disp[y0:y1, x0:x1]
        near = float(sub[mask].max()) * rng.uniform(1.3, 6.0)
        tilt_y, tilt_x = near * rng.uniform(-0.3, 0.3), near * rng.uniform(-0.3, 0.3)
        obj = (near + tilt_y * (yb - cy) + tilt_x * (xb - cx)).astype(np.float32)
        sub[mask] = np.maximum(sub, obj)[mask]
    return (1.0 / disp).astype(np.float32)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """An encoded RGB colour with natural-image-like statistics (mostly muted, some vivid)."""
    hue = rng.random()
    sat = 0.9 * rng.random() ** 1.7
    val = 0.06 + 0.78 * rng.random() ** 0.8  # leaves headroom: only explicit lights clip
    return np.array(colorsys.hsv_to_rgb(hue, sat, val), np.float32)


def dead_leaves(size: tuple[int, int], rng: np.random.Generator, *, return_depth: bool = False,
                min_leaf: float = 4.0, max_leaf: float | None = None, coverage: float = 3.0,
                texture: bool = True, highlights: float = 0.02):
    """A procedural sharp scene with natural-image statistics: the textured dead-leaves model.

    Opaque shapes ("leaves": discs, rotated rectangles and polygons) with radii distributed as
    ``r**-3`` between ``min_leaf`` and ``max_leaf`` are painted back to front over a textured
    background. The ``r**-3`` law makes the scene scale invariant, with the ``1/f**2`` power
    spectrum and the occlusion edges of natural images, which is why it is a standard proxy
    for photos in camera and deblurring work. Leaves carry a colour, a shading gradient and
    (``texture``) a ``1/f`` or striped texture, so there is detail at every scale for a blur to
    destroy; a fraction ``highlights`` of the small leaves are saturated light sources (1.0),
    which bloom into bokeh discs when defocused. Edges are anti-aliased.

    Depth is consistent with occlusion: every leaf is nearer than everything painted before
    it. Depths come in a few clusters (a scene has a handful of "planes" of objects), drawn
    in inverse depth, and the background is the farthest.

    Parameters
    ----------
    size : (H, W)
        Output size.
    rng : numpy.random.Generator
        Source of randomness (the scene is a deterministic function of its state).
    return_depth : bool
        Also return the depth map.
    min_leaf, max_leaf : float
        Range of leaf radii in pixels; ``max_leaf`` defaults to a quarter of the short side.
    coverage : float
        Total leaf area as a multiple of the image area (3 leaves little background visible).
    texture : bool
        Texture the leaves and background (otherwise flat shading only).
    highlights : float
        Probability that a small leaf is a saturated light source.

    Returns
    -------
    image : (H, W, 3) ndarray of float32 in [0, 1]
        The scene, encoded like a photo.
    depth : (H, W) ndarray of float32
        Only with ``return_depth``: distance from the camera, positive, larger = farther.
    """
    h, w = int(size[0]), int(size[1])
    rmin = float(min_leaf)
    rmax = float(max_leaf) if max_leaf is not None else max(rmin * 1.5, 0.25 * min(h, w))
    # Expected leaf area for p(r) ~ r^-3 on [rmin, rmax] -> number of leaves for the coverage.
    mean_area = math.pi * math.log(rmax / rmin) / (0.5 * (rmin ** -2 - rmax ** -2))
    n = max(1, int(round(coverage * h * w / mean_area)))
    # Inverse-CDF sampling of r^-3.
    u = rng.random(n)
    radii = (rmin ** -2 - u * (rmin ** -2 - rmax ** -2)) ** -0.5
    cys = rng.uniform(-rmax, h + rmax, n)
    cxs = rng.uniform(-rmax, w + rmax, n)
    # Inverse depth of each leaf: a few clusters, then sorted so later leaves are nearer.
    n_clusters = int(rng.integers(2, 6))
    centres = np.sort(rng.uniform(0.1, 1.0, n_clusters))
    disp = centres[rng.integers(0, n_clusters, n)] * np.exp(rng.normal(0, 0.05, n))
    disp.sort()
    bg_disp = 0.5 * min(float(disp[0]), float(centres[0]))

    tex = [pink_noise((h, w), rng, beta=b) for b in (1.6, 2.4)] if texture else []
    img = np.empty((h, w, 3), np.float32)
    ys, xs = _grid(h, w)
    bg_a, bg_b = _random_colour(rng), _random_colour(rng)
    t = np.clip(0.5 + 1.5 * (ys * math.cos(rng.uniform(0, 6.3)) + xs * math.sin(rng.uniform(0, 6.3))), 0, 1)
    img[:] = bg_a * (1 - t[..., None]) + bg_b * t[..., None]
    if texture:
        img *= (1.0 + 0.15 * tex[1])[..., None]
    depth_disp = np.full((h, w), bg_disp, np.float32)

    for i in range(n):
        r, cy, cx = float(radii[i]), float(cys[i]), float(cxs[i])
        y0, y1 = max(int(cy - r - 1), 0), min(int(cy + r + 2), h)
        x0, x1 = max(int(cx - r - 1), 0), min(int(cx + r + 2), w)
        if y0 >= y1 or x0 >= x1:
            continue
        yy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
        xx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
        kind = rng.random()
        if kind < 0.6:  # disc
            sdist = np.sqrt(yy * yy + xx * xx) - r
        elif kind < 0.85:  # rotated rectangle
            th = rng.uniform(0, math.pi)
            c, s = np.float32(math.cos(th)), np.float32(math.sin(th))
            a, b = r, r * rng.uniform(0.3, 1.0)
            sdist = np.maximum(np.abs(xx * c + yy * s) - a, np.abs(-xx * s + yy * c) - b)
        else:  # regular polygon
            m = int(rng.integers(3, 8))
            ang = rng.uniform(0, 2 * math.pi) + np.arange(m) * (2 * math.pi / m)
            proj = xx[..., None] * np.cos(ang) + yy[..., None] * np.sin(ang)
            sdist = proj.max(axis=-1) - r * math.cos(math.pi / m)
        alpha = np.clip(0.5 - sdist, 0.0, 1.0).astype(np.float32)
        if not alpha.any():
            continue
        if r < 2.5 * rmin and rng.random() < highlights:
            colour = np.ones((y1 - y0, x1 - x0, 3), np.float32)  # a light source: saturated
        else:
            base = _random_colour(rng)
            g = rng.normal(0, 0.25, 2).astype(np.float32) / max(r, 1.0)  # shading across the leaf
            shade = 1.0 + g[0] * yy + g[1] * xx
            if texture:
                which = rng.random()
                amp = np.float32(rng.uniform(0.0, 0.35))
                if which < 0.7:
                    shade = shade + amp * tex[int(rng.integers(0, 2))][y0:y1, x0:x1]
                else:  # stripes / fabric / fences: strong oriented high frequencies
                    th, period = rng.uniform(0, math.pi), rng.uniform(2.5, 12.0)
                    phase = np.float32(2 * math.pi / period) * (xx * math.cos(th) + yy * math.sin(th))
                    shade = shade + amp * np.sin(phase)
            colour = np.clip(base * shade[..., None], 0.0, 1.0)
        a3 = alpha[..., None]
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1.0 - a3) + colour * a3
        depth_disp[y0:y1, x0:x1][alpha >= 0.5] = disp[i]
    img = np.clip(img, 0.0, 1.0)
    if return_depth:
        return img, (1.0 / depth_disp).astype(np.float32)
    return img
