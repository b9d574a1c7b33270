"""Exact tiled inference.

Whole-image output and tiled output are the same function of the image (up to float
rounding, ~1e-6): tiling is an implementation detail, never an approximation. How:

1. The image is padded once to a multiple of the encoder stride (reflect padding at the
   bottom/right; cropped off at the end).
2. **Encoder pass**: the encoder runs tile by tile, each tile widened by a halo that covers
   the encoder's receptive field, and only the low-resolution encoder output (1/stride of
   the image in each direction) is kept.
3. **Bottleneck**, on the low-resolution map: each KPAC block in turn, tile by tile with a
   halo covering the block's receptive field (:func:`bottleneck_halos`), given the spatial
   mean of its whole input (shape attention's mean, the network's only global operation).
   The outputs of all blocks but the last are kept whole (the next block and the dense
   concat read them); the last block runs in the dense-concat convolutions' tiles, widened
   by both halos, and feeds them directly. Only one tile's branch activations exist at a
   time (:func:`bottleneck_tile`). A map no larger than one widened tile runs whole.
4. **Decoder pass**: per tile, with a halo covering the decoder's receptive field, the
   decoder combines the encoder's skip features for the widened tile with the matching
   slice of the bottleneck output; the tile's interior is kept. Skip features are either
   kept from the encoder pass (whole-image maps, as memory allows; the deepest first, as
   they are the smallest) or recomputed for the widened tile.

Tiles and halos are multiples of the stride, so every stride-2 layer samples the same grid
as it does on the whole image, and zero padding appears only at the true image border.
Peak memory is bounded by one widened tile's activations plus the low-resolution maps (the
encoder output, the outputs of all blocks but the last, the bottleneck output:
:func:`low_resolution_bytes`) and the kept skip maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model import KPACNet
from ..model.config import KPACConfig
from ..model.network import spatial_mean

#: progress(stage, done, total); stages: "encode", "attention", "decode"
ProgressFn = Callable[[str, int, int], None]


def _back_same(iv: tuple[int, int], r: int) -> tuple[int, int]:
    return iv[0] - r, iv[1] + r


def _back_stride2(iv: tuple[int, int]) -> tuple[int, int]:
    # 3x3, stride 2, padded 0 before / 1 after: output i reads inputs 2i .. 2i+2
    return 2 * iv[0], 2 * iv[1] + 2


def _back_upconv(iv: tuple[int, int]) -> tuple[int, int]:
    # 4x4, stride 2, padding 1: input i writes outputs 2i-1 .. 2i+2
    return -((2 - iv[0]) // 2), (iv[1] + 1) // 2


def _back_encoder(iv: tuple[int, int], level: int) -> tuple[int, int]:
    """Image interval that encoder features at ``level`` (0 = f1, full resolution) read."""
    for lv in range(level, 0, -1):
        iv = _back_stride2(_back_same(iv, 1))  # c*_2 (3x3), then the stride-2 conv
    return _back_same(_back_same(iv, 1), 2)  # c0_2 (3x3), c0 (5x5)


def receptive_halos(config: KPACConfig) -> tuple[int, int]:
    """Exact halos (full-resolution pixels, rounded up to the stride) of the two tiled passes.

    Computed by propagating an index interval back through every layer: a same-padded
    k x k convolution widens it by (k-1)/2, a stride-2 convolution maps output i to inputs
    2i..2i+2, a stride-2 transposed convolution maps output o to inputs (o-2)/2..(o+1)/2.
    The encoder halo makes a tile's low-resolution encoder output exact; the decoder halo
    makes the tile's output exact given the bottleneck features (a whole low-resolution map,
    computed first: see :func:`bottleneck_halos`).
    """
    s, levels = config.stride, config.levels
    tile = 4 * s  # any multiple of the stride gives the same halo (shift equivariance)
    lo, hi = _back_encoder((0, tile // s - 1), levels)
    encoder_halo = max(-lo, hi - (tile - 1))

    need_lo, need_hi = 0, tile - 1
    iv = _back_same((0, tile - 1), 2)  # d2_2 (5x5) reads [d2, f1]
    for level in range(levels):
        f_lo, f_hi = _back_encoder(iv, level)
        need_lo, need_hi = min(need_lo, f_lo), max(need_hi, f_hi)
        iv = _back_upconv(iv)  # the transposed conv that produced this level's upsampled half
        if level < levels - 1:
            iv = _back_same(iv, 1)  # d*_2 (3x3) of the next level down
    # iv is now the interval of bottleneck cells the decoder reads; slicing by cells of s pixels
    need_lo, need_hi = min(need_lo, iv[0] * s), max(need_hi, (iv[1] + 1) * s - 1)
    decoder_halo = max(-need_lo, need_hi - (tile - 1))
    return math.ceil(encoder_halo / s) * s, math.ceil(decoder_halo / s) * s


def bottleneck_halos(config: KPACConfig) -> tuple[int, int]:
    """Exact halos, in cells of the low-resolution map, of one KPAC block and of the merge.

    A block's output cell reads its input within the wider of the atrous branches (a k x k
    kernel at the largest dilation d reads (k-1)/2 * d cells each way) and the scale-attention
    stack (four 5x5 convolutions at dilation 2, then a 5x5: 4 * 4 + 2 cells), plus one cell
    for the 3x3 fusion convolution. The merge is two 3x3 convolutions (cm_1, cm_2).
    """
    branches = (config.kernel_size - 1) // 2 * max(config.dilations)
    scale = 4 * 4 + 2 if config.scale_attention else 0
    return max(branches, scale) + 1, 2


def bottleneck_tile(tile: int, config: KPACConfig) -> int:
    """Tile side, in low-resolution cells, of the tiled bottleneck when the image runs in
    ``tile``-pixel tiles: the side whose widened working set matches a widened pixel tile's.

    A KPAC block needs about twice the memory per cell that the whole network needs per pixel
    (measured: 1.2 vs 0.76 KB on the CPU fast path, 3.1 vs 1.3 KB on the plain path), so the
    widened side is the widened tile's over the square root of two.
    """
    pixel_halo, (block_halo, _) = max(receptive_halos(config)), bottleneck_halos(config)
    return max(16, int((tile + 2 * pixel_halo) / math.sqrt(2)) - 2 * block_halo)


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Pad bottom/right to a multiple (reflect where the image is large enough, else replicate)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


@dataclass(frozen=True)
class Tile:
    y0: int
    y1: int
    x0: int
    x1: int  # the tile's own region
    iy0: int
    iy1: int
    ix0: int
    ix1: int  # the region it reads: own region + halo, inside the image (see plan_tiles)


def plan_tiles(height: int, width: int, tile: int, halo: int, static: bool = False) -> list[Tile]:
    """Tiles of ``tile`` pixels covering the image, each reading its own region plus ``halo``.

    With ``static`` every tile reads a region of the same size, ``min(tile + 2 halo, side)``:
    a border tile's region is shifted inward instead of clipped (it reads more than it needs,
    which changes nothing), so that compiled kernels and CUDA graphs see one shape.
    """
    def span(a0: int, a1: int, side: int) -> tuple[int, int]:
        if not static:
            return max(0, a0 - halo), min(side, a1 + halo)
        size = min(side, tile + 2 * halo)
        start = min(max(0, a0 - halo), side - size)
        return start, start + size

    tiles = []
    for y0 in range(0, height, tile):
        for x0 in range(0, width, tile):
            y1, x1 = min(y0 + tile, height), min(x0 + tile, width)
            (iy0, iy1), (ix0, ix1) = span(y0, y1, height), span(x0, x1, width)
            tiles.append(Tile(y0, y1, x0, x1, iy0, iy1, ix0, ix1))
    return tiles


@dataclass
class InferenceResult:
    output: Tensor  # (1, 3, H, W) float32 on the CPU, unclipped, in [-1, 1] units
    scale_attention: list[Tensor | None] = field(default_factory=list)  # per block, (1, n, H/stride', W/stride') padded grid
    # the EXIF orientation that turns scale_attention upright: a dual-pixel model runs in the
    # sensor's frame (Deblurrer.run), and its maps are resampled there before they are turned
    orientation: int = 1


def tile_that_runs(tile: float | None, height: int, width: int, stride: int) -> int | None:
    """The tile side a run of a ``height`` x ``width`` image with ``tile`` uses: an int rounded
    down to the stride, or None (the whole image at once) for ``None`` or 0, as
    :class:`~kpac_cli.engine.EngineOptions` takes them, and when one tile covers the padded image."""
    if tile is None or tile == 0:
        return None
    if tile < 0:
        raise ValueError(f"tile must be a positive size in pixels, or 0 / None for the whole image; got {tile!r}")
    tile = max(stride, int(tile) // stride * stride)  # 256.0 or a NumPy number: range() needs an int
    hp, wp = -(-height // stride) * stride, -(-width // stride) * stride
    return None if tile >= hp and tile >= wp else tile


class TiledInference:
    """Runs a :class:`KPACNet` on one image of any size, whole or in exact tiles.

    ``tile`` is the tile side in pixels (rounded down to a multiple of the stride, at least
    the stride), or ``None`` (or 0) for the whole image at once. ``kept_skips``: how many of the
    deepest skip feature maps the encoder pass stores for the decoder pass instead of the
    decoder pass recomputing them (memory for time; see :func:`skips_that_fit`).
    ``static_shapes``: every tile the same shape (see :func:`plan_tiles`), for compiled stages.
    """

    def __init__(
        self,
        model: KPACNet,
        device: torch.device,
        run_context: Callable[[], object],
        channels_last: bool = True,
        kept_skips: int = 0,
        static_shapes: bool = False,
    ) -> None:
        self.model = model
        self.device = device
        self.run_context = run_context  # e.g. autocast; entered around every model call
        self.channels_last = channels_last
        self.config = model.config
        self.halos = receptive_halos(self.config)
        if not 0 <= kept_skips <= self.config.levels:
            raise ValueError(f"kept_skips must be in 0..{self.config.levels}, got {kept_skips}")
        self.kept_skips = kept_skips
        self.static_shapes = static_shapes

    def _to_device(self, t: Tensor) -> Tensor:
        if self.device.type == "cuda":
            # A pinned host copy lets the upload run asynchronously: the CPU goes on slicing the
            # next tile while the GPU works (PyTorch caches pinned blocks, so same-sized tiles
            # do not pay cudaHostAlloc again).
            t = t.contiguous().pin_memory()
        t = t.to(self.device, non_blocking=True)
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t.contiguous()

    @torch.inference_mode()
    def __call__(
        self,
        x: Tensor,
        reference: Tensor,
        tile: int | None,
        progress: ProgressFn | None = None,
        keep_attention: bool = False,
    ) -> InferenceResult:
        """``x``: (1, C, H, W) network input in [-1, 1] on the CPU; ``reference``: (1, 3, H, W)."""
        if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected input (1, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if tuple(reference.shape) != (1, 3, h, w):  # padded alike, a near miss would be added misaligned
            raise ValueError(f"reference must be (1, 3, {h}, {w}), got {tuple(reference.shape)}")
        stride = self.config.stride
        xp = pad_to_multiple(x.float(), stride)
        refp = xp if reference is x else pad_to_multiple(reference.float(), stride)
        hp, wp = xp.shape[-2:]
        report = progress or (lambda stage, done, total: None)
        tile = tile_that_runs(tile, h, w, stride)
        # The output is made at the image's own size: cropping a padded one would copy it.
        if tile is None:
            out, alphas = self._whole(xp, refp, h, w, report, keep_attention)
        else:
            out, alphas = self._tiled(xp, refp, h, w, tile, report, keep_attention)
        return InferenceResult(out.contiguous(), alphas)

    def _whole(self, xp: Tensor, refp: Tensor, h: int, w: int, report: ProgressFn, keep_attention: bool):
        report("encode", 0, 1)
        with self.run_context():
            skips, encoded = self.model.encode(self._to_device(xp))
            report("encode", 1, 1)
            mid = self.model.bottleneck(encoded)
            report("attention", 1, 1)
            residual = self.model.decode(mid.features, skips)
        out = residual.float().cpu()[..., :h, :w] + refp[..., :h, :w]
        report("decode", 1, 1)
        return out, self._alphas(mid, keep_attention)

    def _alphas(self, mid, keep: bool) -> list[Tensor | None]:
        if not keep:
            return []
        return [None if a is None else a.float().cpu() for a in mid.scale_attention]

    def _tiled(self, xp: Tensor, refp: Tensor, h: int, w: int, tile: int, report: ProgressFn, keep_attention: bool):
        stride, levels = self.config.stride, self.config.levels
        hp, wp = xp.shape[-2:]
        enc_halo, dec_halo = self.halos
        keep = self.kept_skips  # the deepest `keep` skip features are stored, the rest recomputed
        recompute = levels - keep

        # 2. encoder pass: the low-resolution encoder output is kept, and the deepest skips
        enc_tiles = plan_tiles(hp, wp, tile, enc_halo, self.static_shapes)
        stored: dict[int, Tensor] = {}  # skip level (0 = f1) -> map of the whole padded image
        for i, t in enumerate(enc_tiles):
            with self.run_context():
                skips, e = self.model.encode(self._to_device(xp[..., t.iy0 : t.iy1, t.ix0 : t.ix1]))
            for level, f in list(enumerate(skips))[recompute:] + [(levels, e)]:
                if level not in stored:
                    stored[level] = self._empty_map(f, hp >> level, wp >> level)
                _put_interior(stored[level], f, t, 1 << level)
            del skips, e
            report("encode", i + 1, len(enc_tiles))
        encoded = stored.pop(levels)

        # 3. the KPAC blocks and the merge, tile by tile on the low-resolution map
        features, alphas = self._bottleneck(encoded, bottleneck_tile(tile, self.config), report, keep_attention)
        del encoded

        # 4. decoder pass: the shallow skips recomputed per widened tile, the kept ones sliced
        out = torch.empty((1, 3, h, w), dtype=torch.float32)
        dec_tiles = plan_tiles(hp, wp, tile, dec_halo, self.static_shapes)
        for i, t in enumerate(dec_tiles):
            with self.run_context():
                skips = []
                if recompute:
                    skips, _ = self.model.encode(self._to_device(xp[..., t.iy0 : t.iy1, t.ix0 : t.ix1]), skip_levels=recompute)
                skips += [stored[level][..., t.iy0 >> level : t.iy1 >> level, t.ix0 >> level : t.ix1 >> level]
                          for level in range(recompute, levels)]
                f = features[..., t.iy0 // stride : t.iy1 // stride, t.ix0 // stride : t.ix1 // stride]
                residual = self.model.decode(f, skips)
            y1, x1 = min(t.y1, h), min(t.x1, w)  # a tile starts inside the image, may end in its padding
            oy, ox = t.y0 - t.iy0, t.x0 - t.ix0
            ty, tx = y1 - t.y0, x1 - t.x0
            out[..., t.y0 : y1, t.x0 : x1] = residual[..., oy : oy + ty, ox : ox + tx].float().cpu() + refp[..., t.y0 : y1, t.x0 : x1]
            del skips, residual
            report("decode", i + 1, len(dec_tiles))
        return out, alphas

    def _bottleneck(self, encoded: Tensor, cells: int, report: ProgressFn, keep_attention: bool):
        """(features, alphas) of the bottleneck on ``encoded`` in tiles of ``cells`` (see the
        module docstring, step 3): the same function as ``model.bottleneck(encoded)``."""
        hc, wc = encoded.shape[-2:]
        block_halo, merge_halo = bottleneck_halos(self.config)
        if hc * wc <= (cells + 2 * (block_halo + merge_halo)) ** 2:  # the whole map is no larger than a widened tile
            with self.run_context():
                mid = self.model.bottleneck(encoded)
            report("attention", 1, 1)
            return mid.features, self._alphas(mid, keep_attention)
        block_tiles = plan_tiles(hc, wc, cells, block_halo, self.static_shapes)
        merge_tiles = plan_tiles(hc, wc, cells, merge_halo, self.static_shapes)
        # The last block runs in the merge's tiles, widened by its own halo too: its output is
        # read only by the merge, so it is never kept whole (one low-resolution map less).
        last_tiles = plan_tiles(hc, wc, cells, block_halo + merge_halo, self.static_shapes)
        total = self.config.blocks * len(block_tiles)
        outs: list[Tensor] = [encoded]  # the dense concat's inputs, then the bottleneck output
        alphas: list[Tensor | None] = []
        for index in range(self.config.blocks):
            x, last = outs[-1], index == self.config.blocks - 1
            with self.run_context():
                mean = spatial_mean(x)  # what the whole-map block would take shape attention from
            y = alpha_map = None
            for i, (t, m) in enumerate(zip(last_tiles if last else block_tiles, merge_tiles)):
                with self.run_context():
                    y_tile, alpha = self.model.run_block(index, self._crop(x, t), mean)
                    if last:  # m lies inside t by the block's halo (or at the map's edge): exact there
                        y_tile = y_tile[..., m.iy0 - t.iy0 : m.iy1 - t.iy0, m.ix0 - t.ix0 : m.ix1 - t.ix0]
                        # views, not copies: the convolutions read them as fast (measured)
                        y_tile = self.model.merge([o[..., m.iy0 : m.iy1, m.ix0 : m.ix1] for o in outs] + [y_tile])
                y = self._empty_map(y_tile, hc, wc) if y is None else y
                _put_interior(y, y_tile, m if last else t, 1)
                if keep_attention and alpha is not None:
                    if alpha_map is None:
                        alpha_map = torch.empty((1, alpha.shape[1], hc, wc), dtype=torch.float32)
                    _put_interior(alpha_map, alpha.float().cpu(), t, 1)
                del y_tile, alpha
                report("attention", index * len(block_tiles) + i + 1, total)
            outs.append(y)
            alphas.append(alpha_map)
        return outs[-1], alphas if keep_attention else []

    def _crop(self, m: Tensor, t: Tile) -> Tensor:
        """The region tile ``t`` reads from a low-resolution map, in the layout the layers want."""
        c = m[..., t.iy0 : t.iy1, t.ix0 : t.ix1]
        return c.contiguous(memory_format=torch.channels_last) if self.channels_last else c.contiguous()

    def _empty_map(self, like: Tensor, height: int, width: int) -> Tensor:
        # allocated in its layout: converting an NCHW empty() would copy (and page in) a whole map
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        return torch.empty((1, like.shape[1], height, width), dtype=like.dtype, device=like.device, memory_format=layout)


def _put_interior(dst: Tensor, src: Tensor, t: Tile, scale: int) -> None:
    """Copy the part of a widened tile's feature map ``src`` (at 1/scale) that is the tile's own."""
    oy, ox = (t.y0 - t.iy0) // scale, (t.x0 - t.ix0) // scale
    ty, tx = (t.y1 - t.y0) // scale, (t.x1 - t.x0) // scale
    dst[..., t.y0 // scale : t.y1 // scale, t.x0 // scale : t.x1 // scale] = src[..., oy : oy + ty, ox : ox + tx]


def skip_bytes(config: KPACConfig, height: int, width: int, itemsize: int = 4) -> list[int]:
    """Bytes of each skip feature map (f1, f2[, f3]) of a ``height`` x ``width`` image."""
    widths = [config.channels, config.channels, 2 * config.channels][: config.levels]
    h, w = -(-height // config.stride) * config.stride, -(-width // config.stride) * config.stride
    return [c * (h >> level) * (w >> level) * itemsize for level, c in enumerate(widths)]


def low_resolution_bytes(config: KPACConfig, height: int, width: int, itemsize: int = 4) -> int:
    """Bytes of the low-resolution maps a tiled run of a ``height`` x ``width`` image holds whole
    at once (step 3 of the module docstring): the encoder output, the outputs of all KPAC blocks
    but the last, and the bottleneck output being filled; each 2 x channels wide at 1/stride."""
    cells = -(-height // config.stride) * -(-width // config.stride)
    return (config.blocks + 1) * 2 * config.channels * cells * itemsize


def skips_that_fit(config: KPACConfig, height: int, width: int, budget: int, itemsize: int = 4) -> int:
    """How many of the deepest skip maps fit in ``budget`` bytes together (0..levels)."""
    sizes, total, keep = skip_bytes(config, height, width, itemsize), 0, 0
    for size in reversed(sizes):  # the deepest maps are the smallest and save the most per byte
        if total + size > budget:
            break
        total, keep = total + size, keep + 1
    return keep
