"""Tests of kpac_cli.images: formats, bit-exactness, metadata, limits, atomic writes, RAW, pairing."""

from __future__ import annotations

import io
import os
import re
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

import kpac_cli.images as images
import kpac_cli.images.io as images_io
from kpac_cli.images import (
    DEFAULT_MAX_PIXELS,
    RAW_EXTENSIONS,
    DualPixelTriple,
    ImageError,
    ImageInfo,
    RawOptions,
    atomic_output,
    atomic_write_bytes,
    cleanup_stale_temps,
    dpdd_dual_dirs,
    is_image_path,
    list_images,
    pair_dual_pixel,
    probe_size,
    read_dual_pixel,
    read_image,
    read_image_codes,
    write_image,
)
from kpac_cli.images.exif import read_orientation

RNG = np.random.default_rng(1234)


# ------------------------------------------------------------------------------------------
# helpers


def rand(shape, bits=8):
    return RNG.integers(0, 1 << bits, shape).astype(np.uint8 if bits == 8 else np.uint16)


def ihdr(data: bytes) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) straight from the bytes of a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    w, h, depth, ctype = struct.unpack(">IIBB", data[16:26])
    return w, h, depth, ctype


def chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def ref_png(arr: np.ndarray, bit_depth: int, *, interlace: bool = False, extra: bytes = b"") -> bytes:
    """Independent, spec-literal PNG encoder (pure Python filters, cycling all five types)."""
    if arr.ndim == 2:
        arr = arr[..., None]
    h, w, c = arr.shape
    ctype = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    bpp = max(1, c * bit_depth // 8)
    dt = ">u2" if bit_depth == 16 else np.uint8

    def scanlines(sub: np.ndarray, ftype0: int) -> bytes:
        out = bytearray()
        prev = bytes(sub.shape[1] * c * bit_depth // 8)
        for y in range(sub.shape[0]):
            row = np.ascontiguousarray(sub[y], dtype=dt).tobytes()
            ft = (ftype0 + y) % 5
            res = bytearray()
            for i, x in enumerate(row):
                a = row[i - bpp] if i >= bpp else 0
                b = prev[i]
                cc = prev[i - bpp] if i >= bpp else 0
                if ft == 0:
                    pred = 0
                elif ft == 1:
                    pred = a
                elif ft == 2:
                    pred = b
                elif ft == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - cc
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - cc)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else cc)
                res.append((x - pred) & 0xFF)
            out += bytes([ft]) + res
            prev = row
        return bytes(out)

    if interlace:
        raw = b""
        for k, (x0, y0, dx, dy) in enumerate(
            [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
        ):
            sub = arr[y0::dy, x0::dx]
            if sub.size:
                raw += scanlines(sub, k)
    else:
        raw = scanlines(arr, 0)
    head = struct.pack(">IIBBBBB", w, h, bit_depth, ctype, 0, 0, int(interlace))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + extra + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def pil_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def tiff_bytes(arr, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def as_int(img: np.ndarray, bits: int) -> np.ndarray:
    return np.floor(img.astype(np.float64) * ((1 << bits) - 1) + 0.5).astype(np.int64)


def make_exif(orientation: int | None = None, make: str | None = None) -> bytes:
    ex = Image.Exif()
    if orientation is not None:
        ex[0x0112] = orientation
    if make is not None:
        ex[0x010F] = make
    return ex.tobytes()


def no_temps(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".kpac-tmp")]


def notes_for(info: ImageInfo, fmt: str, **options) -> list[str]:
    """The notes ``kpac deblur`` gives for an input described by ``info`` written as ``fmt``."""
    from kpac_cli.engine.batch import Job, OutputOptions, _what_is_not_kept

    job = Job("in", Path("in.png"), Path(f"out.{fmt}"), "in.png", fmt)
    return _what_is_not_kept(job, info, OutputOptions(**options))


# ------------------------------------------------------------------------------------------
# bit-exact round trips


@pytest.mark.parametrize("channels", [3, 4])
def test_png16_color_roundtrip_bit_exact(tmp_path, channels):
    a = rand((23, 31, channels), 16)
    a[0, 0] = 0
    a[0, 1] = 65535
    info = ImageInfo(None, "png", 16, channels, None, None, None, 1, (23, 31))
    img = images_io.to_float(a[..., :3], 65535)
    if channels == 4:
        info.alpha = images_io.to_float(a[..., 3], 65535)
    out = tmp_path / "x.png"
    write_image(out, img, info)
    data = out.read_bytes()
    assert ihdr(data) == (31, 23, 16, 2 if channels == 3 else 6)
    back, binfo = read_image(out)
    assert binfo.bit_depth == 16 and binfo.channels == channels and binfo.format == "png"
    assert back.dtype == np.float32 and back.shape == (23, 31, 3)
    assert np.array_equal(as_int(back, 16), a[..., :3])
    if channels == 4:
        assert np.array_equal(as_int(binfo.alpha, 16), a[..., 3])
    # Independent decoder: Pillow keeps the high byte of 16-bit colour PNGs.
    with Image.open(out) as im:
        assert np.array_equal(np.asarray(im), (a >> 8).astype(np.uint8))


def test_png16_large_enough_to_deflate_in_pieces_decodes_exactly(tmp_path):
    """A 16-bit PNG whose rows exceed one deflate piece is compressed on threads (pigz's
    scheme); an independent decoder reads every value back, and the pieces cost no size."""
    from kpac_cli.images import png as png_mod

    yy, xx = np.mgrid[0:1000, 0:1500]
    smooth = (yy * 37 + xx * 53) % 65536  # runs that cross the cuts between pieces
    a = np.stack([smooth, rand((1000, 1500), 16), smooth[::-1]], axis=2).astype(np.uint16)
    assert a.nbytes > 2 * png_mod._DEFLATE_PIECE
    out = tmp_path / "big.png"
    write_image(out, images_io.to_float(a, 65535), ImageInfo(None, "png", 16, 3, None, None, None, 1, (1000, 1500)))
    imagecodecs = pytest.importorskip("imagecodecs")
    assert np.array_equal(imagecodecs.png_decode(out.read_bytes()), a)
    data = bytes(range(256)) * (3 * png_mod._DEFLATE_PIECE // 256) + b"tail"
    pieces = png_mod._deflate(data, 6)
    assert zlib.decompress(pieces) == data  # the stream, its checksum included
    assert len(pieces) <= len(zlib.compress(data, 6)) * 1.01 + 64


@pytest.mark.parametrize("channels", [1, 2])
def test_png16_gray_roundtrip_and_pillow_agrees(tmp_path, channels):
    a = rand((17, 9, channels), 16)
    src = tmp_path / "g.png"
    src.write_bytes(ref_png(a, 16))
    img, info = read_image(src)
    assert info.channels == channels and info.bit_depth == 16
    assert np.array_equal(as_int(img[..., 0], 16), a[..., 0])
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2])
    out = tmp_path / "o.png"
    write_image(out, img, info)
    assert ihdr(out.read_bytes())[2:] == (16, 0 if channels == 1 else 4)
    back, binfo = read_image(out)
    assert np.array_equal(back, img) and binfo.channels == channels
    if channels == 2:
        assert np.array_equal(binfo.alpha, info.alpha)
    else:
        with Image.open(out) as im:  # Pillow reads 16-bit gray losslessly
            assert np.array_equal(np.asarray(im).astype(np.uint16), a[..., 0])


@pytest.mark.parametrize("channels,bits,interlace", [(3, 16, False), (4, 16, True), (1, 16, True), (2, 16, False), (3, 8, True), (4, 8, False)])
def test_png_decoder_against_reference_encoder(channels, bits, interlace):
    # All five filter types and Adam7 interlacing, encoded by the spec-literal helper.
    a = rand((13, 11, channels), bits)
    img, info = read_image(ref_png(a, bits, interlace=interlace))
    assert info.bit_depth == bits
    color = a[..., : 1 if channels in (1, 2) else 3]
    assert np.array_equal(as_int(img[..., : color.shape[2]], bits), color)
    if channels in (2, 4):
        assert np.array_equal(as_int(info.alpha, bits), a[..., -1])


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_png8_roundtrip_and_pillow_agrees(tmp_path, mode):
    n = len(mode)
    a = rand((19, 14, n)) if n > 1 else rand((19, 14))
    src = tmp_path / "s.png"
    Image.fromarray(a, mode).save(src)
    img, info = read_image(src)
    assert info.bit_depth == 8 and info.channels == n
    out = tmp_path / "o.png"
    write_image(out, img, info)
    with Image.open(out) as im:
        assert im.mode == mode
        assert np.array_equal(np.asarray(im), a)


@pytest.mark.parametrize("dtype,channels", [(np.uint8, 3), (np.uint16, 3), (np.uint16, 4), (np.uint8, 1), (np.uint16, 2)])
def test_tiff_roundtrip_bit_exact(tmp_path, dtype, channels):
    bits = 8 if dtype == np.uint8 else 16
    a = rand((12, 15, channels), bits)
    kw = dict(photometric="rgb" if channels >= 3 else "minisblack")
    if channels in (2, 4):
        kw["extrasamples"] = ["unassalpha"]
    src = tmp_path / "s.tif"
    tifffile.imwrite(src, a if channels > 1 else a[..., 0], **kw)
    img, info = read_image(src)
    assert (info.format, info.bit_depth, info.channels) == ("tiff", bits, channels)
    out = tmp_path / "o.tiff"
    write_image(out, img, info)
    back = tifffile.imread(out)
    assert back.dtype == dtype
    assert np.array_equal(back.reshape(a.shape), a)


def test_tiff_big_endian_planar_miniswhite_palette(tmp_path):
    a = rand((8, 10, 3), 16)
    p = tmp_path / "planar.tif"
    tifffile.imwrite(p, np.moveaxis(a, 2, 0), photometric="rgb", planarconfig="separate", byteorder=">")
    img, info = read_image(p)
    assert np.array_equal(as_int(img, 16), a)

    g = rand((8, 10))
    p = tmp_path / "white.tif"
    tifffile.imwrite(p, g, photometric="miniswhite")
    img, info = read_image(p)
    assert np.array_equal(as_int(img[..., 0], 8), 255 - g.astype(np.int64))

    idx = rand((8, 10))
    cmap = (RNG.integers(0, 256, (3, 256)) * 257).astype(np.uint16)
    p = tmp_path / "pal.tif"
    tifffile.imwrite(p, idx, photometric="palette", colormap=cmap)
    img, info = read_image(p)
    assert info.bit_depth == 8 and info.channels == 3
    assert np.array_equal(as_int(img, 8), (cmap.T[idx] // 257).astype(np.int64))
    # a palette of 16-bit colours reads as 16 bits, and the header probe (dual-pixel pairing) says so too
    from kpac_cli.images.io import _probe_depth

    assert _probe_depth(p)[1] == 8
    cmap16 = RNG.integers(0, 65536, (3, 256)).astype(np.uint16)
    cmap16[0, 0] = 1  # neither v * 257 nor v << 8
    tifffile.imwrite(p, idx, photometric="palette", colormap=cmap16)
    img, info = read_image(p)
    assert info.bit_depth == 16 and _probe_depth(p) == ((8, 10), 16)
    assert np.array_equal(as_int(img, 16), cmap16.T[idx].astype(np.int64))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7])
def test_low_bit_tiff_spans_black_to_white(bits):
    # every code k of a 2-7-bit TIFF reads as the 8-bit code nearest k / top: white is white
    top = (1 << bits) - 1
    ramp = np.tile(np.arange(top + 1, dtype=np.uint8), (2, 1))
    want = np.round(np.arange(top + 1) * 255 / top).astype(np.uint8)
    for arr, photometric in ((ramp, "minisblack"), (np.stack([ramp, ramp[:, ::-1], ramp], axis=-1), "rgb")):
        buf = io.BytesIO()
        tifffile.imwrite(buf, arr, bitspersample=bits, photometric=photometric)
        img, info = read_image(buf.getvalue())
        assert info.bit_depth == 8
        assert img[0, -1, 0] == 1.0 and img[0, 0, 0] == 0.0
        assert np.array_equal(as_int(img[0, :, 0], 8), want)
        codes, depth = read_image_codes(buf.getvalue())
        assert depth == 8 and np.array_equal(codes[0, :, 0], want)
        if photometric == "rgb":
            assert np.array_equal(codes[0, :, 1], want[::-1])


def test_compressed_tiffs_as_photo_editors_write_them_read_exactly(tmp_path):
    # LZW (with and without the predictor), PackBits, Deflate and ZSTD, 8 and 16 bits, gray and
    # RGB with alpha: 16-bit RGB LZW is a common export of photo editors.
    for arr in (rand((5, 6, 3), 16), rand((5, 6, 4), 16), rand((5, 6), 16), rand((5, 6, 3)), rand((5, 6))):
        bits = 16 if arr.dtype == np.uint16 else 8
        for compression, predictor in (("lzw", False), ("lzw", True), ("packbits", False), ("zlib", True), ("zstd", False)):
            if compression == "packbits" and bits == 16:
                continue  # PackBits is byte-oriented; editors use it for 8-bit only
            buf = io.BytesIO()
            extra = {"extrasamples": ["unassalpha"]} if arr.ndim == 3 and arr.shape[2] == 4 else {}
            tifffile.imwrite(buf, arr, photometric="rgb" if arr.ndim == 3 else "minisblack",
                             compression=compression, predictor=predictor, **extra)
            img, info = read_image(buf.getvalue())
            assert info.bit_depth == bits, compression
            n = 1 if arr.ndim == 2 else 3
            assert np.array_equal(as_int(img[..., :n], bits), arr.reshape(5, 6, -1)[..., :n]), (compression, arr.shape)
            if arr.ndim == 3 and arr.shape[2] == 4:
                assert np.array_equal(as_int(info.alpha, bits), arr[..., 3])
    # and what Pillow writes (LZW, 1-bit included)
    bw = rand((5, 6)) > 127
    img, info = read_image(pil_bytes(Image.fromarray(bw), "TIFF", compression="tiff_lzw"))
    assert np.array_equal(img[..., 0] == 1.0, bw)


