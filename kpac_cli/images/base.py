"""Shared types and pixel conventions of :mod:`kpac_cli.images`.

Conventions (hold for every reader and writer in this package)
---------------------------------------------------------------
* Arrays are ``float32``, ``H x W x C`` (row-major, channels last), channel order RGB.
* Values lie in ``[0, 1]``. An integer sample ``k`` of a ``b``-bit source becomes
  ``float32(k) / float32(2**b - 1)`` (a correctly rounded IEEE division).
* Writing quantises with round-half-up, ``floor(clip(v, 0, 1) * (2**b - 1) + 0.5)``, evaluated
  in float64; NaN counts as 0. Together with the reader rule this makes read -> write at the
  same bit depth bit-exact (the float32 error of ``k / maxval`` is far below half a step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Decompression-bomb guard: images with more pixels than this are refused from their header,
#: before any pixel memory is allocated (~2.4 GB as float32 RGB).
DEFAULT_MAX_PIXELS = 200_000_000

#: Camera RAW file extensions (lowercase, no dot) that are developed with LibRaw (rawpy).
RAW_EXTENSIONS: frozenset[str] = frozenset(
    {
        "dng", "cr2", "cr3", "crw", "nef", "nrw", "arw", "srf", "sr2", "orf", "rw2", "raf",
        "pef", "srw", "x3f", "3fr", "fff", "iiq", "mos", "mrw", "erf", "kdc", "dcr", "rwl",
        "raw", "mef", "gpr",
    }
)

#: Extensions of the formats this package reads (lowercase, no dot): those it writes
#: (:data:`FORMAT_ALIASES`) and the other names JPEG files go by (``.jfif`` is what browsers on
#: Windows save many JPEGs as).
STANDARD_EXTENSIONS: frozenset[str] = frozenset({"png", "tif", "tiff", "jpg", "jpeg", "jfif", "jpe"})

#: HEIC/HEIF file extensions (lowercase, no dot; ``.hif`` is what Canon and Fujifilm cameras
#: name them), read with the optional ``heic`` extra (pillow-heif); never written.
HEIF_EXTENSIONS: frozenset[str] = frozenset({"heic", "heif", "hif"})

#: Output format names accepted by ``write_image`` (plus the aliases in ``FORMAT_ALIASES``).
FORMATS = ("png", "tiff", "jpeg")
FORMAT_ALIASES = {"tif": "tiff", "jpg": "jpeg", "png": "png", "tiff": "tiff", "jpeg": "jpeg"}


class ImageError(Exception):
    """A user-facing, one-line error that names the file and the problem.

    Raised for everything that is wrong with an image (missing, unreadable, corrupt,
    unsupported, too large, mismatched dual-pixel partners). Programming errors (wrong array
    shape passed to a writer, unknown option value) raise ``ValueError`` instead.
    """

    def __init__(self, source: object, problem: str | None = None):
        # ImageError(source, problem) -> "source: problem"; ImageError(message) is accepted
        # too, for callers that format the message themselves.
        if problem is None:
            self.source, self.problem = None, " ".join(str(source).split())
            message = self.problem
        else:
            self.source = describe(source)
            # Keep it one line: library messages sometimes carry newlines or bytes reprs.
            self.problem = " ".join(str(problem).split())
            message = f"{self.source}: {self.problem}"
        super().__init__(message)

    def __reduce__(self):  # picklable (e.g. across worker processes) with the 1-arg form
        return (type(self), (str(self),))


#: How to raise the pixel limit, said by every refusal of it.
RAISE_PIXEL_LIMIT = "(raise it with --max-pixels, or max_pixels= from Python)"


def too_large_error(name: object, size: str, pixels: int, max_pixels: int) -> ImageError:
    """The refusal of an image above the pixel limit (decompression-bomb guard), saying how to
    raise the limit."""
    return ImageError(name, f"image is too large: {size} = {pixels:,} pixels exceeds the limit of {max_pixels:,} {RAISE_PIXEL_LIMIT}")


def describe(source: object) -> str:
    """Name of an image source for messages: the path, or ``<stdin>`` for in-memory bytes."""
    if source is None or isinstance(source, (bytes, bytearray, memoryview)):
        return "<stdin>"
    return str(source)


@dataclass
class ImageInfo:
    """Everything the writer needs to write an output "the way the input came".

    Attributes
    ----------
    path : str or None
        Source path, or None for stdin bytes / arrays.
    format : str
        Source format: ``'png'``, ``'tiff'``, ``'jpeg'``, ``'heif'`` (HEIC, with the ``heic``
        extra) or ``'raw'`` (lowercase).
    bit_depth : int
        Bits per integer sample of the source: 8 or 16. Floating-point TIFF gives 32 (written
        as float32 TIFF by default; a PNG output defaults to 16-bit, JPEG is always 8-bit).
        RAW gives 16 (LibRaw develops to 16 bits). Sources with other integer depths are
        rescaled: 1-7-bit -> 8 (``round(k * 255 / (2**b - 1))``), 9-15-bit TIFF and 10/12-bit
        HEIF -> 16 (the pixels are then exactly ``k / (2**b - 1)``).
    channels : int
        Channels of the source: 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA (palette images count as
        3 or 4 after expansion).
    alpha : ndarray or None
        ``H x W`` float32 alpha in ``[0, 1]`` (same value rule as colour), split off the
        source and passed through unchanged; written back bit-exactly at the same bit depth.
    icc_profile : bytes or None
        Embedded ICC profile, copied verbatim; else the profile of what the source says in
        another way: Adobe RGB for a photo whose EXIF says so (camera JPEGs), the development's
        colour space for a camera RAW developed other than to plain sRGB (see :mod:`.icc`).
        None means sRGB.
    exif : bytes or None
        EXIF as a JPEG APP1 payload: ``b"Exif\\0\\0"`` + TIFF-structured data, with the
        Orientation tag reset to 1 (and the thumbnail, IFD1, unlinked) when the pixels were
        rotated on read.
    orientation_applied : int
        EXIF orientation (1-8) that was applied to the pixels on read (1 = none). For HEIF,
        what its ``irot``/``imir`` transformations (which libheif applies) amount to: a HEIF's
        EXIF Orientation tag is informative only, never applied, and reset to 1 all the same.
    size : tuple of int
        ``(height, width)`` of the returned array, i.e. after orientation.
    frames : int
        Frames/pages in the source (multi-page TIFF, APNG, MPO), not counting the reduced
        copies (previews, thumbnails, pyramid levels), transparency masks and other data
        (a JPEG's HDR gain map, an iPhone's depth map and mattes) some files carry beside
        the image. Only the first is read (a TIFF's first page that is no such
        copy or mask; a HEIF's primary image, the one it shows, among its top-level images).
    xmp : bytes or None
        The raw XMP packet (UTF-8 XML), copied verbatim except that ``tiff:Orientation`` is
        reset to 1 when the pixels were rotated on read. Written without what describes media
        stored beside the picture (an HDR gain map, a motion photo's video), which no output
        holds, and with its size properties saying the size written. See :mod:`.metadata`.
    dpi : tuple of float or None
        Print resolution ``(x, y)`` in pixels per inch, of the returned array (swapped when
        the orientation swapped the axes); None when the source has none. See
        :mod:`.metadata`.
    clipped_float_values : int
        Float TIFF samples (colour and alpha) that were outside ``[0, 1]`` or NaN, and so were
        clipped to it (NaN read as 0) on read; 0 for every other source.
    png_chunks : tuple of (bytes, bytes)
        ``(type, payload)`` of a PNG source's colour space chunks (cICP, gAMA, cHRM, sRGB: the
        first well-formed one of each) and text chunks (tEXt, zTXt, iTXt other than XMP), in
        file order, copied verbatim into PNG outputs (sRGB not beside an ICC profile); for a
        HEIF source with an HDR transfer (PQ, HLG), the cICP chunk that says its coding. Empty
        for other sources.
    jpeg_segments : tuple of (int, bytes)
        ``(marker, payload)`` of a JPEG source's comments (COM) and Photoshop resources
        (APP13, where IPTC lives), in file order, copied verbatim into JPEG outputs; when the
        pixels were rotated on read, without the thumbnail resources (1033, 1036), which
        would show turned. Empty for other sources.
    dropped_extra_samples : int
        Extra samples per pixel of a TIFF source that were left out on read: those beyond
        colour and alpha (stored selections, depth, masks). 0 for every other source.
    hdr_gain_map_dropped : bool
        A JPEG source that holds an HDR gain map: a picture of its MP index (MPF) that the
        picture's own XMP or ISO 21496-1 segment, or the primary picture's, says is one; a
        HEIF source with Apple's gain map auxiliary image or an ISO 21496-1 one (the file's
        ``tmap`` brand). The gain map is not read (nor
        counted in ``frames``), so outputs are the SDR image. False for a JPEG whose XMP
        declares a gain map it does not hold.
    motion_photo_dropped : bool
        A JPEG or HEIF source whose XMP says a video follows the picture (a motion photo,
        :func:`.metadata.declares_motion_photo`): the video is not read, and outputs are the
        still picture.
    color_space_dropped : str or None
        The colour space a source declares that no ICC profile says, so that outputs go
        untagged (read as sRGB) unless they are PNG, which says it in a cICP chunk: a HEIF's
        nclx colour information, or a PNG's cICP, with an HDR transfer (PQ, HLG), e.g. ``"the
        PQ (HDR, SMPTE ST 2084) transfer characteristics"``, or a PNG's cICP of narrow-range
        samples. None for every other source (an nclx or cICP that a profile can say becomes
        ``icc_profile``).
    """

    path: str | None
    format: str
    bit_depth: int
    channels: int
    alpha: np.ndarray | None = field(compare=False)  # arrays have no single truth value
    icc_profile: bytes | None
    exif: bytes | None
    orientation_applied: int
    size: tuple[int, int]
    frames: int = 1
    xmp: bytes | None = None
    dpi: tuple[float, float] | None = None
    clipped_float_values: int = 0
    png_chunks: tuple[tuple[bytes, bytes], ...] = ()
    jpeg_segments: tuple[tuple[int, bytes], ...] = ()
    dropped_extra_samples: int = 0
    hdr_gain_map_dropped: bool = False
    motion_photo_dropped: bool = False
    color_space_dropped: str | None = None


def to_float(arr: np.ndarray, maxval: int | float) -> np.ndarray:
    """Integer samples -> float32 ``k / maxval`` (correctly rounded), same shape."""
    out = arr.astype(np.float32)
    out /= np.float32(maxval)
    return out


def luma(rgb: np.ndarray) -> np.ndarray:
    """``H x W x C`` (C >= 3, RGB first) -> ``H x W`` float32 Rec. 709 luma of the values as they
    are (gamma-encoded in, gamma-encoded out; the grey a photo shows)."""
    return rgb[..., :3] @ np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)


def srgb_encode(linear: np.ndarray) -> np.ndarray:
    """Linear light in ``[0, 1]`` -> the sRGB tone curve (IEC 61966-2-1: slope 12.92 below
    0.0031308, else ``1.055 v^(1/2.4) - 0.055``), the curve LibRaw develops RAW files with.
    Not clipped: below 0 the linear segment goes on, above 1 the power law."""
    v = np.asarray(linear, dtype=np.float32)
    return np.where(v <= 0.0031308, 12.92 * v, 1.055 * np.power(np.maximum(v, 0.0031308), 1 / 2.4) - 0.055).astype(np.float32)


def srgb_decode(encoded: np.ndarray) -> np.ndarray:
    """The inverse of :func:`srgb_encode` (also unclipped, so a float output keeps its range)."""
    v = np.asarray(encoded, dtype=np.float32)
    return np.where(v <= 0.04045, v / 12.92, np.power((np.maximum(v, 0.04045) + 0.055) / 1.055, 2.4)).astype(np.float32)


def fill_transparent(rgb: np.ndarray, alpha: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """``rgb`` with the colour of every fully transparent pixel (alpha 0) replaced by the
    nearest visible pixel's, and the mask of those pixels (None, and ``rgb`` itself, when no
    pixel or every pixel is transparent).

    Straight alpha leaves whatever colour under alpha 0 (black, white, an earlier edit); a
    deblurring filter spreads it into the visible pixels beside it as a dark or light fringe.
    Seen through the nearest visible colour, the edge is filtered as if the object went on.
    """
    if alpha is None:
        return rgb, None
    hidden = np.asarray(alpha) == 0
    if not hidden.any() or hidden.all():
        return rgb, None
    from scipy import ndimage  # only for images with transparency

    iy, ix = ndimage.distance_transform_edt(hidden, return_distances=False, return_indices=True)
    return rgb[iy, ix], hidden


def quantize(img: np.ndarray, bit_depth: int) -> np.ndarray:
    """Float image in ``[0, 1]`` -> unsigned integers, ``floor(clip(v) * maxval + 0.5)``.

    Computed in float64 in blocks of rows so that a large image never needs a full float64
    copy. NaN maps to 0, values outside ``[0, 1]`` are clipped.
    """
    maxval = (1 << bit_depth) - 1
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    out = np.empty(img.shape, dtype=dtype)
    rows = max(1, (1 << 22) // max(1, int(np.prod(img.shape[1:], dtype=np.int64))))
    for y in range(0, img.shape[0], rows):
        block = np.asarray(img[y : y + rows], dtype=np.float64)
        block = np.nan_to_num(block, nan=0.0, posinf=1.0, neginf=0.0)
        np.clip(block, 0.0, 1.0, out=block)
        block *= maxval
        block += 0.5
        np.floor(block, out=block)
        out[y : y + rows] = block
    return out


def path_ext(path: str | Path) -> str:
    """Lowercase extension without the dot (``''`` when none)."""
    return Path(path).suffix.lower().lstrip(".")


# Values this far outside [0, 1] are another convention (0-255, HDR), not an overshoot such as
# balanced dual-pixel views or a sharpened photo carry (a few per cent), which the network takes.
PHOTO_RANGE_SLACK = 0.25


def checked_photo(image: Any, what: str = "image") -> np.ndarray:
    """The convention of photos as arrays, enforced (the engine's and the Wiener baseline's
    input): a float array of sRGB-encoded values in [0, 1] (as :func:`read_image` gives),
    non-empty and finite. Either would otherwise answer garbage without a word: 0-255 read as
    0-1 saturates every pixel, and one NaN spreads over the whole output (convolutions, FFTs)."""
    arr = np.asarray(image)
    if arr.dtype.kind != "f":
        hint = f" (divide by {np.iinfo(arr.dtype).max})" if arr.dtype in (np.uint8, np.uint16) else ""
        raise ValueError(f"{what} must be a float array in [0, 1]; got dtype {arr.dtype}{hint}")
    if arr.ndim < 2 or arr.size == 0:
        raise ValueError(f"{what} is empty (shape {arr.shape})")
    lo, hi = float(arr.min()), float(arr.max())  # NaN or inf anywhere shows here, without a mask the image's size
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{what} has {int(arr.size - np.isfinite(arr).sum())} non-finite values (NaN or inf)")
    if lo < -PHOTO_RANGE_SLACK or hi > 1 + PHOTO_RANGE_SLACK:
        hint = " (0-255 data? divide by 255)" if 1.5 < hi <= 255 else ""
        raise ValueError(f"{what} values must be in [0, 1] (within {PHOTO_RANGE_SLACK}); got {lo:.4g} to {hi:.4g}{hint}")
    return arr
