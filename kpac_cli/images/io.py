"""Read and write PNG, TIFF, JPEG and camera RAW images (and read HEIC) with their bit depth and metadata.

Pixel conventions (see :mod:`.base`): ``float32`` ``H x W x 3`` RGB in ``[0, 1]``; an integer
sample ``k`` of a ``b``-bit source reads as ``float32(k) / (2**b - 1)``; writing uses
``floor(clip(v, 0, 1) * (2**b - 1) + 0.5)``; read -> write at the same depth is bit-exact.

Format notes
------------
PNG
    1/2/4/8-bit and palette images via Pillow (palette -> RGB or RGBA, low depths scaled to
    8 bits). 16-bit via :mod:`.png` (Pillow would truncate 16-bit RGB to 8 bits). A tRNS colour
    key becomes an alpha channel. iCCP, eXIf, pHYs and the XMP iTXt (``XML:com.adobe.xmp``)
    are read and written (by :mod:`.png`, at either depth). The colour space chunks (gAMA,
    cHRM, sRGB) and the text chunks (tEXt, zTXt, other iTXt) are kept verbatim in
    ``info.png_chunks`` and written back to PNG outputs only (JPEG and TIFF have no place for
    them); a colour space other than sRGB that gAMA/cHRM say, without an iCCP, is given as an
    ICC profile (:func:`.png.implied_icc_profile`), which every output carries. A cICP chunk
    (PNG third edition: H.273 codes, HDR's PQ and HLG among them) is kept the same way, and comes
    first, as the spec orders them: its colour space is given as an ICC profile where one can
    say it (Display P3, BT.2020, ...), else ``info.color_space_dropped`` says so (TIFF and JPEG
    outputs cannot hold it: :func:`color_space_note`). APNG: the default image (what a
    non-animated viewer shows) is read, ``info.frames`` tells how many frames exist.
TIFF
    tifffile: 1-16-bit integer (2-7-bit rescaled to 8, 9-15-bit to 16), float (clipped to ``[0, 1]``,
    NaN read as 0, ``bit_depth == 32``; ``info.clipped_float_values`` counts the samples that
    changed), gray, RGB, palette, min-is-white, contiguous or planar. Alpha is the first extra
    sample marked as alpha (ExtraSamples 1 associated, un-premultiplied, or 2 unassociated);
    extra samples marked 0 (unspecified data: stored selections, depth, masks) are not alpha,
    and without the ExtraSamples tag the first extra sample is. Other extra samples are
    dropped (``info.dropped_extra_samples`` counts them). Multi-page: the first page that is
    not a reduced-resolution copy (a preview or thumbnail some writers put first, a pyramid
    level) or a transparency mask is read, with its own metadata (else the first such SubIFD
    of page 0, else page 0); ``info.frames`` counts the pages other than such copies and
    masks. CMYK, YCbCr and Lab are refused with an
    :class:`ImageError` (no colour-managed conversion is available, and a naive one would
    silently shift colours).
    Every compression tifffile decodes with ``imagecodecs`` (a dependency: LZW, JPEG,
    PackBits, Deflate, ZSTD, ... as photo editors write them, 16-bit included). Written with
    Deflate + horizontal predictor, ICC profile, XMP (tag 700), resolution when known
    (XResolution, YResolution, ResolutionUnit inch) and the descriptive EXIF tags (Make, Model, DateTime,
    Artist, Copyright, Software, ImageDescription) as TIFF tags, with their bytes (UTF-8 text
    too); the EXIF sub-IFD is not written to TIFF.
JPEG
    Pillow; 8-bit gray and RGB (CMYK/YCCK and 12-bit JPEG refused). MPO (multi-picture) reads
    the first picture; ``info.frames`` counts the pictures of the MP index (MPF) other than
    large thumbnails (the previews cameras store beside the photo), an iPhone's auxiliary
    pictures (depth map, portrait mattes: Apple's ``apdi`` XMP) and an HDR gain map
    (Android Ultra HDR, Adobe, Apple, ISO 21496-1: told by the gain map picture's XMP or ISO
    21496-1 segment, or the primary picture's declaration). The gain map is not read
    (``info.hdr_gain_map_dropped``): outputs are the SDR image. Every output's XMP is written
    without what describes media stored beside the picture, which no output holds: a gain
    map, a motion photo's video, GContainer items (:func:`.metadata.without_secondary_media`).
    The main XMP packet is read (extended XMP segments are not). Written 8-bit, 4:4:4
    chroma, with ICC (APP2), EXIF (APP1; dropped if over :data:`JPEG_MAX_EXIF` bytes), XMP (APP1
    ``http://ns.adobe.com/xap/1.0/``; dropped if over 65504 bytes, as extended XMP is not
    written) and the resolution as JFIF density (whole dpi). The comments (COM) and Photoshop
    resources (APP13, IPTC) of a JPEG input (``info.jpeg_segments``) are copied verbatim into
    JPEG outputs only (less a Photoshop thumbnail when the orientation was applied): PNG and
    TIFF outputs go without them.
HEIC/HEIF
    :mod:`.heif` (pillow-heif, libheif), with the optional extra ``kpac[heic]`` (without it,
    refused, saying how to get it). The primary image is read; ``info.frames`` counts the
    top-level images (a burst, an image collection), not thumbnails, depth maps, alpha planes or
    other auxiliary images; an HDR gain map (Apple's, or ISO 21496-1) is not read
    (``info.hdr_gain_map_dropped``).
    8-bit, 10/12-bit rescaled to 16 as a 9-15-bit TIFF's, or 16-bit; grey, RGB, alpha (premultiplied
    alpha made straight). The orientation is the HEIF's own, the ``irot``/``imir``
    transformations libheif applies on decoding (``info.orientation_applied`` says which); the
    EXIF Orientation tag, informative only in HEIF and often stale, is never applied on top, and
    reset to 1 in the EXIF kept (``tiff:Orientation`` in the XMP too). ICC profile (iPhones embed
    Display P3), EXIF and XMP are read; ``nclx`` colour information without a profile is given
    as an ICC profile when it is not sRGB (Display P3, BT.2020, linear, ...), and where no profile
    can say it (PQ, HLG: HDR) ``info.color_space_dropped`` says so, and a PNG output says the HDR
    coding in a cICP chunk (``info.png_chunks``: the nclx primaries and transfer, RGB, full
    range as libheif hands the samples). Not written: an 8-bit opaque
    HEIC's outputs default to JPEG, the others' to PNG, 16-bit for 10/12 bits, 8-bit for a
    transparent 8-bit HEIC (:func:`default_format`).
RAW
    :mod:`.raw` (LibRaw), developed to 16-bit RGB; written as 16-bit TIFF by default. The
    camera's EXIF of TIFF-based RAW (DNG, NEF, CR2, ARW, ...) is read as a TIFF's (descriptive
    tags, the Exif and GPS directories), and its XMP (a DNG's, as Lightroom writes it: rating,
    label, keywords) without the Camera Raw develop settings (``crs:``), which would develop
    the output a second time; no resolution. The ICC profile is that of the
    development when it is not plain sRGB (:func:`.icc.developed_raw`).
Others
    GIF, BMP, WebP, AVIF, JPEG 2000, ... are refused with an :class:`ImageError` naming the
    detected format (an MP4 or MOV video as a video).

XMP (``info.xmp``, the raw packet) and the print resolution (``info.dpi``, pixels per inch;
from the format's own field, else from EXIF's XResolution) are carried across formats; see
:mod:`.metadata` for the conventions and the limits that make bad values ignored, not fatal.

A photo without an ICC profile whose EXIF says Adobe RGB (a camera JPEG shot in that colour
space: :func:`.exif.declares_adobe_rgb`) is given an Adobe RGB profile (:func:`.icc.adobe_rgb`),
so that every output, TIFF and PNG too, says so: untagged, readers would take it for sRGB.
Every profile made for a source (this one, a PNG's gAMA/cHRM, a HEIF's nclx) is a grey one
for grey pixels (:func:`.icc.grey_counterpart`): readers reject an RGB profile on them.

EXIF orientation is applied to the pixels on read (``info.orientation_applied``) and the
Orientation tag of the kept EXIF (and ``tiff:Orientation`` of the kept XMP) is reset to 1,
so outputs display the same way; the dpi pair is swapped with the axes, and the thumbnails,
which would show turned, are dropped: EXIF's, and those among the Photoshop resources of a
JPEG's APP13 block (resources 1033 and 1036; the others, IPTC included, stay byte for byte).
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import struct
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from . import exif as exif_mod
from . import heif as heif_mod
from . import icc as icc_mod
from . import metadata as meta
from . import png as png_mod
from .atomic import atomic_write_bytes
from .base import (
    DEFAULT_MAX_PIXELS,
    FORMAT_ALIASES,
    HEIF_EXTENSIONS,
    RAW_EXTENSIONS,
    STANDARD_EXTENSIONS,
    ImageError,
    ImageInfo,
    path_ext,
    RAISE_PIXEL_LIMIT,
    quantize,
    to_float,
    too_large_error,
)
from .raw import RawOptions, probe_raw, read_raw

_OTHER_MAGIC = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"8BPS", "Photoshop PSD"),
    (b"\x76\x2f\x31\x01", "OpenEXR"),
    (b"#?RADIANCE", "Radiance HDR"),
    (b"%PDF", "PDF"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"qoif", "QOI"),
)
_RAW_MAGIC = (
    b"FUJIFILMCCD-RAW",  # RAF
    b"IIRO", b"IIRS", b"MMOR",  # ORF
    b"IIU\x00",  # RW2
    b"\x00MRM",  # MRW
    b"FOVb",  # X3F
)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


# --------------------------------------------------------------------------------------------
# sources and format detection


class _Src:
    """An image source: a file path or in-memory bytes (stdin), opened lazily."""

    def __init__(self, source):
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.path: Path | None = None
            self.data: bytes | None = bytes(source)
            self.name = "<stdin>"
            if not self.data:
                raise ImageError(None, "no image data (input is empty)")
            self.head = self.data[:64]
        elif isinstance(source, (str, os.PathLike)):
            self.path = Path(source)
            self.data = None
            self.name = str(source)
            try:
                with open(self.path, "rb") as fh:
                    if stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                        self.head = fh.read(64)
                    else:  # a pipe (``<(cmd)``, /dev/stdin) can be read only once: keep all of it
                        self.data = fh.read()
                        self.head = self.data[:64]
            except FileNotFoundError:
                raise ImageError(source, "no such file") from None
            except IsADirectoryError:
                raise ImageError(source, "is a directory, not an image file") from None
            except PermissionError:
                raise ImageError(source, "permission denied") from None
            except OSError as exc:
                raise ImageError(source, f"cannot read ({exc.strerror or exc})") from None
            if not self.head:
                raise ImageError(source, "file is empty (0 bytes)")
        else:
            raise TypeError(f"image source must be a path or bytes, not {type(source).__name__}")

    def open(self) -> BinaryIO:
        if self.data is not None:
            return io.BytesIO(self.data)
        try:
            return open(self.path, "rb")
        except OSError as exc:
            raise ImageError(self.name, f"cannot read ({exc.strerror or exc})") from None

    @property
    def lib_arg(self):
        """What to hand to Pillow / tifffile: the path (they open and close it) or a BytesIO."""
        return io.BytesIO(self.data) if self.data is not None else self.path

    @property
    def ext(self) -> str:
        return path_ext(self.path) if self.path is not None else ""

    @property
    def raw_arg(self):
        return self.data if self.data is not None else self.path


def _sniff(src: _Src) -> str:
    """Format from the content's magic bytes: 'png' | 'jpeg' | 'tiff' | 'heif' | 'raw'.

    The extension only matters for camera RAW: a RAW extension sends TIFF-structured and
    unknown content to LibRaw (most RAW formats are TIFF-based).
    """
    head = src.head
    if head.startswith(png_mod.SIGNATURE):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[4:12] == b"ftypcrx ":
        return "raw"  # Canon CR3 (ISO base media)
    if any(head.startswith(m) for m in _RAW_MAGIC):
        return "raw"
    if head[:4] in _TIFF_MAGIC:
        if src.ext in RAW_EXTENSIONS or head[8:10] == b"CR":  # CR2 marker
            return "raw"
        return "tiff"
    if src.ext in RAW_EXTENSIONS:
        return "raw"
    for magic, label in _OTHER_MAGIC:
        if head.startswith(magic):
            raise ImageError(src.name, f"{label} images are not supported (use PNG, TIFF, JPEG or camera RAW)")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        raise ImageError(src.name, "WebP images are not supported (use PNG, TIFF, JPEG or camera RAW)")
    if head[4:8] == b"ftyp":
        if heif_mod.available() and _iso_media_kind(head) == "heif":
            return "heif"
        raise ImageError(src.name, _iso_media_problem(head))
    raise ImageError(src.name, "not a recognised image (content is not PNG, TIFF, JPEG or camera RAW)")


#: ``ftyp`` brands of HEIF images (HEIC is the iPhone's photo format) and of AVIF images.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1", b"mif2"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})


def _iso_media_kind(head: bytes) -> str:
    """What ISO base media content (an ``ftyp`` box first; Canon CR3 is taken before) is, told by
    its brands: 'avif', 'heif' or 'video' (the ``ftyp`` box of an MP4 or MOV video looks the
    same as a photo's). AVIF files name HEIF's brands too, so AVIF's are looked for first."""
    brands = heif_mod.ftyp_brands(head)
    if brands & _AVIF_BRANDS:
        return "avif"
    if brands & _HEIF_BRANDS:
        return "heif"
    return "video"


def _iso_media_problem(head: bytes) -> str:
    """Why ISO base media content is refused (HEIF only where the ``heic`` extra is missing)."""
    kind = _iso_media_kind(head)
    if kind == "avif":
        return "AVIF images are not supported (use PNG, TIFF, JPEG or camera RAW)"
    if kind == "heif":
        return ("HEIC/HEIF images are not supported; convert them to JPEG, PNG or TIFF first "
                "(iPhones take JPEG photos with Settings > Camera > Formats > Most Compatible), "
                f"or install HEIC support: {heif_mod.INSTALL_HINT}")
    return "a video or other ISO media file (MP4, MOV, ...), not an image (use PNG, TIFF, JPEG or camera RAW)"


def sniff_format(source: str | os.PathLike | bytes) -> str:
    """The format :func:`read_image` would decode ``source`` as: 'png' | 'jpeg' | 'tiff' |
    'heif' | 'raw' ('heif' only where the ``heic`` extra is installed).

    Looks at the first 64 bytes (and, for camera RAW, the extension); TIFF content is looked
    into further, for a DNG or other TIFF-based RAW without a RAW extension (read from stdin,
    or named ``.tif``), which :func:`read_image` develops as RAW. Raises :class:`ImageError`
    for content that is not a supported image.
    """
    src = _Src(source)
    fmt = _sniff(src)
    return "raw" if fmt == "tiff" and _tiff_content_is_raw(src) else fmt


def _tiff_content_is_raw(src: _Src) -> bool:
    """Whether TIFF content is a camera RAW (:func:`_tiff_is_raw`); False for one tifffile
    cannot open (its reading says what is wrong)."""
    import tifffile

    try:
        with tifffile.TiffFile(src.lib_arg) as tif:
            return bool(tif.pages) and _tiff_is_raw(tif)
    except Exception:  # noqa: BLE001 - damaged content: the read reports it
        return False


def is_image_path(path: str | os.PathLike) -> bool:
    """True when ``path`` has an image extension this package reads (case-insensitive).

    PNG, TIF/TIFF, JPG/JPEG/JFIF/JPE, :data:`RAW_EXTENSIONS`, and HEIC/HEIF/HIF where the
    ``heic`` extra is installed. Hidden files (``.name``) and our temporary files are excluded.
    Only the name is looked at, not the content.
    """
    p = Path(path)
    if p.name.startswith("."):
        return False
    ext = path_ext(p)
    return ext in STANDARD_EXTENSIONS or ext in RAW_EXTENSIONS or (ext in HEIF_EXTENSIONS and heif_mod.available())


def _check_pixels(name, w: int, h: int, max_pixels: int | None) -> None:
    if w <= 0 or h <= 0:
        raise ImageError(name, f"image has zero size ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise too_large_error(name, f"{w}x{h}", w * h, max_pixels)


#: What the pixel limit allows to decode, per pixel: float32 RGB, what the model takes. A
#: TIFF may hold up to 16 samples of 64 bits each, 10x that at the same pixel count.
_LIMIT_BYTES_PER_PIXEL = 12


def _check_decoded_bytes(name, w: int, h: int, samples: int, dtype: Any, max_pixels: int | None) -> None:
    """Refuse a TIFF whose decoded array would outgrow what ``max_pixels`` float32 RGB pixels
    take (many samples, 64-bit floats): the pixel count alone would let it allocate gigabytes."""
    if max_pixels is None:
        return
    itemsize = getattr(dtype, "itemsize", 1) or 1
    needed, allowed = w * h * samples * itemsize, max_pixels * _LIMIT_BYTES_PER_PIXEL
    if needed > allowed:
        raise ImageError(name, f"image is too large to decode: {w}x{h} with {samples} samples of {8 * itemsize} bits is "
                               f"{needed / 1e6:,.1f} MB, more than the limit of {max_pixels:,} pixels allows "
                               f"({allowed / 1e6:,.1f} MB, as float32 RGB) {RAISE_PIXEL_LIMIT}")


def _allow_pillow(pixels: int) -> None:
    # Our own limit was already checked from the header; lift Pillow's (smaller, global)
    # bomb limit just enough that it neither warns nor refuses what the caller allowed.
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = pixels


@contextlib.contextmanager
def _quiet_pil():
    # Pillow warns (UserWarning) about each damaged tag of a corrupt file; the outcome is
    # reported as an ImageError or the metadata are dropped, so the warnings are only noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        yield


def _decode_error(name, what: str, exc: Exception) -> ImageError:
    msg = str(exc).strip() or type(exc).__name__
    if isinstance(exc, MemoryError):
        msg = "out of memory"
    return ImageError(name, f"cannot decode {what} ({msg})")


# --------------------------------------------------------------------------------------------
# per-format readers: return (int or float array H x W x C, bit_depth, icc, exif, orientation,
# frames, xmp, dpi, extra); C includes alpha as the last channel when it is 2 or 4. xmp and dpi
# are already checked (see .metadata); dpi is as stored, before orientation is applied. extra
# holds the ImageInfo fields only some formats fill (keyword -> value).


def _read_png(src: _Src, max_pixels):
    with src.open() as fh:
        png = png_mod.parse(fh, src.name, max_pixels=max_pixels)
    png_mod.check_idat_size(png, src.name)
    exif = exif_mod.normalize_exif(png.exif)
    if png.bit_depth == 16:
        arr = png_mod.decode16(png, src.name)
        depth = 16
    else:
        arr = _pillow_png(src, png)
        depth = 8
    icc, color_space_dropped = _png_colour(arr, png)
    extra = {"png_chunks": tuple(png.kept_chunks), "color_space_dropped": color_space_dropped}
    return arr, depth, icc, exif, exif_mod.read_orientation(exif), png.frames, png.xmp, png.dpi, extra


def _png_colour(arr: np.ndarray, png: png_mod.PngFile) -> tuple[bytes | None, str | None]:
    """``(ICC profile, colour space left unsaid)`` of a PNG, for outputs other than PNG (a PNG
    output carries the colour chunks themselves).

    The file's own iCCP is kept. Else, by the precedence of PNG's third edition, a cICP's colour
    space comes first: a profile where one can say it (BT.2020, Display P3, ...; none for sRGB),
    else gAMA/cHRM's stand-in, if any, with the cICP's colour space said to be left unsaid (PQ,
    HLG: HDR; narrow-range samples), rather than outputs claiming sRGB without a word.
    """
    codes = png_mod.cicp_codes(png.kept_chunks)
    made, dropped = (None, None) if codes is None else _cicp_profile(codes)
    if png.icc_profile:
        return png.icc_profile, dropped
    if codes is not None and dropped is None:
        return _made_profile_for(arr, made), None
    return _made_profile_for(arr, png_mod.implied_icc_profile(png.kept_chunks)), dropped


def _cicp_profile(codes: tuple[int, int, int, int]) -> tuple[bytes | None, str | None]:
    """:func:`.heif.nclx_profile` of a PNG's cICP codes; narrow-range (video) samples, which no
    ICC profile says, are left unsaid."""
    made, dropped = heif_mod.nclx_profile(png_mod.cicp_as_nclx(codes))
    if dropped is None and not codes[3]:
        return None, "narrow-range (video) samples"
    return made, dropped


#: H.273 transfer characteristics of HDR codings, which no ICC profile says but a PNG's cICP chunk
#: does: PQ (SMPTE ST 2084) and HLG (ARIB STD-B67).
HDR_TRANSFERS = (16, 18)


def _heif_cicp(nclx: dict | None) -> tuple[bytes, bytes] | None:
    """The cICP chunk that tells PNG readers a HEIF's HDR coding (:data:`HDR_TRANSFERS`), from its
    nclx codes: primaries and transfer as stored; matrix coefficients 0 and full range, as
    libheif hands the samples (RGB, converted from the stored range). None for other nclx."""
    try:
        primaries, transfer = int(nclx["color_primaries"]), int(nclx["transfer_characteristics"])
        return png_mod.cicp_chunk(primaries, transfer) if transfer in HDR_TRANSFERS else None
    except (KeyError, TypeError, ValueError):
        return None


def _pillow_png(src: _Src, png: png_mod.PngFile) -> np.ndarray:
    from PIL import Image

    _allow_pillow(png.width * png.height)
    try:
        with Image.open(io.BytesIO(png_mod.pixel_stream(png)), formats=["PNG"]) as im:
            im.load()
            trns = im.info.get("transparency")
            mode = im.mode
            if mode == "P" or mode == "PA":
                im = im.convert("RGBA" if (trns is not None or mode == "PA") else "RGB")
            elif mode == "1":
                im = im.convert("L")
            elif mode not in ("L", "LA", "RGB", "RGBA"):
                raise ImageError(src.name, f"unsupported PNG pixel mode {mode}")
            arr = np.asarray(im)
    except ImageError:
        raise
    except Exception as exc:
        raise _decode_error(src.name, "PNG image data", exc) from None
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[:2] != (png.height, png.width):
        raise ImageError(src.name, "corrupt PNG (decoded size differs from the header)")
    if png.color_type in (0, 2) and png.trns is not None:
        # tRNS colour key -> alpha, taken from the chunk: Pillow reports it scaled for 1-bit,
        # unscaled for 2/4-bit and unmasked for all. The spec keeps only the key's low
        # bit-depth bits; Pillow scales 1/2/4-bit gray pixels to 0..255, so the key is scaled alike.
        n = 1 if png.color_type == 0 else 3  # gray or RGB key
        maxval = (1 << png.bit_depth) - 1
        if len(png.trns) >= 2 * n and arr.shape[2] == n:
            key = np.array(struct.unpack(f">{n}H", png.trns[: 2 * n]), np.uint16) & maxval
            key = (key * (255 // maxval)).astype(np.uint8)
            alpha = np.where((arr == key).all(axis=-1), 0, 255).astype(np.uint8)
            arr = np.concatenate([arr, alpha[..., None]], axis=-1)
    return arr


def _jpeg_frame(fh: BinaryIO) -> tuple[int, int, int] | None:
    """``(width, height, sample precision in bits)`` from the first SOF marker, or None when
    not found.

    Needed before Pillow opens the file: Pillow applies its own (global, smaller) bomb limit
    inside ``Image.open``, and refuses a precision other than 8 bits without saying why.
    """
    if fh.read(2) != b"\xff\xd8":
        return None
    while True:
        b = fh.read(1)
        if not b:
            return None
        if b != b"\xff":
            continue  # entropy-coded data or padding: scan for the next marker
        m = fh.read(1)
        while m == b"\xff":
            m = fh.read(1)
        if not m:
            return None
        marker = m[0]
        if marker == 0x00 or marker == 0x01 or 0xD0 <= marker <= 0xD8:
            continue  # stuffed byte / standalone markers
        if marker == 0xD9:
            return None
        seg = fh.read(2)
        if len(seg) != 2:
            return None
        length = struct.unpack(">H", seg)[0]
        if length < 2:
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            sof = fh.read(5)
            if len(sof) != 5:
                return None
            bits, h, w = struct.unpack(">BHH", sof)
            return w, h, bits
        fh.seek(length - 2, 1)


def _open_jpeg(src: _Src, max_pixels):
    """The Pillow image of a JPEG (or MPO), opened once its frame header passed the checks."""
    from PIL import Image, UnidentifiedImageError

    with src.open() as fh:
        frame = _jpeg_frame(fh)
    if frame is not None:
        w, h, bits = frame
        if bits != 8:  # 12-bit (and lossless 16-bit) JPEG: Pillow decodes 8-bit samples only
            raise ImageError(src.name, f"{bits}-bit JPEG is not supported (only 8-bit); convert it to a 16-bit PNG or TIFF first")
        _check_pixels(src.name, w, h, max_pixels)
        _allow_pillow(w * h)
    try:
        return Image.open(src.lib_arg, formats=["JPEG"])  # the JPEG plugin opens MPO files too
    except Image.DecompressionBombError as exc:
        raise ImageError(src.name, f"image is too large ({exc})") from None
    except UnidentifiedImageError:  # its message names the file again, or a BytesIO object
        raise ImageError(src.name, "cannot decode JPEG (corrupt, or a kind of JPEG that is not supported)") from None
    except Exception as exc:
        raise _decode_error(src.name, "JPEG", exc) from None


def _read_jpeg(src: _Src, max_pixels):
    im = _open_jpeg(src, max_pixels)
    with im:
        w, h = im.size
        _check_pixels(src.name, w, h, max_pixels)
        _allow_pillow(w * h)
        if im.mode not in ("L", "RGB"):
            if im.mode == "CMYK":
                raise ImageError(src.name, "CMYK JPEG is not supported; convert it to RGB first")
            raise ImageError(src.name, f"unsupported JPEG pixel mode {im.mode}")
        icc = im.info.get("icc_profile") or None
        exif = exif_mod.normalize_exif(im.info.get("exif"))
        xmp = meta.normalize_xmp(im.info.get("xmp"))  # one APP1 segment: at most 64 KB
        frames, gain_map = _jpeg_frames(src, im, xmp)
        dpi = _jfif_dpi(im.info)
        segments = _jpeg_carried_segments(im.applist)
        try:
            im.load()
            arr = np.asarray(im)
        except Exception as exc:
            raise _decode_error(src.name, "JPEG image data", exc) from None
    if arr.ndim == 2:
        arr = arr[..., None]
    extra = {"jpeg_segments": segments, "hdr_gain_map_dropped": gain_map, "motion_photo_dropped": meta.declares_motion_photo(xmp)}
    return arr, 8, icc, exif, exif_mod.read_orientation(exif), frames, xmp, dpi, extra


#: MP Types (CIPA DC-007) of an MPO picture that is a reduced copy of the first: the large
#: thumbnails (VGA, Full HD) many cameras store in a JPEG photo for previews.
_MPO_LARGE_THUMBNAILS = (0x010001, 0x010002)
#: How a JPEG's APP1 segment of XMP and its APP2 segment of the MP index (MPF) begin.
_JPEG_XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
_MPF_HEADER = b"MPF\x00"
_MP_ENTRY_TAG = 0xB002  # the MP index's table of pictures, 16 bytes each
_APP1, _APP2 = 0xE1, 0xE2
_MP_PICTURES_EXAMINED = 32  # phones store 1-4 pictures beside the primary


def _jpeg_frames(src: _Src, im, xmp: bytes | None) -> tuple[int, bool]:
    """How many pictures of a JPEG are images of their own (``info.frames``), and whether one of
    the others is an HDR gain map (``info.hdr_gain_map_dropped``).

    Told by the primary picture's MP index (MPF) and the header of each picture it lists. Large
    thumbnails are no more another frame than a TIFF's preview page, nor are an iPhone's
    auxiliary pictures (depth, mattes) more than a TIFF's transparency mask; nor is a gain map, the
    primary picture's HDR headroom rather than an image: the picture whose own XMP or ISO
    21496-1 segment says it is one (Adobe, Android Ultra HDR, Apple, ISO 21496-1), else the
    first other picture when the primary's XMP or ISO 21496-1 segment declares one. A gain map
    declared but not in the file (the XMP a copy kept) is none. Without a readable MP index the
    count is Pillow's.
    """
    with src.open() as fh:
        primary = _jpeg_app_segments(fh, 0)
        declared = meta.declares_gain_map(xmp) or any(_is_iso_gain_map(m, p) for m, _at, p in primary)
        index = next(((at + len(_MPF_HEADER), p[len(_MPF_HEADER) :]) for m, at, p in primary
                      if m == _APP2 and p.startswith(_MPF_HEADER)), None)
        pictures = None if index is None else _mp_pictures(index[1])
        if pictures is None:
            return int(getattr(im, "n_frames", 1) or 1), False
        # the headers of the first few pictures are read: an index may list thousands, all
        # pointing at one picture with megabytes of header (the rest count as images)
        kinds = [_picture_kind(fh, index[0] + offset, mp_type) if i < _MP_PICTURES_EXAMINED else "image"
                 for i, (mp_type, offset) in enumerate(pictures)]
    if declared and "gain map" not in kinds and "image" in kinds:
        kinds[kinds.index("image")] = "gain map"
    return 1 + kinds.count("image"), "gain map" in kinds


def _jpeg_app_segments(fh: BinaryIO, start: int) -> list[tuple[int, int, bytes]]:
    """``(marker, file offset of the payload, payload)`` of the APP1 and APP2 segments of the JPEG
    picture whose SOI is at ``start``, up to its scan; empty where no picture starts there. The
    other segments are skipped unread."""
    fh.seek(start)
    if fh.read(2) != b"\xff\xd8":
        return []
    found = []
    while fh.read(1) == b"\xff":
        m = fh.read(1)
        while m == b"\xff":  # fill bytes before a marker
            m = fh.read(1)
        if not m or m[0] in (0xD9, 0xDA):  # EOI, SOS: the header is over
            break
        if m[0] == 0x01 or 0xD0 <= m[0] <= 0xD7:  # standalone markers
            continue
        head = fh.read(2)
        if len(head) < 2 or (length := struct.unpack(">H", head)[0]) < 2:
            break
        if m[0] in (_APP1, _APP2):
            found.append((m[0], fh.tell(), fh.read(length - 2)))
        else:
            fh.seek(length - 2, 1)
    return found


def _is_iso_gain_map(marker: int, payload: bytes) -> bool:
    """Whether a JPEG segment is ISO 21496-1 gain map metadata (an APP2 headed by its URN)."""
    return marker == _APP2 and payload.startswith(meta.ISO_GAIN_MAP_URN)


def _mp_pictures(index: bytes) -> list[tuple[int, int]] | None:
    """``(MP type, offset from the index's start)`` of each picture an MP index lists after the
    first (``index``: an MPF APP2 payload after ``MPF\\0``); None where it cannot be read."""
    found = exif_mod.ifd0_entries(index)
    if found is None:
        return None
    bo, entries = found
    for e, tag, typ, count in entries:
        if tag == _MP_ENTRY_TAG and typ == 7 and count >= 16:  # UNDEFINED bytes
            (at,) = struct.unpack(bo + "I", index[e + 8 : e + 12])
            table = index[at : at + count - count % 16]
            if len(table) < 16:
                return None
            listed = struct.iter_unpack(bo + "IIIHH", table)  # attribute, size, offset, dependents
            return [(attribute & 0xFFFFFF, offset) for attribute, _size, offset, _dep1, _dep2 in listed][1:]
    return None


def _picture_kind(fh: BinaryIO, start: int, mp_type: int) -> str:
    """What a picture an MP index lists is: a "thumbnail", a "gain map" (its own XMP or ISO
    21496-1 segment says so), an "auxiliary" picture (an iPhone's depth map or portrait matte,
    told by its XMP) or an "image" (anything else, unreadable included)."""
    if mp_type in _MPO_LARGE_THUMBNAILS:
        return "thumbnail"
    segments = _jpeg_app_segments(fh, start)
    if any(_is_iso_gain_map(marker, payload) for marker, _at, payload in segments):
        return "gain map"
    xmp = next((meta.normalize_xmp(payload[len(_JPEG_XMP_HEADER) :]) for marker, _at, payload in segments
                if marker == _APP1 and payload.startswith(_JPEG_XMP_HEADER)), None)
    if meta.declares_gain_map(xmp):
        return "gain map"
    return "auxiliary" if meta.describes_auxiliary_image(xmp) else "image"


def _jfif_dpi(info: dict) -> tuple[float, float] | None:
    """dpi from the JFIF APP0 density (Pillow's ``jfif_unit`` / ``jfif_density``); None for
    unit 0 (aspect ratio only). Pillow's own ``info["dpi"]`` is not used: it says 72 dpi for
    a JPEG that has EXIF but no resolution in it."""
    density = info.get("jfif_density")
    unit = info.get("jfif_unit")
    if not isinstance(density, tuple) or len(density) != 2:
        return None
    if unit == 1:
        return meta.normalize_dpi(*density)
    if unit == 2:
        return meta.normalize_dpi(*density, 2.54)
    return None


def _tiff_is_raw(tif) -> bool:
    import tifffile

    raw_kinds = (tifffile.PHOTOMETRIC.CFA, tifffile.PHOTOMETRIC.LINEAR_RAW)
    page = tif.pages.first
    if 50706 in page.tags:  # DNGVersion
        return True
    if page.photometric in raw_kinds:
        return True
    for sub in page.pages or ():
        if getattr(sub, "photometric", None) in raw_kinds:
            return True
    return False


#: NewSubfileType bits of a TIFF page that is no image of its own: a reduced-resolution copy
#: of another (a preview, a thumbnail, a pyramid level; bit 0) or a transparency mask (bit 2).
_NOT_OWN_IMAGE = 0b101


def _is_own_image(page) -> bool:
    return not int(page.subfiletype) & _NOT_OWN_IMAGE


def _tiff_image_page(tif) -> tuple[Any, int]:
    """The page of a TIFF that is read, and how many images the TIFF holds (``info.frames``).

    The page read is the first one that is an image of its own, not a reduced-resolution copy
    or a mask: scanners, Photoshop and camera exports may put a small preview first, and
    reading it would silently lose the full image. Without such a top-level page, the first
    such SubIFD of page 0 is read (a preview whose full image hangs below it), else page 0.
    The count is that of the top-level pages that are images of their own (at least 1).
    """
    pages = tif.pages
    own: list[Any] = []
    damaged = False
    try:
        for i in range(len(pages)):
            page = pages[i]
            if _is_own_image(page):
                own.append(page)
    except Exception:  # a damaged later directory: counted as a page, and the search stops there
        damaged = True
    page = own[0] if own else _own_subifd(pages.first)
    return page, len(pages) if damaged else max(1, len(own))


def _own_subifd(first) -> Any:
    """The first SubIFD of ``first`` that is an image of its own, else ``first`` itself."""
    try:
        return next((sub for sub in first.pages or () if _is_own_image(sub)), first)
    except Exception:  # a damaged SubIFD: the page itself is read, as before SubIFDs were looked at
        return first


def _read_tiff(src: _Src, max_pixels, raw_options):
    """TIFF via tifffile. May hand over to the RAW reader (DNG and other TIFF-based RAW)."""
    import tifffile

    try:
        tif = tifffile.TiffFile(src.lib_arg)
    except ImageError:
        raise
    except Exception as exc:
        raise _decode_error(src.name, "TIFF", exc) from None
    with tif:
        try:
            if not tif.pages:
                raise ImageError(src.name, "TIFF has no images")
            if _tiff_is_raw(tif):
                return None  # caller develops it as RAW
            page, frames = _tiff_image_page(tif)
            h, w = int(page.imagelength), int(page.imagewidth)
            _check_pixels(src.name, w, h, max_pixels)
            spp = int(page.samplesperpixel)
            if spp > 16:
                raise ImageError(src.name, f"unsupported TIFF with {spp} samples per pixel")
            _check_decoded_bytes(src.name, w, h, spp, page.dtype, max_pixels)
            photometric = page.photometric
            P = tifffile.PHOTOMETRIC
            if photometric == P.SEPARATED:
                raise ImageError(src.name, "CMYK TIFF is not supported; convert it to RGB first")
            if photometric not in (P.MINISBLACK, P.MINISWHITE, P.RGB, P.PALETTE, P.YCBCR):
                raise ImageError(src.name, f"unsupported TIFF colour space ({getattr(photometric, 'name', photometric)})")
            if photometric == P.YCBCR and page.compression != tifffile.COMPRESSION.JPEG:
                raise ImageError(src.name, "YCbCr TIFF is not supported; convert it to RGB first")
            bps = page.bitspersample
            tags = page.tags
            orientation = _tiff_orientation(tags)
            icc = tags[34675].value if 34675 in tags else None
            icc = bytes(icc) if isinstance(icc, (bytes, bytearray)) and icc else None
            xmp = _tiff_xmp(tags)
            dpi = meta.dpi_from_tiff_tags(*(tags[t].value if t in tags else None for t in (282, 283, 296)))
            has_exif = any(t in tags for t in (34665, 34853, *exif_mod.DESCRIPTIVE_TAGS))
            extrasamples = tuple(int(e) for e in (page.extrasamples or ()))
            colormap = page.colormap if photometric == P.PALETTE else None  # before the file closes
            ifd_offset = int(page.offset)
            arr = page.asarray()
            axes = page.axes
        except ImageError:
            raise
        except Exception as exc:
            raise _decode_error(src.name, "TIFF image data", exc) from None
    if set(axes) - set("YXS") or "Y" not in axes or "X" not in axes:
        raise ImageError(src.name, f"unsupported TIFF layout (axes {axes})")
    arr = arr.transpose([axes.index(c) for c in "YXS" if c in axes])
    if "S" not in axes:
        arr = arr[..., None]
    if arr.shape[:2] != (h, w):
        raise ImageError(src.name, "corrupt TIFF (decoded size differs from the header)")
    P = tifffile.PHOTOMETRIC
    clipped = 0
    samples = arr.shape[2]
    if photometric == P.PALETTE:
        arr, depth = _apply_colormap(src, colormap, arr)  # RGB, extra samples dropped
    else:
        color = 1 if photometric in (P.MINISBLACK, P.MINISWHITE) else 3
        if arr.shape[2] < color:
            raise ImageError(src.name, f"corrupt TIFF ({arr.shape[2]} samples for an RGB image)")
        # the samples are chosen first, so that clipping counts only the values kept
        arr, alpha_kind = _tiff_color_and_alpha(arr, color, extrasamples)
        arr, depth, clipped = _tiff_normalize(src, arr, bps)
        if photometric == P.MINISWHITE:
            top = 1.0 if arr.dtype.kind == "f" else (1 << depth) - 1
            arr[..., :color] = top - arr[..., :color]
        if alpha_kind == 1:  # associated (premultiplied) alpha -> straight
            arr = _unpremultiply(arr, depth)
    dropped = samples - (1 if photometric == P.PALETTE else arr.shape[2])  # the palette index became RGB
    exif = None
    if has_exif:
        exif = _tiff_exif(src, ifd_offset)
    return arr, depth, icc, exif, orientation, frames, xmp, dpi, {"clipped_float_values": clipped, "dropped_extra_samples": dropped}


def _tiff_orientation(tags) -> int:
    """The Orientation tag (274) when it holds one value 1-8, else 1: a damaged tag (several
    values, text) is ignored like other damaged metadata, not fatal."""
    tag = tags.get(274)
    value = None if tag is None else tag.value
    if isinstance(value, (int, np.integer)) and 1 <= value <= 8:
        return int(value)
    return 1


def _tiff_xmp(tags) -> bytes | None:
    """Tag 700 (XMLPacket), BYTE/UNDEFINED (or ASCII, as some tools write it); size checked
    before the value is touched."""
    tag = tags.get(700)
    if tag is None or tag.valuebytecount > meta.MAX_XMP:
        return None
    value = tag.value
    return meta.normalize_xmp(value) if isinstance(value, (bytes, str)) else None


def _tiff_color_and_alpha(arr: np.ndarray, color: int, extrasamples: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """The ``color`` colour samples plus the alpha one, and the alpha's ExtraSamples value
    (0: no alpha, or alpha from a file without the ExtraSamples tag).

    Alpha is the first extra sample marked as alpha (1 associated, 2 unassociated). Extra
    samples marked 0, "unspecified data" (a stored selection, depth, a mask), are not alpha,
    so a file whose extra samples are all unspecified has none. Without the tag, the first
    extra sample is alpha, as Pillow and libtiff's RGBA reader take it. The other extra
    samples are dropped.
    """
    extra = arr.shape[2] - color
    if extra <= 0:
        return arr[..., :color], 0
    if not extrasamples:  # no ExtraSamples tag: some writers omit it for plain RGBA
        return arr[..., : color + 1], 0
    kinds = extrasamples[:extra]
    marked = [i for i, kind in enumerate(kinds) if kind in (1, 2)]
    if not marked:
        return arr[..., :color], 0
    i = marked[0]
    keep = slice(0, color + 1) if i == 0 else [*range(color), color + i]
    return arr[..., keep], kinds[i]


def _tiff_normalize(src: _Src, arr: np.ndarray, bps) -> tuple[np.ndarray, int, int]:
    """TIFF samples -> (uint8 / uint16 exact, or float32 in [0, 1]; nominal bit depth; how
    many float samples were outside [0, 1] or NaN, and so changed)."""
    bits = int(bps[0] if isinstance(bps, tuple) else bps)
    kind, size = arr.dtype.kind, arr.dtype.itemsize
    if kind == "b":
        return arr.astype(np.uint8) * np.uint8(255), 8, 0
    if kind == "f":
        out = arr.astype(np.float32)  # a copy, changed in place below
        clipped = out.size - int(np.count_nonzero((out >= 0) & (out <= 1)))  # NaN compares false: counted
        np.nan_to_num(out, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
        np.clip(out, 0.0, 1.0, out=out)
        return out, 32, clipped
    if kind == "u" and size == 1:
        if bits < 8:
            return _widen_to_8_bits(arr, bits), 8, 0
        return arr, 8, 0
    if kind == "u" and size == 2:
        arr = arr.astype(np.uint16)  # native byte order
        if bits < 16:
            return _rescaled_to_16_bits(arr, bits), 16, 0
        return arr, 16, 0
    raise ImageError(src.name, f"unsupported TIFF sample format ({arr.dtype}, {bits}-bit)")


def _rescaled_to_16_bits(arr: np.ndarray, bits: int) -> np.ndarray:
    """9-15-bit codes (a TIFF's, a 10/12-bit HEIC's) -> float32 ``k / (2**bits - 1)`` in [0, 1]:
    the exact values, which a 16-bit output then holds (``bit_depth`` 16). Codes above the top
    one (a damaged file) count as white."""
    top = (1 << bits) - 1
    return to_float(np.minimum(arr, top), top)


def _widen_to_8_bits(arr: np.ndarray, bits: int) -> np.ndarray:
    """2-7-bit codes -> 8-bit codes ``round(k * 255 / (2**bits - 1))``: black stays 0 and white
    becomes 255 at every depth (exact for 2 and 4 bits, where 255 is a multiple of the top code;
    for 3, 5, 6 and 7 bits a plain multiple would leave white at 252, 248 or 254)."""
    top = (1 << bits) - 1
    codes = np.minimum(arr, top).astype(np.uint16)
    return ((codes * 255 + top // 2) // top).astype(np.uint8)


def _apply_colormap(src: _Src, cmap, arr: np.ndarray) -> tuple[np.ndarray, int]:
    if cmap is None or arr.dtype.kind != "u":
        raise ImageError(src.name, "corrupt palette TIFF (no colour map)")
    cmap = np.asarray(cmap, dtype=np.uint16)
    if cmap.ndim != 2 or cmap.shape[0] != 3:
        raise ImageError(src.name, "corrupt palette TIFF (bad colour map)")
    idx = np.minimum(arr[..., 0], cmap.shape[1] - 1)
    rgb = cmap.T[idx]
    if _palette_depth(cmap) == 16:
        return rgb, 16
    return ((rgb // 257) if not (cmap % 257).any() else (rgb >> 8)).astype(np.uint8), 8


def _palette_depth(cmap: np.ndarray) -> int:
    """8 for a TIFF colour map (always stored as 16-bit values) that holds 8-bit colours scaled
    up, as v * 257 (libtiff) or v << 8 (Pillow) write them; else 16."""
    return 8 if not (cmap % 257).any() or not (cmap & 0xFF).any() else 16


def _unpremultiply(arr: np.ndarray, depth: int) -> np.ndarray:
    maxval = 1.0 if arr.dtype.kind == "f" else float((1 << depth) - 1)
    f = arr.astype(np.float64) / maxval
    a = f[..., -1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        color = np.where(a > 0, f[..., :-1] / a, 0.0)
    f[..., :-1] = np.clip(color, 0.0, 1.0)
    if arr.dtype.kind == "f":
        return f.astype(np.float32)
    return quantize(f, depth)


def _tiff_exif(src: _Src, ifd_offset: int | None = None) -> bytes | None:
    """EXIF from the TIFF directory at ``ifd_offset`` (None: the first), the page read."""
    try:
        with src.open() as fh:
            return exif_mod.exif_from_tiff(fh, ifd_offset)
    except ImageError:  # the file cannot be opened again: metadata is best-effort
        return None


def _open_heif(src: _Src, *, lazy: bool = False) -> Any:
    """The pillow-heif file of a HEIF source, its header parsed (nothing decoded), with at
    least one image."""
    try:
        heif_file = heif_mod.open_file(src.data if src.data is not None else src.path, lazy=lazy)
    except Exception as exc:  # libheif's errors on damaged content: ValueError, RuntimeError, EOFError, ...
        raise _decode_error(src.name, "HEIF", exc) from None
    if len(heif_file) == 0:
        # libheif lists only the images it can decode: an AV1 one without AVIF brands, JPEG- or
        # uncompressed-coded ones with a build that lacks those codecs are not listed
        raise ImageError(src.name, "HEIF file has no image that this HEIF support can decode")
    return heif_file


def _heif_header(src: _Src, heif_file: Any) -> heif_mod.HeifHeader:
    try:
        return heif_mod.header(heif_file)
    except Exception as exc:
        raise _decode_error(src.name, "HEIF header", exc) from None


def _read_heif(src: _Src, max_pixels):
    """HEIC/HEIF via pillow-heif: the primary image, upright as libheif turns it (its irot/imir
    transformations; ``orientation`` says which they amount to, and :func:`_decode` does not turn
    it again)."""
    heif_file = _open_heif(src)
    head = _heif_header(src, heif_file)
    _check_pixels(src.name, head.width, head.height, max_pixels)  # from the header: before decoding
    try:
        arr = heif_mod.decode(heif_file)
    except Exception as exc:
        raise _decode_error(src.name, "HEIF image data", exc) from None
    if arr.shape[:2] != (head.height, head.width) or arr.shape[2] not in (1, 2, 3, 4):
        raise ImageError(src.name, f"corrupt HEIF (decoded {arr.shape} for a {head.width}x{head.height} image)")
    arr, depth = _heif_samples(src, arr, head.bit_depth)
    if head.premultiplied and arr.shape[2] in (2, 4):
        arr = _unpremultiply(arr, depth)
    raw_icc, raw_exif, raw_xmp, nclx = heif_mod.metadata(heif_file)
    if raw_icc is not None:
        icc, color_space_dropped = raw_icc, None
    else:
        made, color_space_dropped = heif_mod.nclx_profile(nclx)
        icc = _made_profile_for(arr, made)
    cicp = _heif_cicp(nclx) if color_space_dropped else None  # PNG outputs say the HDR coding with it
    exif, xmp = _heif_upright_metadata(raw_exif, raw_xmp)
    extra = {"hdr_gain_map_dropped": head.gain_map, "motion_photo_dropped": meta.declares_motion_photo(xmp),
             "color_space_dropped": color_space_dropped, "png_chunks": () if cicp is None else (cicp,)}
    return arr, depth, icc, exif, head.orientation, head.frames, xmp, None, extra


def _heif_samples(src: _Src, arr: np.ndarray, bits: int) -> tuple[np.ndarray, int]:
    """libheif's samples -> (uint8 codes, 8), (float32 in [0, 1], 16) for 10/12 bits, or
    (uint16 codes, 16) for 16 bits (an uncompressed HEIF's), as a 16-bit TIFF's."""
    if bits == 8 and arr.dtype == np.uint8:
        return arr, 8
    if bits == 16 and arr.dtype == np.uint16:
        return arr, 16
    if 8 < bits < 16 and arr.dtype == np.uint16:
        return _rescaled_to_16_bits(arr, bits), 16
    raise ImageError(src.name, f"unsupported HEIF sample format ({bits}-bit as {arr.dtype})")


def _heif_upright_metadata(raw_exif: Any, raw_xmp: Any) -> tuple[bytes | None, bytes | None]:
    """A HEIF's EXIF and XMP, checked, with their orientation reset to 1: the pixels come out as
    the HEIF's transformations turn them, whatever the tags say (in HEIF they are informative,
    and often stale); a viewer applying them again would turn the output twice. The EXIF
    thumbnail goes with a reset orientation, as for other formats (it would show turned)."""
    exif = exif_mod.normalize_exif(raw_exif if isinstance(raw_exif, (bytes, bytearray)) else None)
    if exif is not None and exif_mod.read_orientation(exif) != 1:
        exif = exif_mod.drop_thumbnail(exif_mod.reset_orientation(exif))
    xmp = meta.normalize_xmp(raw_xmp if isinstance(raw_xmp, (bytes, bytearray, str)) else None)
    if xmp is not None:
        xmp = meta.reset_xmp_orientation(xmp)
    return exif, xmp


def probe_heif(source: str | os.PathLike | bytes) -> heif_mod.HeifHeader:
    """The header of a HEIF's primary image (size upright, bit depth, alpha, orientation,
    frames), read without decoding any pixel; for choosing an output format when planning.

    Raises
    ------
    ImageError
        ``source`` is no HEIF kpac reads (not HEIF, the ``heic`` extra missing, damaged).
    """
    src = _Src(source)
    fmt = _sniff(src)
    if fmt != "heif":
        raise ImageError(src.name, f"not a HEIF image ({fmt.upper()})")
    with _quiet_pil():
        return _heif_header(src, _open_heif(src, lazy=True))


# --------------------------------------------------------------------------------------------
# public API


def _dispatch(src: _Src, fmt: str, max_pixels, raw_options):
    """Run the reader for ``fmt``; returns ``(format, reader result)``."""
    if fmt == "png":
        return fmt, _read_png(src, max_pixels)
    if fmt == "jpeg":
        return fmt, _read_jpeg(src, max_pixels)
    if fmt == "tiff":
        res = _read_tiff(src, max_pixels, raw_options)
        if res is not None:
            return fmt, res
    if fmt == "heif":
        return fmt, _read_heif(src, max_pixels)
    arr, orientation = read_raw(src.raw_arg, src.name, max_pixels=max_pixels, options=raw_options)
    # LibRaw has already turned the pixels; the EXIF kept has no Orientation (exif_from_tiff drops it)
    options = raw_options or RawOptions()
    profile = icc_mod.developed_raw(options.output_colorspace, options.gamma)  # sRGB: none, as untagged means
    return "raw", (arr, 16, profile, _raw_exif(src), orientation, 1, _raw_xmp(src), None, {})


def _raw_exif(src: _Src) -> bytes | None:
    """The camera's EXIF of a TIFF-based RAW (DNG, NEF, CR2, ARW, PEF, ...): make, model,
    capture time, exposure, lens and GPS, as for a TIFF; None for other RAW containers
    (CR3, RAF, ...), whose tags LibRaw alone reads."""
    if src.head[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    return _tiff_exif(src)


def _raw_xmp(src: _Src) -> bytes | None:
    """The XMP of a TIFF-based RAW (a DNG's, as Lightroom writes it: rating, label, keywords,
    title), without its Camera Raw develop settings, which would develop the output again;
    None for other RAW containers and for a packet that cannot be read (the pixels matter more)."""
    import tifffile

    if src.head[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    try:
        with tifffile.TiffFile(src.lib_arg) as tif:
            xmp = _tiff_xmp(tif.pages.first.tags)
    except Exception:  # noqa: BLE001 - LibRaw developed the file: its XMP is best-effort
        return None
    return None if xmp is None else meta.without_raw_develop_settings(xmp)


def _decode(source, max_pixels, raw_options):
    """The decoding step :func:`read_image` and :func:`read_image_codes` share.

    Returns ``(src, format, arr, bit_depth, icc, exif, orientation, frames, xmp, dpi, extra)`` with
    ``arr`` ``H x W x C`` as the format reader gave it (uint8 / uint16 codes, or float32 in
    [0, 1] for float and 9-15-bit TIFF and 10/12-bit HEIF; alpha last when C is 2 or 4), EXIF
    orientation (a HEIF's transformations) applied
    (to the pixels, the EXIF and XMP orientation, and the dpi pair). ``dpi`` falls back to
    EXIF's XResolution / YResolution when the format's own field has none. ``extra`` holds
    the further :class:`ImageInfo` fields the format reader filled.
    """
    src = _Src(source)
    fmt = _sniff(src)
    try:
        with _quiet_pil():
            res = _dispatch(src, fmt, max_pixels, raw_options)
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(src.name, "out of memory while decoding") from None
    except Exception as exc:  # any other library failure on bad data is a bad-image error
        raise _decode_error(src.name, fmt.upper(), exc) from None
    fmt, (arr, depth, icc, exif, orientation, frames, xmp, dpi, extra) = res
    if icc is None and fmt != "raw" and exif_mod.declares_adobe_rgb(exif):  # a camera JPEG shot in Adobe RGB
        icc = _made_profile_for(arr, icc_mod.adobe_rgb())
    if dpi is None:
        dpi = exif_mod.read_resolution(exif)
    if fmt != "raw":
        if fmt != "heif":  # libheif turned a HEIF's pixels already (its irot/imir transformations)
            arr = exif_mod.apply_orientation(arr, orientation)
        if orientation != 1:
            if exif is not None:
                exif = exif_mod.drop_thumbnail(exif_mod.reset_orientation(exif))
            if xmp is not None:
                xmp = meta.reset_xmp_orientation(xmp)
            if extra.get("jpeg_segments"):  # a Photoshop thumbnail would show turned, as EXIF's would
                extra = {**extra, "jpeg_segments": _without_turned_thumbnails(extra["jpeg_segments"])}
            if dpi is not None and orientation in (5, 6, 7, 8):  # axes swapped
                dpi = (dpi[1], dpi[0])
    return src, fmt, arr, depth, icc, exif, orientation, frames, xmp, dpi, extra


def _made_profile_for(arr: np.ndarray, profile: bytes | None) -> bytes | None:
    """A profile kpac made for a source's colour space (:mod:`.icc`, always RGB), as the pixels
    ``arr`` (``H x W x C``) need it: its grey counterpart for grey ones (1 or 2 channels), on
    which an RGB profile is invalid and ignored by readers."""
    return icc_mod.grey_counterpart(profile) if profile is not None and arr.shape[2] in (1, 2) else profile


def _color(arr: np.ndarray) -> np.ndarray:
    """Drop the alpha channel (last of 2 or 4) and replicate gray to RGB."""
    if arr.shape[2] in (2, 4):
        arr = arr[..., :-1]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


def read_image(
    source: str | os.PathLike | bytes,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    raw_options: RawOptions | None = None,
) -> tuple[np.ndarray, ImageInfo]:
    """Read an image as float32 RGB plus the record needed to write it back alike.

    Parameters
    ----------
    source : str, PathLike or bytes
        A file path, or the file's bytes (e.g. stdin). The format is always detected from
        the content's magic bytes, never from the name (except that a RAW extension routes
        TIFF-structured data to LibRaw).
    max_pixels : int or None
        Refuse images with more than ``height * width`` pixels, checked from the header
        before pixel memory is allocated. None disables the check.
    raw_options : RawOptions, optional
        How camera RAW files are developed (default ``RawOptions()``).

    Returns
    -------
    image : ndarray
        ``float32``, shape ``(H, W, 3)``, RGB, C-contiguous, values in ``[0, 1]``, exactly
        ``k / (2**bit_depth - 1)`` for integer sources. Gray is replicated to three
        channels; alpha is split off into ``info.alpha``; EXIF orientation is applied.
    info : ImageInfo
        Source format, bit depth, channels, alpha, ICC profile, EXIF, XMP, print resolution,
        orientation, size.

    Raises
    ------
    ImageError
        Missing/empty/unreadable file, unsupported or corrupt content, too many pixels.
        The message is one line and names the file.
    """
    src, fmt, arr, depth, icc, exif, orientation, frames, xmp, dpi, extra = _decode(source, max_pixels, raw_options)
    channels = int(arr.shape[2])
    if arr.dtype.kind == "f":  # float TIFF / rescaled 9-15-bit: already in [0, 1]
        f = np.ascontiguousarray(arr, dtype=np.float32)
    else:
        f = to_float(arr, (1 << depth) - 1)
    alpha = None
    if channels in (2, 4):
        alpha = np.ascontiguousarray(f[..., -1])
    f = _color(f)
    info = ImageInfo(
        path=None if src.path is None else str(src.path),
        format=fmt,
        bit_depth=depth,
        channels=channels,
        alpha=alpha,
        icc_profile=icc,
        exif=exif,
        orientation_applied=orientation,
        size=(int(f.shape[0]), int(f.shape[1])),
        frames=frames,
        xmp=xmp,
        dpi=dpi,
        **extra,
    )
    return f, info


def read_image_codes(
    source: str | os.PathLike | bytes,
    *,
    bit_depth: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    raw_options: RawOptions | None = None,
) -> tuple[np.ndarray, int]:
    """Read an image as integer code values, decoded exactly as :func:`read_image` decodes it.

    For memory-lean caches (training data): ``uint8`` takes a quarter of ``read_image``'s
    float32, and ``to_float(codes, 2**depth - 1)`` gives back exactly ``read_image``'s pixels.

    Parameters
    ----------
    source : str, PathLike or bytes
        As for :func:`read_image`.
    bit_depth : {None, 8, 16}
        None keeps the source's depth (8 or 16). 8 rounds 16-bit codes to 8 bits with the
        writer's rule, ``floor(k / 65535 * 255 + 0.5)``; 16 widens 8-bit codes exactly
        (``k * 257``).
    max_pixels, raw_options
        As for :func:`read_image`.

    Returns
    -------
    codes : ndarray
        ``(H, W, 3)`` ``uint8`` (depth 8) or ``uint16`` (depth 16), C-contiguous, RGB. Gray is
        replicated to three channels, alpha is dropped, EXIF orientation is applied. Float
        TIFF and 9-15-bit TIFF samples are rounded to 16-bit codes (the writer's rule).
    depth : int
        8 or 16: the codes' bit depth.

    Raises
    ------
    ImageError
        As for :func:`read_image`.
    """
    if bit_depth not in (None, 8, 16):
        raise ValueError(f"bit_depth must be None, 8 or 16; got {bit_depth!r}")
    _src, _fmt, arr, depth, *_meta = _decode(source, max_pixels, raw_options)
    arr = _color(arr)
    if arr.dtype.kind == "f":
        arr, depth = quantize(arr, 16), 16
    if bit_depth == 8 and depth == 16:
        # round(k * 255 / 65535) in integers: the writer's rule (quantize(k / 65535, 8)) for
        # every 16-bit k, without a float copy of the image.
        arr = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif bit_depth == 16 and depth == 8:
        arr = arr.astype(np.uint16) * np.uint16(257)
    return arr, bit_depth or depth


def list_images(folder: str | os.PathLike, *, recursive: bool = False) -> list[Path]:
    """The image files in ``folder`` (those :func:`is_image_path` accepts), sorted.

    Hidden files are skipped, and with ``recursive`` so are hidden sub-folders (and what is
    in them); symbolic links to folders are not followed. Sorted by the path relative to
    ``folder`` (``/``-separated), i.e. by name when not recursive.

    Raises
    ------
    OSError
        ``folder`` is missing, not a folder or cannot be listed (sub-folders that cannot be
        listed are passed over).
    """
    root = Path(folder)
    return sorted(
        (p for p in _entries(root, recursive) if is_image_path(p) and p.is_file()), key=lambda p: p.relative_to(root).as_posix()
    )


def _entries(root: Path, recursive: bool) -> list[Path]:
    """What :func:`list_images` looks through: ``root``'s entries, or with ``recursive`` the
    files below it outside hidden sub-folders."""
    names = os.listdir(root)  # raises for the folder itself; os.walk would stay silent
    if not recursive:
        return [root / n for n in names]
    found = []
    for here, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        found += [Path(here, f) for f in files]
    return found


#: Extensions of image formats kpac does not read, with the format's name (HEIC/HEIF ones
#: only while the ``heic`` extra is missing: see :func:`unread_image_extensions`).
UNREAD_IMAGE_EXTENSIONS = {"heic": "HEIC", "heif": "HEIF", "hif": "HEIF", "avif": "AVIF", "webp": "WebP", "gif": "GIF",
                           "bmp": "BMP", "jp2": "JPEG 2000", "jxl": "JPEG XL"}


def unread_image_extensions() -> dict[str, str]:
    """:data:`UNREAD_IMAGE_EXTENSIONS` less those this installation reads (HEIC/HEIF with the
    ``heic`` extra)."""
    if not heif_mod.available():
        return UNREAD_IMAGE_EXTENSIONS
    return {ext: name for ext, name in UNREAD_IMAGE_EXTENSIONS.items() if ext not in HEIF_EXTENSIONS}


def unread_images(paths: Iterable[str | os.PathLike], *, recursive: bool = False) -> dict[str, int]:
    """How many files of each image format kpac does not read (WebP, HEIC without the ``heic``
    extra, ...: by extension) lie in the folders among ``paths`` where :func:`list_images`
    looks, by format name; to say what a folder listing leaves out. Paths that are no folder,
    or cannot be listed, add none."""
    unread = unread_image_extensions()
    counts: dict[str, int] = {}
    for folder in paths:
        try:
            entries = _entries(Path(folder), recursive) if Path(folder).is_dir() else []
        except OSError:
            continue
        for p in entries:
            name = unread.get(p.suffix[1:].lower())
            if name is not None and not p.name.startswith("."):
                counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def probe_size(source: str | os.PathLike | bytes) -> tuple[int, int]:
    """``(height, width)`` that :func:`read_image` would return, from the header only.

    Cheap: no pixel data are decoded. EXIF orientation is taken into account (5-8 swap the
    axes). For RAW it is the full-size development (``half_size`` would halve it).

    Raises
    ------
    ImageError
        As for :func:`read_image` when the header cannot be read.
    """
    src = _Src(source)
    fmt = _sniff(src)
    try:
        with _quiet_pil():
            return _probe(src, fmt)
    except ImageError:
        raise
    except Exception as exc:
        raise _decode_error(src.name, f"{fmt.upper()} header", exc) from None


def _probe(src: _Src, fmt: str) -> tuple[int, int]:
    if fmt == "png":
        with src.open() as fh:
            png = png_mod.parse(fh, src.name, max_pixels=None, header_only=True)
        o = exif_mod.read_orientation(exif_mod.normalize_exif(png.exif))  # as _read_png reads it
        return exif_mod.oriented_size(png.height, png.width, o)
    if fmt == "jpeg":
        with _open_jpeg(src, None) as im:
            w, h = im.size
            o = exif_mod.read_orientation(exif_mod.normalize_exif(im.info.get("exif")))
        _check_pixels(src.name, w, h, None)
        return exif_mod.oriented_size(h, w, o)
    if fmt == "tiff":
        import tifffile

        with tifffile.TiffFile(src.lib_arg) as tif:
            if not tif.pages:
                raise ImageError(src.name, "TIFF has no images")
            if not _tiff_is_raw(tif):
                page, _frames = _tiff_image_page(tif)
                h, w = int(page.imagelength), int(page.imagewidth)
                o = _tiff_orientation(page.tags)
                _check_pixels(src.name, w, h, None)
                return exif_mod.oriented_size(h, w, o)
    if fmt == "heif":
        head = _heif_header(src, _open_heif(src, lazy=True))
        _check_pixels(src.name, head.width, head.height, None)
        return head.height, head.width  # upright already: libheif's transformations applied
    return probe_raw(src.raw_arg, src.name)


def _probe_depth(source) -> tuple[tuple[int, int], int]:
    """``((h, w), bit_depth)`` from the header (used by dual-pixel pairing)."""
    size = probe_size(source)
    src = _Src(source)
    fmt = _sniff(src)
    if fmt == "png":
        with src.open() as fh:
            png = png_mod.parse(fh, src.name, max_pixels=None, header_only=True)
        return size, 16 if png.bit_depth == 16 else 8
    if fmt == "tiff":
        import tifffile

        try:
            with tifffile.TiffFile(src.lib_arg) as tif:
                if not _tiff_is_raw(tif):
                    page, _frames = _tiff_image_page(tif)
                    if page.dtype is not None and page.dtype.kind == "f":
                        return size, 32
                    if page.photometric == tifffile.PHOTOMETRIC.PALETTE and page.colormap is not None:
                        return size, _palette_depth(np.asarray(page.colormap, dtype=np.uint16))  # as read
                    bits = page.bitspersample
                    return size, 8 if bits <= 8 else 16
        except Exception as exc:
            raise _decode_error(src.name, "TIFF header", exc) from None
    if fmt == "heif":
        return size, 8 if _heif_header(src, _open_heif(src, lazy=True)).bit_depth == 8 else 16
    return size, 8 if fmt == "jpeg" else 16


# --------------------------------------------------------------------------------------------
# writing


def _resolve_format(path, fmt: str | None, info: ImageInfo) -> str:
    if fmt is not None:
        key = str(fmt).lower().lstrip(".")
        if key == "raw" or key in RAW_EXTENSIONS:
            raise ImageError(path, "cannot write camera RAW; write TIFF (16-bit) instead")
        if key in HEIF_EXTENSIONS:
            raise ImageError(path, "cannot write HEIC/HEIF; write JPEG, or PNG (16-bit) instead")
        if key not in FORMAT_ALIASES:
            raise ValueError(f"unknown output format {fmt!r}; use png, tiff or jpeg")
        return FORMAT_ALIASES[key]
    if path is not None:
        ext = path_ext(path)
        if ext in FORMAT_ALIASES:
            return FORMAT_ALIASES[ext]
        if ext in RAW_EXTENSIONS:
            raise ImageError(path, f"cannot write camera RAW (.{ext}); use a .tif/.png/.jpg name")
        if ext in HEIF_EXTENSIONS:
            raise ImageError(path, f"cannot write HEIC/HEIF (.{ext}); use a .jpg/.png/.tif name")
    return default_format(info.format, info.bit_depth, info.alpha is not None)


def default_format(source_format: str, bit_depth: int, alpha: bool) -> str:
    """The format an output is written in when nothing names one: the source's own, but 16-bit
    TIFF for camera RAW, and for HEIC/HEIF (which kpac does not write) JPEG for an 8-bit
    photo without alpha (an iPhone's: what its "Most Compatible" setting would have taken),
    else PNG (it holds the 10/12 bits, as 16-bit, the alpha, and the whole EXIF, which TIFF
    outputs do not)."""
    if source_format == "raw":
        return "tiff"
    if source_format == "heif":
        return "jpeg" if bit_depth == 8 and not alpha else "png"
    return FORMAT_ALIASES.get(source_format, "png")


def write_image(
    path: str | os.PathLike | None,
    image: np.ndarray,
    info: ImageInfo,
    *,
    format: str | None = None,
    bit_depth: int | None = None,
    jpeg_quality: int = 95,
) -> bytes | None:
    """Encode ``image`` the way ``info``'s source came, and write it atomically.

    Parameters
    ----------
    path : str, PathLike or None
        Destination. None returns the encoded bytes instead (e.g. for stdout).
    image : ndarray
        Float ``(H, W, 3)`` RGB in ``[0, 1]`` (also ``(H, W)`` / ``(H, W, 1)`` gray). Values
        are clipped, NaN counts as 0, then rounded half-up: ``floor(v * maxval + 0.5)``
        (float32 output: NaN counts as 0, nothing else changes).
    info : ImageInfo
        From :func:`read_image`. Gray sources (1 or 2 channels) are written gray (the mean of
        the three channels); ``info.alpha`` is re-attached when the format has alpha (PNG,
        TIFF; JPEG drops it) and must be ``H x W``; ICC, EXIF, XMP, the print resolution and
        a PNG's colour space and text chunks are copied where the format allows (see the
        module notes).
    format : {'png', 'tiff', 'jpeg'}, optional
        Default: from the path's extension when it is one of png/tif/tiff/jpg/jpeg, else the
        source format (RAW -> TIFF, HEIF -> JPEG or PNG: :func:`default_format`).
    bit_depth : {8, 16, 32}, optional
        Default: the source's (float TIFF stays float32 as TIFF, 16 in PNG; RAW -> 16). JPEG
        is always 8. 32 writes a float32 TIFF (TIFF only) whose image values are not clipped.
    jpeg_quality : int
        1-100, JPEG only.

    Returns
    -------
    bytes or None
        The encoded file when ``path`` is None, else None.

    Raises
    ------
    ImageError
        The destination cannot be written (the message names it); an existing file is then
        left unchanged and no temporary file remains.
    ValueError
        Bad arguments (array shape, option values).
    """
    fmt = _resolve_format(path, format, info)
    if fmt == "jpeg":
        depth = 8
    elif bit_depth is None:
        depth = info.bit_depth if info.bit_depth in (8, 16) or (info.bit_depth == 32 and fmt == "tiff") else 16
    else:
        depth = int(bit_depth)
        if depth not in (8, 16, 32):
            raise ValueError(f"bit_depth must be 8, 16 or 32; got {bit_depth!r}")
        if depth == 32 and fmt != "tiff":
            raise ValueError("bit_depth 32 (float) is only available for TIFF")
    if not (1 <= int(jpeg_quality) <= 100):
        raise ValueError(f"jpeg_quality must be in 1..100; got {jpeg_quality!r}")
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[2] not in (1, 3) or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"image must be H x W x 3 (or H x W gray); got shape {np.shape(image)}")
    if img.dtype.kind != "f":
        raise ValueError(f"image must be floating point in [0, 1]; got dtype {img.dtype}")
    gray = info.channels in (1, 2) or img.shape[2] == 1
    if gray and img.shape[2] == 3:
        # float64 mean: exact for replicated gray (3v/3 == v), so gray round-trips bit-exactly.
        img = img.mean(axis=2, dtype=np.float64, keepdims=True)
    planes = [img]
    alpha = info.alpha if fmt in ("png", "tiff") else None
    if alpha is not None:
        alpha = np.asarray(alpha)
        if alpha.shape != img.shape[:2]:
            raise ValueError(f"info.alpha is {alpha.shape} but the image is {img.shape[:2]}")
        planes.append(alpha[..., None])
    if depth == 32:
        # float TIFF keeps values outside [0, 1] (e.g. a network's unclipped output); alpha is clipped
        planes = [np.nan_to_num(p.astype(np.float32), nan=0.0) for p in planes]
        planes[1:] = [np.clip(a, 0, 1) for a in planes[1:]]
        arr = np.concatenate(planes, axis=2)
    else:
        arr = np.concatenate([quantize(p, depth) for p in planes], axis=2)
    data = _encode(fmt, arr, depth, info, jpeg_quality)
    if path is None:
        return data
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise ImageError(path, f"cannot write ({exc.strerror or exc})") from None
    return None


#: The largest print resolution a JPEG's JFIF density field holds (16 bits, whole dpi).
JPEG_MAX_DPI = 65535

#: The most XMP one JPEG APP1 segment holds: 65535 - 2 (length) - 29 (namespace) bytes.
#: Longer packets would need "extended XMP" (several segments), which Pillow does not write.
JPEG_MAX_XMP = 65504

#: The most EXIF (``Exif\0\0`` + TIFF data) one JPEG APP1 segment holds: 65535 - 2 (length)
#: bytes, Pillow's limit. EXIF has no multi-segment form, so larger EXIF is not written to JPEG.
JPEG_MAX_EXIF = 65533

#: JPEG segments carried verbatim from a JPEG input to a JPEG output (no other format has a
#: place for them), by Pillow's name: their marker and how a note names them. COM (comments)
#: and APP13 (Photoshop resources, where IPTC captions, keywords, credits and copyright live).
JPEG_CARRIED_SEGMENTS = {"COM": (0xFE, "comments (COM)"), "APP13": (0xED, "IPTC/Photoshop block (APP13)")}


def written_xmp(xmp: bytes | None, *, height: int, width: int) -> bytes | None:
    """The XMP packet an output of ``height`` x ``width`` carries for a source's ``xmp``: the
    primary picture alone is written, at its own size (no secondary media declared, the size
    properties rewritten), so its length, not the source's, is what a JPEG segment must hold."""
    xmp = meta.normalize_xmp(xmp)
    if xmp is None:
        return None
    return meta.set_xmp_pixel_dimensions(meta.without_secondary_media(xmp), width=width, height=height)


def _jpeg_carried_segments(applist: Iterable[tuple[str, bytes]]) -> tuple[tuple[int, bytes], ...]:
    """``(marker, payload)`` of the :data:`JPEG_CARRIED_SEGMENTS` among a JPEG's header
    segments (Pillow's ``applist``: name and payload, in file order), in file order."""
    return tuple((JPEG_CARRIED_SEGMENTS[name][0], bytes(data)) for name, data in applist if name in JPEG_CARRIED_SEGMENTS)


#: How an APP13 segment's Photoshop image resources begin, and the signatures a resource
#: starts with ('8BIM'; the others from ImageReady and older tools).
_PHOTOSHOP_HEADER = b"Photoshop 3.0\x00"
_RESOURCE_SIGNATURES = (b"8BIM", b"MeSa", b"PHUT", b"AgHg", b"DCSR")
#: Photoshop image resources holding a thumbnail of the image (1036, and 1033 of Photoshop 4).
_PHOTOSHOP_THUMBNAILS = (1033, 1036)


def _resource_end(payload: bytes, pos: int) -> int | None:
    """End of the image resource at ``pos`` (signature, id, even-padded Pascal name, size,
    even-padded data), or None where no complete resource starts there."""
    if payload[pos : pos + 4] not in _RESOURCE_SIGNATURES or pos + 7 > len(payload):
        return None
    name_length = payload[pos + 6]
    size_at = pos + 6 + ((1 + name_length + 1) & ~1)
    if size_at + 4 > len(payload):
        return None
    (size,) = struct.unpack(">I", payload[size_at : size_at + 4])
    end = size_at + 4 + size + (size & 1)
    return end if end <= len(payload) + (size & 1) else None  # the last pad byte may be missing


def _without_photoshop_thumbnails(payload: bytes) -> bytes | None:
    """An APP13 payload without its thumbnail resources; None when nothing else is left.

    For pixels turned on read, as the EXIF thumbnail is dropped: the thumbnail keeps the old
    orientation. The other resources (IPTC, ...) stay byte for byte; from where the payload
    cannot be parsed (damage, a block continued in the next segment) it is kept as it is.
    """
    if not payload.startswith(_PHOTOSHOP_HEADER):
        return payload
    kept, pos, dropped = [payload[: len(_PHOTOSHOP_HEADER)]], len(_PHOTOSHOP_HEADER), False
    while (end := _resource_end(payload, pos)) is not None:
        if struct.unpack(">H", payload[pos + 4 : pos + 6])[0] in _PHOTOSHOP_THUMBNAILS:
            dropped = True
        else:
            kept.append(payload[pos:end])
        pos = end
    if not dropped:
        return payload
    kept.append(payload[pos:])
    rest = b"".join(kept)
    return None if rest == _PHOTOSHOP_HEADER else rest


def _without_turned_thumbnails(segments: Iterable[tuple[int, bytes]]) -> tuple[tuple[int, bytes], ...]:
    """Carried JPEG segments with the Photoshop thumbnails of their APP13 blocks dropped."""
    out = []
    for marker, payload in segments:
        if marker == JPEG_CARRIED_SEGMENTS["APP13"][0]:
            payload = _without_photoshop_thumbnails(payload)
        if payload is not None:
            out.append((marker, payload))
    return tuple(out)


def color_space_note(info: ImageInfo, fmt: str) -> str | None:
    """What an output in ``fmt`` (png, tiff, jpeg) makes of the colour space its input declares
    and no ICC profile says (``info.color_space_dropped``: PQ, HLG, ...), said rather than
    dropped silently; None when there is nothing to say (none, or a PNG's cICP copied to a PNG).

    A PNG output says an HDR coding in a cICP chunk (the input's, or one made of a HEIF's nclx);
    TIFF and JPEG have no place for it, and are written untagged (read as sRGB), or with the
    input's stand-in ICC profile (a PNG's iCCP or gAMA/cHRM beside its cICP).
    """
    if not info.color_space_dropped:
        return None
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    has_cicp = png_mod.cicp_codes(info.png_chunks) is not None
    if has_cicp and fmt == "png" and info.format == "png":
        return None  # the cICP chunk is copied as it is
    said = f"no ICC profile can say the input's colour space ({info.color_space_dropped})"
    if has_cicp and fmt == "png":
        return f"{said}: the PNG says it in a cICP chunk, which HDR-capable browsers and viewers read"
    how = ("written untagged, which readers take for sRGB" if info.icc_profile is None
           else "written with the input's stand-in ICC profile, which does not say it")
    keep = " (a PNG output keeps it in a cICP chunk: --format png)" if has_cicp else ""
    return f"{said}: the {fmt.upper()} is {how}{keep}"


def jpeg_segment_names(segments: Iterable[tuple[int, bytes]]) -> list[str]:
    """How notes name the kinds among carried JPEG segments (``ImageInfo.jpeg_segments``), sorted."""
    names = {marker: name for marker, name in JPEG_CARRIED_SEGMENTS.values()}
    return sorted({names[marker] for marker, _ in segments})


def _with_jpeg_segments(jpeg: bytes, segments: Iterable[tuple[int, bytes]]) -> bytes:
    """``jpeg`` (as Pillow writes it) with ``segments`` (``(marker, payload)``) added after
    its own header segments (APPn, COM) and before the tables, in the order given."""
    added = b"".join(struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload for marker, payload in segments)
    if not added:
        return jpeg
    pos = 2  # after SOI
    while pos + 4 <= len(jpeg) and jpeg[pos] == 0xFF and (0xE0 <= jpeg[pos + 1] <= 0xEF or jpeg[pos + 1] == 0xFE):
        pos += 2 + struct.unpack(">H", jpeg[pos + 2 : pos + 4])[0]
    return jpeg[:pos] + added + jpeg[pos:]


def _encode(fmt: str, arr: np.ndarray, depth: int, info: ImageInfo, quality: int) -> bytes:
    """Encode integer (or float32 for depth 32) H x W x C to file bytes."""
    exif = exif_mod.normalize_exif(info.exif)
    if exif is not None:  # the source's recorded size need not be the written one's
        exif = exif_mod.set_pixel_dimensions(exif, width=arr.shape[1], height=arr.shape[0])
    icc = info.icc_profile or None
    xmp = written_xmp(info.xmp, height=arr.shape[0], width=arr.shape[1])
    dpi = None if info.dpi is None else meta.normalize_dpi(*info.dpi)  # same rules as on read
    if fmt == "png":
        chunks = png_mod.chunks_to_copy(info.png_chunks, icc)
        if depth == 16:
            return png_mod.encode16(arr, icc_profile=icc, exif=exif, xmp=xmp, dpi=dpi, chunks=chunks)
        opts = {}
        if xmp is not None or chunks:
            from PIL.PngImagePlugin import PngInfo

            opts["pnginfo"] = PngInfo()
            for ctype, data in png_mod.without_cicp(chunks):  # written verbatim before IDAT, as encode16 does
                opts["pnginfo"].add(ctype, data)
            if xmp is not None:
                opts["pnginfo"].add_itxt(png_mod.XMP_KEYWORD, xmp)
        if dpi is not None:
            opts["dpi"] = dpi
        return png_mod.with_cicp_first(_pillow_save(arr, "PNG", icc=icc, exif=exif, compress_level=6, **opts), chunks)
    if fmt == "jpeg":
        if exif is not None and len(exif) > JPEG_MAX_EXIF:
            exif = None  # too large for one APP1 segment: the rest is written without it
        opts = {}
        if xmp is not None and len(xmp) <= JPEG_MAX_XMP:
            opts["xmp"] = xmp
        if dpi is not None and all(round(v) <= JPEG_MAX_DPI for v in dpi):
            opts["dpi"] = dpi  # Pillow rounds to whole dpi for the JFIF density
        data = _pillow_save(arr, "JPEG", icc=icc, exif=exif, quality=int(quality), subsampling=0, **opts)
        return _with_jpeg_segments(data, info.jpeg_segments)
    return _encode_tiff(arr, depth, icc, exif, xmp, dpi)


def _pillow_save(arr: np.ndarray, fmt: str, *, icc, exif, **opts) -> bytes:
    from PIL import Image

    im = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    if icc:
        opts["icc_profile"] = icc
    if exif:
        opts["exif"] = exif
    buf = io.BytesIO()
    im.save(buf, fmt, **opts)
    return buf.getvalue()


def _encode_tiff(arr: np.ndarray, depth: int, icc, exif, xmp, dpi) -> bytes:
    import tifffile

    channels = arr.shape[2]
    color = 1 if channels in (1, 2) else 3
    tags = exif_mod.descriptive_tags(exif)
    description = tags.pop(270, None)
    extratags = [(code, "s", 0, value, True) for code, value in sorted(tags.items())]
    if xmp:
        extratags.append((700, "B", len(xmp), xmp, True))  # XMLPacket
    resolution = {} if dpi is None else {"resolution": tuple(dpi), "resolutionunit": "INCH"}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tifffile warns about harmless tag choices
        tifffile.imwrite(
            buf,
            arr if channels > 1 else arr[..., 0],
            photometric="rgb" if color == 3 else "minisblack",
            extrasamples=["unassalpha"] if channels in (2, 4) else None,
            compression="zlib",
            predictor=depth != 32,  # horizontal differencing; the float predictor needs imagecodecs
            iccprofile=icc,
            description=description,
            software=False,
            metadata=None,
            extratags=extratags,
            **resolution,
        )
    return buf.getvalue()
