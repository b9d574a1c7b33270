"""ICC profiles made for sources that say their colour space another way (kpac_cli.images.icc):
checked against littleCMS (Pillow's ImageCms) and the colour spaces' published matrices."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageCms

from kpac_cli.images import icc, read_image, write_image
from kpac_cli.images.base import srgb_encode
from kpac_cli.images.exif import declares_adobe_rgb

# Published RGB -> XYZ matrices (B. Lindbloom's tables), independent of the profile builder.
ADOBE_RGB_TO_XYZ_D65 = np.array([[0.5767309, 0.1855540, 0.1881852], [0.2973769, 0.6273491, 0.0752741],
                                 [0.0270343, 0.0706872, 0.9911085]])
XYZ_D65_TO_SRGB = np.array([[3.2404542, -1.5371385, -0.4985314], [-0.9692660, 1.8760108, 0.0415560],
                            [0.0556434, -0.2040259, 1.0572252]])
PROPHOTO_TO_XYZ_D50 = np.array([[0.7976749, 0.1351917, 0.0313534], [0.2880402, 0.7118741, 0.0000857],
                                [0.0, 0.0, 0.8252100]])
ADOBE_RGB_TO_XYZ_D50 = np.array([[0.6097559, 0.2052401, 0.1492240], [0.3111242, 0.6256560, 0.0632197],
                                 [0.0194811, 0.0608902, 0.7448387]])


def to_srgb(profile: bytes, rgb8: np.ndarray) -> np.ndarray:
    """``rgb8`` (N x 3 uint8) in ``profile``'s colour space, converted to sRGB by littleCMS."""
    transform = ImageCms.buildTransform(ImageCms.ImageCmsProfile(io.BytesIO(profile)), ImageCms.createProfile("sRGB"),
                                        "RGB", "RGB", renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC)
    image = Image.fromarray(rgb8.astype(np.uint8).reshape(1, -1, 3))
    return np.asarray(ImageCms.applyTransform(image, transform)).reshape(-1, 3).astype(int)


def colorant_matrix(profile: bytes) -> np.ndarray:
    p = ImageCms.ImageCmsProfile(io.BytesIO(profile)).profile
    return np.array([p.red_colorant[0], p.green_colorant[0], p.blue_colorant[0]]).T


COLOURS = np.array([(0, 0, 0), (255, 255, 255), (128, 64, 200), (30, 160, 90), (200, 200, 40), (120, 120, 120),
                    (250, 5, 5)])


def test_srgb_primaries_with_the_srgb_curve_convert_to_srgb_unchanged():
    profile = icc.rgb_profile("test", icc.SRGB_PRIMARIES, icc.D65, "srgb")
    np.testing.assert_allclose(to_srgb(profile, COLOURS), COLOURS, atol=1)


def test_adobe_rgb_converts_as_its_published_matrix_says():
    linear = (COLOURS / 255.0) ** (563 / 256)
    expected = np.round(srgb_encode(np.clip(linear @ (XYZ_D65_TO_SRGB @ ADOBE_RGB_TO_XYZ_D65).T, 0, 1)) * 255)
    np.testing.assert_allclose(to_srgb(icc.adobe_rgb(), COLOURS), expected, atol=1)
    np.testing.assert_allclose(colorant_matrix(icc.adobe_rgb()), ADOBE_RGB_TO_XYZ_D50, atol=5e-4)
    assert b"Compatible with Adobe RGB (1998)" in icc.adobe_rgb()


def test_a_linear_development_is_tagged_linear():
    values = np.array([0, 8, 16, 64, 128, 200, 255])
    grey = np.repeat(values[:, None], 3, axis=1)
    np.testing.assert_allclose(to_srgb(icc.developed_raw("srgb", "linear"), grey)[:, 1],
                               np.round(srgb_encode(values / 255.0) * 255), atol=1)


def test_prophoto_colorants_are_the_published_ones():
    np.testing.assert_allclose(colorant_matrix(icc.developed_raw("prophoto", "linear")), PROPHOTO_TO_XYZ_D50, atol=1e-3)


def test_plain_srgb_and_the_camera_s_own_space_get_no_profile():
    assert icc.developed_raw("srgb", "srgb") is None
    assert icc.developed_raw("raw", "linear") is None
    assert icc.developed_raw("adobe", "srgb") != icc.adobe_rgb()  # the sRGB tone curve, not Adobe's gamma


