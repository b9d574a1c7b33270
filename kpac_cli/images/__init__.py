"""Image input/output for kpac: PNG, TIFF, JPEG, camera RAW and (read only, with the ``heic``
extra) HEIC/HEIF, with bit depth and metadata.

Conventions
-----------
* :func:`read_image` returns ``float32`` ``(H, W, 3)`` RGB (channels last) in ``[0, 1]``; an
  integer sample ``k`` of a ``b``-bit source becomes ``k / (2**b - 1)``. Gray is replicated to
  three channels; alpha goes to ``ImageInfo.alpha``; EXIF orientation is applied.
  :func:`read_image_codes` decodes the same way but returns the integer code values
  (``uint8``/``uint16``) and their bit depth, for memory-lean caches.
* :func:`list_images` lists the files of a folder that :func:`is_image_path` accepts (the
  formats this package reads); every folder listing in kpac goes through it.
* :func:`write_image` clips to ``[0, 1]`` and rounds half-up (float32 TIFF is written unclipped), ``floor(v * (2**b - 1) + 0.5)``,
  so reading and writing back at the same bit depth is bit-exact (16-bit PNG included).
* ICC profile, EXIF, XMP, print resolution and a PNG's colour space and text chunks travel in :class:`ImageInfo` from
  :func:`read_image` to :func:`write_image`, across formats (see :mod:`.io` and
  :mod:`.metadata`); damaged or oversized metadata is dropped, never fatal.
* Every user-facing failure is an :class:`ImageError` whose one-line message names the file.
* Files are written atomically (temporary file + fsync + rename); see :mod:`.atomic`.

This package does not import typer or rich.
"""

from .atomic import atomic_output, atomic_write_bytes, cleanup_stale_temps, write_output
from .base import DEFAULT_MAX_PIXELS, RAW_EXTENSIONS, ImageError, ImageInfo, fill_transparent, luma, srgb_decode, srgb_encode
from .io import is_image_path, list_images, probe_size, read_image, read_image_codes, sniff_format, unread_images, write_image
from .pairing import DualPixelTriple, dpdd_dual_dirs, pair_dual_pixel, read_dual_pixel
from .raw import RawOptions

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "RAW_EXTENSIONS",
    "DualPixelTriple",
    "ImageError",
    "ImageInfo",
    "RawOptions",
    "atomic_output",
    "atomic_write_bytes",
    "cleanup_stale_temps",
    "dpdd_dual_dirs",
    "fill_transparent",
    "is_image_path",
    "list_images",
    "unread_images",
    "luma",
    "pair_dual_pixel",
    "probe_size",
    "read_dual_pixel",
    "read_image",
    "read_image_codes",
    "sniff_format",
    "srgb_decode",
    "srgb_encode",
    "write_image",
    "write_output",
]
