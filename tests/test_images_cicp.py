"""HDR codings in PNG's cICP chunk (PNG third edition): a PQ or HLG HEIC's PNG output says its
coding in one, a PNG input's cICP is carried to PNG outputs and said to be lost by TIFF and JPEG
ones (never claimed to be sRGB), SDR outputs stay as they were; and 16-bit HEIF samples."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from kpac_cli.images import heif as heif_mod
from kpac_cli.images import icc as icc_mod
from kpac_cli.images import png as png_mod
from kpac_cli.images import read_image, read_image_codes, write_image
from kpac_cli.images.base import quantize
from kpac_cli.images.io import _heif_samples, color_space_note

needs_heif = pytest.mark.skipif(not heif_mod.available(), reason='pillow-heif is not installed (pip install "kpac[heic]")')

SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: The chunks that say a colour space of their own, which must not contradict a cICP made by kpac.
OTHER_COLOUR_CHUNKS = {b"iCCP", b"sRGB", b"gAMA", b"cHRM"}


def chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def chunks_of(data: bytes) -> list[tuple[bytes, bytes]]:
    """``(type, payload)`` of every chunk of a PNG file, in order, each CRC checked."""
    assert data.startswith(SIGNATURE)
    out, pos = [], len(SIGNATURE)
    while pos < len(data):
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        payload = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(ctype + payload), ctype
        out.append((ctype, payload))
        pos += 12 + length
    return out


def png_with(pixels: np.ndarray, before_idat: bytes = b"", after_idat: bytes = b"") -> bytes:
    """An 8-bit RGB PNG of ``pixels`` with ``before_idat`` / ``after_idat`` chunks."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)
    return (SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + before_idat
            + chunk(b"IDAT", zlib.compress(raw)) + after_idat + chunk(b"IEND", b""))


