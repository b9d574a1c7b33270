"""PNG chunk parsing and a lossless 16-bit PNG codec.

Why this exists: Pillow (and therefore imageio's default PNG plugin) reads 16-bit RGB/RGBA
PNGs as 8-bit (it keeps only the high byte) and cannot write them at all. This module

* parses the chunk structure itself (IHDR, PLTE, iCCP, eXIf, iTXt XMP, pHYs, tRNS, acTL, IDAT;
  CRCs checked), so the size is known and checked before any pixel memory is allocated, and
  metadata is read here, with its own limits, for every depth. The colour space chunks
  (gAMA, cHRM, sRGB, and cICP, the coding-independent code points of PNG's third edition
  that say HDR codings) and the text chunks (tEXt, zTXt, non-XMP iTXt) are kept as they are
  (:data:`COLOUR_CHUNKS`, :data:`TEXT_CHUNKS`), to be copied verbatim into a PNG output;
* decodes 16-bit IDAT data with Pillow's own C zlib+unfilter decoder (the ``"zip"`` decoder
  behind ``Image.frombytes``), run twice with big- and little-endian 16-bit raw modes: each
  run unfilters with the true 6- or 8-byte pixel stride and keeps one byte of every sample
  (``RGB;16B`` the high byte, ``RGB;16L`` the low one), so ``hi << 8 | lo`` is exact.
  Adam7 interlacing is handled by the same decoder;
* encodes 16-bit PNG with NumPy-vectorised per-row adaptive filtering (None/Sub/Up/Average/
  Paeth chosen by minimum sum of absolute differences, as libpng does) and ``zlib``,
  with iCCP, eXIf, pHYs and iTXt (XMP) chunks, byte for byte the chunks Pillow writes for
  8-bit PNG (``icc_profile=``, ``exif=``, ``dpi=``, ``PngInfo.add_itxt``), and the kept chunks
  as :func:`chunks_to_copy` selects them for both depths.

8-bit and lower depths and palette images are decoded by Pillow (see :mod:`.io`), from
:func:`pixel_stream`: only the chunks that define the pixels, so that metadata Pillow would
reject (a text chunk over its 1 MB limit, a damaged pHYs) cannot fail the decode.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from . import icc
from . import metadata as meta
from .base import ImageError, too_large_error

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_CHUNK = (1 << 31) - 1
_DEFLATE_PIECE = 4 << 20  # bytes of filtered rows deflated per thread (pigz uses 128 KiB; larger loses less)
_DEFLATE_WINDOW = 32 << 10  # deflate's window: what a piece may refer back to
_MAX_ICC = 64 << 20  # decompressed iCCP limit: a real profile is < 1 MB; stops zlib bombs
XMP_KEYWORD = b"XML:com.adobe.xmp"  # the iTXt keyword of the XMP packet (XMP spec, part 3)
_IDAT_PIECE = 1 << 23
_VALID_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
#: Colour space chunks kept from a PNG input: payload size of each (PNG spec), at most one of each.
COLOUR_CHUNKS = {b"gAMA": 4, b"cHRM": 32, b"sRGB": 1, b"cICP": 4}
#: The chunk type of the coding-independent code points (ITU-T H.273): colour primaries, transfer
#: function, matrix coefficients (0: RGB, the only value PNG allows) and the full range flag.
CICP = b"cICP"
#: Text chunks kept from a PNG input (every one, except the XMP iTXt, which is ``xmp``).
TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")


@dataclass
class PngFile:
    """What :func:`parse` found: header fields, metadata and (unless header-only) IDAT data."""

    width: int
    height: int
    bit_depth: int
    color_type: int
    interlace: int
    icc_profile: bytes | None = None
    exif: bytes | None = None  # eXIf payload (TIFF data, no "Exif\0\0" prefix)
    xmp: bytes | None = None  # iTXt "XML:com.adobe.xmp" text (see .metadata)
    dpi: tuple[float, float] | None = None  # from pHYs in pixels per metre (see .metadata)
    trns: bytes | None = None
    plte: bytes | None = None
    frames: int = 1
    # (type, payload) of the colour space and text chunks, in file order (see COLOUR_CHUNKS, TEXT_CHUNKS)
    kept_chunks: list[tuple[bytes, bytes]] = field(default_factory=list)
    idat: list[bytes] = field(default_factory=list)


def _read_exact(fh: BinaryIO, n: int, name, what: str) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise ImageError(name, f"PNG file is truncated (in {what})")
    return data


def parse(fh: BinaryIO, name, *, max_pixels: int | None, header_only: bool = False) -> PngFile:
    """Parse the PNG chunk stream from ``fh`` (positioned at the signature).

    The pixel limit is enforced right after IHDR, before anything else is read. With
    ``header_only`` parsing stops at the first IDAT (metadata chunks come before it).
    Raises :class:`ImageError` for any structural problem.
    """
    if fh.read(8) != SIGNATURE:
        raise ImageError(name, "not a PNG file (bad signature)")
    png: PngFile | None = None
    seen_idat = False
    while True:
        head = fh.read(8)
        if len(head) == 0 and png is not None and seen_idat:
            break  # missing IEND: tolerated when the image data are complete (checked on decode)
        if len(head) != 8:
            raise ImageError(name, "PNG file is truncated")
        length, ctype = struct.unpack(">I4s", head)
        if length > _MAX_CHUNK:
            raise ImageError(name, "corrupt PNG (invalid chunk length)")
        if png is None and ctype != b"IHDR":
            raise ImageError(name, "corrupt PNG (first chunk is not IHDR)")
        if ctype == b"IDAT" and header_only:
            break
        data = _read_exact(fh, length, name, ctype.decode("latin-1", "replace") + " chunk")
        crc_raw = fh.read(4)
        if len(crc_raw) != 4:
            if ctype == b"IEND":
                break
            raise ImageError(name, "PNG file is truncated")
        crc_ok = struct.unpack(">I", crc_raw)[0] == zlib.crc32(ctype + data)
        critical = not (ctype[0] & 0x20)
        if not crc_ok:
            if critical:
                raise ImageError(name, f"corrupt PNG (CRC mismatch in {ctype.decode('latin-1', 'replace')} chunk)")
            continue  # the spec lets decoders skip damaged ancillary chunks
        if ctype == b"IHDR":
            if png is not None:
                continue
            png = _ihdr(data, name, max_pixels)
        elif ctype == b"IDAT":
            seen_idat = True
            png.idat.append(data)
        elif ctype == b"IEND":
            break
        elif ctype == b"iCCP" and png.icc_profile is None:
            png.icc_profile = _iccp(data)
        elif ctype == b"eXIf" and png.exif is None:
            png.exif = bytes(data) or None
        elif ctype == b"iTXt" and data.startswith(XMP_KEYWORD + b"\x00"):
            if png.xmp is None:
                png.xmp = _itxt_text(data)
        elif ctype in TEXT_CHUNKS:
            png.kept_chunks.append((ctype, bytes(data)))
        elif ctype in COLOUR_CHUNKS:
            # only a well-formed first one, before PLTE and IDAT as the spec requires (libpng
            # ignores the others too)
            placed = png.plte is None and not seen_idat
            first = all(t != ctype for t, _ in png.kept_chunks)
            valid = ctype != CICP or _valid_cicp(data)
            if placed and first and valid and len(data) == COLOUR_CHUNKS[ctype]:
                png.kept_chunks.append((ctype, bytes(data)))
        elif ctype == b"pHYs" and png.dpi is None:
            png.dpi = _phys(data)
        elif ctype == b"tRNS":
            if png.trns is None and not seen_idat and _trns_fits(png.color_type, len(data)):
                png.trns = bytes(data)
        elif ctype == b"PLTE" and png.plte is None:
            png.plte = bytes(data)
        elif ctype == b"acTL" and len(data) == 8:
            png.frames = max(1, struct.unpack(">I", data[:4])[0])
    if png is None:
        raise ImageError(name, "corrupt PNG (no IHDR chunk)")
    if not header_only and not png.idat:
        raise ImageError(name, "corrupt PNG (no image data)")
    return png


def _ihdr(data: bytes, name, max_pixels: int | None) -> PngFile:
    if len(data) != 13:
        raise ImageError(name, "corrupt PNG (bad IHDR chunk)")
    w, h, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", data)
    if w == 0 or h == 0:
        raise ImageError(name, f"image has zero size ({w}x{h})")
    if w > _MAX_CHUNK or h > _MAX_CHUNK:
        raise ImageError(name, "corrupt PNG (invalid dimensions)")
    if ctype not in _VALID_DEPTHS or depth not in _VALID_DEPTHS[ctype]:
        raise ImageError(name, f"corrupt PNG (invalid bit depth {depth} for colour type {ctype})")
    if comp != 0 or filt != 0 or interlace > 1:
        raise ImageError(name, "corrupt PNG (unknown compression, filter or interlace method)")
    if max_pixels is not None and w * h > max_pixels:
        raise too_large_error(name, f"{w}x{h}", w * h, max_pixels)
    return PngFile(width=w, height=h, bit_depth=depth, color_type=ctype, interlace=interlace)


def _valid_cicp(data: bytes) -> bool:
    """Whether a cICP payload is one the PNG spec allows: matrix coefficients 0 (RGB) and a full
    range flag of 0 or 1 (readers ignore the others, so a PNG output does not carry them)."""
    return len(data) == 4 and data[2] == 0 and data[3] in (0, 1)


def cicp_chunk(primaries: int, transfer: int, *, full_range: bool = True) -> tuple[bytes, bytes]:
    """The ``(type, payload)`` of a cICP chunk for RGB samples (matrix coefficients 0) with the
    H.273 ``primaries`` and ``transfer`` codes."""
    if not (0 <= primaries <= 255 and 0 <= transfer <= 255):
        raise ValueError(f"H.273 codes are bytes; got primaries {primaries}, transfer {transfer}")
    return CICP, bytes((primaries, transfer, 0, int(full_range)))


#: xy chromaticities (red, green, blue, white) of the H.273 colour primaries codes that name RGB
#: primaries other than sRGB's (1) and Display P3's (12), which :func:`.heif.nclx_profile` knows.
H273_PRIMARIES = {
    4: ((0.67, 0.33), (0.21, 0.71), (0.14, 0.08), (0.310, 0.316)),  # BT.470 M
    5: ((0.64, 0.33), (0.29, 0.60), (0.15, 0.06), (0.3127, 0.3290)),  # BT.601 (625 lines)
    6: ((0.630, 0.340), (0.310, 0.595), (0.155, 0.070), (0.3127, 0.3290)),  # BT.601 (525 lines)
    7: ((0.630, 0.340), (0.310, 0.595), (0.155, 0.070), (0.3127, 0.3290)),  # SMPTE 240M
    8: ((0.681, 0.319), (0.243, 0.692), (0.145, 0.049), (0.310, 0.316)),  # generic film
    9: ((0.708, 0.292), (0.170, 0.797), (0.131, 0.046), (0.3127, 0.3290)),  # BT.2020
    11: ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060), (0.314, 0.351)),  # DCI-P3
    22: ((0.630, 0.340), (0.295, 0.605), (0.155, 0.077), (0.3127, 0.3290)),  # EBU 3213
}


def cicp_as_nclx(codes: tuple[int, int, int, int]) -> dict:
    """A cICP's codes as the nclx colour information :func:`.heif.nclx_profile` takes (the
    chromaticities of :data:`H273_PRIMARIES` where the code names them)."""
    primaries, transfer, _matrix, _full_range = codes
    nclx: dict = {"color_primaries": primaries, "transfer_characteristics": transfer}
    for colour, (x, y) in zip(("red", "green", "blue", "white"), H273_PRIMARIES.get(primaries, ())):
        nclx[f"color_primary_{colour}_x"], nclx[f"color_primary_{colour}_y"] = x, y
    return nclx


def cicp_codes(chunks) -> tuple[int, int, int, int] | None:
    """``(colour primaries, transfer function, matrix coefficients, full range flag)`` of the
    first cICP among ``(type, payload)`` chunks, or None."""
    data = next((bytes(d) for t, d in chunks if bytes(t) == CICP and len(d) == 4), None)
    return None if data is None else (data[0], data[1], data[2], data[3])


def _trns_fits(color_type: int, length: int) -> bool:
    """Whether a tRNS chunk of ``length`` bytes is well-formed for ``color_type``: a 16-bit
    gray or RGB key, or up to 256 palette alphas. A malformed one is ignored, as libpng does
    (gray+alpha and RGBA images cannot have one), rather than failing the read."""
    if color_type == 0:
        return length == 2
    if color_type == 2:
        return length == 6
    return color_type == 3 and 1 <= length <= 256


def _iccp(data: bytes) -> bytes | None:
    # name (1-79 bytes) NUL method(0) zlib-stream; a damaged profile is dropped, not fatal.
    sep = data.find(b"\x00")
    if sep < 1 or sep + 2 > len(data) or data[sep + 1] != 0:
        return None
    try:
        d = zlib.decompressobj()
        out = d.decompress(data[sep + 2 :], _MAX_ICC)
        if d.unconsumed_tail:
            return None
        return out or None
    except zlib.error:
        return None


def _itxt_text(data: bytes) -> bytes | None:
    # keyword NUL flag method language NUL translated-keyword NUL text; flag 1 = zlib.
    # A damaged or oversized packet is dropped, not fatal.
    parts = data.split(b"\x00", 1)[1]
    if len(parts) < 2 or parts[0] not in (0, 1) or parts[1] != 0:
        return None
    compressed = parts[0] == 1
    pieces = parts[2:].split(b"\x00", 2)
    if len(pieces) != 3:
        return None
    text = pieces[2]
    if compressed:
        try:
            d = zlib.decompressobj()
            text = d.decompress(text, meta.MAX_XMP + 1)
        except zlib.error:
            return None
    return meta.normalize_xmp(text)


def _phys(data: bytes) -> tuple[float, float] | None:
    # pixels per unit X, Y (uint32) and unit (1 = metre; 0 = aspect ratio only)
    if len(data) != 9 or data[8] != 1:
        return None
    x, y = struct.unpack(">II", data[:8])
    return meta.normalize_dpi(x, y, meta.PNG_DPI_PER_PPM)


def pixel_stream(png: PngFile) -> bytes:
    """A PNG holding only what defines ``png``'s pixels (IHDR, PLTE, tRNS, IDAT, IEND), for
    Pillow's decoder. IHDR is rebuilt from the parsed fields, the IDAT data are as read."""
    head = struct.pack(">IIBBBBB", png.width, png.height, png.bit_depth, png.color_type, 0, 0, png.interlace)
    parts = [SIGNATURE, _chunk(b"IHDR", head)]
    if png.plte is not None:
        parts.append(_chunk(b"PLTE", png.plte))
    if png.trns is not None:
        parts.append(_chunk(b"tRNS", png.trns))
    for data in png.idat:  # not _chunk(): no extra copy of the (large) image data
        parts += [struct.pack(">I4s", len(data), b"IDAT"), data, struct.pack(">I", zlib.crc32(data, zlib.crc32(b"IDAT")))]
    parts.append(_chunk(b"IEND", b""))
    return b"".join(parts)


