"""HEIC/HEIF photos (the ``heic`` extra, pillow-heif): pixels, orientation, metadata, limits,
damage, probes, folders, default output formats, and ``kpac deblur`` end to end.

The HEIC files are made here with pillow-heif's encoder (libheif + x265). Every test but the
one that simulates its absence is skipped where pillow-heif is not installed.
"""

from __future__ import annotations

import io
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from kpac_cli.cli import app
from kpac_cli.engine.batch import Job, OutputOptions, _what_is_not_kept
from kpac_cli.images import ImageError, is_image_path, list_images, probe_size, read_image, read_image_codes, sniff_format, unread_images, write_image
from kpac_cli.images import heif as heif_mod
from kpac_cli.images import icc as icc_mod
from kpac_cli.images.base import quantize, srgb_encode
from kpac_cli.images.exif import apply_orientation, read_orientation
from kpac_cli.images.io import _probe_depth, default_format, probe_heif

needs_heif = pytest.mark.skipif(not heif_mod.available(), reason='pillow-heif is not installed (pip install "kpac[heic]")')
runner = CliRunner()


def heic(arr: np.ndarray, *, bits: int = 8, exif: bytes | None = None, xmp: bytes | None = None, **save) -> bytes:
    """``arr`` (uint8, or uint16 codes of ``bits`` bits; H x W [x C]) as a HEIC, near-lossless."""
    import pillow_heif

    channels = 1 if arr.ndim == 2 else arr.shape[2]
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    data = arr
    if bits > 8:  # pillow-heif takes 16-bit input and keeps its top bits
        mode += ";16" if channels > 1 else ""
        mode = "I;16" if channels == 1 else mode
        data = (arr.astype(np.uint16) << (16 - bits)).astype(np.uint16)
    hf = pillow_heif.from_bytes(mode, (arr.shape[1], arr.shape[0]), data.tobytes())
    buf = io.BytesIO()
    opts = {"quality": -1, "chroma": 444, **save}
    if exif is not None:
        opts["exif"] = exif
    if xmp is not None:
        opts["xmp"] = xmp
    hf.save(buf, **opts)
    return buf.getvalue()


def libheif_decode(data: bytes) -> np.ndarray:
    """The primary image as libheif decodes it, samples as stored."""
    import pillow_heif

    return np.asarray(pillow_heif.open_heif(data, convert_hdr_to_8bit=False, hdr_to_16bit=False))


def exif_with(**tags: object) -> bytes:
    names = {"orientation": 274, "make": 271, "model": 272}
    ex = Image.Exif()
    for name, value in tags.items():
        ex[names[name]] = value
    return ex.tobytes()


