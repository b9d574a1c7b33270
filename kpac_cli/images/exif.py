"""EXIF helpers: orientation read/reset on raw EXIF bytes, and pixel re-orientation.

EXIF is kept as a JPEG APP1 payload (``b"Exif\\0\\0"`` + TIFF structure) and edited in place
(only the Orientation and the pixel dimensions change), so maker notes with absolute offsets
stay valid; a full re-serialisation (e.g. ``PIL.Image.Exif.tobytes``) would break them.
"""

from __future__ import annotations

import struct
import warnings
from typing import BinaryIO

import numpy as np

from .metadata import dpi_from_tiff_tags

EXIF_PREFIX = b"Exif\x00\x00"
ORIENTATION_TAG = 0x0112

#: IFD0 tags copied when EXIF is rebuilt from a TIFF's own tags (descriptive ones only;
#: structural tags such as StripOffsets would be wrong in any other file).
DESCRIPTIVE_TAGS = {
    270: "ImageDescription",
    271: "Make",
    272: "Model",
    305: "Software",
    306: "DateTime",
    315: "Artist",
    33432: "Copyright",
}
_SUB_IFDS = (0x8769, 0x8825)  # Exif IFD, GPS IFD


def normalize_exif(data: bytes | None) -> bytes | None:
    """Return EXIF with the ``Exif\\0\\0`` prefix, or None when it is not TIFF-structured."""
    if not data:
        return None
    body = bytes(data)
    while body.startswith(EXIF_PREFIX):  # tolerate a doubled prefix (a common tool bug)
        body = body[6:]
    if body[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    return EXIF_PREFIX + body


def _first_ifd(exif: bytes) -> tuple[int, str, int] | None:
    """Locate IFD0: (absolute offset of its entry count, byte order, number of entries)."""
    base = 6 if exif.startswith(EXIF_PREFIX) else 0
    head = exif[base : base + 8]
    if len(head) < 8 or head[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    bo = "<" if head[:2] == b"II" else ">"
    (ifd,) = struct.unpack(bo + "I", head[4:8])
    pos = base + ifd
    if pos + 2 > len(exif):
        return None
    (n,) = struct.unpack(bo + "H", exif[pos : pos + 2])
    return pos, bo, n


def _ifd_entries(exif: bytes, pos: int, bo: str) -> list[tuple[int, int, int, int]]:
    """``(absolute offset, tag, type, count)`` of the entries of the directory at ``pos``
    (absolute), as many as lie within ``exif``."""
    if pos + 2 > len(exif):
        return []
    (n,) = struct.unpack(bo + "H", exif[pos : pos + 2])
    entries = []
    for i in range(n):
        e = pos + 2 + 12 * i
        if e + 12 > len(exif):
            break
        entries.append((e, *struct.unpack(bo + "HHI", exif[e : e + 8])))
    return entries


def ifd0_entries(data: bytes) -> tuple[str, list[tuple[int, int, int, int]]] | None:
    """The byte order (``"<"`` or ``">"``) and the ``(absolute offset, tag, type, count)`` of the
    IFD0 entries of TIFF-structured ``data``: an EXIF block (with or without its ``Exif\\0\\0``
    prefix), a JPEG's MP index. None where no TIFF header or IFD0 is found."""
    found = _first_ifd(data)
    if found is None:
        return None
    pos, bo, _n = found
    return bo, _ifd_entries(data, pos, bo)


def _orientation_entry(exif: bytes) -> tuple[int, str, int] | None:
    """Locate IFD0's Orientation entry: (absolute offset of its value, byte order, type)."""
    found = _first_ifd(exif)
    if found is None:
        return None
    pos, bo, _n = found
    for e, tag, typ, count in _ifd_entries(exif, pos, bo):
        if tag == ORIENTATION_TAG and count == 1 and typ in (3, 4):  # SHORT or LONG
            return e + 8, bo, typ
    return None


def read_orientation(exif: bytes | None) -> int:
    """EXIF Orientation (1-8) from raw EXIF bytes; 1 when absent or invalid."""
    if not exif:
        return 1
    found = _orientation_entry(bytes(exif))
    if found is None:
        return 1
    off, bo, typ = found
    value = struct.unpack(bo + ("H" if typ == 3 else "I"), exif[off : off + (2 if typ == 3 else 4)])[0]
    return value if 1 <= value <= 8 else 1


def reset_orientation(exif: bytes) -> bytes:
    """Copy of ``exif`` with the Orientation value set to 1 (unchanged when absent)."""
    found = _orientation_entry(exif)
    if found is None:
        return exif
    off, bo, typ = found
    out = bytearray(exif)
    out[off : off + (2 if typ == 3 else 4)] = struct.pack(bo + ("H" if typ == 3 else "I"), 1)
    return bytes(out)


#: Exif sub-IFD tags that give the image's size: PixelXDimension (width), PixelYDimension (height).
PIXEL_X_DIMENSION = 0xA002
PIXEL_Y_DIMENSION = 0xA003
_EXIF_IFD = 0x8769


def _pointed_ifd(exif: bytes, entry: tuple[int, int, int, int], bo: str) -> int | None:
    """The absolute offset of the directory a pointer entry (the Exif or Interoperability IFD's:
    one LONG or IFD value, counted from the TIFF header) points to; None for another entry."""
    e, _tag, typ, count = entry
    if count != 1 or typ not in (4, 13):  # LONG or IFD
        return None
    (offset,) = struct.unpack(bo + "I", exif[e + 8 : e + 12])
    return (6 if exif.startswith(EXIF_PREFIX) else 0) + offset


def _exif_ifd(exif: bytes) -> tuple[int, str] | None:
    """Locate the Exif sub-IFD: (absolute offset of its entry count, byte order)."""
    found = _first_ifd(exif)
    if found is None:
        return None
    pos, bo, _n = found
    for entry in _ifd_entries(exif, pos, bo):
        if entry[1] == _EXIF_IFD and (at := _pointed_ifd(exif, entry, bo)) is not None:
            return at, bo
    return None


_COLOR_SPACE = 0xA001  # 1: sRGB; 0xFFFF: uncalibrated (the Interoperability index then tells)
_INTEROP_IFD = 0xA005
_INTEROP_INDEX = 0x0001


def declares_adobe_rgb(exif: bytes | None) -> bool:
    """Whether ``exif`` says the pixels are Adobe RGB (1998), as cameras mark a JPEG shot in that
    colour space (DCF's optional colour space, without an ICC profile): ColorSpace 0xFFFF
    (uncalibrated) with the Interoperability index ``R03``, or ColorSpace 2 (some cameras)."""
    found = None if not exif else _exif_ifd(bytes(exif))
    if found is None:
        return False
    exif = bytes(exif)
    pos, bo = found
    colour_space, interop_at = None, None
    for entry in _ifd_entries(exif, pos, bo):
        e, tag, typ, count = entry
        if tag == _COLOR_SPACE and typ == 3 and count == 1:
            (colour_space,) = struct.unpack(bo + "H", exif[e + 8 : e + 10])
        elif tag == _INTEROP_IFD:
            interop_at = _pointed_ifd(exif, entry, bo)
    if colour_space == 2:
        return True
    if colour_space != 0xFFFF or interop_at is None:
        return False
    return any(tag == _INTEROP_INDEX and typ == 2 and count <= 4 and exif[e + 8 : e + 11] == b"R03"
               for e, tag, typ, count in _ifd_entries(exif, interop_at, bo))


def set_pixel_dimensions(exif: bytes, width: int, height: int) -> bytes:
    """Copy of ``exif`` whose PixelXDimension and PixelYDimension say ``width`` x ``height``
    (the pixels written), where the Exif sub-IFD has them; tags that are absent are not added.

    They describe the source's pixels, which the written ones need not match: turned upright
    on read (the axes swap), a RAW developed at another size or cut to its crop. Edited in
    place, as the Orientation is: a SHORT that cannot hold the value becomes a LONG, which
    fits the same 4-byte value field.
    """
    found = _exif_ifd(exif)
    if found is None:
        return exif
    pos, bo = found
    out = bytearray(exif)
    wanted = {PIXEL_X_DIMENSION: width, PIXEL_Y_DIMENSION: height}
    for e, tag, typ, count in _ifd_entries(exif, pos, bo):
        if tag in wanted and count == 1 and typ in (3, 4):  # SHORT or LONG
            value = wanted[tag]
            if typ == 3 and value <= 0xFFFF:
                out[e + 8 : e + 10] = struct.pack(bo + "H", value)
            else:
                out[e + 2 : e + 4] = struct.pack(bo + "H", 4)
                out[e + 8 : e + 12] = struct.pack(bo + "I", value)
    return bytes(out)


def drop_thumbnail(exif: bytes) -> bytes:
    """Copy of ``exif`` without its thumbnail: IFD0's link to IFD1 (the thumbnail's directory)
    is set to 0, in place, so nothing else moves (unchanged when IFD0 cannot be found).

    For pixels re-oriented on read: the thumbnail keeps the old orientation, and with the
    Orientation reset to 1 viewers that show it (file browsers) would show it turned.
    """
    found = _first_ifd(exif)
    if found is None:
        return exif
    pos, _bo, n = found
    link = pos + 2 + 12 * n
    if link + 4 > len(exif):
        return exif
    return exif[:link] + bytes(4) + exif[link + 4 :]


def apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Re-orient ``arr`` (H x W [x C]) so that it displays upright, per EXIF ``orientation``.

    1 identity, 2 mirror left-right, 3 rotate 180, 4 mirror top-bottom, 5 transpose,
    6 rotate 90 clockwise, 7 transverse, 8 rotate 90 counter-clockwise (the same as
    ``PIL.ImageOps.exif_transpose``). Returns a C-contiguous array.
    """
    if orientation == 2:
        arr = arr[:, ::-1]
    elif orientation == 3:
        arr = arr[::-1, ::-1]
    elif orientation == 4:
        arr = arr[::-1]
    elif orientation == 5:
        arr = arr.swapaxes(0, 1)
    elif orientation == 6:
        arr = np.rot90(arr, -1)
    elif orientation == 7:
        arr = arr.swapaxes(0, 1)[::-1, ::-1]
    elif orientation == 8:
        arr = np.rot90(arr, 1)
    return np.ascontiguousarray(arr)


def oriented_size(h: int, w: int, orientation: int) -> tuple[int, int]:
    """``(h, w)`` after applying ``orientation`` (5-8 swap the axes)."""
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def exif_from_tiff(fh: BinaryIO, ifd_offset: int | None = None) -> bytes | None:
    """EXIF rebuilt from an image directory of the TIFF file ``fh`` (at its start): the one at
    ``ifd_offset`` (bytes from the start; the page that is read), by default the first.

    Keeps the descriptive IFD0 tags plus the Exif and GPS sub-IFDs; drops structural tags and
    Orientation (the pixels are re-oriented on read). Returns None when nothing is left.
    Only the tag directories are read (with Pillow's EXIF parser), not the image: float,
    BigTIFF and other TIFFs whose pixels Pillow cannot open keep their EXIF too.
    """
    from PIL import Image

    try:
        head = fh.read(16)
        order = "<" if head[:2] == b"II" else ">"
        big = head[2:4] in (b"+\x00", b"\x00+")  # BigTIFF: 64-bit offsets
        if ifd_offset is None:
            (ifd_offset,) = struct.unpack(order + "Q", head[8:16]) if big else struct.unpack(order + "I", head[4:8])
        ex = Image.Exif()
        ex.endian, ex.bigtiff = order, big
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about every damaged tag
            ex.load_from_fp(fh, ifd_offset)
            for tag in _SUB_IFDS:  # load sub-IFDs while the file is still open
                if tag in ex:
                    ex.get_ifd(tag)
        for tag in list(ex):
            if tag not in DESCRIPTIVE_TAGS and tag not in _SUB_IFDS:
                del ex[tag]
            elif isinstance(ex[tag], str):
                # Pillow reads ASCII fields as Latin-1 and writes str back as ASCII, each other
                # character as '?': handing it the bytes keeps UTF-8 text (José, ©) as it was.
                ex[tag] = ex[tag].encode("latin-1", "replace")
        desc = ex.get(270)
        if isinstance(desc, bytes) and desc.startswith(b'{"shape"'):
            del ex[270]  # tifffile's private JSON metadata, not a description
        if not len(ex):
            return None
        ex.bigtiff = False  # EXIF is classic TIFF data (JPEG APP1, PNG eXIf), whatever the source
        return normalize_exif(ex.tobytes())  # Pillow >= 8 already prefixes "Exif\0\0"
    except Exception:  # metadata is best-effort: a broken EXIF block must not fail the read
        return None


def _parsed(exif: bytes):
    """``exif`` parsed by Pillow (an ``Image.Exif``), its warnings about damaged tags silenced;
    raises on a block it cannot parse."""
    from PIL import Image

    ex = Image.Exif()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about every damaged tag
        ex.load(exif)
    return ex


def descriptive_tags(exif: bytes | None) -> dict[int, bytes]:
    """The descriptive IFD0 tags of ``exif`` (Make, Model, DateTime, ...) as the bytes stored,
    without NULs and surrounding blanks. Text beyond ASCII (UTF-8, as most tools write an
    Artist or Copyright) is kept as it is."""
    if not exif:
        return {}
    try:
        ex = _parsed(exif)
        out = {}
        for tag in DESCRIPTIVE_TAGS:
            v = ex.get(tag)
            if isinstance(v, str):
                v = v.encode("latin-1", "replace")  # Pillow decoded the stored bytes as Latin-1
            if isinstance(v, bytes):
                v = v.replace(b"\x00", b"").strip()
                if v:
                    out[tag] = v
        return out
    except Exception:  # best-effort metadata
        return {}


def read_resolution(exif: bytes | None) -> tuple[float, float] | None:
    """Print resolution (dpi pair, see :mod:`.metadata`) from IFD0's XResolution,
    YResolution and ResolutionUnit; None when absent, aspect-only or invalid."""
    if not exif:
        return None
    try:
        ex = _parsed(exif)
        return dpi_from_tiff_tags(ex.get(0x011A), ex.get(0x011B), ex.get(0x0128))
    except Exception:  # best-effort metadata
        return None


#: IFD0 tags a TIFF output carries in its own fields besides the descriptive ones: orientation
#: (applied to the pixels and reset), the print resolution, and the pointers to the sub-IFDs,
#: which are judged by their content.
_TIFF_CARRIED_TAGS = frozenset(DESCRIPTIVE_TAGS) | {0x0112, 0x011A, 0x011B, 0x0128, 0x0213, 0x8769, 0x8825}


def has_tags_beyond_descriptive(exif: bytes | None) -> bool:
    """Whether ``exif`` holds tags that a TIFF output does not write (only the descriptive
    IFD0 tags are written there): any entry of the Exif or GPS sub-IFD, or another IFD0 tag."""
    if not exif:
        return False
    try:
        ex = _parsed(exif)
        return any(tag not in _TIFF_CARRIED_TAGS for tag in ex) or any(len(ex.get_ifd(t)) for t in _SUB_IFDS)
    except Exception:  # best-effort metadata: a damaged block is not worth a note
        return False
