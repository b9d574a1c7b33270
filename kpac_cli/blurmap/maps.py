"""Scale-attention maps of a KPAC model, brought to the image grid; blur-size estimate; masks.

Every KPAC block computes, per pixel of its low-resolution feature map (1/stride of the
network input), one sigmoid weight per dilation rate: the *scale attention* alpha (paper
Sec. 4.2). Map ``i`` weighs the atrous branch of dilation ``config.dilations[i]``, i.e. the
inverse kernel at that scale. The paper (Fig. 6 and 8, Appendix F) reads them as a blur
detector: the dilation-1 map of the first block responds to blur of almost any size, the
dilation-5 map only to large blur.

Conventions
-----------
* Maps are float32 in ``[0, 1]``, shaped like the image (``H x W``), with no polarity change:
  a value is the attention weight itself. Whether a high weight means "blurred" depends on
  the trained model; :data:`BLUR_POLARITY` states what we measured and
  :meth:`AttentionMaps.detection` can flip it.
* Blocks and dilations are addressed by *block number* (1-based, as in the paper) and by
  *dilation rate* (the value, e.g. 1..5), never by array index.
* Geometry: the low-resolution cell ``i`` of a model with total stride ``s`` is centred on
  network-input pixel ``s*i + s - 1`` (each stride-2 convolution reads inputs ``2i..2i+2``;
  every other layer is centred). Maps are resampled to the image with bilinear
  interpolation on exactly that grid (edge cells are extended), so a sharp/blurred boundary
  stays where it is in the image instead of drifting by ``(s-1)/2`` pixels.
* ``upsample = f > 1`` (the trick of the paper's Appendix F) enlarges the input ``f`` times
  (bicubic, half-pixel centres) before the model sees it, so that the blur of small photos
  falls into the range of the atrous dilations; the maps are then brought back to the
  original ``H x W``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from ..images.exif import apply_orientation, oriented_size

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import Deblurrer
    from ..model import KPACConfig

#: What a high dilation-1 weight means unless the model says otherwise: ``"blurred"`` (the
#: paper's reading; see the package docstring for what has been measured). A checkpoint can
#: declare ``"blurmap_polarity": "sharp"`` in its provenance when its attention learned the
#: other way round; ``invert=True`` (``--invert``) flips it by hand.
BLUR_POLARITY = "blurred"
POLARITIES = ("blurred", "sharp")

__all__ = [
    "AttentionMaps",
    "BLUR_POLARITY",
    "POLARITIES",
    "attention_maps",
    "blur_mask",
    "defocus_map",
    "maps_from_attention",
    "model_polarity",
    "resample_to_image",
]


def _axis_weights(n_out: int, n_in: int, stride: int, upsample: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps (i0, i1, w1) for one axis: out[y] = (1-w1)*low[i0] + w1*low[i1].

    Image pixel ``y`` sits at network-input coordinate ``(y + 0.5) * f - 0.5`` and the
    low-resolution cell ``i`` at ``s*i + s - 1``; coordinates outside the cell range are
    clamped (the edge cells are extended).
    """
    y = np.arange(n_out, dtype=np.float64)
    u = ((y + 0.5) * upsample - 0.5 - (stride - 1)) / stride
    u = np.clip(u, 0.0, n_in - 1)
    i0 = np.floor(u).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (u - i0).astype(np.float32)
    return i0, i1, w1


def resample_to_image(low: np.ndarray, size: tuple[int, int], stride: int, upsample: int = 1) -> np.ndarray:
    """Bilinear resampling of low-resolution maps ``(..., h, w)`` to ``(..., H, W)`` = ``size``.

    ``stride`` is the model's total stride (``config.stride``), ``upsample`` the factor the
    input was enlarged by before the model ran. The result is float32; it stays within the
    range of the input values (bilinear weights are convex).
    """
    low = np.asarray(low, dtype=np.float32)
    H, W = size
    y0, y1, wy = _axis_weights(H, low.shape[-2], stride, upsample)
    x0, x1, wx = _axis_weights(W, low.shape[-1], stride, upsample)
    rows = low[..., y0, :] * (1 - wy)[:, None] + low[..., y1, :] * wy[:, None]  # (..., H, w)
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


