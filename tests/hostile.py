"""A corpus of hostile inputs for kpac, generated on the fly (no binary files are committed).

Every generator here is deterministic and small (a few KB), so tests can rebuild the corpus
in a temporary folder in milliseconds:

* :func:`image_cases`: broken, odd and malicious image files, each with what kpac must do
  with it (deblur it, or fail with a one-line error matching ``match``);
* :func:`bomb_png`: a PNG whose header claims an enormous image;
* :func:`dual_pixel_cases`: left/right pairs that do not fit together;
* model files: :func:`evil_npz` (a pickle that would run code), :func:`evil_pt` (a torch
  file with an arbitrary class), :func:`mismatched_checkpoint`, :func:`truncated_checkpoint`
  and :func:`malformed_pt_cases`;
* :func:`fuzz_seeds`: small valid images that property-based tests mutate;
* :class:`StdoutThatStops`: a stdout whose reader goes away or whose disk fills.

Code-running payloads only ever create a marker file (``marker``) so that a test can prove
they never ran.
"""

from __future__ import annotations

import builtins
import functools
import io
import json
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# building blocks


def chunk(ctype: bytes, data: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def ihdr(width: int, height: int, bit_depth: int = 8, color_type: int = 2) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))


def smooth_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 H x W x 3: a gradient plus noise (every PNG filter and real JPEG coefficients occur)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 7, y * 5, (x + y) * 3], axis=-1) + rng.integers(0, 24, (height, width, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def pil_bytes(arr_or_image, fmt: str, **kwargs) -> bytes:
    from PIL import Image

    im = arr_or_image if isinstance(arr_or_image, Image.Image) else Image.fromarray(arr_or_image)
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def tiff_bytes(arr: np.ndarray, **kwargs) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kwargs)
    return buf.getvalue()


def png_bytes(arr: np.ndarray, **kwargs) -> bytes:
    return pil_bytes(arr, "PNG", **kwargs)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming ``width x height`` RGB (30 GB for the default) and 64 bytes
    of image data: decoding it would allocate the full image before noticing."""
    return PNG_SIGNATURE + ihdr(width, height) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def jpeg_with_size(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF marker is patched to claim ``width x height``."""
    jpg = bytearray(pil_bytes(smooth_rgb(16, 16), "JPEG", quality=80))
    sof = jpg.index(b"\xff\xc0")
    jpg[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(jpg)


def tiff_with_size(width: int, height: int) -> bytes:
    """An uncompressed 8 x 8 RGB TIFF whose ImageWidth/ImageLength tags claim another size."""
    import tifffile

    data = bytearray(tiff_bytes(smooth_rgb(8, 8), photometric="rgb"))
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        tags = tif.pages.first.tags
        spots = [(tags[code].valueoffset, tags[code].dtype, value) for code, value in ((256, width), (257, height))]
    for offset, dtype, value in spots:
        fmt = "<I" if int(dtype) == 4 else "<H"
        struct.pack_into(fmt, data, offset, value)
    return bytes(data)


# --------------------------------------------------------------------------------------------
# the image corpus


@dataclass(frozen=True)
class Case:
    """One hostile input.

    ``ok=True`` cases must be deblurred; ``ok=False`` ones must fail alone, with a one-line
    error that names the file and matches ``match`` (a case-insensitive regex); ``ok=None``
    may go either way, but cleanly (a valid output, or such an error).
    """

    name: str
    data: bytes
    ok: bool | None
    match: str = ""
    why: str = ""


@functools.lru_cache(maxsize=None)
def image_cases() -> tuple[Case, ...]:
    """The hostile image corpus (each file a few KB at most; built once per process)."""
    rgb = smooth_rgb(24, 32)
    png = png_bytes(rgb)
    jpg = pil_bytes(rgb, "JPEG", quality=90)
    tif = tiff_bytes(rgb, photometric="rgb")
    png16 = _png16(rgb)

    from PIL import Image

    frames = [Image.fromarray(smooth_rgb(24, 32, seed=s)) for s in range(3)]
    apng = io.BytesIO()
    frames[0].save(apng, "PNG", save_all=True, append_images=frames[1:], duration=100, loop=0)
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)

    floats = rgb.astype(np.float32) / 255
    floats[0, 0] = [np.nan, np.inf, -np.inf]
    floats[1, 1] = [-0.5, 1.5, 7.0]

    idat = zlib.compress(b"\x00" + bytes(32 * 3 * 4))  # one row of data, whatever the depth

    cases = [
        # --- empty, truncated, wrong content
        Case("empty.png", b"", False, r"empty", "0-byte file"),
        Case("empty.jpg", b"", False, r"empty", "0-byte file"),
        Case("truncated.png", png[: len(png) // 2], False, r"truncat|corrupt", "PNG cut in half"),
        Case("truncated16.png", png16[: len(png16) * 2 // 3], False, r"truncat|corrupt", "16-bit PNG cut (own decoder)"),
        Case("truncated.jpg", jpg[: len(jpg) // 3], False, r"truncat|corrupt|decode", "JPEG cut at a third"),
        Case("truncated.tif", tif[: len(tif) // 2], False, r"truncat|corrupt|decode|TIFF", "TIFF cut in half"),
        Case("headeronly.png", png[:33], False, r"truncat|corrupt", "signature + IHDR only"),
        Case("text.png", b"This is a text file, not a picture.\n" * 3, False, r"not a recognised image", "text named .png"),
        Case("gif_named.png", gif.getvalue(), False, r"GIF", "GIF content behind a .png name"),
        Case("html.jpg", b"<!DOCTYPE html><html><body>404</body></html>", False, r"not a recognised image", "error page saved as .jpg"),
        # --- camera RAW that LibRaw cannot decode
        Case("garbage.dng", bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)), False, r"RAW|LibRaw", "random bytes named .dng"),
        Case("plain_tiff.dng", tif, False, r"RAW|LibRaw", "an ordinary TIFF named .dng"),
        Case("dngtag.tif", _with_dng_tag(tif), False, r"RAW|LibRaw", "TIFF carrying a DNGVersion tag"),
        # --- sizes
        Case("zero_width.png", PNG_SIGNATURE + ihdr(0, 24) + chunk(b"IDAT", idat) + chunk(b"IEND", b""), False, r"zero size", "IHDR width 0"),
        Case("zero_height.jpg", jpeg_with_size(16, 0), False, r"zero size|decode", "SOF height 0"),
        Case("one_by_one.png", png_bytes(np.array([[[200, 100, 50]]], np.uint8)), True, why="1x1 pixel"),
        Case("one_by_one16.tif", tiff_bytes(np.array([[[60000, 100, 5]]], np.uint16), photometric="rgb"), True, why="1x1, 16-bit"),
        Case("bomb.png", bomb_png(), False, r"too large", "header claims 100000x100000"),
        Case("bomb.jpg", jpeg_with_size(60_000, 60_000), False, r"too large", "SOF claims 60000x60000"),
        Case("bomb.tif", tiff_with_size(100_000, 100_000), False, r"too large", "tags claim 100000x100000"),
        # --- channel layouts and sample formats
        Case("gray_alpha.png", png_bytes(np.dstack([rgb[..., 0], rgb[..., 1]])), True, why="2 channels: gray + alpha"),
        Case("gray_alpha.tif", tiff_bytes(np.dstack([rgb[..., 0], rgb[..., 1]]), photometric="minisblack", extrasamples=["unassalpha"]), True, why="2-channel TIFF"),
        Case("palette.png", pil_bytes(Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG"), True, why="palette PNG"),
        Case("palette_trns.png", pil_bytes(Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG", transparency=3), True, why="palette + tRNS"),
        Case("cmyk.tif", tiff_bytes(np.dstack([rgb, rgb[..., :1]]), photometric="separated"), False, r"CMYK", "CMYK TIFF"),
        Case("cmyk.jpg", pil_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG"), False, r"CMYK", "CMYK JPEG"),
        Case("float.tif", tiff_bytes(floats, photometric="rgb"), True, why="float32 TIFF with NaN, inf and out-of-range values"),
        Case("int32.tif", tiff_bytes(rgb.astype(np.int32) * 1000, photometric="rgb"), False, r"unsupported|sample format", "signed 32-bit integer TIFF"),
        Case("uint32.tif", tiff_bytes(rgb.astype(np.uint32), photometric="rgb"), False, r"unsupported|sample format", "unsigned 32-bit integer TIFF"),
        Case("depth32.png", PNG_SIGNATURE + ihdr(32, 1, bit_depth=32) + chunk(b"IDAT", idat) + chunk(b"IEND", b""), False, r"bit depth", "IHDR claims 32-bit samples"),
        Case("depth3.png", PNG_SIGNATURE + ihdr(32, 1, bit_depth=3, color_type=0) + chunk(b"IDAT", idat) + chunk(b"IEND", b""), False, r"bit depth", "IHDR claims 3-bit gray"),
        Case("colortype5.png", PNG_SIGNATURE + ihdr(32, 1, color_type=5) + chunk(b"IDAT", idat) + chunk(b"IEND", b""), False, r"bit depth|colour type", "IHDR with an undefined colour type"),
        # --- several frames
        Case("animated.png", apng.getvalue(), True, why="APNG: the default (first) frame is deblurred"),
        Case("animated.gif", gif.getvalue(), False, r"GIF", "GIF is refused clearly"),
        Case("multipage.tif", tiff_bytes(np.stack([smooth_rgb(24, 32, s) for s in range(3)]), photometric="rgb"), True, why="3 pages: the first is deblurred"),
        # --- structural damage in otherwise valid files
        Case("badcrc_ihdr.png", png[:29] + b"\x00\x00\x00\x00" + png[33:], False, r"CRC|corrupt", "IHDR CRC mismatch"),
        Case("huge_chunk.png", png[:33] + struct.pack(">I", 0x7FFFFFF0) + b"IDAT" + b"\x00" * 16, False, r"truncat|corrupt", "chunk claims 2 GB"),
        Case("iccp_bomb.png", _png_with_chunk(png, chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(b"\x00" * (80 << 20), 9))), None, r"ICC|too large|decode", "iCCP chunk inflating to 80 MB"),
        Case("tiff_bad_ifd.tif", tif[:4] + struct.pack("<I", 0x7FFFFFF0) + tif[8:], False, r"TIFF|decode|corrupt", "IFD offset past the end"),
    ]
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), "case names must be unique"
    return tuple(cases)


def _png16(rgb: np.ndarray) -> bytes:
    from kpac_cli.images import ImageInfo, write_image

    info = ImageInfo(None, "png", 16, 3, None, None, None, 1, rgb.shape[:2])
    return write_image(None, rgb.astype(np.float32) / 255, info)


def _png_with_chunk(png: bytes, extra: bytes) -> bytes:
    """``png`` with ``extra`` inserted right after IHDR."""
    return png[:33] + extra + png[33:]


def _with_dng_tag(tif: bytes) -> bytes:
    """Rewrite ``tif`` with a DNGVersion tag (50706) added: it must then go to LibRaw."""
    import tifffile

    arr = tifffile.imread(io.BytesIO(tif))
    return tiff_bytes(arr, photometric="rgb", extratags=[(50706, "B", 4, (1, 4, 0, 0), True)])


def write_cases(folder: Path, cases) -> dict[str, Path]:
    """Write each case to ``folder / case.name``; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for c in cases:
        p = folder / c.name
        p.write_bytes(c.data)
        out[c.name] = p
    return out


def fuzz_seeds() -> list[bytes]:
    """Small valid images (PNG variants mostly) for mutation-based tests."""
    from PIL import Image

    rgb = smooth_rgb(12, 10)
    seeds = [
        png_bytes(rgb),
        png_bytes(rgb[..., 0]),
        pil_bytes(Image.fromarray(rgb).convert("P"), "PNG", transparency=2),
        png_bytes(np.dstack([rgb, rgb[..., :1]])),
        _png16(rgb),
        pil_bytes(rgb, "JPEG", quality=85),
        tiff_bytes(rgb, photometric="rgb", compression="zlib"),
    ]
    return seeds


# --------------------------------------------------------------------------------------------
# dual-pixel pairs


def dual_pixel_cases(seed: int = 0) -> dict[str, tuple[bytes, bytes | None]]:
    """name -> (left bytes, right bytes or None for a missing partner)."""
    from kpac_cli.images import ImageInfo, write_image

    a = smooth_rgb(24, 32, seed)
    b = smooth_rgb(24, 32, seed + 1)
    info16 = ImageInfo(None, "png", 16, 3, None, None, None, 1, (24, 32))
    return {
        "good": (png_bytes(a), png_bytes(b)),
        "size_mismatch": (png_bytes(a), png_bytes(b[:, :30])),
        "depth_mismatch": (png_bytes(a), write_image(None, b.astype(np.float32) / 255, info16)),
        "missing_partner": (png_bytes(a), None),
        "broken_right": (png_bytes(a), b"not an image"),
    }


# --------------------------------------------------------------------------------------------
# model files


class _OpensMarker:
    """Unpickling this calls ``open(marker, 'w')``, i.e. creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def evil_npz(path: Path, marker: Path) -> Path:
    """An authors'-format ``.npz`` (zip with an object-array ``params.npy``) whose pickle
    would create ``marker`` if it were ever unpickled without restriction."""
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header = header + " " * (63 - len(header) % 64) + "\n"
    payload = pickle.dumps([_OpensMarker(marker)], protocol=2)
    npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + payload
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("params.npy", npy)
    return path


def evil_pt(path: Path, marker: Path, state_dict: dict, config: dict) -> Path:
    """A ``.pt`` holding a genuine state dict *and* an object whose unpickling creates ``marker``."""
    import torch

    torch.save({"config": config, "model": state_dict, "provenance": {"note": _OpensMarker(marker)}}, path)
    return path


def mismatched_checkpoint(path: Path, seed: int = 0) -> Path:
    """A kpac safetensors file whose declared architecture (channels=12) does not fit its
    tensors (channels=8)."""
    import torch
    from safetensors.torch import save_file

    from kpac_cli.model import KPACConfig, build_model

    torch.manual_seed(seed)
    tensors = {k: v.contiguous() for k, v in build_model(KPACConfig(levels=2, channels=8)).state_dict().items()}
    meta = {"format": "kpac", "format_version": "1", "config": KPACConfig(levels=2, channels=12).to_json(),
            "provenance": json.dumps({"name": "mismatched"})}
    save_file(tensors, str(path), metadata=meta)
    return path


def truncated_checkpoint(good: Path, path: Path, keep: float = 0.5) -> Path:
    data = good.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


def malformed_pt_cases(state_dict: dict, config: dict) -> dict[str, dict]:
    """Objects that ``torch.load(weights_only=True)`` accepts but that are no checkpoint."""
    return {
        "not_tensors": {"config": config, "model": {k: 1 for k in state_dict}},
        "config_is_int": {"config": 5, "model": state_dict},
        "config_bad_field_type": {"config": {**config, "dilations": 5}, "model": state_dict},
        "model_is_list": {"config": config, "model": [1, 2]},
        "not_a_dict": [state_dict],
    }


class StdoutThatStops:
    """A stdout that takes ``good`` writes, then fails each with ``error`` (a reader that went
    away: ``BrokenPipeError``; a full disk: ``OSError(ENOSPC)``); it has no file descriptor."""

    def __init__(self, good: int, error: OSError) -> None:
        self.good, self.error, self.lines = good, error, []

    def write(self, text: str) -> int:
        if self.good == 0:
            raise self.error
        self.good -= 1
        self.lines.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        raise OSError("no descriptor")

    def isatty(self) -> bool:
        return False
