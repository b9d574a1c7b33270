"""Turning attention maps into files: grey maps, masks, colour overlays, contact sheets.

Conventions
-----------
* Attention maps (values in [0, 1]) are written as **16-bit grayscale PNG**
  (``floor(v * 65535 + 0.5)``, the rule of :mod:`kpac_cli.images`) or as **float32 TIFF**
  (the values themselves).
* The blur-size estimate (:func:`~kpac_cli.blurmap.defocus_map`, in dilation units) is
  written to PNG as ``value / max(dilations)`` (so ``png / 65535 * max(dilations)`` gives it
  back) and to float32 TIFF unscaled.
* Binary masks are 8-bit, 255 = blurred (the CUHK convention), PNG or TIFF.
* Overlays and contact sheets are 8-bit RGB PNG, colour-mapped with a small built-in
  perceptually ordered LUT (dark purple = 0, pale yellow = 1) and carrying the photo's ICC
  profile when it is an RGB one (a grey photo's profile is left out). The overlay of a photo
  with an alpha channel keeps that alpha (RGBA PNG), so what was transparent stays so; a
  contact sheet shows such a photo over white.
* Every file says what it is: a PNG text chunk ``kpac-blurmap`` (and ``Software``), or a
  TIFF ImageDescription ``kpac-blurmap: KIND``, where KIND is one of :data:`KINDS`
  (:func:`blurmap_kind` reads it back). So a predicted mask is never taken for ground truth,
  nor a map for a photo, whatever its name.
* Every file is written atomically; an existing file is only replaced with
  ``overwrite=True`` (otherwise :class:`FileExistsError`).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..images import ImageInfo, luma, write_image, write_output
from ..images.metadata import BLURMAP_KINDS, BLURMAP_MARK_KEY, blurmap_kind
from .maps import BLUR_POLARITY, AttentionMaps, maps_from_attention

#: Stops of the colour map (position, sRGB 0-255): an approximation of "inferno".
COLORMAP_STOPS: tuple[tuple[float, tuple[int, int, int]], ...] = (
    (0.0, (0, 0, 4)),
    (1 / 7, (40, 11, 84)),
    (2 / 7, (101, 21, 110)),
    (3 / 7, (159, 42, 99)),
    (4 / 7, (212, 72, 66)),
    (5 / 7, (245, 125, 21)),
    (6 / 7, (250, 193, 39)),
    (1.0, (252, 255, 164)),
)

MAP_FORMATS = ("png", "tiff")
_EXT = {"png": ".png", "tiff": ".tif"}

# The mark (a PNG text chunk or TIFF ImageDescription) and its reader live with the image
# metadata, since listings and dual-pixel pairing leave marked files out too.
MARK_KEY, KINDS = BLURMAP_MARK_KEY, BLURMAP_KINDS
_SOFTWARE = "kpac"

__all__ = [
    "COLORMAP_STOPS",
    "KINDS",
    "MAP_FORMATS",
    "MARK_KEY",
    "apply_colormap",
    "blurmap_kind",
    "contact_sheet",
    "encode_map",
    "encode_mask",
    "encode_rgb",
    "format_for_path",
    "overlay",
    "save_blurmaps",
    "write_file",
]


def _lut() -> np.ndarray:
    pos = np.array([p for p, _ in COLORMAP_STOPS])
    rgb = np.array([c for _, c in COLORMAP_STOPS], dtype=np.float64) / 255.0
    t = np.linspace(0.0, 1.0, 256)
    return np.stack([np.interp(t, pos, rgb[:, c]) for c in range(3)], axis=1).astype(np.float32)


_LUT = _lut()


def apply_colormap(values: np.ndarray, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """``H x W`` values -> ``H x W x 3`` float32 RGB in [0, 1] (NaN shows as the low end)."""
    span = (vmax - vmin) or 1.0
    t = np.nan_to_num((np.asarray(values, dtype=np.float32) - vmin) / span, nan=0.0)
    idx = np.clip(np.rint(t * 255), 0, 255).astype(np.intp)
    return _LUT[idx]


def overlay(photo: np.ndarray, values: np.ndarray, opacity: float = 0.6, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """The colour-mapped ``values`` blended over a grey version of ``photo`` (``H x W x 3``).

    Grey keeps the photo's structure readable without its colours competing with the map's.
    """
    if photo.shape[:2] != values.shape:
        raise ValueError(f"photo is {photo.shape[:2]} but the map is {values.shape}")
    grey = luma(photo)[..., None]
    return (1 - opacity) * grey + opacity * apply_colormap(values, vmin, vmax)


def _thumbnail(img: np.ndarray, cell: int) -> np.ndarray:
    """Downscale (area average, integer factor) so the longer side is at most ``cell``.

    The edges are extended to a multiple of the factor rather than cut off: a photo
    narrower than the factor (a strip) still gets one row or column.
    """
    h, w = img.shape[:2]
    f = max(1, -(-max(h, w) // cell))
    if f == 1:
        return img
    v = np.pad(img, [(0, -h % f), (0, -w % f)] + [(0, 0)] * (img.ndim - 2), mode="edge")
    hh, ww = v.shape[:2]
    return v.reshape(hh // f, f, ww // f, f, *v.shape[2:]).mean(axis=(1, 3))


def _over_white(photo: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """The photo as it shows over a white page (colours under alpha 0 are not part of it)."""
    rgb = photo[..., :3]
    if alpha is None:
        return rgb
    a = np.asarray(alpha, dtype=np.float32)[..., None]
    return rgb * a + (1 - a)


def contact_sheet(photo: np.ndarray, maps: AttentionMaps, cell: int = 256, defocus: bool = True,
                  alpha: np.ndarray | None = None) -> np.ndarray:
    """All maps on one RGB image: one row per block, one column per dilation, the photo first.

    Each cell is labelled ("block 1  d=1", ...); with ``defocus`` a last column shows each
    block's blur-size estimate (colour-mapped over the dilation range). A column is at least
    as wide as its label, so labels never run into each other however small the photo.
    ``alpha`` (``H x W``, the photo's) shows the photo over white.
    """
    from PIL import Image, ImageDraw, ImageFont

    pad = 4
    font = ImageFont.load_default()
    thumb = _thumbnail(_over_white(photo, alpha), cell)
    th, tw = thumb.shape[:2]
    dmin, dmax = min(maps.dilations), max(maps.dilations)
    rows: list[list[tuple[str, np.ndarray]]] = []
    for b in range(1, maps.blocks + 1):
        # one full-size map at a time: a block's maps together take gigabytes for a large photo
        cells = [("photo", thumb)] + [(f"block {b}  d={d}", apply_colormap(_thumbnail(maps.map(b, d), cell))) for d in maps.dilations]
        if defocus:
            cells.append((f"block {b}  size", apply_colormap(_thumbnail(maps.defocus(b), cell), dmin, dmax)))
        rows.append(cells)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [measure.textbbox((0, 0), text, font=font) for cells in rows for text, _ in cells]
    col_w = max(tw, max(r for _, _, r, _ in boxes) + pad)  # a label never reaches the next column
    label_h = max(14, max(bottom for _, _, _, bottom in boxes) + 2)
    sheet = np.full((len(rows) * (th + label_h + pad) + pad, len(rows[0]) * (col_w + pad) + pad, 3), 1.0, dtype=np.float32)
    labels: list[tuple[int, int, str]] = []
    for r, cells in enumerate(rows):
        y = pad + r * (th + label_h + pad) + label_h
        for c, (text, img) in enumerate(cells):
            x = pad + c * (col_w + pad)
            sheet[y : y + img.shape[0], x : x + img.shape[1]] = img[..., :3]
            labels.append((x, y - label_h + 1, text))
    im = Image.fromarray((np.clip(sheet, 0, 1) * 255 + 0.5).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for x, y, text in labels:
        draw.text((x, y), text, fill=(0, 0, 0), font=font)
    return np.asarray(im, dtype=np.float32) / 255.0


def _info(size: tuple[int, int], channels: int, bit_depth: int, kind: str, icc: bytes | None = None,
          alpha: np.ndarray | None = None) -> ImageInfo:
    text = ((b"tEXt", b"Software\0" + _SOFTWARE.encode()), (b"tEXt", MARK_KEY.encode() + b"\0" + kind.encode()))
    return ImageInfo(
        path=None, format="png", bit_depth=bit_depth, channels=channels, alpha=alpha,
        icc_profile=icc, exif=None, orientation_applied=1, size=size, png_chunks=text,
    )


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _tiff(values: np.ndarray, kind: str, predictor: bool) -> bytes:
    """Single-channel TIFF bytes (zlib) marked as ``kind``."""
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.ascontiguousarray(values), photometric="minisblack", compression="zlib", predictor=predictor,
                     description=f"{MARK_KEY}: {kind}", software=_SOFTWARE, metadata=None)
    return buf.getvalue()


def encode_map(values: np.ndarray, fmt: str = "png", scale: float = 1.0, kind: str = "blurmap") -> bytes:
    """A single-channel map -> file bytes: 16-bit grey PNG of ``values / scale`` (clipped to
    [0, 1]), or float32 TIFF of ``values`` unscaled; marked as ``kind`` (see :data:`KINDS`)."""
    if fmt not in MAP_FORMATS:
        raise ValueError(f"map format must be one of {MAP_FORMATS}, got {fmt!r}")
    _check_kind(kind)
    values = np.asarray(values, dtype=np.float32)
    if fmt == "tiff":
        return _tiff(values, kind, predictor=False)  # the float predictor needs imagecodecs
    return write_image(None, (values / np.float32(scale))[..., None], _info(values.shape, 1, 16, kind), format="png", bit_depth=16)


def encode_mask(mask: np.ndarray, fmt: str = "png") -> bytes:
    """Bool mask -> 8-bit grey file bytes, 255 = True (blurred), marked as a predicted mask."""
    if fmt not in MAP_FORMATS:
        raise ValueError(f"mask format must be one of {MAP_FORMATS}, got {fmt!r}")
    m = np.asarray(mask, dtype=bool)
    if fmt == "tiff":
        return _tiff(np.where(m, 255, 0).astype(np.uint8), "mask", predictor=True)
    return write_image(None, m.astype(np.float32)[..., None], _info(m.shape, 1, 8, "mask"), format="png", bit_depth=8)


def encode_rgb(image: np.ndarray, icc: bytes | None = None, kind: str = "overlay", alpha: np.ndarray | None = None) -> bytes:
    """``H x W x 3`` float RGB in [0, 1] -> 8-bit RGB PNG bytes (RGBA with ``alpha``, ``H x W``
    in [0, 1]), with the ICC profile as RGB pixels take it (an RGB one as it is, a grey photo's
    made RGB, any other dropped: :func:`kpac_cli.images.icc.rgb_counterpart`), marked as ``kind``
    (see :data:`KINDS`)."""
    from ..images.icc import rgb_counterpart

    _check_kind(kind)
    info = _info(image.shape[:2], 3, 8, kind, rgb_counterpart(icc), alpha)
    return write_image(None, image, info, format="png", bit_depth=8)


def write_file(path: str | Path, data: bytes, overwrite: bool = False) -> Path:
    """Write ``data`` atomically; refuse to replace an existing file unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists (use --overwrite to replace it or --skip-existing to keep it)")
    write_output(path, data)
    return path


def format_for_path(path: str | Path) -> str:
    """``png`` or ``tiff`` from a file name's extension (anything else is an error)."""
    ext = Path(path).suffix.lower()
    if ext == ".png":
        return "png"
    if ext in (".tif", ".tiff"):
        return "tiff"
    raise ValueError(f"{path}: blur maps are written as .png (16-bit) or .tif (float32)")


def save_blurmaps(
    path: str | Path,
    result: Any,
    config: Any,
    size: tuple[int, int],
    *,
    block: int = 1,
    dilation: int = 1,
    all_maps: bool = False,
    overwrite: bool = False,
    upsample: int = 1,
    polarity: str | None = None,
) -> list[Path]:
    """Write blur maps from an inference that already ran (e.g. ``kpac deblur --save-blurmap``).

    Parameters
    ----------
    path : path
        File of the chosen map as a detection map (high = blurred, see ``polarity``);
        ``.png`` (16-bit grey) or ``.tif`` (float32). With ``all_maps`` every block x
        dilation map (raw attention) is written instead, beside it as
        ``<stem>_b<block>_d<dilation><ext>``.
    result : InferenceResult or sequence
        The result of ``Deblurrer.run(..., keep_attention=True)`` (its ``scale_attention``),
        or that list itself.
    config : KPACConfig
        The model's config (stride and dilations).
    size : (int, int)
        ``(H, W)`` of the image that was run.
    block, dilation : int
        The map to write (default: the first block's dilation-1 map, the blur detector).
    overwrite : bool
        Replace existing files; otherwise an existing file raises :class:`FileExistsError`
        before anything is written.
    upsample : int
        Factor the image was enlarged by before that inference (1 for a plain run).
    polarity : {"blurred", "sharp"}, optional
        What a high weight means for the model; default :data:`~.maps.BLUR_POLARITY`
        (pass ``model_polarity(deblurrer)`` to honour what the checkpoint declares).

    Returns
    -------
    list of Path
        The files written.
    """
    path = Path(path)
    fmt = format_for_path(path)
    attention = getattr(result, "scale_attention", result)
    maps = maps_from_attention(attention, tuple(size), config, upsample, polarity or BLUR_POLARITY, getattr(result, "orientation", 1))
    if all_maps:
        targets: Sequence[tuple[Path, int, int]] = [
            (path.with_name(f"{path.stem}_b{b}_d{d}{path.suffix}"), b, d) for b in range(1, maps.blocks + 1) for d in maps.dilations
        ]
    else:
        maps._index(block, dilation)  # validate before writing anything
        targets = [(path, block, dilation)]
    if not overwrite:
        for p, _, _ in targets:
            if p.exists():
                raise FileExistsError(f"{p}: exists (use --overwrite to replace it)")
    written = []
    for p, b, d in targets:
        values = maps.map(b, d) if all_maps else maps.detection(b, d)
        written.append(write_file(p, encode_map(values, fmt, kind="attention" if all_maps else "blurmap"), overwrite=True))
    return written
