"""Camera RAW development with LibRaw (via rawpy).

RAW files are developed to 16-bit RGB (``ImageInfo.bit_depth == 16``, ``format == 'raw'``)
with the camera's white balance, AHD demosaicing, sRGB primaries and the sRGB tone curve by
default, without LibRaw's automatic brightening (so exposure is what the camera recorded);
a monochrome sensor's grey is given in all three channels.
A DNG's default crop (DefaultCropOrigin / DefaultCropSize: the image the camera intends, as
Adobe's tools show it, without the border pixels kept for demosaicing) is applied, narrowed by
its DefaultUserCrop where it has one (DNG 1.5: the framing chosen in the camera, such as a 16:9
or 1:1 aspect ratio on a 3:2 sensor, which Adobe's tools open the file with).
LibRaw applies the camera's orientation itself; the value it applied is reported as
``orientation_applied``. The camera's EXIF is read beside it for TIFF-based RAW (see
:mod:`.io`). A development other than plain sRGB (linear light, Adobe RGB or ProPhoto
primaries) is given the ICC profile of what it made (:func:`.icc.developed_raw`), so outputs
are tagged with it; the camera's own colour space (``output_colorspace='raw'``) stays
untagged, as no profile describes it.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

import numpy as np

from .base import ImageError, quantize, srgb_decode, srgb_encode, too_large_error

_WB = ("camera", "auto", "daylight")
_DEMOSAIC = {"ahd": "AHD", "linear": "LINEAR", "vng": "VNG", "ppg": "PPG", "dht": "DHT", "aahd": "AAHD"}
_SPACES = {"srgb": "sRGB", "adobe": "Adobe", "prophoto": "ProPhoto", "raw": "raw"}
_GAMMA = {"srgb": (2.4, 12.92), "linear": (1.0, 1.0)}
# LibRaw's flip code -> EXIF orientation (inverse of dcraw's "50132467" table).
_FLIP_TO_EXIF = {0: 1, 1: 2, 2: 4, 3: 3, 4: 5, 5: 8, 6: 6, 7: 7}
_DNG_VERSION_TAG = 50706
_DEFAULT_CROP_ORIGIN, _DEFAULT_CROP_SIZE, _ACTIVE_AREA, _DEFAULT_USER_CROP = 50719, 50720, 50829, 51125

#: A crop rectangle ``(top, left, height, width)`` in pixels.
_Box = tuple[int, int, int, int]


@dataclass
class RawOptions:
    """How camera RAW files are developed.

    Attributes
    ----------
    white_balance : {'camera', 'auto', 'daylight'}
        As shot (falls back to daylight when the file has none), grey-world auto, or the
        camera's daylight multipliers.
    half_size : bool
        Skip demosaicing by binning each 2x2 Bayer cell: half the width and height, fast.
        Files without a colour filter mosaic (linear DNGs, already demosaiced, and monochrome
        sensors), which LibRaw develops at full size whatever is asked, are binned 2x2 in
        linear light afterwards.
    demosaic : {'ahd', 'linear', 'vng', 'ppg', 'dht', 'aahd'}
        LibRaw demosaicing algorithm (ignored with ``half_size``).
    output_colorspace : {'srgb', 'adobe', 'prophoto', 'raw'}
        RGB primaries of the result (``'raw'`` = camera native, no colour matrix).
    gamma : {'srgb', 'linear'}
        sRGB tone curve (power 2.4, slope 12.92) or linear light.
    no_auto_bright : bool
        Disable LibRaw's histogram-based brightening (default True: keep the exposure).
    exposure : float
        Exposure shift in EV applied before the tone curve, in ``[-2, 3]`` (LibRaw's range).
    """

    white_balance: str = "camera"
    half_size: bool = False
    demosaic: str = "ahd"
    output_colorspace: str = "srgb"
    gamma: str = "srgb"
    no_auto_bright: bool = True
    exposure: float = 0.0

    def __post_init__(self) -> None:
        def check(field: str, value: str, allowed) -> str:
            v = str(value).lower()
            if v not in allowed:
                raise ValueError(f"RawOptions.{field} must be one of {', '.join(allowed)}; got {value!r}")
            return v

        self.white_balance = check("white_balance", self.white_balance, _WB)
        self.demosaic = check("demosaic", self.demosaic, tuple(_DEMOSAIC))
        self.output_colorspace = check("output_colorspace", self.output_colorspace, tuple(_SPACES))
        self.gamma = check("gamma", self.gamma, tuple(_GAMMA))
        self.exposure = float(self.exposure)
        if not (math.isfinite(self.exposure) and -2.0 <= self.exposure <= 3.0):
            raise ValueError(f"RawOptions.exposure must be in [-2, 3] EV; got {self.exposure}")


def _libraw_message(exc: Exception) -> str:
    msg = exc.args[0] if exc.args else str(exc)
    if isinstance(msg, bytes):
        msg = msg.decode("utf-8", "replace")
    return str(msg) or type(exc).__name__


def _decode_error(name, exc: Exception) -> ImageError:
    """One line for a LibRaw failure; LibRaw's own words for a file that ends early (an
    interrupted copy or download) are just "Input/output error", which reads like a disk fault."""
    import rawpy

    damaged = isinstance(exc, (rawpy.LibRawIOError, rawpy.LibRawDataError))
    what = "cannot decode camera RAW: the file is truncated or damaged" if damaged else "cannot decode camera RAW"
    return ImageError(name, f"{what} (LibRaw: {_libraw_message(exc)})")


def _open(source: str | os.PathLike | bytes, name):
    import rawpy

    raw = rawpy.RawPy()
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            raw.open_buffer(io.BytesIO(bytes(source)))
        else:
            raw.open_file(os.fspath(source))
    except rawpy.LibRawError as exc:
        raw.close()
        raise _decode_error(name, exc) from None
    return raw


def _dims(raw) -> tuple[int, int, int]:
    s = raw.sizes
    orientation = _FLIP_TO_EXIF.get(int(s.flip), 1)
    return int(s.height), int(s.width), orientation


def _dng_default_crop(source: str | os.PathLike | bytes) -> _Box | None:
    """A DNG's default crop (DefaultCropOrigin / DefaultCropSize of its main raw image),
    narrowed by its DefaultUserCrop, made relative to the whole sensor (the spec counts it
    from the ActiveArea's corner); None for other files and DNGs without one.

    Read from the tags rather than from LibRaw, which moves an odd origin to the next even
    pixel, drops a crop that reaches the sensor's right or bottom edge and ignores the user
    crop. Other RAW formats keep LibRaw's full visible area: their maker notes' crop boxes
    vary by camera.
    """
    import tifffile

    try:
        fh = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
        with tifffile.TiffFile(fh) as tif:
            first = tif.pages.first
            if _DNG_VERSION_TAG not in first.tags:
                return None
            page = next((p for p in (first, *(first.pages or ())) if int(p.subfiletype) == 0), None)
            if page is None:
                return None
            # in the raw image's directory; as LibRaw does, one put in IFD0 is also taken
            origin, size, user = (_tag_numbers(page, code) or _tag_numbers(first, code)
                                  for code in (_DEFAULT_CROP_ORIGIN, _DEFAULT_CROP_SIZE, _DEFAULT_USER_CROP))
            area = _tag_numbers(page, _ACTIVE_AREA) or (0, 0, int(page.imagelength), int(page.imagewidth))
    except Exception:  # not a TIFF (CR3, RAF, ...) or a damaged one: LibRaw has the last word
        return None
    if len(area) != 4 or (origin is not None and len(origin) != 2) or (size is not None and len(size) != 2):
        return None
    user_box = _user_crop(user)
    if origin is None and size is None and user_box is None:
        return None
    # the spec's defaults: the crop starts at the active area's corner and fills it
    x, y = (round(v) for v in origin or (0, 0))
    w, h = (round(v) for v in size or (area[3] - area[1] - x, area[2] - area[0] - y))
    top, left = round(area[0]) + y, round(area[1]) + x
    if user_box is None or w <= 0 or h <= 0:
        return top, left, h, w
    top_f, left_f, bottom_f, right_f = user_box
    # user crop edges on the pixel grid, at least one pixel kept
    r0, c0 = min(round(top_f * h), h - 1), min(round(left_f * w), w - 1)
    r1, c1 = max(round(bottom_f * h), r0 + 1), max(round(right_f * w), c0 + 1)
    return top + r0, left + c0, r1 - r0, c1 - c0


def _user_crop(values: tuple[float, ...] | None) -> tuple[float, float, float, float] | None:
    """A DefaultUserCrop ``(top, left, bottom, right)``, fractions of the default crop; None
    when absent, the whole default crop, or not the rectangle the spec allows."""
    if values is None or len(values) != 4:
        return None
    top, left, bottom, right = values
    if not (0 <= top < bottom <= 1 and 0 <= left < right <= 1) or values == (0, 0, 1, 1):
        return None
    return top, left, bottom, right


def _tag_numbers(page, code: int) -> tuple[float, ...] | None:
    """The values of a numeric TIFF tag, rationals as floats; None when absent or bad."""
    tag = page.tags.get(code)
    if tag is None:
        return None
    try:
        values = tuple(float(v) for v in np.ravel(tag.value))
    except (TypeError, ValueError):  # text or bytes where numbers belong
        return None
    if int(tag.dtype) in (5, 10):  # RATIONAL, SRATIONAL: numerator, denominator pairs
        values = tuple(n / d if d else math.nan for n, d in zip(values[::2], values[1::2]))
    return values if all(math.isfinite(v) for v in values) else None


def _visible_crop(raw, crop: _Box | None) -> _Box | None:
    """``crop`` (counted from the sensor's corner) within LibRaw's visible area, clipped to
    it; None when there is none or it is the whole area."""
    if crop is None:
        return None
    s = raw.sizes
    h, w = int(s.height), int(s.width)
    top = min(max(crop[0] - int(s.top_margin), 0), h)
    left = min(max(crop[1] - int(s.left_margin), 0), w)
    ch, cw = min(crop[2], h - top), min(crop[3], w - left)
    if ch <= 0 or cw <= 0 or (ch, cw) == (h, w):
        return None
    return top, left, ch, cw


def probe_raw(source, name) -> tuple[int, int]:
    """``(height, width)`` of the developed full-size RAW image, from its header only."""
    raw = _open(source, name)
    try:
        h, w, o = _dims(raw)
        dev_h, dev_w = _stretched(raw, h, w)
        crop = _visible_crop(raw, _dng_default_crop(source))
    finally:
        raw.close()
    if h <= 0 or w <= 0:
        raise ImageError(name, "camera RAW reports zero size")
    if crop is not None:
        r0, r1 = _scaled_span(crop[0], crop[0] + crop[2], h, dev_h)
        c0, c1 = _scaled_span(crop[1], crop[1] + crop[3], w, dev_w)
        dev_h, dev_w = r1 - r0, c1 - c0
    return (dev_w, dev_h) if o in (5, 6, 7, 8) else (dev_h, dev_w)


def _stretched(raw, h: int, w: int) -> tuple[int, int]:
    """``(h, w)`` as LibRaw develops them: non-square pixels (a DNG's DefaultScale) stretch
    one axis, rounded as LibRaw rounds it."""
    aspect = float(raw.sizes.pixel_aspect)
    if not math.isfinite(aspect) or aspect <= 0 or aspect == 1:
        return h, w
    if aspect < 1:
        return int(h / aspect + 0.5), w
    return h, int(w * aspect + 0.5)


def read_raw(source, name, *, max_pixels: int | None, options: RawOptions | None) -> tuple[np.ndarray, int]:
    """Develop a RAW file to ``uint16`` H x W x 3 RGB.

    Returns the array and the EXIF orientation LibRaw applied. A DNG's default crop (and
    user crop) is applied. The pixel limit is checked on the header's sensor size (what
    LibRaw develops, crop borders included) before the sensor data are unpacked.
    """
    import rawpy

    opts = options or RawOptions()
    raw = _open(source, name)
    try:
        h, w, orientation = _dims(raw)
        if h <= 0 or w <= 0:
            raise ImageError(name, "camera RAW reports zero size")
        flip = int(raw.sizes.flip)
        crop = _visible_crop(raw, _dng_default_crop(source))
        dev_h, dev_w = _stretched(raw, h, w)
        # From the header, before the sensor data are unpacked: a Bayer file is developed at
        # half size when asked (whether the file has a mosaic is known only once unpacked).
        _check_pixels(name, dev_h, dev_w, opts.half_size, max_pixels)
        try:
            raw.unpack()  # before reading daylight_whitebalance: LibRaw needs the unpacked data
        except rawpy.LibRawError as exc:
            raise _decode_error(name, exc) from None
        # LibRaw halves only colour mosaic (CFA) data; anything else (a linear DNG, a
        # monochrome sensor) is developed at full size.
        bin_after = opts.half_size and not _is_colour_mosaic(raw.raw_pattern)
        if bin_after:
            _check_pixels(name, dev_h, dev_w, False, max_pixels)
        kwargs: dict = dict(
            output_bps=16,
            half_size=opts.half_size,
            demosaic_algorithm=getattr(rawpy.DemosaicAlgorithm, _DEMOSAIC[opts.demosaic]),
            output_color=getattr(rawpy.ColorSpace, _SPACES[opts.output_colorspace]),
            gamma=_GAMMA[opts.gamma],
            no_auto_bright=opts.no_auto_bright,
        )
        if opts.exposure:
            kwargs["exp_shift"] = 2.0 ** opts.exposure
        kwargs.update(_white_balance_args(raw, opts.white_balance))
        try:
            rgb = raw.postprocess(**kwargs)
        except rawpy.NotSupportedError as exc:
            raise ImageError(name, f"demosaic '{opts.demosaic}' is not supported by this LibRaw build ({exc})") from None
        except rawpy.LibRawError as exc:
            raise _decode_error(name, exc) from None
    finally:
        raw.close()
    rgb = np.asarray(rgb)
    if rgb.ndim == 3 and rgb.shape[2] == 1:  # a monochrome sensor: grey, given as RGB as promised
        rgb = np.repeat(rgb, 3, axis=2)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint16 or rgb.size == 0:
        raise ImageError(name, f"camera RAW developed to an unexpected array {rgb.shape} {rgb.dtype}")
    developed_full = rgb.shape[0] * rgb.shape[1] == dev_h * dev_w
    if crop is not None:
        rgb = _crop_developed(rgb, crop, (h, w), flip)
    if bin_after and developed_full:
        rgb = _half_size(rgb, opts.gamma)
    return rgb, orientation


def _is_colour_mosaic(pattern) -> bool:
    """Whether LibRaw's ``raw_pattern`` is a colour filter mosaic (Bayer, X-Trans), which
    LibRaw develops at half size when asked: not None (a linear DNG) nor the single cell of
    a monochrome sensor."""
    return pattern is not None and np.size(pattern) > 1


def _white_balance_args(raw, white_balance: str) -> dict:
    """LibRaw's white balance arguments for ``white_balance`` (needs the unpacked data).

    A file without usable as-shot multipliers is developed with the daylight ones: asked for
    the camera's, LibRaw would fall back to its grey-world auto balance instead, which tints
    a scene of one dominant colour.
    """
    if white_balance == "auto":
        return {"use_auto_wb": True}
    if white_balance == "camera" and _usable_multipliers(raw.camera_whitebalance):
        return {"use_camera_wb": True}
    return {"user_wb": list(raw.daylight_whitebalance)}


def _usable_multipliers(multipliers) -> bool:
    """Whether white balance multipliers (R, G, B, G2; G2 0 when it is G's) give a balance:
    LibRaw takes as-shot ones only when red and blue are set (positive)."""
    r, g, b = (float(v) for v in list(multipliers)[:3])
    return all(math.isfinite(v) and v > 0 for v in (r, g, b))


def _crop_developed(rgb: np.ndarray, crop: _Box, visible: tuple[int, int], flip: int) -> np.ndarray:
    """``rgb`` (LibRaw's development of the ``visible`` area, maybe at half size, turned by
    LibRaw's ``flip``) cut to ``crop``, a box of the visible area before it was turned."""
    top, left, ch, cw = crop
    out_h, out_w = rgb.shape[:2]
    dev_h, dev_w = (out_w, out_h) if flip & 4 else (out_h, out_w)  # before LibRaw turned it
    r0, r1 = _scaled_span(top, top + ch, visible[0], dev_h)
    c0, c1 = _scaled_span(left, left + cw, visible[1], dev_w)
    # LibRaw's flip: bit 1 mirrors the rows, bit 0 the columns, then bit 2 transposes.
    if flip & 2:
        r0, r1 = dev_h - r1, dev_h - r0
    if flip & 1:
        c0, c1 = dev_w - c1, dev_w - c0
    if flip & 4:
        return np.ascontiguousarray(rgb[c0:c1, r0:r1])
    return np.ascontiguousarray(rgb[r0:r1, c0:c1])


def _scaled_span(start: int, stop: int, full: int, developed: int) -> tuple[int, int]:
    """Pixel span ``[start, stop)`` of a ``full``-pixel axis on that axis developed at
    ``developed`` pixels: the same, halved (2x2 cells, a cell the crop cuts is kept), or
    stretched (a DNG's DefaultScale, non-square pixels)."""
    if developed == full:
        return start, stop
    if developed == (full + 1) // 2:
        return start // 2, (stop + 1) // 2
    scale = developed / full
    lo = min(round(start * scale), developed - 1)
    return lo, max(min(round(stop * scale), developed), lo + 1)


def _check_pixels(name, h: int, w: int, half: bool, max_pixels: int | None) -> None:
    """Refuse a development of more than ``max_pixels`` pixels (``half``: LibRaw's half-size
    development, ``ceil(h / 2) x ceil(w / 2)``), naming the size that is developed."""
    if max_pixels is None:
        return
    dh, dw = ((h + 1) // 2, (w + 1) // 2) if half else (h, w)
    pixels = dh * dw
    if pixels > max_pixels:
        size = f"{dw}x{dh} (half of {w}x{h})" if half else f"{w}x{h}"
        raise too_large_error(name, size, pixels, max_pixels)


def _half_size(rgb: np.ndarray, gamma: str) -> np.ndarray:
    """``uint16`` RGB binned 2x2 in linear light (the last row / column is repeated when odd),
    as LibRaw's half-size development bins each Bayer cell: ``ceil(H / 2) x ceil(W / 2)``."""
    v = rgb.astype(np.float32) / np.float32(65535)
    if gamma == "srgb":
        v = srgb_decode(v)
    v = np.pad(v, ((0, v.shape[0] % 2), (0, v.shape[1] % 2), (0, 0)), mode="edge")
    v = v.reshape(v.shape[0] // 2, 2, v.shape[1] // 2, 2, 3).mean(axis=(1, 3))
    if gamma == "srgb":
        v = srgb_encode(v)
    return quantize(v, 16)