def rgb8(h: int = 16, w: int = 24, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# pixels


@needs_heif
def test_8_bit_heic_reads_exactly_as_libheif_decodes_it(tmp_path):
    data = heic(rgb8())
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(data)
    want = libheif_decode(data).astype(np.float32) / np.float32(255)
    for source in (path, data):
        img, info = read_image(source)
        assert img.dtype == np.float32 and img.shape == (16, 24, 3) and img.flags.c_contiguous
        np.testing.assert_array_equal(img, want)
        assert (info.format, info.bit_depth, info.channels, info.frames, info.alpha) == ("heif", 8, 3, 1, None)
        assert info.orientation_applied == 1 and info.size == (16, 24)
    assert sniff_format(path) == "heif" and probe_size(path) == (16, 24)
    codes, depth = read_image_codes(path)
    np.testing.assert_array_equal(codes, libheif_decode(data))
    assert depth == 8


@needs_heif
@pytest.mark.parametrize("bits", [10, 12])
def test_10_and_12_bit_heic_keep_their_depth(monkeypatch, bits):
    import pillow_heif

    monkeypatch.setattr(pillow_heif.options, "SAVE_HDR_TO_12_BIT", bits == 12)
    top = (1 << bits) - 1
    codes = (np.random.default_rng(1).random((16, 24, 3)) * top).astype(np.uint16)
    data = heic(codes, bits=bits)
    stored = libheif_decode(data)
    assert stored.dtype == np.uint16 and stored.max() > 255 and stored.max() <= top
    img, info = read_image(data)
    assert info.bit_depth == 16
    np.testing.assert_array_equal(img, stored.astype(np.float32) / np.float32(top))  # k / (2**b - 1): the TIFF rule
    assert _probe_depth(data)[1] == 16
    assert read_image_codes(data)[0].dtype == np.uint16
    out = write_image(None, img, info)  # default output: 16-bit PNG, the exact values rounded
    back, back_info = read_image(out)
    assert out[:4] == b"\x89PNG" and back_info.bit_depth == 16
    np.testing.assert_array_equal(back, quantize(img, 16).astype(np.float32) / np.float32(65535))


@needs_heif
def test_alpha_is_passed_through():
    rgba = (np.random.default_rng(2).random((16, 24, 4)) * 255).astype(np.uint8)
    data = heic(rgba)
    stored = libheif_decode(data)
    img, info = read_image(data)
    assert info.channels == 4 and info.alpha is not None
    np.testing.assert_array_equal(info.alpha, stored[..., 3].astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(img, stored[..., :3].astype(np.float32) / np.float32(255))
    out = write_image(None, img, info)  # PNG, alpha kept bit-exactly
    assert out[:4] == b"\x89PNG"
    np.testing.assert_array_equal(read_image(out)[1].alpha, info.alpha)


@needs_heif
def test_premultiplied_alpha_is_made_straight():
    import pillow_heif

    colour = np.random.default_rng(8).random((16, 24, 3)) * 255
    alpha = np.full((16, 24, 1), 128.0)
    stored = np.concatenate([np.round(colour * alpha / 255), alpha], axis=2).astype(np.uint8)
    hf = pillow_heif.from_bytes("RGBA", (24, 16), stored.tobytes())
    hf[0].premultiplied_alpha = True  # the alpha plane says the colour is premultiplied
    buf = io.BytesIO()
    hf.save(buf, quality=-1, chroma=444)
    img, info = read_image(buf.getvalue())
    assert np.abs(img * 255 - colour).max() < 4  # straight colour back (premultiplied, half of it)
    assert np.abs(info.alpha * 255 - 128).max() <= 1


@needs_heif
def test_grey_heic_reads_as_grey():
    grey = (np.random.default_rng(3).random((16, 24)) * 255).astype(np.uint8)
    data = heic(grey)
    img, info = read_image(data)
    assert info.channels == 1
    np.testing.assert_array_equal(img, np.repeat(libheif_decode(data).reshape(16, 24, 1), 3, axis=2) / np.float32(255))
    assert Image.open(io.BytesIO(write_image(None, img, info, format="png"))).mode == "L"


@needs_heif
def test_a_grey_heic_s_nclx_colour_space_becomes_a_grey_profile():
    # linear light (BT.2020, transfer 8): an RGB profile on the grey output would be rejected by
    # readers, who would show the linear greys as sRGB (too dark)
    from PIL import ImageCms

    greys = np.tile(np.arange(0, 256, 15, dtype=np.uint8), (8, 1))
    img, info = read_image(heic(greys, color_primaries=9, transfer_characteristics=8, matrix_coefficients=6))
    assert info.channels == 1 and info.icc_profile[16:20] == b"GRAY" and info.color_space_dropped is None
    to_srgb = ImageCms.buildTransform(ImageCms.ImageCmsProfile(io.BytesIO(info.icc_profile)), ImageCms.createProfile("sRGB"),
                                      "L", "RGB")
    for fmt in ("png", "jpeg", "tiff"):
        with Image.open(io.BytesIO(write_image(None, img, info, format=fmt))) as im:
            assert im.mode == "L" and im.info["icc_profile"] == info.icc_profile
            shown = ImageCms.applyTransform(im, to_srgb)
            linear = np.asarray(im, np.float64) / 255
        want = np.round(srgb_encode(linear) * 255)
        np.testing.assert_allclose(np.asarray(shown)[..., 1], want, atol=2, err_msg=fmt)


# --------------------------------------------------------------------------------------------
# orientation


@needs_heif
@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_orientation_is_applied_once(orientation):
    # the encoder stores EXIF orientation o as irot/imir transformations and keeps the EXIF
    # tag as it is: an iPhone's photo. The pixels are turned by the transformations only.
    plain, _ = read_image(heic(rgb8()))
    data = heic(rgb8(), exif=exif_with(orientation=orientation, make="Apple"))
    img, info = read_image(data)
    np.testing.assert_array_equal(img, apply_orientation(plain, orientation))
    assert info.orientation_applied == orientation
    assert read_orientation(info.exif) == 1 and b"Apple" in info.exif
    assert probe_size(data) == img.shape[:2]


@needs_heif
def test_exif_6_of_a_turned_heic_is_not_applied_again(tmp_path):
    data = heic(rgb8(16, 24), exif=exif_with(orientation=6))
    img, info = read_image(data)
    assert img.shape[:2] == (24, 16) and info.orientation_applied == 6  # once, not twice (16 x 24 again)
    jpeg = write_image(None, img, info, format="jpeg")
    with Image.open(io.BytesIO(jpeg)) as im:
        assert im.size == (16, 24) and im.getexif().get(274) == 1


@needs_heif
def test_a_stale_exif_orientation_is_reset_not_applied():
    # written upright (no irot/imir), then the tags edited in place to say 6: stale tags
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description tiff:Orientation="1"/></rdf:RDF></x:xmpmeta>'
    upright = heic(rgb8(), exif=exif_with(orientation=1, make="Cam"), xmp=xmp)
    marker = exif_with(orientation=1, make="Cam")[6:]
    stale = upright.replace(marker, exif_with(orientation=6, make="Cam")[6:]).replace(b'Orientation="1"', b'Orientation="6"')
    assert stale.count(b'Orientation="6"') == 1 and len(stale) == len(upright)
    assert read_orientation(stale[stale.index(b"MM\x00*") - 6 :]) == 6
    img, info = read_image(stale)
    np.testing.assert_array_equal(img, read_image(upright)[0])
    assert info.orientation_applied == 1 and read_orientation(info.exif) == 1
    assert b'tiff:Orientation="1"' in info.xmp and b'tiff:Orientation="6"' not in info.xmp


def test_orientation_of_libheif_transformations():
    assert heif_mod.orientation_of(()) == 1
    assert heif_mod.orientation_of((("clap", 0, 0, 40, 48, 64, 64), ("irot", 270))) == 6
    assert heif_mod.orientation_of((("irot", 90),)) == 8
    assert heif_mod.orientation_of((("irot", 270), ("imir", 0))) == 7
    assert heif_mod.orientation_of((("imir", 1),)) == 2
    assert heif_mod.orientation_of("garbage") == 1


# --------------------------------------------------------------------------------------------
# metadata and colour


def icc_tag_xyz(profile: bytes, signature: bytes) -> list[float]:
    """The XYZ value of an ICC profile's XYZType tag, found through the tag table."""
    (count,) = struct.unpack(">I", profile[128:132])
    for i in range(count):
        sig, offset, _size = struct.unpack(">4sII", profile[132 + 12 * i : 144 + 12 * i])
        if sig == signature:
            return (np.frombuffer(profile[offset + 8 : offset + 20], ">i4") / 65536).tolist()
    raise KeyError(signature)


@needs_heif
def test_icc_exif_and_xmp_are_carried_into_outputs():
    p3 = icc_mod.rgb_profile("Display P3", heif_mod.DISPLAY_P3_PRIMARIES, icc_mod.D65, "srgb")
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description dc:title="beach"/></rdf:RDF></x:xmpmeta>'
    data = heic(rgb8(), exif=exif_with(make="Apple", model="iPhone 15"), xmp=xmp, icc_profile=p3)
    img, info = read_image(data)
    assert info.icc_profile == p3 and info.color_space_dropped is None
    assert b"iPhone 15" in info.exif and b'dc:title="beach"' in info.xmp
    for fmt in ("jpeg", "png"):
        with Image.open(io.BytesIO(write_image(None, img, info, format=fmt))) as im:
            assert im.info.get("icc_profile") == p3
            assert im.getexif().get(272) == "iPhone 15"
            assert b"beach" in (im.info.get("xmp") or im.info.get("XML:com.adobe.xmp", "").encode())


@needs_heif
def test_nclx_colour_becomes_a_profile_or_is_said():
    def read_nclx(primaries: int, transfer: int):
        return read_image(heic(rgb8(), color_primaries=primaries, transfer_characteristics=transfer, matrix_coefficients=6))[1]

    srgb = read_nclx(1, 13)
    assert srgb.icc_profile is None and srgb.color_space_dropped is None
    p3 = read_nclx(12, 13)
    assert p3.icc_profile == heif_mod.nclx_profile({"color_primaries": 12, "transfer_characteristics": 13})[0]
    assert b"Display P3" in p3.icc_profile
    want = icc_mod.colorants(heif_mod.DISPLAY_P3_PRIMARIES, icc_mod.D65)
    assert icc_tag_xyz(p3.icc_profile, b"rXYZ") == pytest.approx(want[:, 0].tolist(), abs=1e-4)
    assert icc_tag_xyz(p3.icc_profile, b"gXYZ") == pytest.approx(want[:, 1].tolist(), abs=1e-4)
    linear = read_nclx(9, 8)  # BT.2020 primaries, linear light
    assert linear.icc_profile is not None and b"BT.2020 primaries, linear" in linear.icc_profile
    pq = read_nclx(9, 16)  # HDR: no profile says it; not silently sRGB
    assert pq.icc_profile is None and "PQ" in pq.color_space_dropped
    job = Job("x", Path("x.heic"), Path("x.jpg"), "x.heic", "jpeg")
    notes = " ".join(_what_is_not_kept(job, pq, OutputOptions()))
    assert "PQ (HDR" in notes and "untagged, which readers take for sRGB" in notes
    assert not _what_is_not_kept(job, p3, OutputOptions())


# --------------------------------------------------------------------------------------------
# several images, thumbnails, gain maps


@needs_heif
def test_frames_count_top_level_images_and_the_primary_is_read():
    import pillow_heif

    first, second = rgb8(seed=4), rgb8(seed=5)
    hf = pillow_heif.from_bytes("RGB", (24, 16), first.tobytes())
    hf.add_frombytes("RGB", (24, 16), second.tobytes())
    buf = io.BytesIO()
    hf.save(buf, quality=-1, chroma=444, primary_index=1)
    img, info = read_image(buf.getvalue())
    assert info.frames == 2
    assert np.abs(img * 255 - second).max() <= 2 and np.abs(img * 255 - first).max() > 100
    job = Job("x", Path("x.heic"), Path("x.jpg"), "x.heic", "jpeg")
    assert _what_is_not_kept(job, info, OutputOptions()) == ["only the primary image of the 2 in the HEIF file (a burst, a collection) was deblurred"]


@needs_heif
def test_thumbnails_are_no_frames():
    big = (np.random.default_rng(6).random((64, 96, 3)) * 255).astype(np.uint8)
    img, info = read_image(heic(big, thumbnails=[32]))
    assert info.frames == 1 and img.shape == (64, 96, 3) and not info.hdr_gain_map_dropped


def _box(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(body), kind) + body


def iso_gain_map_heic(arr: np.ndarray, *, brand: bool = True) -> bytes:
    """``arr`` as a HEIC laid out as an ISO 21496-1 HDR photo (iOS 18, Android): beside the primary
    image, a ``tmap`` (tone-mapped) derived item made from it (``dimg``), offered as its
    alternative (an ``altr`` group), and the ``tmap`` brand in ``ftyp`` (without it: ``brand``).
    The item is the encoder's thumbnail, retyped; libheif lists neither it nor the gain map."""
    data = bytearray(heic(arr, thumbnails=[16]))
    second_infe = data.index(b"infe", data.index(b"infe") + 4)
    at = data.index(b"hvc1", second_infe)
    data[at : at + 4] = b"tmap"
    at = data.index(b"thmb")  # the thumbnail's reference to the primary image becomes its input
    data[at : at + 4] = b"dimg"
    (ftyp_size,) = struct.unpack(">I", data[:4])
    ftyp = _box(b"ftyp", bytes(data[8:ftyp_size]) + (b"tmap" if brand else b""))
    (meta_size,) = struct.unpack(">I", data[ftyp_size : ftyp_size + 4])
    altr = _box(b"altr", b"\0\0\0\0" + struct.pack(">IIII", 100, 2, 2, 1))  # group 100: items 2 and 1
    meta = _box(b"meta", bytes(data[ftyp_size + 8 : ftyp_size + meta_size]) + _box(b"grpl", altr))
    shift = len(ftyp) + len(meta) - ftyp_size - meta_size  # the media data moves by as much
    out = bytearray(ftyp + meta + data[ftyp_size + meta_size :])
    at = out.index(b"iloc") + 4
    assert out[at : at + 6] == b"\0\0\0\0\x44\x40"  # version 0; offsets, lengths, base offsets of 4 bytes
    (items,) = struct.unpack(">H", out[at + 6 : at + 8])
    at += 8
    for _ in range(items):  # item id, data reference index, base offset, extents
        (base,) = struct.unpack(">I", out[at + 4 : at + 8])
        out[at + 4 : at + 8] = struct.pack(">I", base + shift)
        (extents,) = struct.unpack(">H", out[at + 8 : at + 10])
        at += 10 + 8 * extents
    return bytes(out)


def test_ftyp_brands():
    ftyp = _box(b"ftyp", b"heic\0\0\0\0mif1tmapheic")
    assert heif_mod.ftyp_brands(ftyp + b"\0\0\0\x08free") == {b"heic", b"mif1", b"tmap"}
    assert heif_mod.ftyp_brands(ftyp[:-4]) == {b"heic", b"mif1", b"tmap"}  # cut short: the brands read
    assert heif_mod.ftyp_brands(b"\x89PNG\r\n\x1a\n" + bytes(16)) == frozenset() == heif_mod.ftyp_brands(b"")


@needs_heif
def test_iso_gain_map_is_recognised_by_the_tmap_brand(tmp_path):
    photo = rgb8(32, 48, seed=9)
    data = iso_gain_map_heic(photo)
    path = tmp_path / "IMG_0002.HEIC"
    path.write_bytes(data)
    for source in (path, data):
        img, info = read_image(source)
        assert info.frames == 1 and info.hdr_gain_map_dropped  # the base image, and said
        np.testing.assert_array_equal(img, read_image(heic(photo))[0])
        assert probe_heif(source).gain_map
    job = Job("x", path, Path("x.jpg"), str(path), "jpeg")
    notes = _what_is_not_kept(job, read_image(path)[1], OutputOptions())
    assert notes == ["the HEIF's HDR gain map was dropped: the output is its SDR rendition"]
    unbranded = iso_gain_map_heic(photo, brand=False)
    assert not read_image(unbranded)[1].hdr_gain_map_dropped and not probe_heif(unbranded).gain_map


def test_apple_gain_map_is_recognised_by_its_auxiliary_type():
    assert heif_mod.has_gain_map({"urn:com:apple:photo:2020:aux:hdrgainmap": [5]})
    assert not heif_mod.has_gain_map({"urn:com:apple:photo:2018:aux:portraiteffectsmatte": [4]})
    assert not heif_mod.has_gain_map({}) and not heif_mod.has_gain_map(None)


# --------------------------------------------------------------------------------------------
# limits and damage


@needs_heif
def test_pixel_limit_is_checked_before_decoding(monkeypatch):
    data = heic(rgb8())

    def never(_heif_file):
        raise AssertionError("decoded although over the limit")

    monkeypatch.setattr(heif_mod, "decode", never)
    with pytest.raises(ImageError, match=r"<stdin>: image is too large: 24x16 = 384 pixels exceeds the limit of 383"):
        read_image(data, max_pixels=383)


@needs_heif
def test_damaged_heic_raises_one_line_image_errors(tmp_path):
    data = heic(rgb8(32, 48))
    cuts = [12, 40, 100, len(data) // 3, len(data) // 2, len(data) - 20, len(data) - 1]
    cases = {f"cut{n}.heic": data[:n] for n in cuts}
    rng = np.random.default_rng(7)
    for i in range(12):  # flipped bytes: an error, or pixels of the right shape; never a traceback
        flipped = bytearray(data)
        for at in rng.integers(24, len(data), 4):
            flipped[at] ^= 0xFF
        cases[f"flip{i}.heic"] = bytes(flipped)
    refused = set()
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        for read in (read_image, probe_size):
            try:
                result = read(path)
            except ImageError as exc:
                assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc), str(exc)
                refused.add((name, read.__name__))
            else:
                assert read is probe_size or result[0].shape == (32, 48, 3)
    # a truncated file never reads (its probe may, from a header before the cut)
    assert {(f"cut{n}.heic", "read_image") for n in cuts} <= refused
    (tmp_path / "empty.heic").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        read_image(tmp_path / "empty.heic")


# --------------------------------------------------------------------------------------------
# folders, probes, formats


@needs_heif
def test_heic_files_in_folders_are_taken_not_said_unread(tmp_path):
    for name in ("a.HEIC", "b.heic", "c.heif", "d.hif", "e.webp", ".hidden.heic"):
        (tmp_path / name).write_bytes(b"\0")
    assert [p.name for p in list_images(tmp_path)] == ["a.HEIC", "b.heic", "c.heif", "d.hif"]
    assert unread_images([tmp_path]) == {"WebP": 1}
    assert is_image_path("IMG_0001.HEIC")


@needs_heif
def test_default_output_format_of_a_heic():
    assert default_format("heif", 8, False) == "jpeg"
    assert default_format("heif", 16, False) == default_format("heif", 8, True) == "png"
    assert default_format("raw", 16, False) == "tiff" and default_format("png", 8, False) == "png"
    img, info = read_image(heic(rgb8()))
    assert write_image(None, img, info)[:3] == b"\xff\xd8\xff"  # 8-bit: JPEG
    head = probe_heif(heic(rgb8(), exif=exif_with(orientation=6)))
    assert (head.width, head.height, head.bit_depth, head.alpha, head.orientation) == (16, 24, 8, False, 6)
    with pytest.raises(ImageError, match="cannot write HEIC"):
        write_image("out.heic", img, info)


def test_without_pillow_heif_heic_is_refused_saying_how_to_read_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # import pillow_heif raises ImportError
    heif_mod.available.cache_clear()
    try:
        assert not heif_mod.available()
        # the ftyp box and meta of an iPhone photo: its first bytes decide
        head = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00\x00\x00\x08free" * 8
        (tmp_path / "IMG_0001.HEIC").write_bytes(head)
        with pytest.raises(ImageError) as caught:
            read_image(tmp_path / "IMG_0001.HEIC")
        message = str(caught.value)
        assert "convert them to JPEG, PNG or TIFF" in message and 'pip install "kpac[heic]"' in message
        assert not is_image_path("IMG_0001.HEIC") and list_images(tmp_path) == []
        assert unread_images([tmp_path]) == {"HEIC": 1}
        res = runner.invoke(app, ["deblur", str(tmp_path), "-o", str(tmp_path / "out")])
        assert res.exit_code == 2 and 'pip install "kpac[heic]"' in res.output
    finally:
        monkeypatch.undo()
        heif_mod.available.cache_clear()


# --------------------------------------------------------------------------------------------
# kpac deblur, with the shipped default model


def _photo(h: int = 40, w: int = 56) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 4) % 256, (y * 6) % 256, ((x + y) * 3) % 256], axis=-1).astype(np.uint8)