@dataclass
class AttentionMaps:
    """The scale attention of every KPAC block for one image.

    Holds the maps at the model's resolution and resamples on request, so a large photo
    does not carry ``blocks x dilations`` full-size arrays around.

    Attributes
    ----------
    low_res : list of ndarray
        Per block, ``(len(dilations), h, w)`` float32 sigmoid weights on the model's grid
        (``h = ceil(H*upsample/stride)``).
    dilations : tuple of int
        Dilation rate of each map (map ``i`` <-> ``dilations[i]``).
    size : (int, int)
        ``(H, W)`` of the image the maps describe.
    stride : int
        Total stride of the model (4 for 2 levels, 8 for 3).
    upsample : int
        Factor the input was enlarged by before inference (1 = none).
    polarity : {"blurred", "sharp"}
        What a high weight means for this model (see :data:`BLUR_POLARITY`).
    orientation : int
        The EXIF orientation (1-8) that turns the model's grid upright: a dual-pixel model
        runs on views as the sensor stored them (:attr:`InferenceResult.orientation`). The
        maps are resampled on that grid, where each cell has its place, then turned; ``size``
        is the upright size.
    """

    low_res: list[np.ndarray]
    dilations: tuple[int, ...]
    size: tuple[int, int]
    stride: int
    upsample: int = 1
    polarity: str = BLUR_POLARITY
    orientation: int = 1
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.polarity not in POLARITIES:
            raise ValueError(f"polarity must be one of {POLARITIES}, got {self.polarity!r}")

    @property
    def blocks(self) -> int:
        return len(self.low_res)

    def _resampled(self, low: np.ndarray) -> np.ndarray:
        """``(..., h, w)`` maps on the model's grid -> ``(..., H, W)``, upright."""
        H, W = self.size
        out = resample_to_image(low, oriented_size(H, W, self.orientation), self.stride, self.upsample)
        if self.orientation == 1:
            return out
        turned = apply_orientation(np.moveaxis(out, (-2, -1), (0, 1)), self.orientation)
        return np.ascontiguousarray(np.moveaxis(turned, (0, 1), (-2, -1)))

    def _index(self, block: int, dilation: int) -> tuple[int, int]:
        if not 1 <= block <= self.blocks:
            raise ValueError(f"block must be 1..{self.blocks} (this model has {self.blocks} KPAC blocks), got {block}")
        if dilation not in self.dilations:
            raise ValueError(f"dilation must be one of {list(self.dilations)}, got {dilation}")
        return block - 1, self.dilations.index(dilation)

    def map(self, block: int = 1, dilation: int = 1) -> np.ndarray:
        """One attention map, ``H x W`` float32 in [0, 1]."""
        b, i = self._index(block, dilation)
        return self._resampled(self.low_res[b][i])

    def block(self, block: int = 1) -> np.ndarray:
        """All maps of one block, ``(len(dilations), H, W)``."""
        b, _ = self._index(block, self.dilations[0])
        return self._resampled(self.low_res[b])

    def detection(self, block: int = 1, dilation: int = 1, invert: bool = False) -> np.ndarray:
        """The blur-detection map, higher = more likely blurred: the attention map itself,
        or ``1 - map`` when the model's :attr:`polarity` is ``"sharp"``; ``invert`` flips
        that choice once more."""
        m = self.map(block, dilation)
        return 1.0 - m if (self.polarity == "sharp") != invert else m

    def defocus(self, block: int = 1) -> np.ndarray:
        """Blur-size estimate of one block at image size: see :func:`defocus_map`.

        Computed exactly as :func:`defocus_map` of :meth:`block`, but cheaply: resampling is
        linear, so the weighted sum and the sum of weights are resampled from the model's
        grid and divided at the end.
        """
        b, _ = self._index(block, self.dilations[0])
        a = self.low_res[b].astype(np.float64)
        d = np.asarray(self.dilations, dtype=np.float64)[:, None, None]
        num = self._resampled((a * d).sum(0))
        den = self._resampled(a.sum(0))
        return _ratio(num, den, self.dilations)

    def items(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(block, dilation, H x W map)`` for every map, block-major."""
        for b in range(1, self.blocks + 1):
            for d in self.dilations:
                yield b, d, self.map(b, d)


def _ratio(num: np.ndarray, den: np.ndarray, dilations: Sequence[int]) -> np.ndarray:
    # Where every weight is (numerically) zero the estimate is undefined: report the mean
    # dilation there, the value of an all-equal weighting, rather than NaN.
    neutral = float(np.mean(dilations))
    ok = den > 1e-12
    out = np.full(np.shape(num), neutral, dtype=np.float64)
    np.divide(num, den, out=out, where=ok)
    return np.clip(out, min(dilations), max(dilations)).astype(np.float32)


def defocus_map(maps: np.ndarray, dilations: Sequence[int]) -> np.ndarray:
    """Per-pixel blur-size estimate: the attention-weighted mean dilation of one block.

    ``sum_i alpha_i * d_i / sum_i alpha_i`` over the block's maps ``alpha_i`` (``maps[i]``
    weighs dilation ``dilations[i]``). It is a *relative* blur-size indicator in units of
    dilation rates (between ``min(dilations)`` and ``max(dilations)``), not a calibrated
    circle-of-confusion radius: a pixel whose large-dilation branches get more weight is
    read as more defocused. Pixels where all weights are zero get the mean dilation.

    Parameters
    ----------
    maps : ndarray, shape (n, H, W)
        Attention maps of one block (e.g. :meth:`AttentionMaps.block`).
    dilations : sequence of int
        The ``n`` dilation rates.
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3 or maps.shape[0] != len(dilations):
        raise ValueError(f"maps must be (len(dilations)={len(dilations)}, H, W), got {maps.shape}")
    d = np.asarray(dilations, dtype=np.float64)[:, None, None]
    return _ratio((maps * d).sum(0), maps.sum(0), dilations)


