"""Camera RAW input: half-size development and its pixel limit, a DNG's default crop, damaged
files, RAW dual-pixel views."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kpac_cli.checkpoints import save_checkpoint
from kpac_cli.cli import app
from kpac_cli.images import DualPixelTriple, ImageError, RawOptions, probe_size, read_dual_pixel, read_image, srgb_decode, srgb_encode
from kpac_cli.images.exif import apply_orientation
from kpac_cli.model import KPACConfig, build_model


def _raw(shared_dir, name: str):
    p = shared_dir / "samples" / "raw" / name
    if not p.is_file():
        pytest.skip(f"{name} not in the reference material")
    return p


def _binned(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    return img.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))


@pytest.mark.shared
def test_half_size_halves_a_raw_without_a_mosaic(shared_dir):
    # canon_eos_6d.dng is a linear DNG (already demosaiced): LibRaw ignores half_size for it
    p = _raw(shared_dir, "canon_eos_6d.dng")
    full, _ = read_image(p)
    half, info = read_image(p, raw_options=RawOptions(half_size=True))
    assert half.shape == (408, 612, 3) and info.size == (408, 612) and info.bit_depth == 16
    # binned in linear light, as LibRaw bins a Bayer cell, then put back on the sRGB curve
    assert np.abs(half - srgb_encode(_binned(srgb_decode(full)))).max() < 1e-4
    full_lin, _ = read_image(p, raw_options=RawOptions(gamma="linear"))
    half_lin, _ = read_image(p, raw_options=RawOptions(gamma="linear", half_size=True))
    assert np.abs(half_lin - _binned(full_lin)).max() < 1e-4


@pytest.mark.shared
def test_pixel_limit_counts_what_is_developed_at_half_size(shared_dir):
    # a file without a mosaic is developed at full size before it is halved: the limit sees that
    canon = _raw(shared_dir, "canon_eos_6d.dng")
    with pytest.raises(ImageError, match=r"too large: 1224x816 = 998,784 pixels"):
        read_image(canon, max_pixels=500_000, raw_options=RawOptions(half_size=True))
    assert read_image(canon, max_pixels=1_000_000, raw_options=RawOptions(half_size=True))[0].shape == (408, 612, 3)
    # a Bayer file is developed at half size: the message gives that size, with sound arithmetic
    bayer = _raw(shared_dir, "Blackmagic.dng")
    with pytest.raises(ImageError, match=r"too large: 2064x1088 \(half of 4128x2176\) = 2,245,632 pixels exceeds the limit of 1,000,000"):
        read_image(bayer, max_pixels=1_000_000, raw_options=RawOptions(half_size=True))


@pytest.mark.shared
def test_raw_half_size_on_the_command_line(shared_dir, tmp_path):
    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "tiny.safetensors", build_model(KPACConfig(levels=2, channels=8)), {"name": "tiny"})
    dng = _raw(shared_dir, "canon_eos_6d.dng")
    res = CliRunner().invoke(app, ["deblur", str(dng), "-o", str(tmp_path / "out"), "--model", str(model), "--raw-half-size", "--json", "-q"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    (record,) = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert (record["status"], record["width"], record["height"]) == ("ok", 612, 408)
    # the camera's EXIF is read; what the TIFF output cannot carry of it is said, not dropped silently
    assert len(record["notes"]) == 1 and record["notes"][0].startswith("TIFF output carries only the descriptive EXIF tags")
    img, info = read_image(tmp_path / "out" / "canon_eos_6d.tif")
    assert img.shape == (408, 612, 3) and info.bit_depth == 16
    assert _exif_tags(info.exif)[0] == {271: "Canon", 272: "Canon EOS 6D", 305: "Adobe Photoshop Camera Raw 11.3.1 (Macintosh)",
                                        306: "2019:06:06 05:15:13"}
    res = CliRunner().invoke(app, ["deblur", str(dng), "-o", str(tmp_path / "jpeg"), "--model", str(model), "--raw-half-size",
                                   "--format", "jpeg", "--json", "-q"], catch_exceptions=False)
    assert res.exit_code == 0 and json.loads(res.stdout.splitlines()[0])["notes"] == ["JPEG holds 8 bits: written as 8-bit"]
    ifd0, exif_ifd = _exif_tags(read_image(tmp_path / "jpeg" / "canon_eos_6d.jpg")[1].exif)
    assert (ifd0[271], ifd0[272]) == ("Canon", "Canon EOS 6D") and 274 not in ifd0  # LibRaw turned the pixels
    assert exif_ifd[36867] == "2019:06:06 07:29:51" and float(exif_ifd[37381]) == 4.0  # capture time, aperture value


def test_a_dng_s_xmp_is_carried_without_its_develop_settings(shared_dir, tmp_path):
    """What describes the photo (Dublin Core, xmp:, photoshop:) reaches the output; Camera Raw's
    develop settings do not (a reader would apply them to the developed pixels again)."""
    import xml.dom.minidom

    dng = _raw(shared_dir, "canon_eos_6d.dng")
    _, info = read_image(dng, raw_options=RawOptions(half_size=True))
    assert info.xmp is not None and b"crs:" not in info.xmp and b"camera-raw-settings" not in info.xmp
    assert b'xmlns:dc="http://purl.org/dc/elements/1.1/"' in info.xmp and b"xmlns:photoshop=" in info.xmp
    xml.dom.minidom.parseString(info.xmp.decode())  # still well-formed XML
    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "tiny.safetensors", build_model(KPACConfig(levels=2, channels=8)), {"name": "tiny"})
    res = CliRunner().invoke(app, ["deblur", str(dng), "-o", str(tmp_path / "out"), "--model", str(model), "--raw-half-size", "-q"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert read_image(tmp_path / "out" / "canon_eos_6d.tif")[1].xmp == info.xmp


def test_a_dng_without_a_raw_extension_is_sniffed_as_raw(shared_dir, tmp_path):
    """A DNG read from stdin or named .tif is developed as RAW: its format, and so which
    options apply (``--raw-half-size``), must say so, not 'tiff'."""
    from kpac_cli.images import sniff_format

    dng = _raw(shared_dir, "canon_eos_6d.dng")
    renamed = tmp_path / "shot.tif"
    shutil.copyfile(dng, renamed)
    assert sniff_format(dng) == sniff_format(dng.read_bytes()) == sniff_format(renamed) == "raw"
    assert read_image(renamed, raw_options=RawOptions(half_size=True))[1].format == "raw"
    plain = tmp_path / "plain.tif"
    import tifffile

    tifffile.imwrite(plain, np.zeros((4, 5, 3), np.uint16), photometric="rgb")
    assert sniff_format(plain) == sniff_format(plain.read_bytes()) == "tiff"
    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "tiny.safetensors", build_model(KPACConfig(levels=2, channels=8)), {"name": "tiny"})
    res = CliRunner().invoke(app, ["deblur", "-", "-o", str(tmp_path / "out.tif"), "--model", str(model), "--raw-half-size",
                                   "--json", "-q"], input=dng.read_bytes(), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "--raw-half-size" not in res.output  # no "changes nothing here" warning: it halved the photo
    assert read_image(tmp_path / "out.tif")[0].shape == (408, 612, 3)


@pytest.mark.shared
def test_a_bayer_dng_keeps_what_exif_it_has(shared_dir):
    _, info = read_image(_raw(shared_dir, "Blackmagic.dng"), raw_options=RawOptions(half_size=True))
    assert info.format == "raw" and _exif_tags(info.exif)[0] == {305: "6.1"}


def _exif_tags(exif: bytes | None) -> tuple[dict, dict]:
    from PIL import Image

    assert exif is not None and exif.startswith(b"Exif\0\0")
    tags = Image.Exif()
    tags.load(exif[6:])
    return dict(tags), dict(tags.get_ifd(0x8769))


@pytest.mark.shared
def test_raw_dual_pixel_views_are_developed_with_the_raw_options(shared_dir, tmp_path):
    dng = _raw(shared_dir, "canon_eos_6d.dng")
    left, right = tmp_path / "x_l.dng", tmp_path / "x_r.dng"
    shutil.copyfile(dng, left)
    shutil.copyfile(dng, right)
    triple = DualPixelTriple(left, right, None, "x")
    views, center, info = read_dual_pixel(triple, raw_options=RawOptions(half_size=True, gamma="linear"))
    assert views.shape == (408, 612, 6) and center.shape == (408, 612, 3) and info.format == "raw"
    half_lin, _ = read_image(dng, raw_options=RawOptions(half_size=True, gamma="linear"))
    assert np.array_equal(views[..., :3], half_lin) and np.array_equal(views[..., 3:], half_lin)


@pytest.mark.shared
def test_raw_dual_pixel_on_the_command_line_develops_and_encodes_every_view(shared_dir, tmp_path):
    """--raw-* options reach dual-pixel RAW views, and with --raw-linear the model sees the views
    and the centre on the sRGB curve, its result written back in linear light."""
    from kpac_cli.engine import Deblurrer, EngineOptions

    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "dual.safetensors", build_model(KPACConfig(levels=2, channels=8, in_views=2)), {"name": "dual"})
    dng = _raw(shared_dir, "canon_eos_6d.dng")
    left, right = tmp_path / "x_l.dng", tmp_path / "x_r.dng"
    shutil.copyfile(dng, left)
    shutil.copyfile(dng, right)
    res = CliRunner().invoke(app, ["deblur", "--left", str(left), "--right", str(right), "-o", str(tmp_path / "out.tif"),
                                   "--model", str(model), "--raw-half-size", "--raw-linear", "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    got, info = read_image(tmp_path / "out.tif")
    assert got.shape == (408, 612, 3) and info.bit_depth == 16
    views, center, _ = read_dual_pixel(DualPixelTriple(left, right, None, "x"), raw_options=RawOptions(half_size=True, gamma="linear"))
    expected = srgb_decode(Deblurrer(model, EngineOptions(device="cpu")).deblur(srgb_encode(views), srgb_encode(center)))
    assert np.abs(got - expected).max() < 2 / 65535


def _dng(cfa: np.ndarray, *, crop=None, active_area=None, orientation: int = 1, default_scale=None, user_crop=None,
         as_shot=True) -> bytes:
    """A small Bayer (RGGB) DNG holding ``cfa`` (12-bit values); ``crop`` is
    ``((x, y), (width, height))`` for DefaultCropOrigin / DefaultCropSize, ``active_area``
    ``(top, left, bottom, right)``, ``default_scale`` ``(x, y)`` (non-square pixels),
    ``user_crop`` DefaultUserCrop's ``(top, left, bottom, right)`` in 1/64ths of the default crop;
    ``as_shot`` False leaves out the as-shot white balance (AsShotNeutral)."""
    import tifffile

    tags = [
        (50706, "B", 4, (1, 4, 0, 0), True),  # DNGVersion
        (50708, "s", 0, "Test Camera", True),  # UniqueCameraModel
        (274, "H", 1, orientation, True),
        (33421, "H", 2, (2, 2), True),  # CFARepeatPatternDim
        (33422, "B", 4, (0, 1, 1, 2), True),  # CFAPattern: RGGB
        (50717, "H", 1, 4095, True),  # WhiteLevel
        (50721, "2i", 9, (1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1), True),  # ColorMatrix1: identity
        (50778, "H", 1, 21, True),  # CalibrationIlluminant1: D65
    ]
    if as_shot:
        tags.append((50728, "2I", 3, (1, 1, 1, 1, 1, 1), True))  # AsShotNeutral
    if crop is not None:
        (x, y), (w, h) = crop
        tags += [(50719, "2I", 2, (x, 1, y, 1), True), (50720, "2I", 2, (w, 1, h, 1), True)]
    if active_area is not None:
        tags.append((50829, "H", 4, active_area, True))
    if default_scale is not None:
        tags.append((50718, "2I", 2, (default_scale[0], 1, default_scale[1], 1), True))
    if user_crop is not None:
        tags.append((51125, "2I", 4, tuple(v for n in user_crop for v in (n, 64)), True))
    buf = io.BytesIO()
    tifffile.imwrite(buf, cfa.astype(np.uint16), photometric=32803, extratags=tags, metadata=None)
    return buf.getvalue()


def _scene(h: int = 48, w: int = 64) -> np.ndarray:
    """A mosaic with no symmetry (so a wrong turn or crop shows), a dark top border and a
    clipped right border, as sensors' edge pixels often are."""
    yy, xx = np.mgrid[0:h, 0:w]
    cfa = 200 + 40 * xx + 15 * yy + 300 * ((xx // 7 + yy // 5) % 2)
    cfa[:3] = 0
    cfa[:, -5:] = 4095
    return cfa


@pytest.mark.parametrize("half", [False, True])
def test_a_dng_is_cut_to_its_default_crop_in_every_orientation(half):
    # an odd origin, which LibRaw itself would move to the next even pixel
    cfa, (x, y), (w, h) = _scene(), (5, 3), (52, 40)
    opts = RawOptions(gamma="linear", half_size=half)
    whole, _ = read_image(_dng(cfa), raw_options=opts)
    # at half size each 2x2 cell is a pixel: the cells the crop touches are kept
    box = whole[y // 2 : (y + h + 1) // 2, x // 2 : (x + w + 1) // 2] if half else whole[y : y + h, x : x + w]
    for orientation in range(1, 9):
        data = _dng(cfa, crop=((x, y), (w, h)), orientation=orientation)
        img, info = read_image(data, raw_options=opts)
        assert info.orientation_applied == orientation
        np.testing.assert_array_equal(img, apply_orientation(box, orientation), err_msg=f"orientation {orientation}")
        assert probe_size(data) == ((w, h) if orientation >= 5 else (h, w))


def test_a_dng_default_crop_counts_from_the_active_area_and_may_reach_its_edge():
    cfa = _scene()
    area = (2, 4, 46, 62)  # top, left, bottom, right
    whole, _ = read_image(_dng(cfa, active_area=area))
    assert whole.shape == (44, 58, 3)
    img, _ = read_image(_dng(cfa, crop=((3, 1), (50, 40)), active_area=area))
    np.testing.assert_array_equal(img, whole[1:41, 3:53])
    # a crop ending at the right and bottom edges (LibRaw's own crop box drops it)
    img, _ = read_image(_dng(cfa, crop=((8, 8), (56, 40))))
    np.testing.assert_array_equal(img, read_image(_dng(cfa))[0][8:, 8:])
    # a crop covering the whole image changes nothing
    np.testing.assert_array_equal(read_image(_dng(cfa, crop=((0, 0), (64, 48))))[0], read_image(_dng(cfa))[0])


@pytest.mark.parametrize("half", [False, True])
def test_a_dng_user_crop_narrows_its_default_crop_in_every_orientation(half):
    # DefaultUserCrop (DNG 1.5): the framing chosen in the camera (16:9, 1:1, ...), as
    # fractions of the default crop; LibRaw ignores it
    cfa, (x, y), (w, h) = _scene(), (5, 3), (52, 40)
    opts = RawOptions(gamma="linear", half_size=half)
    whole, _ = read_image(_dng(cfa), raw_options=opts)
    # rows 3 + 40 * 8/64 = 8 to 3 + 40 * 56/64 = 38, columns 5 + 52 * 16/64 = 18 to 5 + 52 = 57
    r0, r1, c0, c1 = 8, 38, 18, 57
    box = whole[r0 // 2 : (r1 + 1) // 2, c0 // 2 : (c1 + 1) // 2] if half else whole[r0:r1, c0:c1]
    for orientation in range(1, 9):
        data = _dng(cfa, crop=((x, y), (w, h)), orientation=orientation, user_crop=(8, 16, 56, 64))
        img, _ = read_image(data, raw_options=opts)
        np.testing.assert_array_equal(img, apply_orientation(box, orientation), err_msg=f"orientation {orientation}")
        assert probe_size(data) == ((c1 - c0, r1 - r0) if orientation >= 5 else (r1 - r0, c1 - c0))


def test_a_dng_user_crop_without_a_default_crop_is_a_share_of_the_active_area():
    cfa = _scene()
    area = (2, 4, 46, 62)  # 44 x 58
    whole, _ = read_image(_dng(cfa, active_area=area))
    img, _ = read_image(_dng(cfa, active_area=area, user_crop=(16, 0, 48, 32)))
    np.testing.assert_array_equal(img, whole[11:33, 0:29])
    # the whole default crop, or a rectangle the spec does not allow, crops nothing more
    for user_crop in [(0, 0, 64, 64), (48, 0, 16, 64), (0, 0, 64, 80)]:
        np.testing.assert_array_equal(read_image(_dng(cfa, active_area=area, user_crop=user_crop))[0], whole)


def test_non_square_pixels_are_sized_and_limited_as_developed():
    # DefaultScale (2, 1): LibRaw develops twice the sensor's width
    cfa = _scene()
    whole, _ = read_image(_dng(cfa, default_scale=(2, 1)))
    assert whole.shape == (48, 128, 3) and probe_size(_dng(cfa, default_scale=(2, 1))) == (48, 128)
    data = _dng(cfa, crop=((4, 2), (52, 40)), default_scale=(2, 1), orientation=6)
    img, _ = read_image(data)
    np.testing.assert_array_equal(img, apply_orientation(whole[2:42, 8:112], 6))
    assert probe_size(data) == (104, 40)
    with pytest.raises(ImageError, match=r"too large: 128x48 = 6,144 pixels exceeds the limit of 4,000"):
        read_image(_dng(cfa, default_scale=(2, 1)), max_pixels=4_000)


@pytest.mark.shared
def test_a_camera_dng_is_developed_to_the_image_the_camera_intends(shared_dir):
    # Blackmagic.dng: a 4128x2176 sensor, DefaultCropOrigin (16, 8), DefaultCropSize 4096x2160;
    # its outermost columns hold no image (black)
    import rawpy

    p = _raw(shared_dir, "Blackmagic.dng")
    assert probe_size(p) == (2160, 4096)
    img, info = read_image(p, raw_options=RawOptions(half_size=True, gamma="linear"))
    assert img.shape == (1080, 2048, 3) and info.size == (1080, 2048)
    with rawpy.imread(str(p)) as raw:
        whole = raw.postprocess(output_bps=16, half_size=True, use_camera_wb=True, no_auto_bright=True, gamma=(1, 1))
    assert whole.shape == (1088, 2064, 3) and not whole[:, -1].any()
    np.testing.assert_array_equal(img, whole[4:1084, 8:2056] / np.float32(65535))
    assert img[:, -1].mean() > 0.01  # the image reaches the right edge


def test_camera_white_balance_falls_back_to_daylight_when_the_file_has_none():
    # LibRaw's own fallback is its grey-world auto balance, which --raw-wb auto already gives
    data = _dng(_scene(), as_shot=False)
    camera = read_image(data, raw_options=RawOptions(gamma="linear"))[0]
    daylight = read_image(data, raw_options=RawOptions(gamma="linear", white_balance="daylight"))[0]
    auto = read_image(data, raw_options=RawOptions(gamma="linear", white_balance="auto"))[0]
    np.testing.assert_array_equal(camera, daylight)
    assert np.abs(camera - auto).max() > 0.01
    # with an as-shot balance, that is the one used
    shot = _dng(_scene())
    assert np.abs(read_image(shot)[0] - read_image(shot, raw_options=RawOptions(white_balance="daylight"))[0]).max() > 0.01


def _monochrome_dng(values: np.ndarray) -> bytes:
    """A DNG of a monochrome sensor (LinearRaw, one sample per pixel, 12-bit ``values``), as
    Leica's Monochrom cameras write."""
    import tifffile

    tags = [(50706, "B", 4, (1, 4, 0, 0), True), (50708, "s", 0, "Test Monochrome", True), (50717, "H", 1, 4095, True)]
    buf = io.BytesIO()
    tifffile.imwrite(buf, values.astype(np.uint16), photometric="minisblack", extratags=tags, metadata=None)
    # tifffile writes LinearRaw with three samples only: PhotometricInterpretation 1 -> 34892
    entry = b"\x06\x01\x03\x00\x01\x00\x00\x00"
    data = buf.getvalue()
    assert data.count(entry + b"\x01\x00") == 1
    return data.replace(entry + b"\x01\x00", entry + (34892).to_bytes(2, "little"))


def test_a_monochrome_raw_is_developed_to_grey_at_full_and_half_size():
    yy, xx = np.mgrid[0:48, 0:64]
    data = _monochrome_dng(200 + 40 * xx + 15 * yy)
    img, info = read_image(data, raw_options=RawOptions(gamma="linear"))
    assert img.shape == (48, 64, 3) and info.format == "raw" and info.bit_depth == 16
    np.testing.assert_array_equal(img[..., 0], img[..., 1])
    np.testing.assert_array_equal(img[..., 0], img[..., 2])
    assert (np.diff(img[..., 0], axis=1) > 0).all()  # the picture, not a constant
    # LibRaw develops it at full size whatever is asked: binned afterwards, as a linear DNG is
    half, _ = read_image(data, raw_options=RawOptions(gamma="linear", half_size=True))
    assert half.shape == (24, 32, 3)
    assert np.abs(half - _binned(img)).max() < 1e-4


def test_a_truncated_raw_is_called_truncated(tmp_path):
    # as an interrupted copy leaves it; LibRaw's own words, "Input/output error", read like a disk fault
    data = _dng(_scene())
    (tmp_path / "x.dng").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"x\.dng: cannot decode camera RAW: the file is truncated or damaged \(LibRaw: "):
        read_image(tmp_path / "x.dng")


def test_a_raw_developed_other_than_plain_srgb_is_tagged_with_its_profile(tmp_path):
    # untagged, a linear or Adobe RGB development reads as sRGB: dark, or dull greens
    from kpac_cli.images import icc, write_image

    data = _dng(_scene())
    assert read_image(data)[1].icc_profile is None  # plain sRGB: untagged means sRGB
    for space, gamma in [("srgb", "linear"), ("adobe", "srgb"), ("prophoto", "linear")]:
        img, info = read_image(data, raw_options=RawOptions(output_colorspace=space, gamma=gamma))
        assert info.icc_profile == icc.developed_raw(space, gamma) is not None
        write_image(tmp_path / "out.tif", img, info)
        assert read_image(tmp_path / "out.tif")[1].icc_profile == info.icc_profile
    assert read_image(data, raw_options=RawOptions(output_colorspace="raw"))[1].icc_profile is None
