"""Dual-pixel view balancing (kpac_cli.engine.dualpixel) and where the engine applies it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from kpac_cli.checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from kpac_cli.engine import Deblurrer, EngineOptions
from kpac_cli.engine.dualpixel import balance_views
from kpac_cli.images import DualPixelTriple, ImageError, ImageInfo, pair_dual_pixel, read_dual_pixel, read_image, write_image
from kpac_cli.model import KPACConfig, build_model
from kpac_cli.metrics.dualpixel_capture import GammaEncoding, psnr_with_gain, read_dual_pixel_capture
from kpac_cli.synth import SynthSettings, dead_leaves, synthesize


def _dual_sample(h: int = 320, w: int = 480, seed: int = 0):
    rng = np.random.default_rng(seed)
    scene, depth = dead_leaves((h, w), rng, return_depth=True)
    return synthesize(scene, rng, SynthSettings(max_radius=6, min_radius=2, dual_pixel=True, noise_sigma=0.0), depth)


def _vignette(views: np.ndarray) -> np.ndarray:
    """Opposite horizontal vignetting of the two views, like a dual-pixel sensor's (ratio 0.7-1.5)."""
    w = views.shape[1]
    ramp = np.linspace(-1, 1, w, dtype=np.float32)[None, :, None]
    return np.concatenate([views[..., :3] * (1 + 0.2 * ramp), views[..., 3:] * (1 - 0.2 * ramp)], axis=2)


def _low(x: np.ndarray) -> np.ndarray:
    return gaussian_filter(x.mean(axis=2), 24)


def test_identical_views_come_back_unchanged():
    img = np.random.default_rng(1).random((50, 70, 3), dtype=np.float32)
    views = np.concatenate([img, img], axis=2)
    assert np.array_equal(balance_views(views), views)
    with pytest.raises(ValueError, match="6"):
        balance_views(img)


def test_vignetting_is_removed_and_the_disparity_kept():
    s = _dual_sample()
    clean = np.concatenate([s.left, s.right], axis=2)
    vignetted = _vignette(clean)
    ratio_before = _low(vignetted[..., :3]) / _low(vignetted[..., 3:])
    out = balance_views(vignetted)
    ratio_after = _low(out[..., :3]) / _low(out[..., 3:])
    inner = (slice(40, -40), slice(40, -40))
    assert np.abs(ratio_before[inner] - 1).max() > 0.3
    assert np.abs(ratio_after[inner] - 1).max() < 0.03
    # The fine left/right differences (defocus disparity) survive: balancing the clean views
    # changes them little, and the vignetted views balance to nearly the clean ones.
    d_clean = clean[..., :3] - clean[..., 3:]
    d_out = balance_views(clean)[..., :3] - balance_views(clean)[..., 3:]
    assert np.corrcoef(d_clean.ravel(), d_out.ravel())[0, 1] > 0.99
    assert np.abs(out - balance_views(clean))[inner].mean() < 0.01


def test_the_engine_balances_only_for_models_whose_checkpoint_asks():
    dual = build_model(KPACConfig(levels=2, channels=8, in_views=2))
    single = build_model(KPACConfig(levels=2, channels=8))
    ask = {"balance_views": True}
    assert not Deblurrer(dual).balance_views
    assert not Deblurrer(Checkpoint(dual.config, dual.state_dict(), {})).balance_views
    assert not Deblurrer(Checkpoint(single.config, single.state_dict(), ask)).balance_views
    d = Deblurrer(Checkpoint(dual.config, dual.state_dict(), ask), EngineOptions(tile=None))
    assert d.balance_views
    s = _dual_sample(96, 128)
    vignetted = _vignette(np.concatenate([s.left, s.right], axis=2))
    plain = Deblurrer(dual, EngineOptions(tile=None))
    # What the model sees is the balanced views; the residual goes onto the views as captured.
    centre = vignetted.reshape(96, 128, 2, 3).mean(axis=2)
    expected = plain.deblur(balance_views(vignetted), centre)
    assert np.abs(d.deblur(vignetted) - expected).max() < 1e-6
    assert np.abs(plain.deblur(vignetted) - expected).max() > 1e-3


