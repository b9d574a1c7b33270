"""HEIC/HEIF photos (the iPhone's default format), read through pillow-heif (libheif).

An optional extra: ``pip install "kpac[heic]"``. Without it, :func:`available` is False and
:mod:`.io` refuses HEIF content, saying how to get the extra or what to convert to.

What libheif gives, and what kpac makes of it (:mod:`.io` applies the pixel conventions):

* The primary image is decoded, with libheif's transformations applied: the rotation and
  mirroring a HEIF stores as ``irot``/``imir`` (and the ``clap`` crop). They are the file's
  orientation; the EXIF Orientation tag of a HEIF is informative only (HEIF, ISO/IEC 23008-12),
  and may disagree or be stale, so it is never applied on top. :attr:`HeifHeader.orientation`
  is what the transformations amount to, as an EXIF orientation (1-8).
* Samples come as stored: 8 bits, or 10/12 bits in ``uint16`` (never shifted to 16 bits, so
  :mod:`.io` can scale them exactly as it scales a 9-15-bit TIFF's).
* ``frames`` counts the top-level images (a burst, an image collection). Thumbnails, depth
  maps, alpha planes and other auxiliary images (portrait mattes, HDR gain maps) are none:
  libheif lists them under their image. An HDR gain map is recognised (:attr:`HeifHeader.gain_map`):
  Apple's by its auxiliary type, an ISO 21496-1 one (iOS 18, Android) by the ``tmap`` brand of
  its file, which holds it as the hidden input of a tone-mapped image that libheif does not list.
* Colour: an ICC profile is kept as it is. ``nclx`` colour information (codes of ITU-T H.273)
  without a profile becomes one (:func:`nclx_profile`) when it is no plain sRGB and a matrix/TRC
  profile can say it (:mod:`.io` makes it a grey one for grey pixels); HDR transfers (PQ, HLG)
  cannot, and are reported rather than mislabelled.

AVIF is not read: the pillow-heif wheels carry no AV1 decoder.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from . import icc as icc_mod
from .exif import apply_orientation

#: How to get HEIC support, said by every refusal of HEIF content without it.
INSTALL_HINT = 'pip install "kpac[heic]"'

#: Apple's auxiliary image type of the HDR gain map stored beside an iPhone photo.
APPLE_GAIN_MAP_AUX_TYPE = "urn:com:apple:photo:2020:aux:hdrgainmap"

#: The ``ftyp`` brand of a HEIF holding a tone-map derived image (``tmap``, ISO/IEC 23008-12
#: Amd 1): the HDR rendition of the primary image by an ISO 21496-1 gain map.
TONE_MAP_BRAND = b"tmap"

#: How much of a file's start is read for its ``ftyp`` brands: the box comes first, and is short.
_FTYP_HEAD_BYTES = 4096

#: The attribute of an opened file (:func:`open_file`) that holds its ``ftyp`` brands.
_BRANDS_ATTR = "kpac_ftyp_brands"

#: Display P3 (SMPTE EG 432-1 primaries, D65 white; H.273 colour primaries 12): the colour space
#: of iPhone photos.
DISPLAY_P3_PRIMARIES = ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060))

#: H.273 colour primaries codes: the sRGB / BT.709 ones (1) and "unspecified" (2), which
#: readers take for sRGB; 12 is Display P3.
_SRGB_PRIMARIES_CODES = (1, 2)
_DISPLAY_P3_CODE = 12
_PRIMARIES_NAMES = {4: "BT.470 M", 5: "BT.601 (625 lines)", 6: "BT.601 (525 lines)", 7: "SMPTE 240M", 8: "generic film",
                    9: "BT.2020", 10: "XYZ", 11: "DCI-P3", 12: "Display P3", 22: "EBU 3213"}
#: H.273 transfer characteristics: those a tone curve of a display profile says. The SDR video
#: curves (BT.709, BT.601, BT.2020) are shown with sRGB's, as photo viewers show them.
_TRANSFER_CURVES: dict[int, float | str] = {1: "srgb", 2: "srgb", 6: "srgb", 13: "srgb", 14: "srgb", 15: "srgb",
                                             4: 2.2, 5: 2.8, 8: 1.0}
_TRANSFER_NAMES = {16: "PQ (HDR, SMPTE ST 2084)", 18: "HLG (HDR, ARIB STD-B67)", 7: "SMPTE 240M", 9: "logarithmic",
                   10: "logarithmic", 11: "IEC 61966-2-4", 12: "BT.1361", 17: "SMPTE ST 428-1"}


@cache
def available() -> bool:
    """Whether pillow-heif (the ``heic`` extra) is installed."""
    try:
        import pillow_heif  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class HeifHeader:
    """What a HEIF's header says of its primary image, before any pixel is decoded."""

    width: int  # as displayed: libheif's transformations applied
    height: int
    bit_depth: int  # bits per sample as stored: 8, 10 or 12
    alpha: bool
    premultiplied: bool  # the alpha plane says the colour is premultiplied by it
    orientation: int  # what the irot/imir transformations amount to, as an EXIF orientation
    frames: int  # top-level images
    gain_map: bool  # an HDR gain map is stored beside the primary image (Apple's, or ISO 21496-1)


