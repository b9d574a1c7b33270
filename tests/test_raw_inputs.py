"""Camera RAW input: half-size development and its pixel limit, RAW dual-pixel views."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kpac_cli.checkpoints import save_checkpoint
from kpac_cli.cli import app
from kpac_cli.images import DualPixelTriple, ImageError, RawOptions, read_dual_pixel, read_image, srgb_decode, srgb_encode
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