@pytest.mark.shared
@pytest.mark.slow
def test_shipped_dual_model_improves_the_real_pixel4_capture(shared_dir):
    """kpac-dual on a real dual-pixel capture (green channel, linear, black level 1024; the
    target is a centre crop at another brightness, so a gain is fitted before scoring) scores
    what its model file and model card say."""
    root = shared_dir / "samples" / "defocused" / "dp_pixel4"
    if not root.is_dir():
        pytest.skip("dp_pixel4 capture not in the reference material")
    left, right, target = read_dual_pixel_capture(root)
    combined = left + right
    gamma = GammaEncoding.for_combined(combined)

    torch.set_num_threads(2)
    dual = Deblurrer("kpac-dual", EngineOptions(tile=512))
    out = dual.deblur(np.concatenate([gamma.encode(2 * left), gamma.encode(2 * right)], 2), gamma.encode(combined))
    torch.set_num_threads(1)
    scored, before = psnr_with_gain(gamma.decode(out), target), psnr_with_gain(combined, target)
    assert scored - before > 0.1, f"kpac-dual changes PSNR by {scored - before:+.2f} dB on the real capture"
    recorded = dual.provenance["scores"]["pixel4_dual_pixel_capture"]  # the figures `kpac models` and the card give
    assert before == pytest.approx(recorded["input_psnr"], abs=0.01)
    assert scored == pytest.approx(recorded["dual_psnr"], abs=0.02)


# ------------------------------------------------------------------------------------------
# pairing and reading dual-pixel views


def _png(path, seed: int, grey: bool = False, shape=(24, 32)):
    img = np.random.default_rng(seed).random((*shape, 1 if grey else 3), dtype=np.float32).repeat(3 if grey else 1, axis=2)
    info = ImageInfo(path=None, format="png", bit_depth=16, channels=1 if grey else 3, alpha=None, icc_profile=None, exif=None,
                     orientation_applied=1, size=shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, img, info)
    return path


def test_one_folder_holding_every_view_pairs_them_by_their_markers(tmp_path):
    # the layout of the Pixel 4 dual-pixel dataset: 005_left.png and 005_right.png side by side
    d = tmp_path / "capture"
    for i, name in enumerate(("005_left.png", "005_right.png", "007_l.png", "007_r.png", "007_c.png")):
        _png(d / name, i)
    assert [(t.left.name, t.right.name, t.center, t.name) for t in pair_dual_pixel(d, d)] == [
        ("005_left.png", "005_right.png", None, "005"), ("007_l.png", "007_r.png", None, "007")]
    with pytest.raises(ImageError, match="no centre image") as e:  # 005 has no centre in the folder
        pair_dual_pixel(d, d, d)
    assert "005_left.png" in str(e.value)
    (d / "005_centre.png").write_bytes((d / "007_c.png").read_bytes())
    assert [t.center.name for t in pair_dual_pixel(d, d, d)] == ["005_centre.png", "007_c.png"]
    # a centre folder of its own keeps its plain names
    _png(tmp_path / "C" / "005.png", 9)
    _png(tmp_path / "C" / "007.png", 10)
    assert [t.center.name for t in pair_dual_pixel(d, d, tmp_path / "C")] == ["005.png", "007.png"]
    # a folder of unmarked images given as both views holds no pairs
    plain = tmp_path / "plain"
    _png(plain / "a.png", 11)
    with pytest.raises(ImageError, match="marked as a left view"):
        pair_dual_pixel(plain, plain)


def test_swapped_views_are_refused(tmp_path):
    l, r = _png(tmp_path / "x_r.png", 1), _png(tmp_path / "x_l.png", 2)
    with pytest.raises(ImageError, match="swapped") as e:
        pair_dual_pixel(l, r)
    assert str(l) in str(e.value) and str(r) in str(e.value)
    assert pair_dual_pixel(r, l)[0].name == "x"
    _png(tmp_path / "L" / "005_right.png", 3)
    _png(tmp_path / "R" / "005_left.png", 4)
    with pytest.raises(ImageError, match="swapped"):
        pair_dual_pixel(tmp_path / "L", tmp_path / "R")
    # the same name in both folders is a plain name, whatever it ends with
    _png(tmp_path / "L2" / "car_r.png", 5)
    _png(tmp_path / "R2" / "car_r.png", 6)
    (t,) = pair_dual_pixel(tmp_path / "L2", tmp_path / "R2")
    assert (t.left, t.right) == (tmp_path / "L2" / "car_r.png", tmp_path / "R2" / "car_r.png")