def test_profiles_are_the_same_bytes_every_time():
    made = icc.rgb_profile("x", icc.ADOBE_RGB_PRIMARIES, icc.D65, icc.ADOBE_RGB_GAMMA)
    assert made == icc.rgb_profile("x", icc.ADOBE_RGB_PRIMARIES, icc.D65, icc.ADOBE_RGB_GAMMA)
    assert struct.unpack(">I", made[:4])[0] == len(made) and made[36:40] == b"acsp"


def exif_block(colour_space: int, interop_index: bytes | None, bo: str = "<") -> bytes:
    """EXIF as cameras write it: IFD0 -> Exif IFD (ColorSpace, Interoperability pointer) ->
    Interoperability IFD (InteropIndex)."""
    n = 2 if interop_index is not None else 1
    exif_at, interop_at = 8 + 2 + 12 + 4, 8 + 2 + 12 + 4 + 2 + 12 * n + 4
    out = (b"II*\0" if bo == "<" else b"MM\0*") + struct.pack(bo + "I", 8)
    out += struct.pack(bo + "H", 1) + struct.pack(bo + "HHII", 0x8769, 4, 1, exif_at) + struct.pack(bo + "I", 0)
    out += struct.pack(bo + "H", n) + struct.pack(bo + "HHIHH", 0xA001, 3, 1, colour_space, 0)
    if interop_index is not None:
        out += struct.pack(bo + "HHII", 0xA005, 4, 1, interop_at)
    out += struct.pack(bo + "I", 0)
    if interop_index is not None:
        out += struct.pack(bo + "H", 1) + struct.pack(bo + "HHI", 1, 2, 4) + interop_index.ljust(4, b"\0")
        out += struct.pack(bo + "I", 0)
    return b"Exif\0\0" + out


@pytest.mark.parametrize("bo", ["<", ">"])
def test_exif_says_adobe_rgb_as_cameras_mark_it(bo):
    assert declares_adobe_rgb(exif_block(0xFFFF, b"R03", bo))
    assert declares_adobe_rgb(exif_block(2, None, bo))
    assert not declares_adobe_rgb(exif_block(1, b"R98", bo))  # sRGB
    assert not declares_adobe_rgb(exif_block(0xFFFF, b"R98", bo))
    assert not declares_adobe_rgb(exif_block(0xFFFF, None, bo))  # uncalibrated, nothing more said
    assert not declares_adobe_rgb(None) and not declares_adobe_rgb(b"Exif\0\0II*\0")


PIXELS = np.random.default_rng(3).integers(0, 256, (24, 32, 3), dtype=np.uint8)


def camera_jpeg(path, exif: bytes, icc_profile: bytes | None = None):
    extra = {"icc_profile": icc_profile} if icc_profile else {}
    Image.fromarray(PIXELS).save(path, "JPEG", quality=95, exif=exif, **extra)
    return path


def test_an_adobe_rgb_camera_jpeg_keeps_its_colour_space_in_every_output(tmp_path):
    src = camera_jpeg(tmp_path / "DSC_0001.JPG", exif_block(0xFFFF, b"R03"))
    image, info = read_image(src)
    assert info.icc_profile == icc.adobe_rgb()
    for ext in ("tif", "png", "jpg"):
        write_image(tmp_path / f"out.{ext}", image, info)
        assert read_image(tmp_path / f"out.{ext}")[1].icc_profile == icc.adobe_rgb()
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:
        assert bytes(tif.pages[0].tags[34675].value) == icc.adobe_rgb()


def test_a_profile_of_the_photo_s_own_wins_and_srgb_stays_untagged(tmp_path):
    own = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert read_image(camera_jpeg(tmp_path / "a.jpg", exif_block(0xFFFF, b"R03"), own))[1].icc_profile == own
    assert read_image(camera_jpeg(tmp_path / "b.jpg", exif_block(1, b"R98")))[1].icc_profile is None


def test_primaries_of_no_colour_space_are_a_value_error():
    with pytest.raises(ValueError, match="span no colour space"):
        icc.rgb_profile("flat", ((0.3, 0.3), (0.3, 0.3), (0.3, 0.3)), icc.D65, 1.0)