def rgb8(h: int = 12, w: int = 16, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def heic_10_bit(**nclx: int) -> bytes:
    """A 10-bit RGB HEIC (as HDR photos are), near-lossless, with the nclx codes given."""
    import pillow_heif

    codes = (np.random.default_rng(3).random((12, 16, 3)) * 1023).astype(np.uint16)
    hf = pillow_heif.from_bytes("RGB;16", (16, 12), (codes << 6).tobytes())
    buf = io.BytesIO()
    hf.save(buf, quality=-1, chroma=444, matrix_coefficients=9, full_range_flag=0, **nclx)
    return buf.getvalue()


def assert_cicp_right(data: bytes, payload: bytes) -> None:
    """``data`` is a PNG with one cICP chunk of ``payload``, right after IHDR (before PLTE and
    IDAT, as the spec requires), and no other chunk saying a colour space."""
    types = [t for t, _ in chunks_of(data)]
    assert types[:2] == [b"IHDR", b"cICP"] and types.count(b"cICP") == 1
    assert types.index(b"cICP") < types.index(b"IDAT")
    assert dict(chunks_of(data))[b"cICP"] == payload
    assert not OTHER_COLOUR_CHUNKS & set(types)


# --------------------------------------------------------------------------------------------
# HDR HEIC -> PNG


@needs_heif
@pytest.mark.parametrize("primaries,transfer", [(9, 16), (9, 18), (12, 16)])  # BT.2020 PQ, HLG; Display P3 PQ
def test_an_hdr_heic_s_png_output_says_its_coding_in_a_cicp_chunk(primaries, transfer):
    img, info = read_image(heic_10_bit(color_primaries=primaries, transfer_characteristics=transfer))
    assert info.icc_profile is None and "HDR" in info.color_space_dropped
    payload = bytes([primaries, transfer, 0, 1])  # RGB, full range: libheif hands RGB in full range
    for depth in (None, 8):  # the default 16-bit PNG, and the 8 bits Pillow writes
        data = write_image(None, img, info, bit_depth=depth)
        assert_cicp_right(data, payload)
        back, again = read_image(data)
        assert again.bit_depth == (depth or 16) and again.png_chunks == ((b"cICP", payload),)
        assert again.icc_profile is None and again.color_space_dropped == info.color_space_dropped
        assert_cicp_right(write_image(None, back, again), payload)  # and on to the next PNG
    with Image.open(io.BytesIO(write_image(None, img, info))) as im:  # other readers read the file
        im.load()


@needs_heif
def test_the_note_of_an_hdr_heic_says_what_each_output_holds():
    _img, info = read_image(heic_10_bit(color_primaries=9, transfer_characteristics=16))
    assert color_space_note(info, "png") == ("no ICC profile can say the input's colour space (the PQ (HDR, SMPTE ST 2084) "
                                             "transfer characteristics): the PNG says it in a cICP chunk, which HDR-capable "
                                             "browsers and viewers read")
    for fmt in ("jpeg", "tiff", "tif", "jpg"):
        note = color_space_note(info, fmt)
        assert "PQ (HDR" in note and "untagged, which readers take for sRGB" in note and "--format png" in note
        assert note.split(": the ")[1].startswith({"tif": "TIFF", "jpg": "JPEG"}.get(fmt, fmt.upper()))


@needs_heif
@pytest.mark.parametrize("nclx", [dict(color_primaries=1, transfer_characteristics=13),  # sRGB
                                  dict(color_primaries=12, transfer_characteristics=13),  # Display P3
                                  dict(color_primaries=9, transfer_characteristics=8)])  # BT.2020, linear
def test_sdr_heic_outputs_have_no_cicp_and_stay_as_they_were(nclx):
    img, info = read_image(heic_10_bit(**nclx))
    assert info.png_chunks == () and info.color_space_dropped is None and color_space_note(info, "png") is None
    data = write_image(None, img, info)
    assert b"cICP" not in [t for t, _ in chunks_of(data)]
    # byte for byte what the 16-bit encoder writes of the pixels and the profile alone
    assert data == png_mod.encode16(quantize(img, 16), icc_profile=info.icc_profile, exif=info.exif)


# --------------------------------------------------------------------------------------------
# PNG inputs with a cICP chunk

PQ_BT2020 = bytes([9, 16, 0, 1])


@pytest.mark.parametrize("bits", [8, 16])
def test_a_png_s_cicp_is_carried_to_png_outputs(bits):
    src = png_with(rgb8(), chunk(b"cICP", PQ_BT2020))
    img, info = read_image(src)
    assert info.png_chunks == ((b"cICP", PQ_BT2020),) and info.icc_profile is None
    assert "PQ (HDR" in info.color_space_dropped
    assert_cicp_right(write_image(None, img, info, format="png", bit_depth=bits), PQ_BT2020)
    assert color_space_note(info, "png") is None  # nothing is lost


@pytest.mark.parametrize("fmt", ["tiff", "jpeg"])
def test_tiff_and_jpeg_outputs_of_an_hdr_png_claim_nothing_and_say_the_coding_is_lost(fmt):
    img, info = read_image(png_with(rgb8(), chunk(b"cICP", PQ_BT2020)))
    data = write_image(None, img, info, format=fmt)
    if fmt == "tiff":
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            assert 34675 not in tif.pages.first.tags  # no ICC profile, sRGB or other
    else:
        with Image.open(io.BytesIO(data)) as im:
            assert "icc_profile" not in im.info and b"ICC_PROFILE" not in data and b"sRGB" not in data
    note = color_space_note(info, fmt)
    assert note == (f"no ICC profile can say the input's colour space (the PQ (HDR, SMPTE ST 2084) transfer characteristics): "
                    f"the {fmt.upper()} is written untagged, which readers take for sRGB (a PNG output keeps it in a cICP "
                    "chunk: --format png)")


def test_an_hdr_png_s_stand_in_profile_is_kept_and_said_to_be_one():
    # a PQ PNG with gAMA/cHRM for readers that know no cICP: TIFF and JPEG get their profile
    linear = chunk(b"gAMA", struct.pack(">I", 100000))
    img, info = read_image(png_with(rgb8(), chunk(b"cICP", PQ_BT2020) + linear))
    assert info.icc_profile is not None and "PQ" in info.color_space_dropped
    assert "stand-in ICC profile, which does not say it" in color_space_note(info, "tiff")
    data = write_image(None, img, info, format="png")
    types = [t for t, _ in chunks_of(data)]
    assert types[:2] == [b"IHDR", b"cICP"] and b"gAMA" in types  # the file's own, copied


def test_a_png_s_sdr_cicp_becomes_the_profile_of_outputs_that_cannot_hold_it(tmp_path):
    # Display P3 and BT.2020 (sRGB's curve) said by cICP alone: untagged they would read as sRGB
    for payload, primaries in ((bytes([12, 13, 0, 1]), heif_mod.DISPLAY_P3_PRIMARIES),
                               (bytes([9, 1, 0, 1]), ((0.708, 0.292), (0.170, 0.797), (0.131, 0.046)))):
        img, info = read_image(png_with(rgb8(), chunk(b"cICP", payload)))
        assert info.color_space_dropped is None and color_space_note(info, "jpeg") is None
        write_image(tmp_path / "out.tif", img, info)
        profile = read_image(tmp_path / "out.tif")[1].icc_profile
        assert profile == info.icc_profile is not None
        want = icc_mod.colorants(primaries, icc_mod.D65)
        for i, tag in enumerate((b"rXYZ", b"gXYZ", b"bXYZ")):
            at = profile.index(tag, 128)  # the tag table entry: signature, offset, size
            offset = struct.unpack(">I", profile[at + 4 : at + 8])[0]
            got = np.frombuffer(profile[offset + 8 : offset + 20], ">i4") / 65536
            np.testing.assert_allclose(got, want[:, i], atol=1e-4)


def test_cicp_comes_before_gama_and_chrm():
    # cICP says sRGB: untagged is right, whatever the gAMA (linear) says to readers without cICP
    linear = chunk(b"gAMA", struct.pack(">I", 100000))
    _img, info = read_image(png_with(rgb8(), chunk(b"cICP", bytes([1, 13, 0, 1])) + linear))
    assert info.icc_profile is None and info.color_space_dropped is None
    _img, info = read_image(png_with(rgb8(), linear))  # without it, gAMA's colour space is the profile
    assert info.icc_profile is not None


def test_narrow_range_samples_are_said_to_be_left_unsaid():
    _img, info = read_image(png_with(rgb8(), chunk(b"cICP", bytes([1, 13, 0, 0]))))
    assert info.icc_profile is None and info.color_space_dropped == "narrow-range (video) samples"


@pytest.mark.parametrize("before,after", [
    (chunk(b"cICP", bytes([9, 16, 1, 1])), b""),  # matrix coefficients other than 0: PNG is RGB
    (chunk(b"cICP", bytes([9, 16, 0, 2])), b""),  # a range flag other than 0 and 1
    (chunk(b"cICP", bytes([9, 16, 0])), b""),  # short
    (b"", chunk(b"cICP", PQ_BT2020)),  # after the image data
])
def test_a_cicp_the_spec_does_not_allow_is_not_kept(before, after):
    img, info = read_image(png_with(rgb8(), before, after))
    assert info.png_chunks == () and info.color_space_dropped is None
    assert b"cICP" not in [t for t, _ in chunks_of(write_image(None, img, info))]


def test_only_the_first_cicp_is_kept():
    second = bytes([12, 18, 0, 1])
    img, info = read_image(png_with(rgb8(), chunk(b"cICP", PQ_BT2020) + chunk(b"cICP", second)))
    assert info.png_chunks == ((b"cICP", PQ_BT2020),)
    assert_cicp_right(write_image(None, img, info), PQ_BT2020)


# --------------------------------------------------------------------------------------------
# 16-bit HEIF samples (an uncompressed HEIF's; x265 writes at most 12 bits, so none is made here)


def test_16_bit_heif_samples_are_read_as_a_16_bit_tiff_s():
    codes = np.array([[[0, 1, 65535], [257, 32768, 65534]]], np.uint16)
    arr, depth = _heif_samples(None, codes, 16)
    assert depth == 16 and arr is codes


@needs_heif
def test_a_16_bit_heif_reads_and_writes_its_exact_codes(monkeypatch):
    # libheif's 16-bit samples (pillow-heif's "RGB;16" mode) stood in for an 8-bit file's
    import dataclasses

    codes = (np.random.default_rng(5).random((12, 16, 3)) * 65535).astype(np.uint16)
    codes[0, 0] = (0, 1, 65535)
    header = heif_mod.header
    monkeypatch.setattr(heif_mod, "header", lambda f: dataclasses.replace(header(f), bit_depth=16))
    monkeypatch.setattr(heif_mod, "decode", lambda f: codes)
    data = heic_8_bit()
    img, info = read_image(data)
    assert info.bit_depth == 16
    np.testing.assert_array_equal(img, codes.astype(np.float32) / np.float32(65535))
    got, depth = read_image_codes(data)
    assert depth == 16 and np.array_equal(got, codes)
    back = chunks_of(out := write_image(None, img, info))  # default output: 16-bit PNG
    assert struct.unpack(">IIB", back[0][1][:9])[2] == 16
    assert np.array_equal(read_image_codes(out)[0], codes)


def heic_8_bit() -> bytes:
    import pillow_heif

    buf = io.BytesIO()
    pillow_heif.from_bytes("RGB", (16, 12), rgb8().tobytes()).save(buf, quality=-1, chroma=444)
    return buf.getvalue()