def test_grey_and_colour_views_of_one_pair_are_refused(tmp_path):
    # the output is written as the left view is: grey would silently drop a colour centre's colour
    grey_l, grey_r = _png(tmp_path / "gl.png", 1, grey=True), _png(tmp_path / "gr.png", 2, grey=True)
    colour = _png(tmp_path / "c.png", 3)
    views, center, info = read_dual_pixel(DualPixelTriple(grey_l, grey_r, None, "g"))
    assert info.channels == 1 and np.array_equal(views[..., 0], views[..., 2])
    with pytest.raises(ImageError, match="grey, but its partner .* is in colour") as e:
        read_dual_pixel(DualPixelTriple(grey_l, grey_r, colour, "g"))
    assert str(grey_l) in str(e.value) and str(colour) in str(e.value)
    with pytest.raises(ImageError, match="in colour, but its partner .* is grey"):
        read_dual_pixel(DualPixelTriple(colour, grey_r, None, "g"))


def test_a_grey_and_colour_pair_fails_alone_on_the_command_line(tmp_path):
    from typer.testing import CliRunner

    from kpac_cli.cli import app

    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "dual.safetensors", build_model(KPACConfig(levels=2, channels=8, in_views=2)), {"name": "tiny-dual"})
    for side, seed in (("L", 0), ("R", 1), ("C", 2)):
        _png(tmp_path / side / "a.png", seed)
    _png(tmp_path / "L" / "b.png", 3, grey=True)
    _png(tmp_path / "R" / "b.png", 4, grey=True)
    _png(tmp_path / "C" / "b.png", 5)
    res = CliRunner().invoke(app, ["deblur", "--left", str(tmp_path / "L"), "--right", str(tmp_path / "R"), "--center", str(tmp_path / "C"),
                                   "-o", str(tmp_path / "out"), "--model", str(model), "--json", "-q"], catch_exceptions=False)
    assert res.exit_code == 1, res.output
    records = {Path(r["input"]).name: r for r in map(json.loads, (x for x in res.stdout.splitlines() if x.startswith("{")))}
    assert records["a.png"]["status"] == "ok" and read_image(tmp_path / "out" / "a.png")[1].channels == 3
    assert records["b.png"]["status"] == "failed" and "grey" in records["b.png"]["error"]
    assert not (tmp_path / "out" / "b.png").exists()


def test_maps_written_beside_the_views_are_no_views_on_a_rerun(tmp_path):
    """``kpac blurmap --left L --right R -o L`` (or ``deblur --save-blurmap`` into a view folder)
    twice: the second run pairs the views, not the maps the first wrote among them."""
    from typer.testing import CliRunner

    from kpac_cli.cli import app

    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "dual.safetensors", build_model(KPACConfig(levels=2, channels=8, in_views=2)), {"name": "tiny-dual"})
    for side, seed in (("L", 0), ("R", 1)):
        _png(tmp_path / side / "a.png", seed)
    args = ["blurmap", "--left", str(tmp_path / "L"), "--right", str(tmp_path / "R"), "-o", str(tmp_path / "L"), "--model", str(model), "-q"]
    for run in ("first", "second"):
        res = CliRunner().invoke(app, args + (["--overwrite"] if run == "second" else []), catch_exceptions=False)
        assert res.exit_code == 0, (run, res.output)
    assert sorted(p.name for p in (tmp_path / "L").iterdir()) == ["a.png", "a_blurmap.png"]
    assert [t.name for t in pair_dual_pixel(tmp_path / "L", tmp_path / "R")] == ["a"]


# ------------------------------------------------------------------------------------------
# views stored with an EXIF orientation: deblurred in the sensor's frame