def test_tiff_associated_alpha_is_unpremultiplied(tmp_path):
    color = np.full((4, 4, 3), 200, np.uint8)
    alpha = np.full((4, 4), 128, np.uint8)
    alpha[0, 0] = 0
    pre = np.round(color * (alpha[..., None] / 255.0)).astype(np.uint8)
    p = tmp_path / "assoc.tif"
    tifffile.imwrite(p, np.dstack([pre, alpha]), photometric="rgb", extrasamples=["assocalpha"])
    img, info = read_image(p)
    assert abs(img[1, 1, 0] * 255 - 200) < 2.5
    assert img[0, 0].tolist() == [0, 0, 0]
    assert np.array_equal(as_int(info.alpha, 8), alpha)


def test_tiff_alpha_is_the_first_extra_sample_marked_alpha():
    x = rand((8, 8, 5))
    for kinds, alpha_at in (
        (["unspecified", "unassalpha"], 4),
        (["unassalpha", "assocalpha"], 3),
    ):
        img, info = read_image(tiff_bytes(x, photometric="rgb", planarconfig="contig", extrasamples=kinds))
        assert info.channels == 4 and np.array_equal(as_int(info.alpha, 8), x[..., alpha_at]), kinds
        assert np.array_equal(as_int(img, 8), x[..., :3]), kinds
    # associated alpha behind an unspecified sample: the colour is un-premultiplied by it
    color = np.full((4, 4, 3), 200, np.uint8)
    alpha = np.full((4, 4), 128, np.uint8)
    alpha[0, 0] = 0
    pre = np.round(color * (alpha[..., None] / 255.0)).astype(np.uint8)
    other = np.full((4, 4), 7, np.uint8)
    rgbxa = np.dstack([pre, other, alpha])
    img, info = read_image(tiff_bytes(rgbxa, photometric="rgb", planarconfig="contig", extrasamples=["unspecified", "assocalpha"]))
    assert np.array_equal(as_int(info.alpha, 8), alpha)
    assert abs(img[1, 1, 0] * 255 - 200) < 2.5 and img[0, 0].tolist() == [0, 0, 0]
    # gray with a marked alpha second
    g = rand((4, 4, 3))
    img, info = read_image(tiff_bytes(g, photometric="minisblack", planarconfig="contig", extrasamples=["unspecified", "unassalpha"]))
    assert info.channels == 2 and np.array_equal(as_int(info.alpha, 8), g[..., 2])
    assert np.array_equal(as_int(img[..., 0], 8), g[..., 0])


def without_extrasamples_tag(data: bytes) -> bytes:
    """``data`` (a little-endian TIFF from tifffile) with its ExtraSamples tag renamed to a
    private tag number, as writers that omit the tag leave the file."""
    at = data.find(struct.pack("<HH", 338, 3))
    assert at > 0
    return data[:at] + struct.pack("<H", 65000) + data[at + 2 :]


@pytest.mark.parametrize("bits", [8, 16])
def test_tiff_extra_samples_of_unspecified_data_are_not_alpha(tmp_path, bits):
    # RGB + a stored selection (Photoshop), RGB + depth and mask, gray + mask: ExtraSamples 0
    # says the samples are not transparency, so the image has no alpha and writes back opaque
    x = rand((6, 7, 5), bits)
    for color, photometric in ((3, "rgb"), (1, "minisblack")):
        for extra in (1, 2):
            data = tiff_bytes(x[..., : color + extra], photometric=photometric, planarconfig="contig",
                              extrasamples=["unspecified"] * extra)
            img, info = read_image(data)
            assert info.channels == color and info.alpha is None, (photometric, extra)
            assert np.array_equal(as_int(img, bits), x[..., [0, 1, 2] if color == 3 else [0, 0, 0]])
            out = tmp_path / f"out{bits}.tif"
            write_image(out, img, info, format="tiff")
            assert tifffile.imread(out).shape == ((6, 7, 3) if color == 3 else (6, 7))
            assert info.dropped_extra_samples == extra
            assert notes_for(info, "tiff")[-1] == (f"{extra} extra channel{'s' if extra > 1 else ''} of the TIFF beyond colour and "
                                                   f"alpha (a stored selection, depth, a mask) {'were' if extra > 1 else 'was'} left out")
    assert read_image(tiff_bytes(x[..., :4], photometric="rgb", extrasamples=["unassalpha"]))[1].dropped_extra_samples == 0
    # without the ExtraSamples tag (some writers omit it) the extra sample stays alpha, as Pillow reads it
    img, info = read_image(without_extrasamples_tag(tiff_bytes(x[..., :4], photometric="rgb", planarconfig="contig")))
    assert info.channels == 4 and np.array_equal(as_int(info.alpha, bits), x[..., 3])


def test_float_tiff(tmp_path):
    f = RNG.random((6, 7, 3)).astype(np.float32) * 1.4 - 0.2
    f[0, 0, 0] = np.nan
    p = tmp_path / "f.tif"
    tifffile.imwrite(p, f, photometric="rgb")
    img, info = read_image(p)
    assert info.bit_depth == 32
    expect = np.clip(np.nan_to_num(f, nan=0.0), 0, 1)
    assert np.array_equal(img, expect)
    out = tmp_path / "o.tif"
    write_image(out, img, info)  # default for float input: float32 TIFF, 16-bit PNG
    assert tifffile.imread(out).dtype == np.float32
    write_image(tmp_path / "o16.png", img, info)
    assert read_image(tmp_path / "o16.png")[1].bit_depth == 16
    write_image(out, f, info, bit_depth=32)  # unclipped: out-of-range values survive, NaN -> 0
    assert np.array_equal(tifffile.imread(out), np.nan_to_num(f, nan=0.0))
    write_image(out, img, info, bit_depth=32)
    back = tifffile.imread(out)
    assert back.dtype == np.float32 and np.array_equal(back, expect)
    with pytest.raises(ValueError):
        write_image(tmp_path / "o.png", img, info, bit_depth=32)


def test_float_tiff_clipping_is_counted_and_said():
    f = np.full((3, 4, 3), 0.5, np.float32)
    f[0, 0] = [2.0, -0.5, np.nan]
    f[1, 1] = [np.inf, 1.0, 0.0]  # 1 and 0 are inside: not clipped
    img, info = read_image(tiff_bytes(f, photometric="rgb"))
    assert img[0, 0].tolist() == [1, 0, 0] and img[1, 1].tolist() == [1, 1, 0]
    assert info.clipped_float_values == 4
    for fmt, bits in (("tiff", 32), ("tiff", None), ("png", None), ("jpeg", None)):  # said whatever the output
        said = [n for n in notes_for(info, fmt, bit_depth=bits) if "clipped" in n]
        assert said == ["4 float values outside [0, 1] were clipped"], fmt
    # alpha counts; extra samples that are not kept do not
    rgba = np.dstack([np.full((2, 2, 3), 0.25, np.float32), np.full((2, 2), 1.0, np.float32), np.full((2, 2), 9.0, np.float32)])
    rgba[1, 0, 3] = 1.5
    _, info = read_image(tiff_bytes(rgba, photometric="rgb", planarconfig="contig", extrasamples=["unassalpha", "unspecified"]))
    assert info.clipped_float_values == 1
    assert notes_for(info, "tiff") == ["1 extra channel of the TIFF beyond colour and alpha (a stored selection, depth, a mask) was left out",
                                       "1 float value outside [0, 1] was clipped"]
    # nothing clipped, nothing said
    _, info = read_image(tiff_bytes(np.clip(np.nan_to_num(f), 0, 1), photometric="rgb"))
    assert info.clipped_float_values == 0 and notes_for(info, "tiff") == []


def test_jpeg_read_write(tmp_path):
    a = np.clip(RNG.normal(128, 30, (32, 40, 3)), 0, 255).astype(np.uint8)
    src = tmp_path / "s.jpg"
    Image.fromarray(a).save(src, quality=95)
    img, info = read_image(src)
    assert (info.format, info.bit_depth, info.channels) == ("jpeg", 8, 3)
    with Image.open(src) as im:
        assert np.array_equal(as_int(img, 8), np.asarray(im))
    out = tmp_path / "o.jpeg"
    write_image(out, img, info, bit_depth=16)  # JPEG is always 8-bit
    back, binfo = read_image(out)
    assert binfo.bit_depth == 8
    assert np.abs(back - img).mean() < 0.02
    small = write_image(None, img, info, jpeg_quality=10)
    assert len(small) < out.stat().st_size
    with pytest.raises(ValueError):
        write_image(None, img, info, jpeg_quality=0)


def test_gray_jpeg_stays_gray(tmp_path):
    src = tmp_path / "g.jpg"
    Image.fromarray(rand((10, 12)), "L").save(src)
    img, info = read_image(src)
    assert info.channels == 1 and img.shape == (10, 12, 3)
    data = write_image(None, img, info)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "L"


def test_jpeg_pillow_cannot_open_is_said_plainly(tmp_path):
    import imagecodecs

    twelve = tmp_path / "deep.jpg"
    twelve.write_bytes(imagecodecs.jpeg8_encode(rand((8, 12, 3), 16) >> 4, bitspersample=12, level=90))
    for call in (read_image, probe_size):
        with pytest.raises(ImageError, match=r"deep\.jpg: 12-bit JPEG is not supported \(only 8-bit\)"):
            call(twelve)
    # a frame Pillow does not identify: no stray plugin name or object repr in the message
    data = bytearray(pil_bytes(Image.fromarray(rand((6, 8))), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 9] = 2  # two colour components
    for call in (read_image, probe_size):
        with pytest.raises(ImageError) as e:
            call(bytes(data))
        assert str(e.value) == "<stdin>: cannot decode JPEG (corrupt, or a kind of JPEG that is not supported)"
    # multi-picture files still open through the JPEG plugin
    mpo = pil_bytes(Image.fromarray(rand((6, 8, 3))), "MPO", save_all=True, append_images=[Image.new("RGB", (8, 6))])
    img, info = read_image(mpo)
    assert img.shape == (6, 8, 3) and info.frames == 2 and probe_size(mpo) == (6, 8)


def test_palette_and_low_bit_png(tmp_path):
    rgb = rand((9, 9, 3))
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img, info = read_image(pil_bytes(pal, "PNG"))
    assert info.channels == 3 and info.bit_depth == 8 and info.alpha is None
    assert np.array_equal(as_int(img, 8), np.asarray(pal.convert("RGB")))

    pal.info["transparency"] = 0
    img, info = read_image(pil_bytes(pal, "PNG", transparency=0))
    assert info.channels == 4
    expect = np.asarray(pal.convert("RGBA"))
    assert np.array_equal(as_int(info.alpha, 8), expect[..., 3])

    bw = Image.fromarray(rand((5, 13)) > 127)
    img, info = read_image(pil_bytes(bw, "PNG"))
    assert info.bit_depth == 8 and set(np.unique(as_int(img, 8))) <= {0, 255}

    # 4-bit gray with a tRNS key: values scale by 17, the key follows.
    g4 = RNG.integers(0, 16, (3, 8)).astype(np.uint8)
    g4[0, 0] = 5
    packed = np.zeros((3, 4), np.uint8)
    packed[:] = (g4[:, 0::2] << 4) | g4[:, 1::2]
    raw = b"".join(b"\x00" + r.tobytes() for r in packed)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 3, 4, 0, 0, 0, 0))
        + chunk(b"tRNS", struct.pack(">H", 5))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    img, info = read_image(data)
    assert np.array_equal(as_int(img[..., 0], 8), g4.astype(np.int64) * 17)
    assert np.array_equal(info.alpha == 0, g4 == 5)


def test_trns_colour_key_16bit():
    a = rand((4, 5, 3), 16)
    a[1, 2] = (1, 2, 3)
    img, info = read_image(ref_png(a, 16, extra=chunk(b"tRNS", struct.pack(">3H", 1, 2, 3))))
    assert info.channels == 4
    assert info.alpha[1, 2] == 0 and (info.alpha == 0).sum() == 1