def grey_to_srgb(profile: bytes, grey8: np.ndarray) -> np.ndarray:
    """``grey8`` (N uint8) in grey ``profile``, converted to sRGB by littleCMS (N x 3)."""
    transform = ImageCms.buildTransform(ImageCms.ImageCmsProfile(io.BytesIO(profile)), ImageCms.createProfile("sRGB"),
                                        "L", "RGB", renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC)
    image = Image.fromarray(grey8.astype(np.uint8).reshape(1, -1))
    return np.asarray(ImageCms.applyTransform(image, transform)).reshape(-1, 3).astype(int)


GREYS = np.arange(0, 256, 15)


@pytest.mark.parametrize("made", [icc.adobe_rgb(), icc.developed_raw("prophoto", "linear"),
                                  icc.rgb_profile("x", icc.SRGB_PRIMARIES, icc.D65, 1.8)])
def test_the_grey_counterpart_shows_greys_as_the_rgb_profile_does(made):
    grey = icc.grey_counterpart(made)
    assert grey[16:20] == b"GRAY" and struct.unpack(">I", grey[:4])[0] == len(grey)
    assert ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(grey))) == \
        ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(made)))
    want = to_srgb(made, np.repeat(GREYS[:, None], 3, axis=1))
    np.testing.assert_allclose(grey_to_srgb(grey, GREYS), want, atol=1)


def test_only_a_matrix_profile_has_a_grey_counterpart():
    grey = icc.grey_counterpart(icc.adobe_rgb())
    assert icc.grey_counterpart(grey) is None and icc.grey_counterpart(None) is None
    assert icc.grey_counterpart(b"RGB " * 40) is None and icc.grey_counterpart(icc.adobe_rgb()[:200]) is None


@pytest.mark.parametrize("made", [icc.adobe_rgb(), icc.developed_raw("prophoto", "linear"),
                                  icc.rgb_profile("x", icc.SRGB_PRIMARIES, icc.D65, 1.8)])
def test_the_rgb_counterpart_of_a_grey_profile_shows_its_greys_alike(made):
    # what a blur map's RGB overlay of a grey photo carries: the grey profile is invalid there
    grey = icc.grey_counterpart(made)
    rgb = icc.rgb_counterpart(grey)
    assert rgb[16:20] == b"RGB " and struct.unpack(">I", rgb[:4])[0] == len(rgb)
    np.testing.assert_allclose(to_srgb(rgb, np.repeat(GREYS[:, None], 3, axis=1)), grey_to_srgb(grey, GREYS), atol=1)
    assert icc.rgb_counterpart(made) is made  # an RGB profile is one already
    assert icc.rgb_counterpart(None) is None and icc.rgb_counterpart(grey[:100]) is None


def png_chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def test_a_grey_photo_in_a_colour_space_of_its_own_gets_a_grey_profile(tmp_path):
    # a grey PNG in linear light (gAMA 1.0), and a grey JPEG whose EXIF says Adobe RGB: an RGB
    # profile on their grey outputs would be rejected and the greys shown as sRGB
    buf = io.BytesIO()
    Image.fromarray(np.tile(GREYS.astype(np.uint8), (4, 1))).save(buf, "PNG")
    plain = buf.getvalue()
    linear_png = plain[:33] + png_chunk(b"gAMA", struct.pack(">I", 100000)) + plain[33:]
    Image.fromarray(np.tile(GREYS.astype(np.uint8), (4, 1))).save(tmp_path / "adobe.jpg", quality=100,
                                                                  exif=exif_block(0xFFFF, b"R03"))
    cases = {"linear": (linear_png, icc.developed_raw("srgb", "linear")), "adobe": (tmp_path / "adobe.jpg", icc.adobe_rgb())}
    for name, (source, rgb) in cases.items():
        image, info = read_image(source)
        assert info.channels == 1 and info.icc_profile[16:20] == b"GRAY", name
        for ext in ("png", "tif", "jpg"):
            write_image(tmp_path / f"{name}.{ext}", image, info)
            with Image.open(tmp_path / f"{name}.{ext}") as im:
                assert im.mode == "L" and im.info["icc_profile"] == info.icc_profile
                row = np.asarray(im)[0]
            shown, want = grey_to_srgb(info.icc_profile, row), to_srgb(rgb, np.repeat(row[:, None], 3, axis=1))
            np.testing.assert_allclose(shown, want, atol=1, err_msg=f"{name}.{ext}")