def blur_mask(map: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Binary blur mask: ``map >= threshold`` (bool, same shape).

    ``map`` is a detection map whose high values mean "blurred" (see
    :meth:`AttentionMaps.detection`).
    """
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    return np.asarray(map) >= threshold


def model_polarity(deblurrer: Any) -> str:
    """The polarity a model declares (``provenance["blurmap_polarity"]``), else the default."""
    value = (getattr(deblurrer, "provenance", None) or {}).get("blurmap_polarity", BLUR_POLARITY)
    return value if value in POLARITIES else BLUR_POLARITY


def maps_from_attention(
    scale_attention: Sequence[Any],
    size: tuple[int, int],
    config: "KPACConfig",
    upsample: int = 1,
    polarity: str = BLUR_POLARITY,
    orientation: int = 1,
) -> AttentionMaps:
    """Wrap the ``scale_attention`` of an inference result (tensors ``(1, n, h', w')`` on the
    padded grid, or arrays ``(n, h, w)``) as :class:`AttentionMaps` for an ``H x W`` image.

    The maps must lie on the grid the model ran on, as :meth:`Deblurrer.run` leaves them
    (with its result's ``orientation``). :meth:`Deblurrer.scale_attention` of a dual-pixel
    model given an ``orientation`` other than 1 returns them turned upright, where a partial
    edge cell may have moved to the first row or column: use :func:`attention_maps` instead.

    ``upsample`` is the factor the image was enlarged by before that inference (1 when the
    result comes from a plain deblurring run); ``polarity`` what a high weight means for the
    model (:func:`model_polarity`); ``orientation`` the result's
    (:attr:`InferenceResult.orientation`).
    """
    H, W = size
    s = config.stride
    gh, gw = oriented_size(H, W, orientation)  # the grid the model ran on
    hh, ww = -(-gh * upsample // s), -(-gw * upsample // s)
    low = []
    for a in scale_attention:
        if a is None:
            raise ValueError("this model has no scale attention (built with scale_attention=False)")
        arr = a.detach().float().cpu().numpy() if hasattr(a, "detach") else np.asarray(a, dtype=np.float32)
        if arr.ndim == 4:
            arr = arr[0]
        low.append(np.ascontiguousarray(arr[:, :hh, :ww], dtype=np.float32))
    if not low:
        raise ValueError("no scale attention given (run the model with keep_attention=True)")
    return AttentionMaps(low, tuple(config.dilations), (int(H), int(W)), s, int(upsample), polarity, int(orientation))


def _enlarge(image: np.ndarray, factor: int) -> np.ndarray:
    """Bicubic enlargement by an integer factor (half-pixel centres), clipped to [0, 1]."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    t = F.interpolate(t, scale_factor=factor, mode="bicubic", align_corners=False)
    return t[0].permute(1, 2, 0).clamp_(0, 1).numpy()


def attention_maps(
    deblurrer: "Deblurrer",
    image: np.ndarray,
    center: np.ndarray | None = None,
    upsample: int = 1,
    orientation: int = 1,
) -> AttentionMaps:
    """Scale-attention maps of every block for one image, on the image's ``H x W`` grid.

    Parameters
    ----------
    deblurrer : Deblurrer
        The loaded model (any device, precision and tiling: tiling leaves the maps unchanged).
    image : ndarray
        ``H x W x 3`` RGB in [0, 1] (``H x W x 6``, left then right view, for dual-pixel
        models).
    center : ndarray, optional
        Centre view of a dual-pixel image (``H x W x 3``).
    upsample : int
        Enlarge the input this many times before inference (the paper's Appendix F); the
        maps are returned at the original size.
    orientation : int
        EXIF orientation the image was turned upright by when read
        (``ImageInfo.orientation_applied``): a dual-pixel model runs in the sensor's frame
        (see :meth:`~kpac_cli.engine.Deblurrer.run`), and its maps are turned upright.
    """
    upsample = int(upsample)
    if upsample < 1:
        raise ValueError(f"upsample must be a positive integer, got {upsample}")
    H, W = image.shape[:2]
    if upsample > 1:
        image = _enlarge(image, upsample)
        center = None if center is None else _enlarge(center, upsample)
    result = deblurrer.run(image, center, keep_attention=True, orientation=orientation)
    maps = maps_from_attention(result.scale_attention, (H, W), deblurrer.config, upsample, model_polarity(deblurrer), result.orientation)
    maps.meta.update(model=getattr(deblurrer, "name", "model"), precision=getattr(deblurrer.last_stats, "precision", None))
    return maps
