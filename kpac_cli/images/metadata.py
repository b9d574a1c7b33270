"""XMP packets and print resolution: the metadata copied from input to output as it is; and
the mark kpac's blur-map writers leave in what they write (:func:`blurmap_kind`).

(EXIF, which is edited in place, has its own module :mod:`.exif`; ICC profiles are opaque bytes.)

Conventions
-----------
XMP
    ``ImageInfo.xmp`` is the raw XMP packet, ``bytes`` (UTF-8 XML with the ``<?xpacket?>``
    wrapper and padding the source had), as stored in JPEG APP1 (``http://ns.adobe.com/xap/1.0/``),
    PNG iTXt (keyword ``XML:com.adobe.xmp``) and TIFF tag 700 (XMLPacket). It is never handed
    to an XML parser (no untrusted XML is parsed); the only edit is :func:`reset_xmp_orientation`,
    the only search :func:`declares_gain_map`.
    A packet that is empty, not UTF-8, or longer than :data:`MAX_XMP` bytes is ignored.
Resolution
    ``ImageInfo.dpi`` is the print resolution as ``(x, y)`` floats in pixels per inch (a pair:
    non-square pixels exist), or None when the source has none or only an aspect ratio (unit
    "unknown"/"none"). Per-centimetre values are multiplied by 2.54, PNG's per-metre values by
    0.0254; values outside ``[MIN_DPI, MAX_DPI]`` (or not finite) are ignored. Each format
    stores it as close as it can: JPEG JFIF density in whole dpi (omitted when a value
    rounds outside 1-65535), PNG pHYs in whole pixels per metre, TIFF as rationals.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

#: XMP packets longer than this (bytes, after decompression) are ignored on read. Real
#: packets are kilobytes to a few megabytes (edit histories); this stops zlib bombs and
#: absurd tags from costing memory.
MAX_XMP = 16 << 20

#: Accepted print resolutions, dots per inch (1 dpi to ~1 um pixels).
MIN_DPI = 1.0
MAX_DPI = 1_000_000.0

PNG_DPI_PER_PPM = 0.0254  # pixels per metre -> pixels per inch (Pillow's factor)


def normalize_xmp(data: bytes | bytearray | memoryview | str | None) -> bytes | None:
    """The XMP packet as ``bytes``, or None when absent, empty, not UTF-8 or over :data:`MAX_XMP`.

    Trailing NUL bytes (a C-string terminator some writers add) are dropped; nothing else
    changes.
    """
    if data is None:
        return None
    if isinstance(data, str):  # tag 700 written as ASCII by some tools
        try:
            data = data.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates
            return None
    if len(data) > MAX_XMP:
        return None
    packet = bytes(data).rstrip(b"\x00")
    if not packet.strip():
        return None
    try:
        packet.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return packet


# tiff:Orientation as an attribute (tiff:Orientation="6") or an element (<tiff:Orientation>6<).
_XMP_ORIENTATION = re.compile(rb"""(tiff:Orientation\s*=\s*["']\s*|<tiff:Orientation>\s*)[1-8]""")


def reset_xmp_orientation(xmp: bytes) -> bytes:
    """Copy of ``xmp`` with ``tiff:Orientation`` set to 1 (the pixels were re-oriented on read).

    A byte-level edit of one digit (no XML parsing), so the packet keeps its length.
    """
    return _XMP_ORIENTATION.sub(lambda m: m.group(1) + b"1", xmp)


# An HDR gain map declared by the primary image's XMP: the Adobe/ISO gain map namespace
# (hdrgm:Version, Ultra HDR too), or a GContainer directory item whose semantic is GainMap.
_XMP_GAIN_MAP = re.compile(
    rb"""http://ns\.adobe\.com/hdr-gain-map/1\.0/|Semantic\s*=\s*["']\s*GainMap\s*["']|Semantic>\s*GainMap\s*<"""
)


def declares_gain_map(xmp: bytes | None) -> bool:
    """Whether ``xmp`` (a JPEG's primary XMP packet) declares an HDR gain map: the picture, stored
    after the primary one (MPF), that lifts it to its HDR rendition (Android Ultra HDR, Adobe
    and ISO 21496-1 gain maps). A byte-level search, no XML parsing."""
    return xmp is not None and _XMP_GAIN_MAP.search(xmp) is not None


def normalize_dpi(x: object, y: object, scale: float = 1.0) -> tuple[float, float] | None:
    """``(x * scale, y * scale)`` as floats when both are finite and within
    ``[MIN_DPI, MAX_DPI]``, else None. ``scale`` converts to per-inch (e.g. 2.54 for per-cm).

    ``x`` and ``y`` may be numbers or ``(numerator, denominator)`` rationals (TIFF/EXIF); a
    zero denominator or anything that is not a number gives None.
    """
    try:
        vals = []
        for v in (x, y):
            if isinstance(v, tuple):
                num, den = v
                v = float(num) / float(den)
            vals.append(float(v) * scale)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
    if not all(math.isfinite(v) and MIN_DPI <= v <= MAX_DPI for v in vals):
        return None
    return vals[0], vals[1]


def dpi_from_tiff_tags(x: object, y: object, unit: object) -> tuple[float, float] | None:
    """dpi from TIFF/EXIF XResolution, YResolution and ResolutionUnit (None: absent, which
    the TIFF spec reads as 2 = inch). Unit 1 (no absolute unit) and unknown units give None."""
    if x is None or y is None:
        return None
    try:
        unit = 2 if unit is None else int(unit)
    except (TypeError, ValueError):
        return None
    if unit == 2:
        return normalize_dpi(x, y)
    if unit == 3:
        return normalize_dpi(x, y, 2.54)
    return None


#: The PNG text keyword (and TIFF ImageDescription prefix) that marks a file kpac's blur-map
#: writers made (:mod:`kpac_cli.blurmap.render`), with its kind as the value.
BLURMAP_MARK_KEY = "kpac-blurmap"
#: What a marked file holds: the detection map, a raw attention map (``--all``), the
#: blur-size estimate, a predicted mask, an overlay, a contact sheet.
BLURMAP_KINDS = ("blurmap", "attention", "defocus", "mask", "overlay", "sheet")


def blurmap_kind(path: str | Path) -> str | None:
    """What a file written by kpac's blur-map writers holds (one of :data:`BLURMAP_KINDS`), read
    from its metadata; None for any other file (a photo, a ground-truth mask, an unreadable
    file). Only PNG and TIFF files are opened (their header), others are judged by name."""
    ext = Path(path).suffix.lower()
    try:
        if ext == ".png":
            from PIL import Image

            with Image.open(path) as im:  # text chunks before the image data: read on open
                value = im.info.get(BLURMAP_MARK_KEY)
        elif ext in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                described = tif.pages.first.description or ""
            prefix = f"{BLURMAP_MARK_KEY}: "
            value = described[len(prefix) :] if described.startswith(prefix) else None
        else:
            return None
    except Exception:  # noqa: BLE001 - any unreadable file is simply not one of ours
        return None
    return value if value in BLURMAP_KINDS else None