def open_file(source: str | os.PathLike | bytes, *, lazy: bool = False) -> Any:
    """The pillow-heif ``HeifFile`` of ``source`` (a path or the file's bytes); its header is
    parsed, nothing is decoded. ``lazy`` reads only the parts of a file the header needs (for
    probes). Raises what libheif raises for damaged content (ValueError, RuntimeError, ...)."""
    import pillow_heif

    in_memory = isinstance(source, (bytes, bytearray, memoryview))
    arg = io.BytesIO(source) if in_memory else os.fspath(source)
    lazy_read = lazy and isinstance(arg, str)
    # samples as stored: no conversion to 8 bits, no shift to the 16-bit range
    heif_file = pillow_heif.open_heif(arg, convert_hdr_to_8bit=False, hdr_to_16bit=False, lazy_read=lazy_read)
    head = bytes(source[:_FTYP_HEAD_BYTES]) if in_memory else _file_head(arg)
    # libheif lists no tone-mapped image: its brand is what tells of an ISO 21496-1 gain map
    setattr(heif_file, _BRANDS_ATTR, ftyp_brands(head))
    return heif_file


def _file_head(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(_FTYP_HEAD_BYTES)


def ftyp_brands(head: bytes) -> frozenset[bytes]:
    """The major and compatible brands of the ``ftyp`` box that ``head`` (a file's first bytes)
    starts with; none where it starts with no such box."""
    if len(head) < 12 or head[4:8] != b"ftyp":
        return frozenset()
    end = min(int.from_bytes(head[:4], "big"), len(head))
    compatible = (head[at : at + 4] for at in range(16, end - 3, 4))  # after the major brand and minor version
    return frozenset({head[8:12], *compatible})


def header(heif_file: Any) -> HeifHeader:
    """The :class:`HeifHeader` of an opened file's primary image."""
    primary = heif_file[heif_file.primary_index]
    width, height = primary.size
    return HeifHeader(
        width=int(width),
        height=int(height),
        bit_depth=int(primary.info.get("bit_depth") or 8),
        alpha=bool(primary.has_alpha),
        premultiplied=bool(primary.premultiplied_alpha),
        orientation=orientation_of(getattr(primary._c_image, "transformations", ())),  # noqa: SLF001
        frames=len(heif_file),
        gain_map=has_gain_map(primary.info.get("aux")) or TONE_MAP_BRAND in getattr(heif_file, _BRANDS_ATTR, ()),
    )


def orientation_of(transformations: Any) -> int:
    """The EXIF orientation (1-8) that libheif's transformations of an image amount to: the
    ``("irot", degrees counter-clockwise)`` and ``("imir", direction)`` steps, in their order
    (direction 0 flips top to bottom, 1 left to right); the ``clap`` crop turns nothing. 1
    when they are unknown."""
    probe = np.arange(6).reshape(2, 3)
    turned = probe
    try:
        for step in transformations:
            if step[0] == "irot":
                turned = np.rot90(turned, int(step[1]) // 90)
            elif step[0] == "imir":
                turned = turned[:, ::-1] if int(step[1]) == 1 else turned[::-1]
    except (TypeError, ValueError, IndexError):
        return 1
    return next((o for o in range(1, 9) if np.array_equal(apply_orientation(probe, o), turned)), 1)


def has_gain_map(aux: dict[str, Any] | None) -> bool:
    """Whether pillow-heif's ``info["aux"]`` of an image (auxiliary type -> image ids) holds an
    HDR gain map (Apple's)."""
    return bool(aux) and any(str(kind).startswith(APPLE_GAIN_MAP_AUX_TYPE) for kind in aux)


def decode(heif_file: Any) -> np.ndarray:
    """The primary image's samples, ``H x W x C`` (C: 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA),
    ``uint8`` or ``uint16`` codes of the stored bit depth, upright as libheif turns them."""
    primary = heif_file[heif_file.primary_index]
    arr = np.asarray(primary)
    if arr.ndim == 2:
        arr = arr[..., None]
    return arr


def metadata(heif_file: Any) -> tuple[bytes | None, Any, Any, dict | None]:
    """The primary image's ICC profile, EXIF and XMP (as pillow-heif gives them, unchecked) and
    its nclx colour information (None where an ICC profile or nothing is stored)."""
    info = heif_file[heif_file.primary_index].info
    icc = info.get("icc_profile")
    icc = bytes(icc) if isinstance(icc, (bytes, bytearray)) and icc else None
    nclx = info.get("nclx_profile") if icc is None else None
    return icc, info.get("exif"), info.get("xmp"), nclx if isinstance(nclx, dict) else None


def nclx_profile(nclx: dict | None) -> tuple[bytes | None, str | None]:
    """``(ICC profile, colour space left unsaid)`` of a HEIF's nclx colour information.

    No profile for sRGB (BT.709 or unspecified primaries with an SDR curve): untagged means
    sRGB. A profile made with :func:`.icc.rgb_profile` for other primaries (Display P3, BT.2020,
    ...: the chromaticities the file gives) with a curve a display profile holds. None and a
    description of the colour space for what no such profile says (PQ, HLG: HDR), so that the
    caller can tell the user rather than write it as if it were sRGB.
    """
    if not nclx:
        return None, None
    primaries = int(nclx.get("color_primaries", 2))
    transfer = int(nclx.get("transfer_characteristics", 2))
    curve = _TRANSFER_CURVES.get(transfer)
    if curve is None:
        name = _TRANSFER_NAMES.get(transfer, f"code {transfer}")
        return None, f"the {name} transfer characteristics"
    if primaries in _SRGB_PRIMARIES_CODES and curve == "srgb":
        return None, None
    chromaticities = _chromaticities(nclx, primaries)
    if chromaticities is None:
        return None, f"colour primaries code {primaries}"
    rgb, white = chromaticities
    name = "sRGB" if primaries in _SRGB_PRIMARIES_CODES else _PRIMARIES_NAMES.get(primaries, f"H.273 code {primaries}")
    tone = "sRGB tone curve" if curve == "srgb" else ("linear" if curve == 1.0 else f"gamma {curve}")
    try:
        return icc_mod.rgb_profile(f"{name} primaries, {tone}", rgb, white, curve), None
    except ValueError:  # primaries on one line: no colour space
        return None, f"colour primaries code {primaries}"


def _chromaticities(nclx: dict, primaries: int) -> tuple[tuple, tuple] | None:
    """The xy chromaticities of the primaries and white point: Display P3's own numbers for
    code 12, else those libheif gives (rounded to 4 places, as the specifications state them,
    so that the profile's bytes are the same for every file); None where they are missing or
    not a colour space (XYZ)."""
    if primaries == _DISPLAY_P3_CODE:
        return DISPLAY_P3_PRIMARIES, icc_mod.D65
    if primaries in _SRGB_PRIMARIES_CODES:
        return icc_mod.SRGB_PRIMARIES, icc_mod.D65
    if primaries == 10:  # XYZ: no RGB primaries
        return None
    try:
        xy = [(round(float(nclx[f"color_primary_{c}_x"]), 4), round(float(nclx[f"color_primary_{c}_y"]), 4))
              for c in ("red", "green", "blue", "white")]
    except (KeyError, TypeError, ValueError):
        return None
    if any(not (0 < x < 1 and 0 < y < 1) for x, y in xy):
        return None
    return tuple(xy[:3]), xy[3]


__all__ = ["APPLE_GAIN_MAP_AUX_TYPE", "DISPLAY_P3_PRIMARIES", "INSTALL_HINT", "TONE_MAP_BRAND", "HeifHeader",
           "available", "decode", "ftyp_brands", "has_gain_map", "header", "metadata", "nclx_profile", "open_file",
           "orientation_of"]
