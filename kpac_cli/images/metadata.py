"""XMP packets and print resolution: the metadata copied from input to output as it is; and
the mark kpac's blur-map writers leave in what they write (:func:`blurmap_kind`).

(EXIF, which is edited in place, has its own module :mod:`.exif`; ICC profiles are opaque bytes.)

Conventions
-----------
XMP
    ``ImageInfo.xmp`` is the raw XMP packet, ``bytes`` (UTF-8 XML with the ``<?xpacket?>``
    wrapper and padding the source had), as stored in JPEG APP1 (``http://ns.adobe.com/xap/1.0/``),
    PNG iTXt (keyword ``XML:com.adobe.xmp``) and TIFF tag 700 (XMLPacket). It is never handed
    to an XML parser (no untrusted XML is parsed); the only edits are byte-level ones,
    :func:`reset_xmp_orientation`, :func:`set_xmp_pixel_dimensions` and
    :func:`without_secondary_media`, the only searches
    :func:`declares_gain_map` and :func:`declares_motion_photo`.
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

import bisect
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


#: XMP namespace of Adobe Camera Raw's develop settings (``crs:``), which a raw file's XMP holds:
#: applied again to an already developed output (Lightroom reads them on TIFF and JPEG too), they
#: would change it a second time.
CAMERA_RAW_SETTINGS_NAMESPACE = b"http://ns.adobe.com/camera-raw-settings/1.0/"


def without_raw_develop_settings(xmp: bytes) -> bytes:
    """Copy of a raw file's ``xmp`` without its Camera Raw develop settings (``crs:``) and with
    ``tiff:Orientation`` 1: what describes the photo (rating, label, keywords, title, creator,
    rights, capture details) stays, for the developed output."""
    return reset_xmp_orientation(_without_properties(xmp, CAMERA_RAW_SETTINGS_NAMESPACE))


#: XMP namespaces of HDR gain map metadata: Adobe's (Ultra HDR, and the XMP form of ISO 21496-1
#: gain maps) and Apple's (iPhone photos).
GAIN_MAP_NAMESPACES = (b"http://ns.adobe.com/hdr-gain-map/1.0/", b"http://ns.apple.com/HDRGainMap/1.0/")
#: How a JPEG APP2 segment of ISO 21496-1 gain map metadata begins: the version alone in the
#: primary picture, all of the metadata in the gain map picture.
ISO_GAIN_MAP_URN = b"urn:iso:std:iso:ts:21496:-1"

# The image's size in XMP, as an attribute (exif:PixelXDimension="6000") or an element: the
# EXIF copies (exif:) and the TIFF ones (tiff:); group 1 is the name, group 2 what precedes the value
_XMP_SIZE = re.compile(rb"""((exif:PixelXDimension|exif:PixelYDimension|tiff:ImageWidth|tiff:ImageLength)(?:\s*=\s*["']|>)\s*)\d+""")
_WIDTH_NAMES = (b"exif:PixelXDimension", b"tiff:ImageWidth")


def set_xmp_pixel_dimensions(xmp: bytes, width: int, height: int) -> bytes:
    """Copy of ``xmp`` whose size properties (``exif:PixelX/YDimension``, ``tiff:ImageWidth/Length``)
    say ``width`` x ``height``, the pixels written (turned upright on read, a RAW's crop); those
    absent are not added. A byte-level edit of the digits, as EXIF's copies are edited."""
    return _XMP_SIZE.sub(lambda m: m.group(1) + str(width if m.group(2) in _WIDTH_NAMES else height).encode(), xmp)


# An HDR gain map in XMP: a gain map namespace (the primary picture's hdrgm:Version, a gain map
# picture's own metadata), or a GContainer directory item whose semantic is GainMap.
_XMP_GAIN_MAP = re.compile(
    b"|".join(re.escape(ns) for ns in GAIN_MAP_NAMESPACES) + rb"""|Semantic\s*=\s*["']\s*GainMap\s*["']|Semantic>\s*GainMap\s*<"""
)


def declares_gain_map(xmp: bytes | None) -> bool:
    """Whether ``xmp`` speaks of an HDR gain map: a JPEG primary picture's XMP that declares one
    (Android Ultra HDR, Adobe gain maps), or the gain map picture's own (Adobe, Ultra HDR, Apple).
    The gain map is the picture, stored after the primary one (MPF), that lifts it to its HDR
    rendition. A byte-level search, no XML parsing."""
    return xmp is not None and _XMP_GAIN_MAP.search(xmp) is not None


#: Apple's XMP namespace of what an auxiliary picture stored beside an iPhone photo holds
#: (``apdi:AuxiliaryImageType``: a depth map, a portrait matte, a gain map).
APPLE_AUXILIARY_NAMESPACE = b"http://ns.apple.com/pixeldatainfo/1.0/"


def describes_auxiliary_image(xmp: bytes | None) -> bool:
    """Whether ``xmp`` is that of an auxiliary picture (Apple's ``apdi:AuxiliaryImageType``): data
    about the photo beside it (depth, a matte), not an image to look at. A byte-level search."""
    return xmp is not None and APPLE_AUXILIARY_NAMESPACE in xmp and b"AuxiliaryImageType" in xmp


def _prefixes_of(namespace: bytes, xmp: bytes) -> set[bytes]:
    """The prefixes that ``xmp`` binds to ``namespace`` (``xmlns:hdrgm="..."`` gives ``hdrgm``)."""
    declaration = rb"""xmlns:([\w.-]+)\s*=\s*["']""" + re.escape(namespace) + rb"""["']"""
    return set(re.findall(declaration, xmp))


def _without_properties(xmp: bytes, namespace: bytes, names: bytes | None = None) -> bytes:
    """``xmp`` without the properties of ``namespace`` (elements and attributes, under every prefix
    bound to it) whose names match the pattern ``names``; with None, without all of them and
    the declarations binding the namespace too."""
    name = rb"[\w.-]+" if names is None else names
    for prefix in _prefixes_of(namespace, xmp):
        p = re.escape(prefix)
        # one blank before an attribute goes with it; runs of blanks are never scanned from each
        # of their bytes (XMP padding is kilobytes of them)
        xmp = re.sub(b"<" + p + b":" + name + rb"\b[^<>]*/>", b"", xmp)  # <hdrgm:Version/>
        xmp = _without_spans(xmp, _element_spans(xmp, p, name))  # <hdrgm:Version>1.0</hdrgm:Version>
        xmp = re.sub(rb"\s" + p + b":" + name + rb"""\s*=\s*(?:"[^"]*"|'[^']*')""", b"", xmp)  # hdrgm:Version="1.0"
        if names is None:
            xmp = re.sub(rb"""\sxmlns:""" + p + rb"""\s*=\s*["']""" + re.escape(namespace) + rb"""["']""", b"", xmp)
    return xmp


def _element_spans(xmp: bytes, prefix: bytes, name: bytes) -> list[tuple[int, int]]:
    """``(start, end)`` of each element ``<prefix:NAME ...>...</prefix:NAME>`` whose name matches
    the pattern ``name``, each up to the first closing tag of its name after it. Every closing
    tag is found once, then looked up: a pattern scanning ahead from each start tag takes time
    quadratic in the packet's size when closing tags are missing (packets reach megabytes)."""
    closing: dict[bytes, list[tuple[int, int]]] = {}
    for m in re.finditer(b"</" + prefix + b":(" + name + rb")\s*>", xmp):
        closing.setdefault(m.group(1), []).append((m.start(), m.end()))
    spans = []
    for m in re.finditer(b"<" + prefix + b":(" + name + rb")\b[^<>]*(?<!/)>", xmp):
        ends = closing.get(m.group(1), [])
        i = bisect.bisect_left(ends, (m.end(), 0))
        if i < len(ends):
            spans.append((m.start(), ends[i][1]))
    return spans


def _without_spans(xmp: bytes, spans: list[tuple[int, int]]) -> bytes:
    """``xmp`` without the byte ranges ``spans`` (sorted by start; one inside another goes with it)."""
    kept, at = [], 0
    for start, end in spans:
        if start >= at:
            kept.append(xmp[at:start])
            at = end
        else:
            at = max(at, end)
    return b"".join(kept) + xmp[at:] if spans else xmp


#: Google's camera namespace, whose MotionPhoto* and MicroVideo* properties say that a video
#: follows the JPEG (a motion photo).
GOOGLE_CAMERA_NAMESPACE = b"http://ns.google.com/photos/1.0/camera/"
_MOTION_PHOTO_PROPERTIES = rb"(?:MotionPhoto|MicroVideo)[\w.-]*"

# A GContainer directory item is an innermost rdf:li; what it holds is told by its Semantic
_ITEM_START = re.compile(rb"<rdf:li\b")
_ITEM_END = re.compile(rb"</rdf:li\s*>")
_ITEM_SEMANTIC = re.compile(rb""":Semantic(?:\s*=\s*["']|>)\s*([\w.-]+)\s*["'<]""")


def _secondary_item_spans(xmp: bytes) -> list[tuple[int, int]]:
    """``(start, end)`` of each GContainer directory item (an innermost ``rdf:li``) of media other
    than the primary picture: a gain map, a motion photo's video, a depth map, ... Each item is
    searched between its start and the next item's start only (linear in the packet's size)."""
    starts = [m.start() for m in _ITEM_START.finditer(xmp)] + [len(xmp)]
    spans = []
    for start, next_start in zip(starts, starts[1:]):
        end = _ITEM_END.search(xmp, start, next_start)
        if end is None:  # not innermost (another item starts first), or unclosed
            continue
        semantic = _ITEM_SEMANTIC.search(xmp, start, end.start())
        if semantic is not None and semantic.group(1) != b"Primary":
            spans.append((start, end.end()))
    return spans


# A motion photo's video declared: GCamera:MotionPhoto="1" (or the older MicroVideo), as an
# attribute or an element, or a GContainer item whose semantic is MotionPhoto.
_XMP_MOTION_PHOTO = re.compile(
    rb"""(?:MotionPhoto|MicroVideo)(?:\s*=\s*["']|>)\s*1\s*["'<]|Semantic(?:\s*=\s*["']|>)\s*MotionPhoto\s*["'<]"""
)


def declares_motion_photo(xmp: bytes | None) -> bool:
    """Whether ``xmp`` (a JPEG's) says a video follows the picture in the file (a motion photo:
    Google's ``GCamera:MotionPhoto``/``MicroVideo``). A byte-level search, no XML parsing."""
    return xmp is not None and _XMP_MOTION_PHOTO.search(xmp) is not None


#: Namespaces whose properties all describe data a JPEG keeps outside its main XMP packet, in
#: the extended XMP segments no output holds: the pointer to them (``xmpNote:HasExtendedXMP``),
#: Google's depth map and the original picture of a portrait (``GDepth:*``, ``GImage:*``).
EXTENDED_XMP_NAMESPACES = (b"http://ns.adobe.com/xmp/note/", b"http://ns.google.com/photos/1.0/depthmap/",
                           b"http://ns.google.com/photos/1.0/image/")


def without_secondary_media(xmp: bytes) -> bytes:
    """Copy of ``xmp`` that describes the primary picture alone, for a file that holds it alone
    (kpac writes no HDR gain map, motion photo video, extended XMP or other media stored
    beside a photo).

    Removed are the properties of the :data:`GAIN_MAP_NAMESPACES` (``hdrgm:Version`` ...) and
    the :data:`EXTENDED_XMP_NAMESPACES` with their namespace declarations, Google's motion
    photo properties (``GCamera:MotionPhoto*``, ``GCamera:MicroVideo*``) and the GContainer
    directory items other than the primary picture; every other byte stays as it was. Left
    in, they would send HDR-aware viewers looking for a gain map, and photo apps for a video
    or a depth map, that are not there. A byte-level edit, no XML parsing.
    """
    whole = GAIN_MAP_NAMESPACES + EXTENDED_XMP_NAMESPACES
    if not (any(ns in xmp for ns in whole) or GOOGLE_CAMERA_NAMESPACE in xmp or b"Semantic" in xmp):
        return xmp
    for namespace in whole:
        xmp = _without_properties(xmp, namespace)
    xmp = _without_properties(xmp, GOOGLE_CAMERA_NAMESPACE, _MOTION_PHOTO_PROPERTIES)
    return _without_spans(xmp, _secondary_item_spans(xmp))


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