def _oriented_png(path: Path, sensor: np.ndarray, orientation: int) -> Path:
    """An 8-bit PNG holding the ``sensor`` pixels as stored, tagged with ``orientation``."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(sensor * 255).astype(np.uint8)).save(path, exif=exif.tobytes())
    return path


@pytest.mark.parametrize("orientation", range(2, 9))
def test_dual_pixel_views_with_an_exif_orientation_are_deblurred_in_the_sensor_frame(tmp_path, orientation):
    # A portrait capture's views are stored as the sensor recorded them (defocus disparity
    # along the rows) and tagged to be shown turned. Turned upright on read, the disparity runs
    # along the columns, which a dual-pixel model does not know: the engine turns the views back
    # for the model and the results upright after, so a tagged pair gives the untagged pair's
    # result turned as the tag says - image and blur map alike.
    from typer.testing import CliRunner

    from kpac_cli.cli import app
    from kpac_cli.images.exif import apply_orientation

    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "dual.safetensors", build_model(KPACConfig(levels=2, channels=8, in_views=2)),
                            {"name": "tiny-dual", "balance_views": True})
    s = _dual_sample(40, 56, seed=orientation)
    runs = {}
    for tag in (1, orientation):
        left = _oriented_png(tmp_path / f"o{tag}" / "L" / "a.png", s.left, tag)
        _oriented_png(tmp_path / f"o{tag}" / "R" / "a.png", s.right, tag)
        out = tmp_path / f"o{tag}" / "out"
        res = CliRunner().invoke(app, ["deblur", "--left", str(left.parent), "--right", str(left.parent.parent / "R"), "-o", str(out),
                                       "--model", str(model), "--save-blurmap", "-q"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        res = CliRunner().invoke(app, ["blurmap", "--left", str(left.parent), "--right", str(left.parent.parent / "R"),
                                       "-o", str(out / "maps"), "--model", str(model), "--defocus-map", "-q"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        runs[tag] = [read_image(p)[0] for p in (out / "a.png", out / "a_blurmap.png", *sorted((out / "maps").iterdir()))]
    image, *maps = runs[1]
    turned_image, *turned_maps = runs[orientation]
    assert len(maps) == 3  # deblur's blur map; kpac blurmap's map and blur-size estimate
    assert turned_image.shape[:2] == apply_orientation(image, orientation).shape[:2]
    assert np.array_equal(turned_image, apply_orientation(image, orientation))
    for m, turned in zip(maps, turned_maps):
        assert np.abs(turned - apply_orientation(m, orientation)).max() <= 1 / 65535
    # what the model makes of the views turned upright is another picture
    views, _, info = read_dual_pixel(DualPixelTriple(tmp_path / f"o{orientation}" / "L" / "a.png",
                                                     tmp_path / f"o{orientation}" / "R" / "a.png", None, "a"))
    assert info.orientation_applied == orientation
    as_shown = Deblurrer(load_checkpoint(model), EngineOptions(tile=None)).deblur(views)
    assert np.abs(as_shown - turned_image).max() > 2 / 255


def test_the_orientation_reaches_tiles_and_the_self_ensemble_and_is_for_dual_pixel_models_only():
    from kpac_cli.images.exif import apply_orientation

    torch.manual_seed(1)
    dual = build_model(KPACConfig(levels=2, channels=8, in_views=2))
    s = _dual_sample(136, 200, seed=3)
    sensor = np.concatenate([s.left, s.right], axis=2)
    d = Deblurrer(dual, EngineOptions(tile=128, ensemble=2))
    expected = apply_orientation(d.deblur(sensor), 6)
    assert d.last_stats.tile == 128
    assert np.abs(d.deblur(apply_orientation(sensor, 6), orientation=6) - expected).max() < 1e-5
    single = Deblurrer(build_model(KPACConfig(levels=2, channels=8)), EngineOptions(tile=None))
    photo = apply_orientation(s.left, 6)
    assert np.array_equal(single.deblur(photo, orientation=6), single.deblur(photo))
    with pytest.raises(ValueError, match="orientation"):
        d.deblur(sensor, orientation=9)


def test_views_stored_with_different_orientations_are_refused(tmp_path):
    s = _dual_sample(40, 40)
    left = _oriented_png(tmp_path / "L" / "a.png", s.left, 6)
    right = _oriented_png(tmp_path / "R" / "a.png", s.right, 1)
    with pytest.raises(ImageError, match="EXIF orientation 6 differs from its partner") as e:
        read_dual_pixel(DualPixelTriple(left, right, None, "a"))
    assert str(right) in str(e.value)


@pytest.mark.parametrize("orientation", [3, 6, 7])
def test_scale_attention_of_a_turned_pair_is_the_sensor_frame_s_turned_upright(orientation):
    """As deblur does, scale_attention runs a dual-pixel model on the views in the sensor's
    frame and hands the maps back upright; the views as shown would be another picture."""
    from kpac_cli.images.exif import apply_orientation

    torch.manual_seed(2)
    d = Deblurrer(build_model(KPACConfig(levels=2, channels=8, in_views=2)), EngineOptions(tile=None))
    s = _dual_sample(40, 56, seed=5)
    sensor = np.concatenate([s.left, s.right], axis=2)
    shown = apply_orientation(sensor, orientation)
    upright = [apply_orientation(m.transpose(1, 2, 0), orientation).transpose(2, 0, 1) for m in d.scale_attention(sensor)]
    turned = d.scale_attention(shown, orientation=orientation)
    assert [m.shape for m in turned] == [m.shape for m in upright]
    for got, want in zip(turned, upright, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    as_shown = d.scale_attention(shown)
    assert max(np.abs(a - b).max() for a, b in zip(as_shown, upright)) > 1e-3
    with pytest.raises(ValueError, match="orientation"):
        d.scale_attention(shown, orientation=0)


# ------------------------------------------------------------------------------------------
# mismatched views: one clear message before any work, never a wrong pair


def test_one_file_given_as_two_views_is_refused(tmp_path):
    from typer.testing import CliRunner

    from kpac_cli.cli import app

    photo, other = _png(tmp_path / "a.png", 1), _png(tmp_path / "b.png", 2)
    with pytest.raises(ImageError, match="the same file as the left view") as e:
        pair_dual_pixel(photo, photo)
    assert str(photo) in str(e.value)
    link = tmp_path / "link.png"  # the same file under another name
    link.symlink_to(photo)
    with pytest.raises(ImageError, match="the same file as the left view"):
        pair_dual_pixel(photo, link)
    with pytest.raises(ImageError, match="the same file as the right view"):
        pair_dual_pixel(photo, other, other)
    assert pair_dual_pixel(photo, other)[0].right == other
    model = save_checkpoint(tmp_path / "dual.safetensors", build_model(KPACConfig(levels=2, channels=8, in_views=2)), {"name": "tiny-dual"})
    res = CliRunner().invoke(app, ["deblur", "--left", str(photo), "--right", str(photo), "-o", str(tmp_path / "out.png"),
                                   "--model", str(model)], catch_exceptions=False)
    assert res.exit_code == 2 and "the same file as the left view" in res.output, res.output
    assert not (tmp_path / "out.png").exists()


def test_a_centre_image_without_views_is_refused(tmp_path):
    # extra left or right views are refused; an extra centre image was left out without a word
    for side in ("L", "R", "C"):
        _png(tmp_path / side / "a.png", 1)
    _png(tmp_path / "C" / "b.png", 2)
    with pytest.raises(ImageError, match="no left and right views for it") as e:
        pair_dual_pixel(tmp_path / "L", tmp_path / "R", tmp_path / "C")
    assert str(tmp_path / "C" / "b.png") in str(e.value)
    (tmp_path / "C" / "b.png").unlink()
    assert [t.center.name for t in pair_dual_pixel(tmp_path / "L", tmp_path / "R", tmp_path / "C")] == ["a.png"]
    # one folder holding every view: a centre image marked for a pair that is not there
    d = tmp_path / "capture"
    for i, name in enumerate(("005_l.png", "005_r.png", "005_c.png", "007_c.png")):
        _png(d / name, i)
    with pytest.raises(ImageError, match="no left and right views for it") as e:
        pair_dual_pixel(d, d, d)
    assert "007_c.png" in str(e.value)


def test_views_named_as_other_views_are_refused(tmp_path):
    # --right given the folder of centre images: the names say so
    _png(tmp_path / "L" / "005_l.png", 1)
    _png(tmp_path / "C" / "005_c.png", 2)
    with pytest.raises(ImageError, match="named as a centre view, given as the right one") as e:
        pair_dual_pixel(tmp_path / "L", tmp_path / "C")
    assert str(tmp_path / "C" / "005_c.png") in str(e.value) and str(tmp_path / "L" / "005_l.png") in str(e.value)
    left, right, centre = (_png(tmp_path / f"x_{v}.png", i) for i, v in enumerate("lrc"))
    assert pair_dual_pixel(left, right, centre)[0].center == centre
    with pytest.raises(ImageError, match="named as a centre view, given as the left one"):
        pair_dual_pixel(centre, right)
    with pytest.raises(ImageError, match="named as a right view, given as the centre one"):
        pair_dual_pixel(left, _png(tmp_path / "y.png", 3), right)
    # one marker on every file, or on one only, is part of a plain name
    assert pair_dual_pixel(_png(tmp_path / "L2" / "car_c.png", 4), _png(tmp_path / "R2" / "car_c.png", 5))[0].name == "car"
    assert pair_dual_pixel(left, _png(tmp_path / "z.png", 6))[0].left == left