def check_idat_size(png: PngFile, name) -> None:
    """Refuse image data too short to hold the image, before the pixel buffer is allocated.

    Deflate expands at most 1032:1, so fewer compressed bytes than ``raw_size / 1032`` cannot
    be a complete image: a tiny file with a big (but allowed) IHDR would otherwise cost a
    large allocation before failing.
    """
    bits = png.bit_depth * CHANNELS[png.color_type]
    raw_lower_bound = png.height * ((png.width * bits) // 8)
    if sum(len(d) for d in png.idat) * 1032 < raw_lower_bound:
        raise ImageError(name, "PNG image data are truncated (far too short for the image size)")


def decode16(png: PngFile, name) -> np.ndarray:
    """Decode a 16-bit PNG's IDAT data losslessly to ``uint16`` H x W x C (C = 1, 2, 3, 4).

    A ``tRNS`` colour key (gray or RGB) becomes an alpha channel: 0 where the pixel equals the
    key, 65535 elsewhere.
    """
    from PIL import Image

    size = (png.width, png.height)
    data = b"".join(png.idat)
    args = (png.interlace,)

    def run(mode: str, rawmode: str) -> np.ndarray:
        try:
            im = Image.frombytes(mode, size, data, "zip", rawmode, *args)
        except (ValueError, OSError) as exc:
            raise ImageError(name, f"corrupt PNG image data ({exc})") from None
        return np.asarray(im)

    ct = png.color_type
    if ct == 0:
        arr = run("I;16", "I;16B").astype(np.uint16)[..., None]
    elif ct == 4:
        b = run("RGBA", "RGBA")  # 4 bytes per pixel = gray hi, gray lo, alpha hi, alpha lo
        arr = (b[..., 0::2].astype(np.uint16) << 8) | b[..., 1::2]
    else:
        mode = "RGB" if ct == 2 else "RGBA"
        hi = run(mode, f"{mode};16B")
        lo = run(mode, f"{mode};16L")
        arr = (hi.astype(np.uint16) << 8) | lo
    if png.trns is not None and ct in (0, 2):
        n = 1 if ct == 0 else 3
        if len(png.trns) >= 2 * n:
            key = np.array(struct.unpack(f">{n}H", png.trns[: 2 * n]), dtype=np.uint16)
            alpha = np.where((arr == key).all(axis=-1), 0, 65535).astype(np.uint16)
            arr = np.concatenate([arr, alpha[..., None]], axis=-1)
    return arr


def _filter_rows(raw: np.ndarray, bpp: int) -> np.ndarray:
    """PNG-filter ``raw`` (H x stride uint8) -> H x (1 + stride) uint8 with per-row filter bytes.

    Each row gets the filter (0 None, 1 Sub, 2 Up, 3 Average, 4 Paeth) whose output has the
    smallest sum of absolute values as signed bytes (libpng's heuristic). Blocks of rows (which
    bound the int16 temporaries) are filtered on threads: a row depends only on the raw row
    above it, and numpy releases the GIL.
    """
    h, stride = raw.shape
    out = np.empty((h, stride + 1), np.uint8)
    block = max(1, (1 << 20) // max(1, stride))
    starts = range(0, h, block)
    with ThreadPoolExecutor(max_workers=_workers(len(starts))) as pool:
        list(pool.map(lambda y0: _filter_block(raw, out, y0, min(y0 + block, h), bpp), starts))
    return out


def _filter_block(raw: np.ndarray, out: np.ndarray, y0: int, y1: int, bpp: int) -> None:
    """Rows ``y0:y1`` of :func:`_filter_rows`, written into ``out``."""
    x = raw[y0:y1].astype(np.int16)
    n = len(x)
    b = np.empty_like(x)
    b[0] = raw[y0 - 1] if y0 else 0
    b[1:] = x[:-1]
    a = np.zeros_like(x)
    a[:, bpp:] = x[:, :-bpp]
    c = np.zeros_like(x)
    c[:, bpp:] = b[:, :-bpp]
    pa = np.abs(b - c)
    pb = np.abs(a - c)
    pc = np.abs(a + b - 2 * c)
    paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    cands = np.stack([x, x - a, x - b, x - ((a + b) >> 1), x - paeth])
    cands &= 0xFF
    cost = np.abs(((cands + 128) & 0xFF) - 128).sum(axis=2, dtype=np.int64)
    choice = cost.argmin(axis=0)
    out[y0:y1, 0] = choice
    out[y0:y1, 1:] = cands[choice, np.arange(n)]


def _workers(tasks: int) -> int:
    # at most 4: each filtering thread holds ~30 MB of temporaries, and the writer runs beside
    # the next photo's inference
    return max(1, min(tasks, os.cpu_count() or 1, 4))


def _deflate(data: bytes, level: int) -> bytes:
    """The zlib stream of ``data``, deflated in pieces on threads as pigz does: each piece
    primed with the 32 KiB before it (so matches reach back across the cut, and the size stays
    within a fraction of a percent of one-piece deflate), all but the last ended by a sync
    flush, which leaves the stream byte-aligned for the next piece's blocks. The pieces are cut
    at fixed sizes, so the bytes are the same on any machine; zlib releases the GIL."""
    if len(data) <= _DEFLATE_PIECE:
        return zlib.compress(data, level)
    view = memoryview(data)
    starts = range(0, len(data), _DEFLATE_PIECE)

    def piece(start: int) -> bytes:
        stop = min(start + _DEFLATE_PIECE, len(data))
        prime = {"zdict": view[max(0, start - _DEFLATE_WINDOW) : start]} if start else {}
        comp = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, **prime)  # raw deflate: no header of its own
        return comp.compress(view[start:stop]) + comp.flush(zlib.Z_FINISH if stop == len(data) else zlib.Z_SYNC_FLUSH)

    with ThreadPoolExecutor(max_workers=_workers(len(starts))) as pool:
        body = b"".join(pool.map(piece, starts))
    header = zlib.compress(b"", level)[:2]  # CMF/FLG as zlib writes them for this level
    return header + body + struct.pack(">I", zlib.adler32(data))


def _chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def _metadata_chunks(xmp: bytes | None, dpi: tuple[float, float] | None) -> list[tuple[bytes, bytes]]:
    """``(type, data)`` of the pHYs and iTXt chunks that carry ``dpi`` and ``xmp`` (see
    :mod:`.metadata`). pHYs is in whole pixels per metre, rounded half up as Pillow's
    ``dpi=`` does (omitted when a value would be 0 or over 2**31 - 1); the XMP iTXt is
    uncompressed with empty language and translated keyword, as Pillow's ``add_itxt`` and
    Adobe write it (packet scanners find it)."""
    chunks = []
    if dpi is not None:
        ppm = [int(v / meta.PNG_DPI_PER_PPM + 0.5) for v in dpi]
        if all(1 <= v <= _MAX_CHUNK for v in ppm):
            chunks.append((b"pHYs", struct.pack(">IIB", ppm[0], ppm[1], 1)))
    if xmp:
        chunks.append((b"iTXt", XMP_KEYWORD + b"\x00\x00\x00\x00\x00" + bytes(xmp)))
    return chunks


# sRGB's gAMA (1/2.2, x 100000) and cHRM (white, red, green, blue x/y, x 100000), as the PNG
# spec recommends writing beside an sRGB chunk.
_SRGB_GAMA = 45455
_SRGB_CHRM = (31270, 32900, 64000, 33000, 30000, 60000, 15000, 6000)


def colour_other_than_srgb(chunks) -> list[str]:
    """The kept colour space chunks that describe something other than sRGB, which readers
    assume of an untagged JPEG or TIFF: none beside an sRGB chunk, else a gAMA more than 2 %
    from 1/2.2 and a cHRM more than 0.01 from sRGB's chromaticities."""
    found = {bytes(t): bytes(d) for t, d in chunks if bytes(t) in COLOUR_CHUNKS}
    if b"sRGB" in found:
        return []
    other = []
    if b"gAMA" in found and abs(struct.unpack(">I", found[b"gAMA"])[0] - _SRGB_GAMA) > 0.02 * _SRGB_GAMA:
        other.append("gAMA")
    if b"cHRM" in found and max(abs(a - b) for a, b in zip(struct.unpack(">8I", found[b"cHRM"]), _SRGB_CHRM)) > 1000:
        other.append("cHRM")
    return other


def implied_icc_profile(chunks) -> bytes | None:
    """The ICC profile of the colour space the kept gAMA and cHRM chunks say, when it is not sRGB
    (:func:`colour_other_than_srgb`), so that JPEG and TIFF outputs, which have no such chunks,
    keep it (and PNG outputs say it the way every reader honours): the tone curve of gAMA
    (else sRGB's), the primaries and white point of cHRM (else sRGB's). None for sRGB, and
    for values no colour space has (a zero, primaries on one line)."""
    if not colour_other_than_srgb(chunks):
        return None
    found = {bytes(t): bytes(d) for t, d in chunks if bytes(t) in COLOUR_CHUNKS}
    curve: float | str = "srgb"
    if b"gAMA" in found:
        (encoding,) = struct.unpack(">I", found[b"gAMA"])  # the encoding exponent x 100000
        if not 10_000 <= encoding <= 1_000_000:
            return None
        curve = round(100000 / encoding, 4)
    chromaticities = struct.unpack(">8I", found[b"cHRM"]) if b"cHRM" in found else _SRGB_CHRM
    white, *primaries = [(chromaticities[i] / 100000, chromaticities[i + 1] / 100000) for i in range(0, 8, 2)]
    if any(y <= 0 or x < 0 or x + y > 1 for x, y in [white, *primaries]):
        return None
    try:
        return icc.rgb_profile("PNG gAMA/cHRM colour space", tuple(primaries), white, curve)
    except ValueError:  # primaries on one line
        return None


def chunks_to_copy(chunks, icc_profile: bytes | None) -> list[tuple[bytes, bytes]]:
    """The kept chunks (``(type, payload)`` pairs) a PNG output carries: those of
    :data:`COLOUR_CHUNKS` and :data:`TEXT_CHUNKS`, each colour space chunk once (the first), and no sRGB beside an ICC
    profile (the spec allows only one of them), as Pillow chooses for 8-bit PNG."""
    out, seen = [], set()
    for ctype, data in chunks:
        ctype = bytes(ctype)
        if ctype in COLOUR_CHUNKS:
            if ctype in seen or (ctype == b"sRGB" and icc_profile):
                continue
            seen.add(ctype)
        elif ctype not in TEXT_CHUNKS:
            continue
        out.append((ctype, bytes(data)))
    return out


def encode16(arr: np.ndarray, *, icc_profile: bytes | None = None, exif: bytes | None = None,
             xmp: bytes | None = None, dpi: tuple[float, float] | None = None,
             chunks=(), compress_level: int = 6) -> bytes:
    """Encode ``uint16`` H x W x C (C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA) as a 16-bit PNG.

    ``exif`` may carry the ``Exif\\0\\0`` prefix (it is stripped for the eXIf chunk);
    ``xmp`` (the packet) and ``dpi`` (pixels per inch) go in iTXt and pHYs chunks; ``chunks``
    (``(type, payload)`` pairs, as :func:`chunks_to_copy` selects them) are written verbatim before
    IDAT, a cICP first of all, right after IHDR (as :func:`with_cicp_first` puts it in 8-bit PNG).
    """
    if arr.ndim == 2:
        arr = arr[..., None]
    h, w, c = arr.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = np.ascontiguousarray(arr, dtype=">u2").view(np.uint8).reshape(h, w * c * 2)
    filtered = _filter_rows(raw, bpp=2 * c)
    comp = _deflate(filtered.tobytes(), compress_level)
    buf = io.BytesIO()
    buf.write(SIGNATURE)
    buf.write(_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)))
    cicp, others = _split_cicp(chunks)
    for ctype, data in cicp:
        buf.write(_chunk(ctype, data))
    if icc_profile:
        buf.write(_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc_profile)))
    for ctype, data in others:
        buf.write(_chunk(ctype, data))
    if exif:
        body = exif[6:] if exif.startswith(b"Exif\x00\x00") else exif
        buf.write(_chunk(b"eXIf", body))
    for ctype, data in _metadata_chunks(xmp, dpi):
        buf.write(_chunk(ctype, data))
    for i in range(0, len(comp), _IDAT_PIECE):
        buf.write(_chunk(b"IDAT", comp[i : i + _IDAT_PIECE]))
    buf.write(_chunk(b"IEND", b""))
    return buf.getvalue()


def _split_cicp(chunks) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
    """``chunks`` as (the cICP ones, the others), each in the order given."""
    chunks = [(bytes(t), bytes(d)) for t, d in chunks]
    return [c for c in chunks if c[0] == CICP], [c for c in chunks if c[0] != CICP]


def without_cicp(chunks) -> list[tuple[bytes, bytes]]:
    """``chunks`` less the cICP ones (which :func:`with_cicp_first` writes into an 8-bit PNG:
    Pillow before 11.2 drops a cICP it is handed)."""
    return _split_cicp(chunks)[1]


def with_cicp_first(data: bytes, chunks) -> bytes:
    """A PNG file's bytes (``data``, as Pillow writes it) with the cICP among ``chunks`` put right
    after IHDR: before PLTE and IDAT, as the spec requires, where :func:`encode16` writes it."""
    cicp = _split_cicp(chunks)[0]
    if not cicp:
        return data
    ihdr_end = len(SIGNATURE) + 8 + 13 + 4  # IHDR: length, type, 13 bytes, CRC
    return data[:ihdr_end] + b"".join(_chunk(t, d) for t, d in cicp) + data[ihdr_end:]