def gray_png(values: np.ndarray, bits: int, *, extra: bytes = b"") -> bytes:
    """A gray PNG of ``bits`` per sample (samples packed most significant first, filter None)."""
    if bits == 16:
        return ref_png(values.astype(np.uint16), 16, extra=extra)
    h, w = values.shape
    per_byte = 8 // bits
    padded = np.zeros((h, -(-w // per_byte) * per_byte), np.uint8)
    padded[:, :w] = values
    groups = padded.reshape(h, -1, per_byte)
    packed = np.zeros(groups.shape[:2], np.uint8)
    for i in range(per_byte):
        packed |= groups[..., i] << (8 - bits * (i + 1))
    raw = b"".join(b"\x00" + row.tobytes() for row in packed)
    head = struct.pack(">IIBBBBB", w, h, bits, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + extra + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_gray_trns_key_every_bit_depth_and_key():
    # Every level of each depth is in the image; the key makes exactly its level transparent.
    # A key with bits above the depth set counts by its low bits (the PNG spec; browsers agree).
    for bits in (1, 2, 4, 8, 16):
        maxval = (1 << bits) - 1
        levels = np.arange(maxval + 1) if bits < 16 else np.array([0, 1, 255, 256, 4660, 65534, 65535])
        values = np.stack([levels, levels[::-1]])
        depth = 8 if bits < 16 else 16
        expect_gray = values * (255 // maxval) if bits < 16 else values
        for level in levels:
            for stored in ([level, level | (1 << bits)] if bits < 16 else [level]):
                img, info = read_image(gray_png(values, bits, extra=chunk(b"tRNS", struct.pack(">H", stored))))
                assert info.channels == 2 and info.bit_depth == depth, (bits, stored)
                assert np.array_equal(info.alpha == 0, values == level), (bits, stored)
                assert np.array_equal(info.alpha[values != level], np.ones((values != level).sum(), np.float32))
                assert np.array_equal(as_int(img[..., 0], depth), expect_gray), (bits, stored)


def test_rgb_trns_key_counts_by_the_low_byte_of_each_sample():
    a = rand((3, 4, 3))
    a[1, 2] = (5, 6, 7)
    key = struct.pack(">3H", 0x0105, 0xFF06, 0x0007)  # high bytes set: ignored for 8-bit
    img, info = read_image(ref_png(a, 8, extra=chunk(b"tRNS", key)))
    assert info.channels == 4 and np.array_equal(info.alpha == 0, (a == (5, 6, 7)).all(axis=-1))
    assert np.array_equal(as_int(img, 8), a)


def test_malformed_or_misplaced_trns_is_ignored_at_every_depth():
    # libpng ignores such a chunk and shows the image; Pillow refused it for 8-bit PNG
    gray8, rgb8 = rand((3, 4)), rand((3, 4, 3))
    gray16, rgb16 = rand((3, 4), 16), rand((3, 4, 3), 16)
    for arr, bits, payload in [
        (gray8, 8, b""), (gray8, 8, b"\x00"), (gray8, 8, b"\x00" * 4),
        (rgb8, 8, b""), (rgb8, 8, b"\x00\x01"), (rgb8, 8, b"\x00" * 8),
        (gray16, 16, b"\x00"), (rgb16, 16, b"\x00\x01"),
        (rand((3, 4, 4)), 8, b"\x00" * 6),  # RGBA cannot have one
    ]:
        img, info = read_image(ref_png(arr, bits, extra=chunk(b"tRNS", payload)))
        channels = 1 if arr.ndim == 2 else arr.shape[2]
        assert info.alpha is None if channels in (1, 3) else info.alpha is not None, (bits, payload)
        assert info.channels == channels, (bits, payload)
        color = arr if arr.ndim == 3 else arr[..., None]
        assert np.array_equal(as_int(img, bits)[..., : color.shape[2]], color[..., :3]), (bits, payload)
    # a tRNS after the image data is out of place, and only the first one counts
    a = rand((3, 4, 3))
    a[0, 0], a[0, 1] = (1, 2, 3), (4, 5, 6)
    late = ref_png(a, 8)
    late = late[:-12] + chunk(b"tRNS", struct.pack(">3H", 1, 2, 3)) + late[-12:]
    assert read_image(late)[1].alpha is None
    twice = chunk(b"tRNS", struct.pack(">3H", 1, 2, 3)) + chunk(b"tRNS", struct.pack(">3H", 4, 5, 6))
    for bits, arr in ((8, a), (16, a.astype(np.uint16))):
        info = read_image(ref_png(arr, bits, extra=twice))[1]
        assert np.argwhere(info.alpha == 0).tolist() == [[0, 0]], bits


def test_gray_source_written_gray_and_alpha_passthrough(tmp_path):
    a = rand((6, 6, 2), 16)
    img, info = read_image(ref_png(a, 16))
    for name, fmt in [("o.png", "png"), ("o.tif", "tiff")]:
        write_image(tmp_path / name, img, info)
        back, binfo = read_image(tmp_path / name)
        assert binfo.channels == 2, fmt
        assert np.array_equal(back, img) and np.array_equal(binfo.alpha, info.alpha)
    # JPEG cannot hold alpha: dropped, still gray.
    back, binfo = read_image(write_image(None, img, info, format="jpg"))
    assert binfo.channels == 1 and binfo.alpha is None


def test_fill_transparent_takes_the_nearest_visible_colour():
    from kpac_cli.images import fill_transparent

    rgb = np.zeros((3, 5, 3), np.float32)
    rgb[:, 0], rgb[:, 1] = 0.2, 0.6  # visible columns; the rest hidden and black
    alpha = np.array([[1, 1, 0, 0, 0]] * 3, np.uint8)
    filled, hidden = fill_transparent(rgb, alpha)
    assert np.array_equal(hidden, alpha == 0)
    assert np.all(filled[:, :2] == rgb[:, :2]) and np.all(filled[:, 2:] == 0.6)  # column 1 is nearest
    for a in (np.ones((3, 5), np.uint8), np.zeros((3, 5), np.uint8), None):  # nothing to fill
        same, none = fill_transparent(rgb, a)
        assert same is rgb and none is None


def test_alpha_converted_between_bit_depths(tmp_path):
    a = rand((5, 5, 4), 16)
    img, info = read_image(ref_png(a, 16))
    back, binfo = read_image(write_image(None, img, info, bit_depth=8))
    assert binfo.bit_depth == 8
    assert np.array_equal(as_int(binfo.alpha, 8), as_int(info.alpha, 8))


def test_quantization_rule():
    info = ImageInfo(None, "png", 8, 1, None, None, None, 1, (1, 8))
    v = np.array([0.0, 0.5 / 255, 0.5 / 255 - 1e-9, 1.0, 1.7, -3.0, np.nan, 254.5 / 255], np.float64)
    img = np.repeat(v[None, :, None], 3, axis=2)
    back, _ = read_image(write_image(None, img, info))
    assert as_int(back[0, :, 0], 8).tolist() == [0, 1, 0, 255, 255, 0, 0, 255]


def test_write_validates_arguments(tmp_path):
    info = ImageInfo(None, "png", 8, 3, None, None, None, 1, (2, 2))
    with pytest.raises(ValueError):
        write_image(None, np.zeros((2, 2, 4), np.float32), info)
    with pytest.raises(ValueError):
        write_image(None, np.zeros((2, 2, 3), np.uint8), info)
    with pytest.raises(ValueError):
        write_image(None, np.zeros((2, 2, 3), np.float32), info, format="bmp")
    with pytest.raises(ImageError):
        write_image(tmp_path / "x.nef", np.zeros((2, 2, 3), np.float32), info)
    bad = ImageInfo(None, "png", 8, 4, np.zeros((3, 3), np.float32), None, None, 1, (2, 2))
    with pytest.raises(ValueError):
        write_image(None, np.zeros((2, 2, 3), np.float32), bad)


def test_output_format_from_extension_and_defaults(tmp_path):
    img = RNG.random((4, 4, 3)).astype(np.float32)
    info = ImageInfo(None, "png", 16, 3, None, None, None, 1, (4, 4))
    write_image(tmp_path / "a.TIF", img, info)
    assert tifffile.imread(tmp_path / "a.TIF").dtype == np.uint16
    write_image(tmp_path / "a.jpg", img, info)
    assert (tmp_path / "a.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    assert ihdr(write_image(None, img, info))[2] == 16  # stdout: the source format
    raw_info = ImageInfo(None, "raw", 16, 3, None, None, None, 1, (4, 4))
    data = write_image(None, img, raw_info)
    assert data[:4] in (b"II*\x00", b"MM\x00*")
    assert tifffile.imread(io.BytesIO(data)).dtype == np.uint16
    write_image(tmp_path / "noext", img, info, format="TIFF", bit_depth=8)
    assert tifffile.imread(tmp_path / "noext").dtype == np.uint8


def test_stdin_bytes_sniffed_not_named(tmp_path):
    a = rand((5, 6, 3))
    src = tmp_path / "actually_png.jpg"
    Image.fromarray(a).save(src, format="PNG")
    img, info = read_image(src)
    assert info.format == "png" and info.path == str(src)
    img2, info2 = read_image(src.read_bytes())
    assert info2.path is None and np.array_equal(img, img2)


# ------------------------------------------------------------------------------------------
# metadata


def exif_with_thumbnail(orientation: int) -> bytes:
    """EXIF as cameras and phones write it: IFD0 (Orientation), then IFD1 with a JPEG thumbnail."""
    thumb = pil_bytes(Image.fromarray(rand((4, 8, 3))), "JPEG")
    ifd0 = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 26)
    ifd1 = struct.pack("<H", 2) + struct.pack("<HHII", 0x0201, 4, 1, 56) + struct.pack("<HHII", 0x0202, 4, 1, len(thumb))
    return b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd0 + ifd1 + struct.pack("<I", 0) + thumb


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_thumbnail_dropped_when_the_pixels_are_turned(orientation):
    # the thumbnail keeps the camera's orientation: once the tag says 1, it would show turned
    from PIL import ExifTags

    src = pil_bytes(Image.fromarray(rand((8, 16, 3))), "JPEG", exif=exif_with_thumbnail(orientation))
    img, info = read_image(src)
    for fmt in ("jpeg", "png"):
        with Image.open(io.BytesIO(write_image(None, img, info, format=fmt))) as im:
            exif = im.getexif()
            assert exif.get(0x0112) == 1
            thumbnail = exif.get_ifd(ExifTags.IFD.IFD1)
            assert (thumbnail.get(0x0202) is not None) == (orientation == 1), fmt  # kept only when upright


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied_and_reset(tmp_path, orientation):
    a = rand((4, 7, 3))
    src = tmp_path / "o.png"
    Image.fromarray(a).save(src, exif=make_exif(orientation, "KpacCam"))
    img, info = read_image(src)
    with Image.open(src) as im:
        expect = np.asarray(ImageOps.exif_transpose(im))
    assert np.array_equal(as_int(img, 8), expect)
    assert info.orientation_applied == orientation
    assert info.size == img.shape[:2] == probe_size(src)
    assert read_orientation(info.exif) == 1
    for fmt in ("png", "jpeg"):
        with Image.open(io.BytesIO(write_image(None, img, info, format=fmt))) as im:
            ex = im.getexif()
            assert ex.get(0x0112, 1) == 1 and ex.get(0x010F) == "KpacCam"
            assert im.size == (img.shape[1], img.shape[0])


def test_jpeg_orientation_probe_and_read(tmp_path):
    src = tmp_path / "r.jpg"
    Image.fromarray(rand((10, 30, 3))).save(src, exif=make_exif(6))
    assert probe_size(src) == (30, 10)
    img, info = read_image(src)
    assert img.shape == (30, 10, 3) and info.orientation_applied == 6


def exif_with_pixel_dimensions(width: int, height: int, orientation: int = 1, endian: str = "<") -> bytes:
    """EXIF whose Exif sub-IFD records PixelXDimension and PixelYDimension, and the capture time."""
    ex = Image.Exif()
    ex.endian = endian
    ex[0x0112] = orientation
    sub = ex.get_ifd(0x8769)
    sub[0xA002], sub[0xA003], sub[0x9003] = width, height, "2024:05:06 07:08:09"
    return ex.tobytes()


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_exif_pixel_dimensions_say_the_written_size(fmt):
    # a camera JPEG stored 30 wide, 10 high, shown turned: its EXIF says 30 x 10, the output is 10 x 30
    src = pil_bytes(Image.fromarray(rand((10, 30, 3))), "JPEG", exif=exif_with_pixel_dimensions(30, 10, orientation=6))
    img, info = read_image(src)
    assert img.shape[:2] == (30, 10)
    with Image.open(io.BytesIO(write_image(None, img, info, format=fmt))) as im:
        sub = im.getexif().get_ifd(0x8769)
        assert im.size == (10, 30) and (sub[0xA002], sub[0xA003]) == im.size
        assert sub[0x9003] == "2024:05:06 07:08:09"  # the rest of the Exif directory is as it was


def test_exif_pixel_dimensions_edited_in_place_and_never_added():
    from kpac_cli.images.exif import _parsed, normalize_exif, set_pixel_dimensions

    exif = normalize_exif(exif_with_pixel_dimensions(300, 200, endian=">"))  # stored as SHORTs
    wider = set_pixel_dimensions(exif, width=70000, height=5)  # too wide for a SHORT: a LONG
    sub = _parsed(wider).get_ifd(0x8769)
    assert len(wider) == len(exif) and (sub[0xA002], sub[0xA003], sub[0x9003]) == (70000, 5, "2024:05:06 07:08:09")
    without = normalize_exif(make_exif(6, "KpacCam"))
    assert set_pixel_dimensions(without, width=4, height=3) == without


def test_tiff_orientation_tag(tmp_path):
    a = rand((3, 5, 3))
    p = tmp_path / "o.tif"
    tifffile.imwrite(p, a, photometric="rgb", extratags=[(274, "H", 1, 8, True)])
    img, info = read_image(p)
    assert info.orientation_applied == 8 and img.shape == (5, 3, 3)
    assert np.array_equal(as_int(img, 8), np.rot90(a, 1))
    assert probe_size(p) == (5, 3)


def test_damaged_tiff_orientation_tag_is_ignored():
    a = rand((3, 5, 3))
    for value in [("H", 2, (6, 6)), ("s", 0, "six"), ("H", 1, 0), ("H", 1, 9)]:
        data = tiff_bytes(a, photometric="rgb", extratags=[(274, *value, True)])
        img, info = read_image(data)
        assert info.orientation_applied == 1 and np.array_equal(as_int(img, 8), a), value
        assert probe_size(data) == (3, 5), value


def test_probe_size_reads_a_doubled_exif_prefix_as_read_image_does():
    # some tools write the JPEG "Exif\\0\\0" prefix into a PNG's eXIf chunk, once or twice
    a = rand((3, 5, 3))
    for body in (make_exif(6)[6:], make_exif(6), b"Exif\x00\x00" + make_exif(6)):
        data = ref_png(a, 8, extra=chunk(b"eXIf", body))
        assert read_image(data)[0].shape[:2] == probe_size(data) == (5, 3), body[:12]


def exif_with_text(tags: dict[int, bytes]) -> bytes:
    """EXIF (APP1 payload) whose IFD0 holds ``tags`` as ASCII fields with exactly these bytes
    (Pillow would write each non-ASCII character as '?')."""
    n = len(tags)
    values_at = 8 + 2 + 12 * n + 4
    entries, values = b"", b""
    for tag, text in sorted(tags.items()):
        text += b"\x00"
        if len(text) <= 4:
            entries += struct.pack("<HHI", tag, 2, len(text)) + text.ljust(4, b"\x00")
        else:
            entries += struct.pack("<HHII", tag, 2, len(text), values_at + len(values))
            values += text
    return b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, n) + entries + b"\x00" * 4 + values


UTF8_TAGS = {270: "Über den Wolken".encode(), 271: b"KpacCam", 315: "José Müller".encode(), 33432: "© 2024 José".encode()}


def test_utf8_descriptive_exif_tags_survive_every_format():
    a = rand((4, 6, 3))
    # JPEG source -> TIFF output: the tags are written with their bytes, not dropped
    img, info = read_image(pil_bytes(Image.fromarray(a), "JPEG", exif=exif_with_text(UTF8_TAGS)))
    tiff = write_image(None, img, info, format="tiff")
    with tifffile.TiffFile(io.BytesIO(tiff)) as t:
        assert {k: t.pages[0].tags[k].value.encode() for k in UTF8_TAGS} == UTF8_TAGS
    # TIFF source -> JPEG / PNG output: the EXIF rebuilt from the TIFF tags keeps the bytes
    img, info = read_image(tiff)
    for fmt, bits in (("jpeg", 8), ("png", 8), ("png", 16)):
        with Image.open(io.BytesIO(write_image(None, img, info, format=fmt, bit_depth=bits))) as im:
            ex = im.getexif()
            assert {k: ex.get(k).encode("latin-1") for k in UTF8_TAGS} == UTF8_TAGS, (fmt, bits)


def test_tiff_exif_kept_above_pillows_own_pixel_limit(monkeypatch):
    # the EXIF of a TIFF is parsed by Pillow, whose (global) bomb limit is lower than ours
    data = tiff_bytes(rand((30, 40, 3)), photometric="rgb", extratags=[(271, "s", 0, "BigCam", True)])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1,200 pixels: over twice the limit
    img, info = read_image(data)
    monkeypatch.undo()  # for the check's own Image.open
    with Image.open(io.BytesIO(write_image(None, img, info, format="jpeg"))) as im:
        assert im.getexif().get(271) == "BigCam"


def _tiff_with_gps(arr: np.ndarray, **kw) -> bytes:
    """A TIFF of ``arr`` (tifffile) with Make 'Canon' and a GPS IFD saying GPSLatitudeRef 'N'."""
    buf = io.BytesIO()
    # tifffile writes no GPS pointer: a neighbouring code is written, then renamed (same order)
    tifffile.imwrite(buf, arr, metadata=None, extratags=[(271, "s", 0, "Canon", True), (34854, "I", 1, 0, True)], **kw)
    data = bytearray(buf.getvalue())
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        tag = tif.pages.first.tags[34854]
        order, entry, value_at, big = tif.byteorder, tag.offset, tag.valueoffset, tif.is_bigtiff
    data[entry : entry + 2] = struct.pack(order + "H", 34853)
    data += b"\x00" * (len(data) % 2)
    gps_at, word = len(data), "Q" if big else "I"
    # one entry: GPSLatitudeRef (tag 1), ASCII, count 2, "N\0" in the entry; then no next IFD
    data += struct.pack(order + ("Q" if big else "H"), 1) + struct.pack(order + "HH" + word, 1, 2, 2)
    data += b"N\x00".ljust(struct.calcsize(word), b"\x00") + struct.pack(order + word, 0)
    data[value_at : value_at + struct.calcsize(word)] = struct.pack(order + word, gps_at)
    return bytes(data)


@pytest.mark.parametrize(
    "arr,kw",
    [
        (RNG.random((6, 8, 3)).astype(np.float32), {}),  # 32-bit float, as HDR editors write
        (RNG.random((6, 8, 3)).astype(np.float16), {"byteorder": ">"}),  # half float, big-endian
        (rand((6, 8, 3)), {"bigtiff": True}),
        (rand((6, 8, 3), 16), {}),
    ],
    ids=["float32", "float16-big-endian", "bigtiff", "uint16"],
)
def test_exif_of_tiffs_pillow_cannot_open_is_kept(arr, kw):
    # the EXIF (GPS sub-IFD included) comes from the tag directories, not from Pillow's decoder
    data = _tiff_with_gps(arr, photometric="rgb", **kw)
    img, info = read_image(data)
    with Image.open(io.BytesIO(write_image(None, img, info, format="jpeg"))) as im:
        exif = im.getexif()
        assert exif.get(271) == "Canon" and exif.get_ifd(0x8825).get(1) == "N"


def test_icc_and_exif_copied(tmp_path):
    icc = b"\x00\x00\x02\x0cfake-icc-profile" * 20
    exif = make_exif(None, "KpacCam")
    a = rand((6, 5, 3))
    # 8-bit PNG and JPEG via Pillow
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg")):
        src = tmp_path / f"s.{ext}"
        Image.fromarray(a).save(src, icc_profile=icc, exif=exif)
        img, info = read_image(src)
        assert info.icc_profile == icc and info.exif is not None and info.exif.startswith(b"Exif\x00\x00")
        for out_fmt in ("png", "jpeg", "tiff"):
            data = write_image(None, img, info, format=out_fmt)
            back, binfo = read_image(data)
            assert binfo.icc_profile == icc, (fmt, out_fmt)
            if out_fmt == "tiff":
                with tifffile.TiffFile(io.BytesIO(data)) as t:
                    assert t.pages[0].tags[271].value == "KpacCam"
            else:
                with Image.open(io.BytesIO(data)) as im:
                    assert im.getexif().get(0x010F) == "KpacCam"
    # 16-bit PNG: our own iCCP / eXIf chunks, read by Pillow too
    img, info = read_image(tmp_path / "s.png")
    data = write_image(None, img, info, bit_depth=16)
    assert ihdr(data)[2] == 16
    with Image.open(io.BytesIO(data)) as im:
        assert im.info.get("icc_profile") == icc and im.getexif().get(0x010F) == "KpacCam"
    # TIFF source: ICC tag and descriptive tags become EXIF
    p = tmp_path / "s.tif"
    tifffile.imwrite(p, a, photometric="rgb", iccprofile=icc, extratags=[(271, "s", 0, "TiffCam", True)])
    img, info = read_image(p)
    assert info.icc_profile == icc
    with Image.open(io.BytesIO(write_image(None, img, info, format="jpeg"))) as im:
        assert im.getexif().get(0x010F) == "TiffCam"


IPTC_IRB = b"Photoshop 3.0\x008BIM\x04\x04\x00\x00\x00\x00\x00\x0f\x1c\x02\x78\x00\x0bA caption \xc2\xa9\x00"


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def test_jpeg_comments_and_iptc_segments_are_found_and_written_back():
    from kpac_cli.images.io import _jpeg_carried_segments, _with_jpeg_segments

    a = rand((16, 24, 3))
    plain = pil_bytes(Image.fromarray(a), "JPEG", quality=90, exif=make_exif(None, "Cam"), icc_profile=b"\0" * 128)
    carried = ((0xED, IPTC_IRB), (0xFE, b"first comment"), (0xFE, b"second \xff comment"))
    # as a camera or Photoshop places them: right after SOI, before the other header segments
    source = plain[:2] + b"".join(jpeg_segment(m, d) for m, d in carried) + plain[2:]
    with Image.open(io.BytesIO(source)) as im:
        assert _jpeg_carried_segments(im.applist) == carried  # in file order, APP1/APP2 left to their own fields
    out = _with_jpeg_segments(plain, carried)
    with Image.open(io.BytesIO(out)) as im:
        assert [(n, d) for n, d in im.applist if n in ("APP13", "COM")] == [("APP13", IPTC_IRB), ("COM", b"first comment"),
                                                                           ("COM", b"second \xff comment")]
        assert im.getexif().get(0x010F) == "Cam" and im.info["icc_profile"] == b"\0" * 128
        assert np.array_equal(np.asarray(im), np.asarray(Image.open(io.BytesIO(plain))))  # the image data untouched
    assert _with_jpeg_segments(plain, ()) == plain


def test_jpeg_comments_and_iptc_carried_to_jpeg_outputs():
    plain = pil_bytes(Image.fromarray(rand((16, 24, 3))), "JPEG", quality=95, exif=make_exif(6, "Cam"))
    carried = ((0xED, IPTC_IRB), (0xFE, b"a comment"))
    img, info = read_image(plain[:2] + b"".join(jpeg_segment(m, d) for m, d in carried) + plain[2:])
    assert info.jpeg_segments == carried
    with Image.open(io.BytesIO(write_image(None, img, info, format="jpeg"))) as im:
        assert [(n, d) for n, d in im.applist if n in ("APP13", "COM")] == [("APP13", IPTC_IRB), ("COM", b"a comment")]
        assert im.getexif().get(0x010F) == "Cam" and im.size == (16, 24)  # EXIF beside them, orientation applied
    for fmt in ("png", "tiff"):  # no place for them: not written, and that is said
        assert read_image(write_image(None, img, info, format=fmt))[1].jpeg_segments == ()
        assert notes_for(info, fmt)[-1] == (f"{fmt.upper()} output does not carry the JPEG's IPTC/Photoshop block (APP13) "
                                            "and comments (COM): dropped (--format jpeg keeps them)")
    assert notes_for(info, "jpeg") == []
    assert read_image(plain)[1].jpeg_segments == ()


def photoshop_resource(resource_id: int, data: bytes, name: bytes = b"") -> bytes:
    """One Photoshop image resource: '8BIM', id, Pascal name padded to even, size, data padded to even."""
    pascal = bytes([len(name)]) + name
    return (b"8BIM" + struct.pack(">H", resource_id) + pascal + b"\0" * (len(pascal) & 1)
            + struct.pack(">I", len(data)) + data + b"\0" * (len(data) & 1))


def test_photoshop_thumbnails_are_dropped_from_app13_when_the_pixels_are_turned():
    iptc = photoshop_resource(0x0404, b"\x1c\x02\x78\x00\x0bA caption \xc2\xa9")  # odd size: padded
    named = photoshop_resource(0x0BB7, b"named resource", name=b"ab")
    thumbnail = photoshop_resource(1036, b"\0\0\0\1" + b"JFIF thumbnail data" * 20)
    old_thumbnail = photoshop_resource(1033, b"old-style thumbnail")
    app13 = b"Photoshop 3.0\x00" + iptc + thumbnail + named + old_thumbnail
    only_thumbnail = b"Photoshop 3.0\x00" + thumbnail
    segments = ((0xED, app13), (0xFE, b"a comment"), (0xED, only_thumbnail))
    a = pil_bytes(Image.fromarray(rand((16, 24, 3))), "JPEG", quality=95, exif=make_exif(6, "Cam"))
    source = a[:2] + b"".join(jpeg_segment(m, d) for m, d in segments) + a[2:]

    img, info = read_image(source)
    # the other resources byte for byte, in their order; a block of nothing but a thumbnail goes
    assert info.jpeg_segments == ((0xED, b"Photoshop 3.0\x00" + iptc + named), (0xFE, b"a comment"))
    with Image.open(io.BytesIO(write_image(None, img, info, format="jpeg"))) as im:
        assert [d for n, d in im.applist if n == "APP13"] == [b"Photoshop 3.0\x00" + iptc + named]

    upright = a[:2] + b"".join(jpeg_segment(m, d) for m, d in segments) + a[2:]
    upright = upright.replace(make_exif(6, "Cam"), make_exif(1, "Cam"))
    assert read_image(upright)[1].jpeg_segments == segments  # nothing turned: all carried as it was


def test_a_damaged_app13_keeps_what_cannot_be_parsed():
    from kpac_cli.images.io import _without_photoshop_thumbnails

    iptc = photoshop_resource(0x0404, b"\x1c\x02\x78\x00\x02ab")
    thumbnail = photoshop_resource(1036, b"thumb")
    truncated = photoshop_resource(0x0404, b"x" * 40)[:-10]  # a block continued in the next segment
    head = b"Photoshop 3.0\x00"
    assert _without_photoshop_thumbnails(head + thumbnail + iptc + truncated) == head + iptc + truncated
    assert _without_photoshop_thumbnails(head + truncated + thumbnail) == head + truncated + thumbnail
    assert _without_photoshop_thumbnails(b"not Photoshop resources") == b"not Photoshop resources"
    assert _without_photoshop_thumbnails(head + iptc) == head + iptc
    assert _without_photoshop_thumbnails(head + thumbnail) is None


def test_a_tiff_of_many_wide_samples_is_held_to_the_limit_in_bytes():
    """The pixel limit guards memory as float32 RGB would take it: 16 float64 samples per pixel
    (10x that) are refused before decoding, with how to raise the limit; float32 RGB at the
    limit reads."""
    x = np.random.default_rng(0).random((100, 100, 16))
    with pytest.raises(ImageError, match=r"too large to decode: 100x100 with 16 samples of 64 bits is 1\.3 MB, more than "
                                         r"the limit of 20,000 pixels allows \(0\.2 MB, as float32 RGB\).*--max-pixels"):
        read_image(tiff_bytes(x, photometric="minisblack", planarconfig="contig"), max_pixels=20_000)
    img, _ = read_image(tiff_bytes(x[..., :3].astype(np.float32), photometric="rgb"), max_pixels=10_000)
    assert img.shape == (100, 100, 3)
    assert read_image(tiff_bytes(x, photometric="minisblack", planarconfig="contig"), max_pixels=None)[0].shape[:2] == (100, 100)


def test_huge_exif_dropped_for_jpeg_only():
    ex = Image.Exif()
    ex[0x010E] = "x" * 70000  # ImageDescription larger than a JPEG APP1 segment
    info = ImageInfo(None, "png", 8, 3, None, None, ex.tobytes(), 1, (2, 2))
    img = np.zeros((2, 2, 3), np.float32)
    back, binfo = read_image(write_image(None, img, info, format="jpeg"))
    assert binfo.exif is None
    back, binfo = read_image(write_image(None, img, info, format="png"))
    assert binfo.exif is not None


def test_exif_too_large_for_jpeg_is_dropped_and_said():
    from kpac_cli.images.io import JPEG_MAX_EXIF

    img = np.zeros((2, 2, 3), np.float32)
    big = make_exif(None, "x" * (JPEG_MAX_EXIF - 200))
    for size in (JPEG_MAX_EXIF, JPEG_MAX_EXIF + 1):  # the largest EXIF that fits, one byte more
        exif = big + bytes(size - len(big))  # padded after the IFD's data
        info = ImageInfo(None, "png", 8, 3, None, None, exif, 1, (2, 2))
        kept = read_image(write_image(None, img, info, format="jpeg"))[1].exif is not None
        said = [n for n in notes_for(info, "jpeg") if "EXIF" in n]
        assert kept == (size <= JPEG_MAX_EXIF)
        assert said == ([] if kept else [f"the EXIF metadata ({size:,} bytes) is too large for a JPEG segment: dropped"])
        for fmt in ("png", "tiff"):  # they hold it
            assert notes_for(info, fmt) == []


# ------------------------------------------------------------------------------------------
# XMP and print resolution

XMP = (
    b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmlns:dc="http://purl.org/dc/elements/1.1/"'
    b' xmlns:tiff="http://ns.adobe.com/tiff/1.0/" xmp:Rating="4" tiff:Orientation="1">'
    b"<dc:subject><rdf:Bag><rdf:li>caf\xc3\xa9</rdf:li><rdf:li>portrait</rdf:li></rdf:Bag></dc:subject>"
    b"</rdf:Description></rdf:RDF></x:xmpmeta>\n" + b" " * 200 + b'\n<?xpacket end="w"?>'
)


def png_meta(arr: np.ndarray, bit_depth: int, *, xmp: bytes | None = XMP, ppm: tuple | None = (11811, 11811, 1)) -> bytes:
    """A PNG (independent encoder) with an XMP iTXt and a pHYs chunk (pixels per metre, unit)."""
    extra = b""
    if ppm is not None:
        extra += chunk(b"pHYs", struct.pack(">IIB", *ppm))
    if xmp is not None:
        extra += chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp)
    return ref_png(arr, bit_depth, extra=extra)


def tiff_meta(arr: np.ndarray, *, xmp: bytes | None = XMP, resolution=(300, 300), unit="INCH", **kw) -> bytes:
    tags = [(700, "B", len(xmp), xmp, True)] if xmp is not None else []
    return tiff_bytes(arr, photometric="rgb", resolution=resolution, resolutionunit=unit, extratags=tags, **kw)


def seen_by_others(data: bytes) -> tuple[bytes | None, tuple | None]:
    """(XMP, dpi) of encoded bytes as Pillow (PNG, JPEG) or tifffile (TIFF) reads them."""
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        with tifffile.TiffFile(io.BytesIO(data)) as t:
            tags = t.pages.first.tags
            xmp = bytes(tags[700].value) if 700 in tags else None
            unit = int(tags[296].value) if 296 in tags else 2
            dpi = None
            if 282 in tags and unit in (2, 3):
                dpi = tuple(n / d * (2.54 if unit == 3 else 1) for n, d in (tags[282].value, tags[283].value))
            return xmp, dpi
    with Image.open(io.BytesIO(data)) as im:
        xmp = im.info.get("xmp")
        dpi = im.info.get("dpi")
        if im.format == "JPEG" and im.info.get("jfif_unit") != 1:
            dpi = None  # Pillow's 72-dpi default, not in the file
        return xmp, None if dpi is None else tuple(float(v) for v in dpi)


def same_dpi(a, b) -> bool:
    """Equal up to each format's storage rounding (whole dpi in JPEG, whole pixels/metre in PNG)."""
    return a is not None and b is not None and all(abs(x - y) <= 0.5 for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["png8", "png16", "jpeg", "tiff8", "tiff16"])
def test_xmp_and_dpi_kept_in_the_same_format(kind):
    bits = 16 if kind.endswith("16") else 8
    a = rand((6, 5, 3), bits)
    if kind.startswith("png"):
        src = png_meta(a, bits)
    elif kind == "jpeg":
        src = pil_bytes(Image.fromarray(a), "JPEG", xmp=XMP, dpi=(300, 300))
    else:
        src = tiff_meta(a)
    img, info = read_image(src)
    assert info.xmp == XMP and same_dpi(info.dpi, (300, 300))
    data = write_image(None, img, info)
    if kind.startswith("png"):
        assert ihdr(data)[2] == bits
    back, binfo = read_image(data)
    assert binfo.xmp == XMP and binfo.dpi == info.dpi, kind  # stable: no drift from re-rounding
    xmp, dpi = seen_by_others(data)
    assert xmp == XMP and same_dpi(dpi, (300, 300)), kind
    if kind != "jpeg":
        assert np.array_equal(back, img)  # pixels are not touched by the metadata


CROSS = [(s, o, b) for s in ("jpeg", "png", "tiff") for o in ("png", "jpeg", "tiff") if s != o for b in (8, 16) if s != "jpeg" or b == 8]


@pytest.mark.parametrize("src_kind,out_fmt,bits", CROSS, ids=[f"{s}{b}-{o}" for s, o, b in CROSS])
def test_xmp_and_dpi_kept_across_formats(src_kind, out_fmt, bits):
    a = rand((5, 7, 3), bits)
    dpi_in = (240, 96)  # non-square pixels: x and y stay apart
    if src_kind == "png":
        src = png_meta(a, bits, ppm=(round(240 / 0.0254), round(96 / 0.0254), 1))
    elif src_kind == "jpeg":
        src = pil_bytes(Image.fromarray(a), "JPEG", xmp=XMP, dpi=dpi_in)
    else:
        src = tiff_meta(a, resolution=dpi_in)
    img, info = read_image(src)
    data = write_image(None, img, info, format=out_fmt)
    xmp, dpi = seen_by_others(data)
    assert xmp == XMP and same_dpi(dpi, dpi_in), (src_kind, out_fmt, dpi)
    _, binfo = read_image(data)
    assert binfo.xmp == XMP and same_dpi(binfo.dpi, dpi_in)


def test_resolution_units_and_exif_fallback():
    a = rand((4, 4, 3))
    # per-centimetre units become dpi
    jpg = pil_bytes(Image.fromarray(a), "JPEG")
    jfif = jpg.index(b"JFIF\x00")
    cm = jpg[: jfif + 7] + struct.pack(">BHH", 2, 100, 50) + jpg[jfif + 12 :]
    assert read_image(cm)[1].dpi == pytest.approx((254.0, 127.0))
    assert read_image(tiff_meta(a, resolution=(100, 100), unit="CENTIMETER"))[1].dpi == pytest.approx((254.0, 254.0))
    # aspect ratio only (JFIF unit 0 and tifffile's default 1/1 "none"): no resolution
    assert read_image(jpg)[1].dpi is None
    assert read_image(tiff_bytes(a, photometric="rgb"))[1].dpi is None
    assert read_image(png_meta(a, 8, ppm=(2, 1, 0)))[1].dpi is None
    # no JFIF density: EXIF's XResolution (as camera JPEGs carry it); none there: None, not 72
    ex = Image.Exif()
    ex[0x011A], ex[0x011B], ex[0x0128] = 350.0, 350.0, 2
    assert read_image(pil_bytes(Image.fromarray(a), "JPEG", exif=ex.tobytes()))[1].dpi == (350.0, 350.0)
    assert read_image(pil_bytes(Image.fromarray(a), "JPEG", exif=make_exif(None, "Cam")))[1].dpi is None
    # JFIF density wins over EXIF
    assert read_image(pil_bytes(Image.fromarray(a), "JPEG", exif=ex.tobytes(), dpi=(72, 72)))[1].dpi == (72.0, 72.0)


def test_no_metadata_is_invented():
    a = rand((4, 4, 3))
    for src in (ref_png(a, 8), ref_png(a.astype(np.uint16) * 257, 16), pil_bytes(Image.fromarray(a), "JPEG"), tiff_bytes(a, photometric="rgb")):
        img, info = read_image(src)
        assert info.xmp is None and info.dpi is None
        for fmt in ("png", "jpeg", "tiff"):
            data = write_image(None, img, info, format=fmt)
            assert read_image(data)[1].dpi is None and read_image(data)[1].xmp is None
            if fmt == "png":
                assert b"pHYs" not in data and b"iTXt" not in data


@pytest.mark.parametrize("orientation", [6, 3])
def test_orientation_swaps_dpi_and_resets_xmp_orientation(orientation):
    xmp = XMP.replace(b'tiff:Orientation="1"', f'tiff:Orientation="{orientation}"'.encode())
    a = rand((4, 6, 3))
    src = pil_bytes(Image.fromarray(a), "JPEG", exif=make_exif(orientation), xmp=xmp, dpi=(300, 150))
    img, info = read_image(src)
    assert info.orientation_applied == orientation
    assert info.dpi == ((150.0, 300.0) if orientation == 6 else (300.0, 150.0))  # dpi of the upright pixels
    assert info.xmp == XMP  # tiff:Orientation reset to 1, nothing else changed
    elem = xmp.replace(b' tiff:Orientation="%d">' % orientation, b"><tiff:Orientation>%d</tiff:Orientation>" % orientation)
    tags = [(274, "H", 1, orientation, True), (700, "B", len(elem), elem, True)]
    _, info = read_image(tiff_bytes(a, photometric="rgb", extratags=tags))
    assert b"<tiff:Orientation>1</tiff:Orientation>" in info.xmp and len(info.xmp) == len(elem)


def test_xmp_and_dpi_given_by_hand():
    """ImageInfo's new fields have defaults; values set by a caller pass the reader's checks."""
    img = np.zeros((2, 2, 3), np.float32)
    info = ImageInfo(None, "png", 8, 3, None, None, None, 1, (2, 2))
    assert info.xmp is None and info.dpi is None
    info = ImageInfo(None, "png", 8, 3, None, None, None, 1, (2, 2), xmp=XMP, dpi=(300, 300))
    for fmt in ("png", "jpeg", "tiff"):
        _, binfo = read_image(write_image(None, img, info, format=fmt))
        assert binfo.xmp == XMP and same_dpi(binfo.dpi, (300, 300))
    bad = ImageInfo(None, "png", 8, 3, None, None, None, 1, (2, 2), xmp=b"\xff\xfe not utf-8", dpi=(float("nan"), 0))
    for fmt in ("png", "jpeg", "tiff"):
        _, binfo = read_image(write_image(None, img, bad, format=fmt))
        assert binfo.xmp is None and binfo.dpi is None


def test_a_deeper_image_written_as_jpeg_is_said_unless_eight_bits_were_asked_for():
    info = ImageInfo(None, "png", 16, 3, None, None, None, 1, (2, 2))
    assert notes_for(info, "jpeg") == ["JPEG holds 8 bits: written as 8-bit"]
    assert notes_for(info, "jpeg", bit_depth=8) == []  # what was asked for
    assert notes_for(ImageInfo(None, "png", 8, 3, None, None, None, 1, (2, 2)), "jpeg") == []


def test_what_jpeg_cannot_hold_is_dropped_for_jpeg_only():
    big = XMP.replace(b" " * 200, b" " * 70_000)  # over one APP1 segment
    info = ImageInfo(None, "png", 8, 3, None, None, None, 1, (2, 2), xmp=big, dpi=(100_000.0, 100_000.0))
    img = np.zeros((2, 2, 3), np.float32)
    _, binfo = read_image(write_image(None, img, info, format="jpeg"))
    assert binfo.xmp is None and binfo.dpi is None  # the JFIF density is 16-bit
    for fmt in ("png", "tiff"):
        for bits in (8, 16):
            _, binfo = read_image(write_image(None, img, info, format=fmt, bit_depth=bits))
            assert binfo.xmp == big and same_dpi(binfo.dpi, (100_000, 100_000)), (fmt, bits)
    # ... and kpac deblur says so, for JPEG outputs only
    assert notes_for(info, "jpeg") == ["JPEG holds a print resolution of at most 65,535 dpi: the input's 100,000 dpi was dropped",
                                       f"the XMP metadata ({len(big):,} bytes) is too large for a JPEG segment: dropped"]
    assert notes_for(info, "png") == notes_for(info, "tiff") == []


def test_the_xmp_size_note_measures_the_packet_that_is_written():
    # a packet over one APP1 segment only by a declaration the output drops (extended XMP it
    # does not hold) fits once that is gone: kept in the JPEG, and no note says it was dropped
    declared = XMP.replace(b'tiff:Orientation="1"', b'tiff:Orientation="1" xmlns:xmpNote="http://ns.adobe.com/xmp/note/" '
                           b'xmpNote:HasExtendedXMP="0123456789ABCDEF0123456789ABCDEF"')
    packet = declared.replace(b" " * 200, b" " * (200 + images_io.JPEG_MAX_XMP + 10 - len(declared)))
    assert len(packet) == images_io.JPEG_MAX_XMP + 10
    info = ImageInfo(None, "png", 8, 3, None, None, None, 1, (2, 2), xmp=packet)
    assert notes_for(info, "jpeg") == []
    _, binfo = read_image(write_image(None, np.zeros((2, 2, 3), np.float32), info, format="jpeg"))
    assert binfo.xmp is not None and b"HasExtendedXMP" not in binfo.xmp and b"caf\xc3\xa9" in binfo.xmp


def _itxt(text: bytes, *, compressed: bool = False, keyword: bytes = b"XML:com.adobe.xmp") -> bytes:
    return chunk(b"iTXt", keyword + b"\x00" + (b"\x01\x00" if compressed else b"\x00\x00") + b"\x00\x00" + text)


COLOUR_CHUNKS = [
    (b"gAMA", struct.pack(">I", 45455)),
    (b"cHRM", struct.pack(">8I", 31270, 32900, 64000, 33000, 30000, 60000, 15000, 6000)),
    (b"sRGB", b"\x00"),
]
TEXT_CHUNKS = [
    (b"tEXt", b"Title\x00kpac test"),
    (b"zTXt", b"Comment\x00\x00" + zlib.compress(b"deflated words")),
    (b"iTXt", b"Author\x00\x00\x00de\x00Autor\x00J\xc3\xb6rg"),
]


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """``(type, payload)`` of every chunk of a PNG file, in order (CRCs checked)."""
    out, pos = [], 8
    while pos < len(data):
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        payload = data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(ctype + payload)
        out.append((ctype, payload))
        pos += 12 + length
    return out


def test_png_colour_and_text_chunks_kept_in_png_outputs():
    after_idat = (b"tEXt", b"Note\x00written after the image data")
    for bits in (8, 16):
        a = rand((5, 6, 3), bits)
        extra = b"".join(chunk(t, d) for t, d in COLOUR_CHUNKS + TEXT_CHUNKS) + _itxt(XMP)
        src = ref_png(a, bits, extra=extra)
        src = src[:-12] + chunk(*after_idat) + src[-12:]  # before IEND
        img, info = read_image(src)
        for out_bits in (8, 16):
            data = write_image(None, img, info, format="png", bit_depth=out_bits)
            chunks = png_chunks(data)
            types = [t for t, _ in chunks]
            kept = [c for c in chunks if c in COLOUR_CHUNKS + TEXT_CHUNKS + [after_idat]]
            assert kept == COLOUR_CHUNKS + TEXT_CHUNKS + [after_idat], (bits, out_bits)  # byte-identical, in order
            assert types[0] == b"IHDR" and max(types.index(t) for t, _ in kept) < types.index(b"IDAT")
            assert [d for t, d in chunks if t == b"iTXt" and d.startswith(b"XML:com.adobe.xmp\x00")] == [b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + XMP]
            with Image.open(io.BytesIO(data)) as im:  # and another reader understands them
                im.load()
                assert im.info["gamma"] == 0.45455 and im.info["srgb"] == 0 and im.info["chromaticity"][0] == 0.3127
                assert (im.info["Title"], im.info["Comment"], im.info["Author"]) == ("kpac test", "deflated words", "J\u00f6rg")
            assert read_image(data)[1].png_chunks == info.png_chunks
        assert list(info.png_chunks) == COLOUR_CHUNKS + TEXT_CHUNKS + [after_idat] and info.xmp == XMP
        # beside an ICC profile sRGB is left out (the PNG spec allows one of them)
        icc = b"\x00\x00\x02\x0cfake-icc-profile" * 20
        with_icc = ImageInfo(None, "png", bits, 3, None, icc, None, 1, img.shape[:2], png_chunks=info.png_chunks)
        for out_bits in (8, 16):
            types = [t for t, _ in png_chunks(write_image(None, img, with_icc, format="png", bit_depth=out_bits))]
            assert b"iCCP" in types and b"sRGB" not in types and b"gAMA" in types and b"tEXt" in types
    # a colour chunk of the wrong size, or after the image data (out of place), is not kept
    src = ref_png(rand((2, 2, 3)), 8, extra=chunk(b"gAMA", b"\x00\xb1\x8f"))
    src = src[:-12] + chunk(b"cHRM", COLOUR_CHUNKS[1][1]) + src[-12:]
    assert read_image(src)[1].png_chunks == ()


def test_png_colour_chunks_other_formats_cannot_hold_become_an_icc_profile(tmp_path):
    from PIL import ImageCms

    from kpac_cli.images.base import srgb_encode

    a = rand((4, 4, 3))
    linear = (b"gAMA", struct.pack(">I", 100000))  # gamma 1.0: linear light, not sRGB
    wide = (b"cHRM", struct.pack(">8I", 31270, 32900, 70800, 29200, 17000, 79700, 13100, 4600))  # BT.2020 primaries
    text = "cannot hold the PNG's text chunks (Title, Comment, Author): dropped"
    # JPEG and TIFF outputs get the colour space as an ICC profile: nothing to say of it
    _, info = read_image(ref_png(a, 8, extra=b"".join(chunk(t, d) for t, d in [linear, wide] + TEXT_CHUNKS)))
    assert info.icc_profile is not None
    assert notes_for(info, "jpeg") == [f"JPEG {text}"] and notes_for(info, "tiff") == [f"TIFF {text}"]
    assert notes_for(info, "png") == []
    # the profile says what the chunks say: linear grey converts to sRGB's curve
    grey = np.array([0, 16, 64, 128, 255], np.uint8)
    src = ref_png(np.repeat(grey[None, :, None], 3, axis=2), 8, extra=chunk(*linear))
    img, info = read_image(src)
    write_image(tmp_path / "out.tif", img, info)
    profile = read_image(tmp_path / "out.tif")[1].icc_profile
    to_srgb = ImageCms.buildTransform(ImageCms.ImageCmsProfile(io.BytesIO(profile)), ImageCms.createProfile("sRGB"), "RGB", "RGB")
    shown = np.asarray(ImageCms.applyTransform(Image.fromarray(np.repeat(grey[None, :, None], 3, axis=2)), to_srgb))[0, :, 0]
    np.testing.assert_allclose(shown, np.round(srgb_encode(grey / 255.0) * 255), atol=1)
    # sRGB said in chunks (the sRGB chunk, or sRGB's own gAMA and cHRM) is what untagged means
    for chunks in (COLOUR_CHUNKS, COLOUR_CHUNKS[:2], [COLOUR_CHUNKS[2], linear]):
        _, info = read_image(ref_png(a, 8, extra=b"".join(chunk(t, d) for t, d in chunks)))
        assert info.icc_profile is None and notes_for(info, "jpeg") == [], chunks
    # an iCCP of the file's own wins; values no colour space has give none
    own = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    _, info = read_image(ref_png(a, 8, extra=chunk(b"iCCP", b"sRGB\0\0" + zlib.compress(own)) + chunk(*linear)))
    assert info.icc_profile == own
    flat = (b"cHRM", struct.pack(">8I", 31270, 32900, 30000, 30000, 30000, 30000, 30000, 30000))  # one point
    _, info = read_image(ref_png(a, 8, extra=chunk(*flat)))
    assert info.icc_profile is None and notes_for(info, "tiff") == ["TIFF cannot hold the PNG's colour space (cHRM, not sRGB): "
                                                                    "written untagged, which readers take for sRGB"]
    _, info = read_image(ref_png(a, 8, extra=b"".join(chunk(t, d) for t, d in TEXT_CHUNKS)))
    assert notes_for(info, "jpeg") == [f"JPEG {text}"] and notes_for(info, "tiff") == [f"TIFF {text}"]


@pytest.mark.parametrize("bits", [8, 16])
def test_malformed_or_oversize_xmp_and_phys_are_ignored(bits):
    from kpac_cli.images.metadata import MAX_XMP

    a = rand((4, 5, 3), bits)
    pad = XMP.replace(b" " * 200, b" " * (MAX_XMP + 1 - len(XMP) + 200))
    assert len(pad) == MAX_XMP + 1
    bad_meta = {
        "xmp_over_limit_compressed": _itxt(zlib.compress(pad, 9), compressed=True),
        "xmp_zlib_bomb": _itxt(zlib.compress(b" " * (64 << 20), 9), compressed=True),
        "xmp_broken_zlib": _itxt(b"x\x9c not zlib at all", compressed=True),
        "xmp_not_utf8": _itxt(b"<x:xmpmeta>\xff\xfe\xfd</x:xmpmeta>"),
        "xmp_empty": _itxt(b""),
        "xmp_no_separators": chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00"),
        "xmp_bad_flag": chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x07\x00\x00\x00" + XMP),
        "phys_short": chunk(b"pHYs", b"\x00\x00\x2e\x23\x01"),
        "phys_long": chunk(b"pHYs", struct.pack(">IIB", 11811, 11811, 1) + b"\x00"),
        "phys_zero": chunk(b"pHYs", struct.pack(">IIB", 0, 0, 1)),
        "phys_huge": chunk(b"pHYs", struct.pack(">IIB", 0xFFFFFFFF, 0xFFFFFFFF, 1)),
        "phys_unit_7": chunk(b"pHYs", struct.pack(">IIB", 11811, 11811, 7)),
    }
    for name, extra in bad_meta.items():
        src = ref_png(a, bits, extra=extra)
        img, info = read_image(src)
        assert info.xmp is None and info.dpi is None, name
        assert np.array_equal(as_int(img, bits), a), name
        assert read_image(write_image(None, img, info))[1] == info, name
    # a damaged first packet does not hide a good second one; the first good one wins
    img, info = read_image(ref_png(a, bits, extra=bad_meta["xmp_not_utf8"] + _itxt(XMP) + _itxt(b"<second/>")))
    assert info.xmp == XMP
    # a compressed iTXt within the limit is read; other iTXt keywords are not XMP
    assert read_image(ref_png(a, bits, extra=_itxt(zlib.compress(XMP), compressed=True)))[1].xmp == XMP
    assert read_image(ref_png(a, bits, extra=_itxt(XMP, keyword=b"Comment")))[1].xmp is None


def test_malformed_tiff_resolution_and_xmp_are_ignored(monkeypatch):
    a = rand((4, 5, 3))
    good = tiff_meta(a)
    unit_entry = struct.pack("<HHIHH", 296, 3, 1, 2, 0)  # ResolutionUnit SHORT 1 = inch
    assert good.count(unit_entry) == 1 and good.count(struct.pack("<II", 300, 1)) == 2
    bad_dpi = {
        "zero_denominator": good.replace(struct.pack("<II", 300, 1), struct.pack("<II", 300, 0)),
        "zero": good.replace(struct.pack("<II", 300, 1), struct.pack("<II", 0, 1)),
        "unknown_unit": good.replace(unit_entry, struct.pack("<HHIHH", 296, 3, 1, 9, 0)),
        "no_unit": good.replace(unit_entry, struct.pack("<HHIHH", 296, 3, 1, 1, 0)),
    }
    for name, src in bad_dpi.items():
        img, info = read_image(src)
        assert info.dpi is None and info.xmp == XMP, name
    _, info = read_image(tiff_meta(a, xmp=b"\xff\xfe\x00\x01" * 10))
    assert info.xmp is None and info.dpi == (300.0, 300.0)
    # tag 700 over the limit: ignored without being decoded
    from kpac_cli.images import metadata

    src = tiff_meta(a, xmp=XMP)
    assert read_image(src)[1].xmp == XMP
    monkeypatch.setattr(metadata, "MAX_XMP", len(XMP) - 1)
    assert read_image(src)[1].xmp is None


def test_damaged_metadata_never_fails_a_read():
    """Random bytes in the pHYs / iTXt payloads (with valid CRCs), in the JPEG XMP and JFIF
    density and in the TIFF resolution and XMP values: the pixels always read, metadata is
    whatever survived the checks."""
    rng = np.random.default_rng(99)
    a = rand((4, 5, 3))
    phys = struct.pack(">IIB", 11811, 11811, 1)
    itxt = b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + XMP
    jpg = pil_bytes(Image.fromarray(a), "JPEG", xmp=XMP, dpi=(300, 300))
    tif = tiff_meta(a)
    spans = {  # (file, start, end) of the bytes to damage
        "jpeg_xmp": (jpg, jpg.index(b"http://ns.adobe.com/xap"), jpg.index(b"http://ns.adobe.com/xap") + 29 + len(XMP)),
        "jpeg_jfif": (jpg, jpg.index(b"JFIF\x00") + 7, jpg.index(b"JFIF\x00") + 12),
        "tiff_xmp": (tif, tif.index(XMP), tif.index(XMP) + len(XMP)),
        "tiff_resolution": (tif, tif.index(struct.pack("<II", 300, 1)), tif.index(struct.pack("<II", 300, 1)) + 16),
    }

    def damage(b: bytes) -> bytes:
        b = bytearray(b)
        for _ in range(rng.integers(1, 4)):
            b[rng.integers(len(b))] = rng.integers(256)
        return bytes(b)

    for i in range(300):
        cut = rng.integers(0, 2)  # sometimes also cut the payload short
        p, t = damage(phys), damage(itxt)
        if cut:
            p, t = p[: rng.integers(len(p))], t[: rng.integers(len(t))]
        img, info = read_image(ref_png(a, 8, extra=chunk(b"pHYs", p) + chunk(b"iTXt", t)))
        assert np.array_equal(as_int(img, 8), a)
        assert info.dpi is None or all(1 <= v <= 1e6 for v in info.dpi)
        name = list(spans)[i % len(spans)]
        data, start, end = spans[name]
        mutated = data[:start] + damage(data[start:end]) + data[end:]
        img, info = read_image(mutated)
        assert img.shape == (4, 5, 3), name
        write_image(None, img, info, format="png")  # whatever was kept can be written


# ------------------------------------------------------------------------------------------
# refusals, multi-frame, errors


def test_cmyk_refused(tmp_path):
    p = tmp_path / "cmyk.tif"
    tifffile.imwrite(p, rand((4, 4, 4)), photometric="separated")
    with pytest.raises(ImageError, match="CMYK") as e:
        read_image(p)
    assert str(p) in str(e.value)
    p = tmp_path / "cmyk.jpg"
    Image.fromarray(rand((4, 4, 4)), "CMYK").save(p)
    with pytest.raises(ImageError, match="CMYK"):
        read_image(p)


def test_multipage_tiff_and_apng_first_frame(tmp_path):
    a, b = rand((4, 5, 3)), rand((4, 5, 3))
    p = tmp_path / "multi.tif"
    with tifffile.TiffWriter(p) as tw:
        tw.write(a, photometric="rgb")
        tw.write(b, photometric="rgb")
    img, info = read_image(p)
    assert info.frames == 2 and np.array_equal(as_int(img, 8), a)
    # a preview (reduced resolution) or a transparency mask of the image is not another frame
    with tifffile.TiffWriter(p) as tw:
        tw.write(a, photometric="rgb")
        tw.write(a[::2, ::2], photometric="rgb", subfiletype=1)
        tw.write(np.ones((4, 5), bool), photometric="minisblack", subfiletype=4)
        tw.write(b, photometric="rgb")
    img, info = read_image(p)
    assert info.frames == 2 and np.array_equal(as_int(img, 8), a)

    p = tmp_path / "anim.png"
    Image.fromarray(a).save(p, save_all=True, append_images=[Image.fromarray(b)])
    img, info = read_image(p)
    assert info.frames == 2 and np.array_equal(as_int(img, 8), a)
    with Image.open(io.BytesIO(write_image(None, img, info))) as im:
        assert getattr(im, "n_frames", 1) == 1


@pytest.mark.parametrize("fmt,label", [("GIF", "GIF"), ("BMP", "BMP"), ("WEBP", "WebP")])
def test_other_formats_refused(tmp_path, fmt, label):
    p = tmp_path / f"x.{fmt.lower()}"
    try:
        Image.fromarray(rand((4, 4, 3))).save(p, fmt)
    except (KeyError, OSError):
        pytest.skip(f"Pillow cannot write {fmt} here")
    with pytest.raises(ImageError, match=label):
        read_image(p)


def _ftyp(major: bytes, *compatible: bytes) -> bytes:
    """The ``ftyp`` box an ISO base media file (HEIC, AVIF, MP4, MOV) starts with, and some bytes."""
    body = b"ftyp" + major + b"\x00\x00\x00\x00" + b"".join(compatible)
    return struct.pack(">I", 4 + len(body)) + body + b"\x00\x00\x00\x08free" * 8


@pytest.mark.parametrize(
    "head,said,not_said",
    [
        (_ftyp(b"heic", b"mif1", b"MiHE", b"miaf", b"MiHB", b"heic"), "HEIC/HEIF images are not supported; convert them to JPEG", "AVIF"),
        (_ftyp(b"mif1", b"mif1", b"heic"), "HEIC/HEIF images", "video"),
        (_ftyp(b"avif", b"avif", b"mif1", b"miaf"), "AVIF images are not supported", "HEIC"),
        (_ftyp(b"isom", b"isom", b"iso2", b"avc1", b"mp41"), "a video or other ISO media file", "HEIC"),
        (_ftyp(b"qt  ", b"qt  "), "a video or other ISO media file", "AVIF"),
    ],
    ids=["iphone-heic", "heif", "avif", "mp4", "mov"],
)
def test_iso_media_files_are_named_for_what_they_are(tmp_path, monkeypatch, head, said, not_said):
    # an iPhone's HEIC photo, an AVIF and a phone's MP4 or MOV video all start with an ftyp box;
    # HEIC as a kpac without the heic extra says it (with it, tests/test_images_heif.py)
    from kpac_cli.images import heif

    monkeypatch.setattr(heif, "available", lambda: False)
    p = tmp_path / "IMG_0001.HEIC"  # the name is not looked at
    p.write_bytes(head)
    for source in (p, head):
        with pytest.raises(ImageError, match=re.escape(said)) as caught:
            read_image(source)
        assert not_said not in caught.value.problem


def _errors(tmp_path):
    png = pil_bytes(Image.fromarray(rand((20, 20, 3))), "PNG")
    jpg = pil_bytes(Image.fromarray(rand((20, 20, 3))), "JPEG")
    tif = tiff_bytes(rand((20, 20, 3)), photometric="rgb")
    zero = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    cases = {
        "empty.png": b"",
        "text.png": b"hello, I am not an image\n",
        "zero.png": zero,
        "trunc.png": png[: len(png) // 2],
        "trunc.jpg": jpg[: len(jpg) // 3],
        "trunc.tif": tif[: len(tif) // 2],
        "noidat.png": png[:33] + chunk(b"IEND", b""),
        "badcrc.png": png[:29] + b"\x00\x00\x00\x00" + png[33:],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    return list(cases)


def test_bad_files_raise_one_line_image_error_naming_file(tmp_path):
    for name in _errors(tmp_path):
        p = tmp_path / name
        with pytest.raises(ImageError) as e:
            read_image(p)
        msg = str(e.value)
        assert str(p) in msg and "\n" not in msg, msg
        if name != "empty.png":
            with pytest.raises(ImageError) as e:
                read_image(p.read_bytes())
            assert str(e.value).startswith("<stdin>: ")
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="directory"):
        read_image(tmp_path)
    with pytest.raises(ImageError, match="empty"):
        read_image(b"")
    with pytest.raises(ImageError, match="zero size"):
        probe_size(tmp_path / "zero.png")


def test_image_error_forms():
    e = ImageError(Path("/x/a.png"), "corrupt\n  data")
    assert str(e) == "/x/a.png: corrupt data" and e.source == "/x/a.png" and e.problem == "corrupt data"
    assert str(ImageError(b"..", "bad")) == "<stdin>: bad"
    assert str(ImageError("out.png: exists")) == "out.png: exists"  # preformatted message
    import pickle

    assert str(pickle.loads(pickle.dumps(e))) == str(e)


def test_decompression_bomb_png_refused_before_allocation():
    # A valid IHDR claiming 100000 x 100000 RGB (30 GB as uint8), followed by a tiny IDAT.
    head = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ImageError, match="too large"):
            read_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 1.0
    assert peak < 10 << 20
    assert probe_size(data) == (100_000, 100_000)  # probing is allowed: it reads the header only
    for d in (16,):  # same for the 16-bit path
        head = struct.pack(">IIBBBBB", 100_000, 100_000, d, 6, 0, 0, 0)
        with pytest.raises(ImageError, match="too large"):
            read_image(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", b"x"))


def test_tiny_idat_with_big_allowed_header_refused_early():
    # 10000 x 10000 is under the pixel limit, but 100 bytes of deflate cannot hold it.
    head = struct.pack(">IIBBBBB", 10_000, 10_000, 16, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(b"\x00" * 100))
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match="truncated"):
            read_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 << 20
    # ... while a legitimately extreme compression ratio passes the check.
    raw = b"".join(b"\x00" + bytes(375) for _ in range(3000))  # 3000 x 3000, 1-bit, all black
    comp = zlib.compress(raw, 9)
    assert len(raw) / len(comp) > 900
    png = images.png.PngFile(3000, 3000, 1, 0, 0, idat=[comp])
    images.png.check_idat_size(png, "x")


def test_max_pixels_other_formats(tmp_path):
    jpg = bytearray(pil_bytes(Image.fromarray(rand((8, 8, 3))), "JPEG"))
    sof = jpg.index(b"\xff\xc0")
    jpg[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)  # 3.6 G pixels in the header
    with pytest.raises(ImageError, match="too large"):
        read_image(bytes(jpg))
    tif = tiff_bytes(rand((30, 30, 3)), photometric="rgb")
    with pytest.raises(ImageError, match="too large"):
        read_image(tif, max_pixels=899)
    img, _ = read_image(tif, max_pixels=900)
    assert img.shape == (30, 30, 3)
    assert DEFAULT_MAX_PIXELS == 200_000_000


def test_core_does_not_import_cli_libraries():
    code = "import sys, kpac_cli.images; assert not {'typer', 'rich'} & set(sys.modules), sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_is_image_path_and_raw_extensions():
    for name in ("a.png", "b.TIF", "c.tiff", "d.JPG", "e.jpeg", "f.dng", "g.CR2", "h.nef", "i.arw", "j.cr3", "k.RAF"):
        assert is_image_path(name), name
    for name in ("a.txt", "b.gif", "c", ".hidden.png", ".x.png.123.ab.kpac-tmp", "d.png.kpac-tmp"):
        assert not is_image_path(name), name
    assert {"dng", "cr2", "cr3", "nef", "arw", "orf", "rw2", "raf", "pef", "srw"} <= RAW_EXTENSIONS
    assert all(e == e.lower() and not e.startswith(".") for e in RAW_EXTENSIONS)


def test_jpegs_named_jfif_or_jpe_are_listed(tmp_path):
    # browsers on Windows save many JPEGs as .jfif: a folder of them is not empty
    for name in ("download.jfif", "old.JPE", "photo.jpg"):
        Image.fromarray(rand((6, 8, 3))).save(tmp_path / name, "JPEG")
    found = list_images(tmp_path)
    assert [p.name for p in found] == ["download.jfif", "old.JPE", "photo.jpg"]
    assert all(read_image(p)[1].format == "jpeg" for p in found)


def test_list_images(tmp_path):
    for rel in ("b.png", "A.TIF", "c.cr2", "a.jpg", "notes.txt", "d.gif", ".hidden.png", "e.png.kpac-tmp",
                "sub/x.png", "sub/deeper/y.tiff", ".cache/z.png", "sub/.w.png", "a-b/v.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "dir.png").mkdir()  # a folder with an image name is not an image
    assert [p.name for p in list_images(tmp_path)] == ["A.TIF", "a.jpg", "b.png", "c.cr2"]
    rel = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, recursive=True)]
    assert rel == ["A.TIF", "a-b/v.png", "a.jpg", "b.png", "c.cr2", "sub/deeper/y.tiff", "sub/x.png"]
    assert all(p.parent.is_relative_to(tmp_path) for p in list_images(str(tmp_path), recursive=True))
    for recursive in (False, True):
        with pytest.raises(FileNotFoundError):
            list_images(tmp_path / "missing", recursive=recursive)
        with pytest.raises(NotADirectoryError):
            list_images(tmp_path / "b.png", recursive=recursive)


def test_read_image_codes_are_read_image_as_integers(tmp_path):
    rgba16 = rand((5, 7, 4), 16)
    la8 = rand((6, 4, 2))
    f = RNG.random((4, 5, 3)).astype(np.float32) * 1.4 - 0.2
    f[0, 0, 0] = np.nan
    files = {
        "rgba16.png": ref_png(rgba16, 16),
        "la8.png": ref_png(la8, 8),
        "float.tif": tiff_bytes(f, photometric="rgb"),
        "rot.jpg": pil_bytes(Image.fromarray(rand((6, 9, 3))), "JPEG", exif=make_exif(6)),
        "planar16.tif": tiff_bytes(np.moveaxis(rand((3, 4, 3), 16), 2, 0), photometric="rgb", planarconfig="separate"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        img, info = read_image(tmp_path / name)
        codes, depth = read_image_codes(tmp_path / name)
        assert codes.shape == img.shape and codes.flags.c_contiguous, name
        assert codes.dtype == (np.uint8 if depth == 8 else np.uint16), name
        assert depth == min(info.bit_depth, 16), name
        assert np.array_equal(codes, as_int(img, depth)), name  # the writer's rule: bit-exact for integer sources
        if info.bit_depth != 32:
            assert np.array_equal(images_io.to_float(codes, (1 << depth) - 1), img), name
        assert np.array_equal(read_image_codes(files[name])[0], codes), name  # bytes too
    codes, _ = read_image_codes(tmp_path / "rgba16.png")
    assert np.array_equal(codes, rgba16[..., :3])  # alpha dropped, values untouched
    codes, _ = read_image_codes(tmp_path / "la8.png")
    assert np.array_equal(codes, np.repeat(la8[..., :1], 3, axis=2))
    assert read_image_codes(tmp_path / "rot.jpg")[0].shape == (9, 6, 3)  # orientation applied


def test_read_image_codes_bit_depth(tmp_path):
    k = np.array([0, 128, 129, 257, 385, 386, 32767, 32768, 65535], np.uint16)
    (tmp_path / "16.png").write_bytes(ref_png(np.repeat(k[None, :, None], 3, 2), 16))
    codes, depth = read_image_codes(tmp_path / "16.png", bit_depth=8)
    assert depth == 8 and codes.dtype == np.uint8
    assert np.array_equal(codes[0, :, 0], np.round(k / 257).astype(np.uint8))
    assert np.array_equal(codes[0, :, 0], as_int(read_image(tmp_path / "16.png")[0], 8)[0, :, 0])
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    (tmp_path / "all.png").write_bytes(ref_png(every, 16))
    assert np.array_equal(read_image_codes(tmp_path / "all.png", bit_depth=8)[0][..., 0],
                          as_int(read_image(tmp_path / "all.png")[0], 8)[..., 0])  # every 16-bit code
    b = rand((3, 4, 3))
    (tmp_path / "8.png").write_bytes(ref_png(b, 8))
    assert np.array_equal(read_image_codes(tmp_path / "8.png", bit_depth=8)[0], b)
    wide, depth = read_image_codes(tmp_path / "8.png", bit_depth=16)
    assert depth == 16 and np.array_equal(wide, b.astype(np.uint16) * 257)
    with pytest.raises(ValueError):
        read_image_codes(tmp_path / "8.png", bit_depth=12)
    with pytest.raises(ImageError, match="missing.png"):
        read_image_codes(tmp_path / "missing.png")


def test_probe_size_formats(tmp_path):
    a = rand((7, 9, 3))
    assert probe_size(pil_bytes(Image.fromarray(a), "PNG")) == (7, 9)
    assert probe_size(pil_bytes(Image.fromarray(a), "JPEG")) == (7, 9)
    assert probe_size(tiff_bytes(a, photometric="rgb")) == (7, 9)
    assert probe_size(ref_png(rand((7, 9, 3), 16), 16)) == (7, 9)


# ------------------------------------------------------------------------------------------
# atomic writes


def test_write_failure_in_encoder_leaves_destination(tmp_path, monkeypatch):
    dest = tmp_path / "out.png"
    dest.write_bytes(b"previous content")
    img = np.zeros((4, 4, 3), np.float32)
    info = ImageInfo(None, "png", 16, 3, None, None, None, 1, (4, 4))

    def boom(*a, **k):
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(images.png, "encode16", boom)
    with pytest.raises(RuntimeError):
        write_image(dest, img, info)
    assert dest.read_bytes() == b"previous content" and no_temps(tmp_path)
    new = tmp_path / "new.png"
    with pytest.raises(RuntimeError):
        write_image(new, img, info)
    assert not new.exists() and no_temps(tmp_path)


def test_write_failure_mid_write_cleans_temp(tmp_path, monkeypatch):
    dest = tmp_path / "out.tif"
    dest.write_bytes(b"previous content")
    seen = []
    real_fsync = os.fsync

    def failing_fsync(fd):
        seen.extend(p.name for p in tmp_path.iterdir() if p.name.endswith(".kpac-tmp"))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    info = ImageInfo(None, "tiff", 8, 3, None, None, None, 1, (4, 4))
    with pytest.raises(ImageError, match="No space left") as e:
        write_image(dest, np.zeros((4, 4, 3), np.float32), info)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert str(dest) in str(e.value)
    assert dest.read_bytes() == b"previous content" and no_temps(tmp_path)
    assert seen and seen[0].startswith(".out.tif.") and seen[0].endswith(".kpac-tmp")
    assert f".{os.getpid()}." in seen[0]


def test_atomic_helpers(tmp_path):
    dest = tmp_path / "f.bin"
    atomic_write_bytes(dest, b"one")
    dest.chmod(0o640)
    atomic_write_bytes(dest, b"two")
    assert dest.read_bytes() == b"two" and (dest.stat().st_mode & 0o777) == 0o640
    with atomic_output(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".kpac-tmp") and tmp.name.startswith(".")
        tmp.write_bytes(b"three")
        assert dest.read_bytes() == b"two"
    assert dest.read_bytes() == b"three"
    with pytest.raises(KeyError):
        with atomic_output(dest) as tmp:
            tmp.write_bytes(b"partial")
            raise KeyError("fail")
    assert dest.read_bytes() == b"three" and no_temps(tmp_path)
    long_name = tmp_path / ("n" * 250)
    atomic_write_bytes(long_name, b"long")  # the temp name must stay under NAME_MAX
    assert long_name.read_bytes() == b"long"
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "nodir" / "x", b"")
    (tmp_path / "adir").mkdir()
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "adir", b"x")
    assert no_temps(tmp_path)
    with pytest.raises(ImageError):
        write_image(tmp_path / "adir", np.zeros((2, 2, 3), np.float32), ImageInfo(None, "png", 8, 3, None, None, None, 1, (2, 2)), format="png")
    assert no_temps(tmp_path)


def test_atomic_writes_go_through_a_symlink_and_keep_it(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    target = store / "photo.bin"
    target.write_bytes(b"old")
    target.chmod(0o640)
    (tmp_path / "hop").symlink_to("store/photo.bin")  # relative, and a link to a link
    link = tmp_path / "link.bin"
    link.symlink_to("hop")
    atomic_write_bytes(link, b"new")
    assert link.is_symlink() and os.readlink(link) == "hop" and (tmp_path / "hop").is_symlink()
    assert target.read_bytes() == b"new" and (target.stat().st_mode & 0o777) == 0o640
    with atomic_output(link) as tmp:
        assert tmp.parent == store  # beside the file it replaces: one file system, one rename
        tmp.write_bytes(b"newer")
    assert link.is_symlink() and target.read_bytes() == b"newer"
    assert no_temps(tmp_path) and no_temps(store)
    dangling = tmp_path / "dangling.bin"
    dangling.symlink_to("store/missing.bin")
    atomic_write_bytes(dangling, b"made")  # as open(dangling, "w") would: the target is created
    assert dangling.is_symlink() and (store / "missing.bin").read_bytes() == b"made"
    with pytest.raises(FileExistsError):  # a link is there: "never replace" keeps it and its target
        atomic_write_bytes(link, b"no", replace=False)
    assert link.is_symlink() and target.read_bytes() == b"newer"


def test_long_non_ascii_names_are_written(tmp_path):
    # 244 bytes in UTF-8 (a valid name): the temporary name beside it must fit NAME_MAX too
    name = "写真" * 40 + ".png"
    info = ImageInfo(None, "png", 8, 3, None, None, None, 1, (4, 4))
    write_image(tmp_path / name, np.full((4, 4, 3), 0.5, np.float32), info)
    assert read_image(tmp_path / name)[0].shape == (4, 4, 3)
    atomic_write_bytes(tmp_path / ("é" * 127), b"data")
    assert (tmp_path / ("é" * 127)).read_bytes() == b"data" and no_temps(tmp_path)


def test_cleanup_stale_temps(tmp_path, monkeypatch):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead_pid = proc.pid
    dead = tmp_path / f".a.png.{dead_pid}.deadbeef.kpac-tmp"
    live = tmp_path / f".b.png.{os.getpid()}.cafe0001.kpac-tmp"
    old = tmp_path / f".c.png.{os.getpid()}.cafe0002.kpac-tmp"
    weird = tmp_path / ".d.kpac-tmp"  # no pid: only the age rule applies
    keep = tmp_path / "e.png.kpac-tmp"  # not hidden: not ours
    for p in (dead, live, old, weird, keep):
        p.write_bytes(b"x")
    past = time.time() - 120
    os.utime(old, (past, past))
    with atomic_output(tmp_path / "f.png") as active:
        os.utime(active, (past, past))
        monkeypatch.chdir(tmp_path)  # a relative folder name must still spare the live temp
        assert cleanup_stale_temps(".") == 2
        assert active.exists()
    assert not dead.exists() and not old.exists()
    assert live.exists() and weird.exists() and keep.exists()
    assert cleanup_stale_temps(tmp_path / "missing") == 0


# ------------------------------------------------------------------------------------------
# camera RAW (real DNGs from ../shared)


@pytest.mark.shared
def test_raw_dng_canon(shared_dir):
    p = shared_dir / "samples" / "raw" / "canon_eos_6d.dng"
    img, info = read_image(p)
    assert (info.format, info.bit_depth, info.channels) == ("raw", 16, 3)
    assert img.dtype == np.float32 and img.shape == (816, 1224, 3)
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.01
    assert info.size == (816, 1224) == probe_size(p)
    # stdin bytes take the same route (sniffed as TIFF-structured DNG).
    img2, info2 = read_image(p.read_bytes())
    assert info2.format == "raw" and np.array_equal(img, img2)
    # RAW input -> 16-bit TIFF by default, bit-exact
    data = write_image(None, img, info)
    back = tifffile.imread(io.BytesIO(data))
    assert back.dtype == np.uint16 and np.array_equal(back.astype(np.int64), as_int(img, 16))
    lin, _ = read_image(p, raw_options=RawOptions(gamma="linear", white_balance="daylight", demosaic="linear"))
    assert lin.mean() < img.mean()


@pytest.mark.shared
def test_raw_dng_blackmagic_half_size(shared_dir):
    p = shared_dir / "samples" / "raw" / "Blackmagic.dng"
    img, info = read_image(p, raw_options=RawOptions(half_size=True, white_balance="auto", exposure=1.0))
    assert info.format == "raw" and img.shape == (1080, 2048, 3)  # the DNG's default crop of 4128x2176
    assert probe_size(p) == (2160, 4096)
    with pytest.raises(ImageError, match="too large"):
        read_image(p, max_pixels=1_000_000)


@pytest.mark.shared
def test_raw_errors(tmp_path, shared_dir):
    data = (shared_dir / "samples" / "raw" / "canon_eos_6d.dng").read_bytes()
    p = tmp_path / "cut.dng"
    p.write_bytes(data[:5000])
    with pytest.raises(ImageError) as e:
        read_image(p)
    assert str(p) in str(e.value)
    q = tmp_path / "junk.nef"
    q.write_bytes(b"not a raw file at all" * 10)
    with pytest.raises(ImageError, match="RAW"):
        read_image(q)


def test_raw_options_validation():
    assert RawOptions() == RawOptions("camera", False, "ahd", "srgb", "srgb", True, 0.0)
    for bad in (dict(white_balance="tungsten"), dict(demosaic="amaze"), dict(output_colorspace="p3"), dict(gamma="2.2"), dict(exposure=5)):
        with pytest.raises(ValueError):
            RawOptions(**bad)


# ------------------------------------------------------------------------------------------
# dual-pixel pairing


def _dp_folder(root: Path, names, shape=(6, 8), bits=16, suffix=("", "")):
    l, r = root / "L", root / "R"
    l.mkdir(parents=True)
    r.mkdir()
    for n in names:
        (l / f"{n}{suffix[0]}.png").write_bytes(ref_png(rand((*shape, 3), bits), bits))
        (r / f"{n}{suffix[1]}.png").write_bytes(ref_png(rand((*shape, 3), bits), bits))
    return l, r


def test_pair_folders_and_read(tmp_path):
    l, r = _dp_folder(tmp_path, ["002", "001"])
    (l / "notes.txt").write_text("ignored")
    triples = pair_dual_pixel(l, r, None)
    assert [t.name for t in triples] == ["001", "002"]
    assert triples[0] == DualPixelTriple(l / "001.png", r / "001.png", None, "001")
    views, center, info = read_dual_pixel(triples[0])
    left, _ = read_image(l / "001.png")
    right, _ = read_image(r / "001.png")
    assert views.shape == (6, 8, 6) and views.dtype == np.float32
    assert np.array_equal(views[..., :3], left) and np.array_equal(views[..., 3:], right)
    assert np.allclose(center, (left + right) / 2) and center.dtype == np.float32
    assert info.path == str(l / "001.png") and info.bit_depth == 16


def test_pair_suffixes_files_and_center(tmp_path):
    l, r = _dp_folder(tmp_path, ["005"], suffix=("_left", "_Right"))
    c = tmp_path / "C"
    c.mkdir()
    (c / "005_c.png").write_bytes(ref_png(rand((6, 8, 3), 16), 16))
    (t,) = pair_dual_pixel(l, r, c)
    assert t.name == "005" and t.center == c / "005_c.png"
    _, center, _ = read_dual_pixel(t)
    assert np.array_equal(center, read_image(c / "005_c.png")[0])
    (t,) = pair_dual_pixel(l / "005_left.png", r / "005_Right.png", None)
    assert t.name == "005" and t.center is None


def test_pair_errors(tmp_path):
    l, r = _dp_folder(tmp_path / "a", ["1", "2"])
    (r / "2.png").unlink()
    with pytest.raises(ImageError, match="no right view") as e:
        pair_dual_pixel(l, r)
    assert "2.png" in str(e.value)
    l, r = _dp_folder(tmp_path / "b", ["1"])
    (r / "1.png").write_bytes(ref_png(rand((6, 9, 3), 16), 16))
    with pytest.raises(ImageError, match="size") as e:
        pair_dual_pixel(l, r)
    assert str(l / "1.png") in str(e.value) and str(r / "1.png") in str(e.value)
    (r / "1.png").write_bytes(ref_png(rand((6, 8, 3), 8), 8))
    with pytest.raises(ImageError, match="bit depth"):
        pair_dual_pixel(l, r)
    with pytest.raises(ImageError, match="bit depth"):
        read_dual_pixel(DualPixelTriple(l / "1.png", r / "1.png", None, "1"))
    with pytest.raises(ImageError, match="all be files or all be folders"):
        pair_dual_pixel(l, r / "1.png")
    with pytest.raises(ImageError, match="no such"):
        pair_dual_pixel(l, tmp_path / "nothing")
    with pytest.raises(ImageError, match="DPDD"):
        pair_dual_pixel(l)


def test_dpdd_layout(tmp_path):
    ld, rd, cd = dpdd_dual_dirs(tmp_path, "test")
    assert (ld, rd, cd) == (tmp_path / "test_l/source", tmp_path / "test_r/source", tmp_path / "test_c/source")
    assert dpdd_dual_dirs(tmp_path, "train")[0] == tmp_path / "train_l/source"
    for d in (ld, rd, cd):
        d.mkdir(parents=True)
        (d / "1P0A1031.png").write_bytes(ref_png(rand((4, 4, 3), 16), 16))
    (t,) = pair_dual_pixel(tmp_path)
    assert (t.left, t.right, t.center, t.name) == (ld / "1P0A1031.png", rd / "1P0A1031.png", cd / "1P0A1031.png", "1P0A1031")


@pytest.mark.shared
def test_pixel4_dual_pixel_sample(shared_dir):
    root = shared_dir / "samples" / "defocused" / "dp_pixel4"
    (t,) = pair_dual_pixel(root / "left", root / "right", None)
    views, center, info = read_dual_pixel(t)
    assert views.shape == (1512, 2016, 6) and info.bit_depth == 16 and info.channels == 1
    assert np.array_equal(views[..., 0], views[..., 2])


def test_srgb_curve_round_trips_and_extends_beyond_the_unit_range():
    from kpac_cli.images import srgb_decode, srgb_encode

    v = np.linspace(-0.2, 1.5, 10001, dtype=np.float32)
    assert np.abs(srgb_decode(srgb_encode(v)) - v).max() < 1e-6
    assert srgb_encode(np.float32(0.5)) == pytest.approx(0.735357, abs=1e-6)  # IEC 61966-2-1
    assert srgb_decode(np.float32(1.2)) > 1 and srgb_decode(np.float32(-0.1)) < 0  # float outputs keep their range


def test_an_interrupt_just_after_the_temporary_file_is_made_leaves_none_at_exit(tmp_path):
    """A Ctrl-C or SIGTERM raised between the temporary file's creation and the write's own
    clean-up (a job scheduler stopping `kpac synth`) left a hidden ``.kpac-tmp`` file behind;
    whatever a write has not committed or removed is removed when the interpreter exits."""
    script = r"""
import os, sys
import kpac_cli.images.atomic as atomic

real_close = os.close
def close_then_interrupted(fd):
    real_close(fd)
    raise KeyboardInterrupt  # as a signal handler raises it, between two bytecodes
atomic.os.close = close_then_interrupted
try:
    atomic.atomic_write_bytes(sys.argv[1], b"data")
except KeyboardInterrupt:
    pass
atomic.os.close = real_close
print(sorted(os.listdir(os.path.dirname(sys.argv[1]))))
"""
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out.png")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    left_then = eval(proc.stdout)  # the temporary file existed while the process ran
    assert len(left_then) == 1 and left_then[0].endswith(".kpac-tmp")
    assert list(tmp_path.iterdir()) == []  # and is gone once it exited
