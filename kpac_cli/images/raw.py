"""Camera RAW development with LibRaw (via rawpy).

RAW files are developed to 16-bit RGB (``ImageInfo.bit_depth == 16``, ``format == 'raw'``)
with the camera's white balance, AHD demosaicing, sRGB primaries and the sRGB tone curve by
default, without LibRaw's automatic brightening (so exposure is what the camera recorded).
LibRaw applies the camera's orientation itself; the value it applied is reported as
``orientation_applied``. No EXIF or ICC profile is produced: outputs are plain 16-bit TIFFs
whose colour space is the one chosen by ``RawOptions.output_colorspace`` (untagged).
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
        Files without a colour filter mosaic (linear DNGs, already demosaiced), which LibRaw
        develops at full size whatever is asked, are binned 2x2 in linear light afterwards.
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
        raise ImageError(name, f"cannot decode camera RAW (LibRaw: {_libraw_message(exc)})") from None
    return raw


def _dims(raw) -> tuple[int, int, int]:
    s = raw.sizes
    orientation = _FLIP_TO_EXIF.get(int(s.flip), 1)
    return int(s.height), int(s.width), orientation


def probe_raw(source, name) -> tuple[int, int]:
    """``(height, width)`` of the developed full-size RAW image, from its header only."""
    raw = _open(source, name)
    try:
        h, w, o = _dims(raw)
    finally:
        raw.close()
    if h <= 0 or w <= 0:
        raise ImageError(name, "camera RAW reports zero size")
    return (w, h) if o in (5, 6, 7, 8) else (h, w)


def read_raw(source, name, *, max_pixels: int | None, options: RawOptions | None) -> tuple[np.ndarray, int]:
    """Develop a RAW file to ``uint16`` H x W x 3 RGB.

    Returns the array and the EXIF orientation LibRaw applied. The pixel limit is checked on
    the header's sensor size before the sensor data are unpacked.
    """
    import rawpy

    opts = options or RawOptions()
    raw = _open(source, name)
    try:
        h, w, orientation = _dims(raw)
        if h <= 0 or w <= 0:
            raise ImageError(name, "camera RAW reports zero size")
        # From the header, before the sensor data are unpacked: a Bayer file is developed at
        # half size when asked (whether the file has a mosaic is known only once unpacked).
        _check_pixels(name, h, w, opts.half_size, max_pixels)
        try:
            raw.unpack()  # before reading daylight_whitebalance: LibRaw needs the unpacked data
        except rawpy.LibRawError as exc:
            raise ImageError(name, f"cannot decode camera RAW (LibRaw: {_libraw_message(exc)})") from None
        # LibRaw halves only mosaic (CFA) data; anything else is developed at full size.
        bin_after = opts.half_size and raw.raw_pattern is None
        if bin_after:
            _check_pixels(name, h, w, False, max_pixels)
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
        if opts.white_balance == "camera":
            kwargs["use_camera_wb"] = True
        elif opts.white_balance == "auto":
            kwargs["use_auto_wb"] = True
        else:
            kwargs["user_wb"] = list(raw.daylight_whitebalance)
        try:
            rgb = raw.postprocess(**kwargs)
        except rawpy.NotSupportedError as exc:
            raise ImageError(name, f"demosaic '{opts.demosaic}' is not supported by this LibRaw build ({exc})") from None
        except rawpy.LibRawError as exc:
            raise ImageError(name, f"cannot decode camera RAW (LibRaw: {_libraw_message(exc)})") from None
    finally:
        raw.close()
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint16 or rgb.size == 0:
        raise ImageError(name, f"camera RAW developed to an unexpected array {rgb.shape} {rgb.dtype}")
    if bin_after and rgb.shape[0] * rgb.shape[1] == h * w:
        rgb = _half_size(rgb, opts.gamma)
    return rgb, orientation


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