@needs_heif
def test_deblur_a_heic_end_to_end(tmp_path):
    p3 = icc_mod.rgb_profile("Display P3", heif_mod.DISPLAY_P3_PRIMARIES, icc_mod.D65, "srgb")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "IMG_0001.HEIC").write_bytes(heic(_photo(), exif=exif_with(orientation=6, make="Apple"), icc_profile=p3))
    (photos / "notes.webp").write_bytes(b"\0")
    res = runner.invoke(app, ["deblur", str(photos / "IMG_0001.HEIC"), "-o", str(tmp_path / "out") + "/"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out" / "IMG_0001.jpg"  # 8-bit HEIC -> JPEG
    with Image.open(out) as im:
        assert im.format == "JPEG" and im.size == (40, 56)  # turned once: 56 high
        assert im.getexif().get(274) == 1 and im.getexif().get(271) == "Apple" and im.info["icc_profile"] == p3
    res = runner.invoke(app, ["deblur", str(photos), "-o", str(tmp_path / "tif"), "--format", "tiff"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "tif" / "IMG_0001.tif").exists()
    said = " ".join(res.stderr.split())
    assert "1 WebP file" in said and "HEIC" not in said  # the note counts only what kpac does not read
    res = runner.invoke(app, ["deblur", "-", "-o", str(tmp_path / "stdin.jpg")], input=(photos / "IMG_0001.HEIC").read_bytes())
    assert res.exit_code == 0, res.output
    assert read_image(tmp_path / "stdin.jpg")[0].shape == (56, 40, 3)


@needs_heif
def test_deblur_a_10_bit_heic_writes_16_bit_png(tmp_path):
    codes = (_photo().astype(np.uint16) * 4).clip(0, 1023)
    (tmp_path / "hdr.heic").write_bytes(heic(codes, bits=10))
    res = runner.invoke(app, ["deblur", str(tmp_path / "hdr.heic"), "-o", str(tmp_path / "out") + "/"])
    assert res.exit_code == 0, res.output
    img, info = read_image(tmp_path / "out" / "hdr.png")
    assert info.format == "png" and info.bit_depth == 16 and img.shape == (40, 56, 3)
    assert not re.search(r"frames|8 bits", res.output)


@needs_heif
def test_bit_depth_16_makes_an_8_bit_heic_s_output_a_16_bit_png(tmp_path):
    """kpac chooses a HEIC's output format: with --bit-depth 16 it is one that holds 16 bits
    (PNG), not the 8-bit photo's JPEG, which would be written as 8 bits with a note."""
    (tmp_path / "IMG_0002.HEIC").write_bytes(heic(_photo()))
    res = runner.invoke(app, ["deblur", str(tmp_path / "IMG_0002.HEIC"), "-o", str(tmp_path / "out") + "/", "--bit-depth", "16"])
    assert res.exit_code == 0, res.output
    img, info = read_image(tmp_path / "out" / "IMG_0002.png")
    assert info.bit_depth == 16 and not (tmp_path / "out" / "IMG_0002.jpg").exists()
    assert "8 bits" not in res.output


def test_nclx_chromaticities_of_no_colour_space_give_no_profile():
    # every primary on one point: no profile can be made, and the colour space is said
    same = {f"color_primary_{c}_{a}": 0.3 for c in ("red", "green", "blue", "white") for a in ("x", "y")}
    assert heif_mod.nclx_profile({"color_primaries": 9, "transfer_characteristics": 13, **same}) == (None, "colour primaries code 9")
