"""Synthetic defocus (kpac_cli.synth): the optics behave like a lens, files come out in the DPDD layout."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from kpac_cli.images import read_image

from kpac_cli.synth import (
    SKIMAGE_PHOTOS,
    SynthSettings,
    aperture_psf,
    dataset_dirs,
    dead_leaves,
    decode,
    defocus_radius,
    random_depth,
    sharp_sources,
    synthesize,
    write_dataset,
)
from kpac_cli.synth.optics import layer_levels

CLEAN = SynthSettings(noise_sigma=0.0, highlight_boost=1.0)  # no noise, no bloom: pure optics


def hf_energy(img: np.ndarray) -> float:
    """Mean squared discrete Laplacian of the luminance: the fine detail a blur destroys."""
    g = img.mean(axis=2)
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float((lap ** 2).mean())


@pytest.fixture(scope="module")
def texture() -> np.ndarray:
    """A sharp, detailed 96x128 scene (dead leaves with small leaves)."""
    return dead_leaves((96, 128), np.random.default_rng(7), min_leaf=2.0, max_leaf=12.0)


def centroid_x(img: np.ndarray) -> float:
    w = img.sum(axis=0)
    return float((w * np.arange(img.shape[1])).sum() / w.sum())


# --- brightness -------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [
    CLEAN,
    SynthSettings(noise_sigma=0.0, highlight_boost=1.0, aperture="polygon", blades=5),
    SynthSettings(noise_sigma=0.0, highlight_boost=1.0, dual_pixel=True),
])
def test_flat_colour_stays_flat(settings):
    flat = np.full((48, 64, 3), [0.2, 0.5, 0.8], np.float32)
    out = synthesize(flat, np.random.default_rng(0), replace(settings, min_radius=6.0))
    assert np.abs(out.radius).max() > 1  # there was blur to preserve brightness through
    np.testing.assert_allclose(out.blurred, flat, atol=1e-4)  # incl. borders and depth edges
    if settings.dual_pixel:
        np.testing.assert_allclose(out.left, flat, atol=1e-4)
        np.testing.assert_allclose(out.right, flat, atol=1e-4)


def test_flat_colour_mean_preserved_with_noise():
    flat = np.full((64, 64, 3), 0.5, np.float32)
    out = synthesize(flat, np.random.default_rng(1), SynthSettings(noise_sigma=0.01))
    assert abs(out.blurred.mean() / 0.5 - 1) < 0.01
    assert out.blurred.std() > 1e-3  # the noise is there


def test_point_light_energy_is_conserved_in_linear_light():
    img = np.zeros((61, 61, 3), np.float32)
    img[30, 30] = 0.8
    out = synthesize(img, np.random.default_rng(0), CLEAN, radius=np.full((61, 61), 7.0, np.float32))
    lin = decode(out.blurred, CLEAN.gamma)
    assert lin[..., 0].sum() == pytest.approx(0.8 ** CLEAN.gamma, rel=1e-3)
    assert lin[30, 30, 0] < 0.01 * 0.8 ** CLEAN.gamma  # spread out over ~pi 7^2 pixels


# --- blur size --------------------------------------------------------------------------


def test_blur_follows_the_radius_map(texture):
    h, w = texture.shape[:2]
    radius = np.zeros((h, w), np.float32)
    radius[:, w // 2:] = 8.0  # left half in focus, right half far behind
    out = synthesize(texture, np.random.default_rng(0), CLEAN, radius=radius)
    m = 8 + 2  # stay clear of the boundary, where blur from the right half may spill
    left_ratio = hf_energy(out.blurred[:, :w // 2 - m]) / hf_energy(texture[:, :w // 2 - m])
    right_ratio = hf_energy(out.blurred[:, w // 2 + m:]) / hf_energy(texture[:, w // 2 + m:])
    assert left_ratio == pytest.approx(1.0, abs=1e-3)  # exactly sharp without noise
    assert right_ratio < 0.05


def test_sharpness_drops_monotonically_with_radius(texture):
    h, w = texture.shape[:2]
    energies = []
    for r in (0.0, 1.0, 2.0, 4.0, 8.0):
        out = synthesize(texture, np.random.default_rng(0), CLEAN, radius=np.full((h, w), -r, np.float32))
        energies.append(hf_energy(out.blurred))
    assert energies[0] == pytest.approx(hf_energy(texture), rel=1e-4)
    assert all(a > 1.5 * b for a, b in zip(energies, energies[1:])), energies


def test_sign_does_not_change_single_view_blur_amount(texture):
    h, w = texture.shape[:2]
    a = synthesize(texture, np.random.default_rng(0), CLEAN, radius=np.full((h, w), 5.0, np.float32))
    b = synthesize(texture, np.random.default_rng(0), CLEAN, radius=np.full((h, w), -5.0, np.float32))
    np.testing.assert_allclose(a.blurred, b.blurred, atol=1e-5)  # a disc is symmetric


# --- occlusion ------------------------------------------------------------------------


def _scene_with_square(h=80, w=80, stripes=True):
    """Green/blue fine stripes (or flat) in the background, a red square object in the middle."""
    img = np.zeros((h, w, 3), np.float32)
    img[..., 1] = 0.3 + 0.4 * (np.arange(w) % 4 < 2)[None, :] if stripes else 0.5
    img[..., 2] = 0.4
    obj = np.zeros((h, w), bool)
    obj[25:55, 25:55] = True
    img[obj] = [0.9, 0.1, 0.1]
    return img, obj


def test_defocused_foreground_spreads_over_sharp_background():
    img, obj = _scene_with_square()
    radius = np.where(obj, -6.0, 0.0).astype(np.float32)  # object in front of focus, background sharp
    out = synthesize(img, np.random.default_rng(0), CLEAN, radius=radius)
    ring = np.zeros_like(obj)
    ring[22:58, 22:58] = True
    ring &= ~obj  # 3 px just outside the silhouette
    assert (out.blurred[ring, 0] - img[ring, 0]).mean() > 0.1  # the red blur covers the background there
    far = np.zeros_like(obj)
    far[:, :12] = True  # > 6 px away: untouched
    np.testing.assert_allclose(out.blurred[far], img[far], atol=1e-5)


def test_sharp_foreground_keeps_a_crisp_edge_over_blurred_background():
    img, obj = _scene_with_square()
    radius = np.where(obj, 0.0, 6.0).astype(np.float32)  # object in focus, background far
    out = synthesize(img, np.random.default_rng(0), CLEAN, radius=radius)
    np.testing.assert_allclose(out.blurred[obj], img[obj], atol=1e-5)  # up to its very edge
    ring = np.zeros_like(obj)
    ring[23:57, 23:57] = True
    ring &= ~obj
    # No red from the sharp object leaks onto the background behind it...
    assert np.abs(out.blurred[ring, 0] - img[ring, 0]).max() < 1e-4
    # The background itself is blurred: its stripes are gone.
    assert out.blurred[:20, :, 1].std() < 0.2 * img[:20, :, 1].std()
    # No dark halo where the object hides part of the background's blur (normalised layers).
    flat, _ = _scene_with_square(stripes=False)
    out = synthesize(flat, np.random.default_rng(0), CLEAN, radius=radius)
    np.testing.assert_allclose(out.blurred[~obj], flat[~obj], atol=1e-4)


# --- highlights and noise -------------------------------------------------------------


def test_saturated_highlights_bloom():
    img = np.full((64, 64, 3), 0.1, np.float32)
    yy, xx = np.mgrid[:64, :64]
    img[(yy - 32) ** 2 + (xx - 32) ** 2 <= 4] = 1.0  # a small clipped light
    radius = np.full((64, 64), 8.0, np.float32)
    plain = synthesize(img, np.random.default_rng(0), CLEAN, radius=radius)
    bloom = synthesize(img, np.random.default_rng(0), SynthSettings(noise_sigma=0, highlight_boost=6.0), radius=radius)
    # The bokeh disc of a boosted light stays bright; without the boost it is a dim smudge.
    assert bloom.blurred[32, 32, 0] > plain.blurred[32, 32, 0] + 0.15
    # Non-saturated pixels are not boosted: far from the light both are the same.
    np.testing.assert_allclose(bloom.blurred[:10, :10], plain.blurred[:10, :10], atol=1e-5)


def test_in_focus_saturated_colour_keeps_its_hue():
    # A saturated orange (red clipped, green and blue measured) in focus: the boost may only
    # raise the clipped channel, which the sensor clips back, so the input equals the target.
    img = np.empty((32, 32, 3), np.float32)
    img[:] = (1.0, 0.4, 0.2)
    img[:, 16:] = (1.0, 1.0, 1.0)  # and a white highlight beside it
    out = synthesize(img, np.random.default_rng(0), SynthSettings(noise_sigma=0, highlight_boost=3.0),
                     radius=np.zeros((32, 32), np.float32))
    np.testing.assert_allclose(out.blurred, img, atol=1e-5)
    # Defocused, the white highlight still blooms evenly (its hue kept: all channels equal).
    far = synthesize(img, np.random.default_rng(0), SynthSettings(noise_sigma=0, highlight_boost=3.0),
                     radius=np.full((32, 32), 6.0, np.float32))
    np.testing.assert_allclose(far.blurred[:, 28, 1], far.blurred[:, 28, 2], atol=1e-5)


def test_noise_level_matches_the_model():
    grey = np.full((128, 128, 3), 0.5, np.float32)
    sigma = 0.02
    out = synthesize(grey, np.random.default_rng(0), SynthSettings(noise_sigma=sigma, highlight_boost=1),
                     radius=np.zeros((128, 128), np.float32))
    x = 0.5 ** 2.2
    expected = sigma * np.sqrt(0.9 * x + 0.1)
    assert decode(out.blurred, 2.2).std() == pytest.approx(expected, rel=0.1)


# --- dual pixel ------------------------------------------------------------------------


@pytest.mark.parametrize("r,left_is_left", [(6.0, True), (-6.0, False)])
def test_dual_pixel_disparity_flips_across_focal_plane(r, left_is_left):
    img = np.zeros((41, 61, 3), np.float32)
    img[20, 30] = 0.9  # a point light
    s = SynthSettings(noise_sigma=0, highlight_boost=1, dual_pixel=True)
    out = synthesize(img, np.random.default_rng(0), s, radius=np.full((41, 61), r, np.float32))
    lx = centroid_x(decode(out.left, 2.2)[..., 0])
    rx = centroid_x(decode(out.right, 2.2)[..., 0])
    cx = centroid_x(decode(out.blurred, 2.2)[..., 0])
    shift = 4 * abs(r) / (3 * np.pi)  # centroid of a half disc
    assert (lx < rx) == left_is_left
    assert abs(lx - 30) == pytest.approx(shift, abs=0.1) and abs(rx - 30) == pytest.approx(shift, abs=0.1)
    assert cx == pytest.approx(30, abs=1e-3)


def test_dual_pixel_views_average_to_centre(texture):
    s = SynthSettings(dual_pixel=True, noise_sigma=0.01)
    out = synthesize(texture, np.random.default_rng(3), s)
    mean = (decode(out.left, 2.2) + decode(out.right, 2.2)) / 2
    np.testing.assert_allclose(mean, decode(out.blurred, 2.2), atol=1e-5)
    assert np.abs(out.left - out.right).max() > 0.05  # the views really differ (disparity)
    # In-focus pixels look the same in both views; defocused ones do not.
    h, w = texture.shape[:2]
    radius = np.zeros((h, w), np.float32)
    radius[:, w // 2:] = 6.0
    clean = synthesize(texture, np.random.default_rng(0), SynthSettings(dual_pixel=True, noise_sigma=0), radius=radius)
    assert np.abs(clean.left - clean.right)[:, :w // 2 - 8].max() < 1e-5
    assert np.abs(clean.left - clean.right)[:, w // 2 + 8:].mean() > 0.01


def test_dual_pixel_centre_equals_single_view_on_a_single_layer(texture):
    h, w = texture.shape[:2]
    radius = np.full((h, w), 5.0, np.float32)
    single = synthesize(texture, np.random.default_rng(0), CLEAN, radius=radius)
    dual = synthesize(texture, np.random.default_rng(0), replace(CLEAN, dual_pixel=True), radius=radius)
    # Away from the image borders (where each view is normalised on its own) they agree.
    np.testing.assert_allclose(dual.blurred[6:-6, 6:-6], single.blurred[6:-6, 6:-6], atol=1e-4)
    assert single.left is None and single.right is None


# --- PSFs, depth, scenes ---------------------------------------------------------------


@pytest.mark.parametrize("aperture", ["disc", "polygon"])
def test_psf_halves_sum_to_the_full_aperture(aperture):
    full = aperture_psf(5.3, aperture=aperture, blades=6, rotation=0.3)
    left = aperture_psf(5.3, aperture=aperture, blades=6, rotation=0.3, half="left")
    right = aperture_psf(5.3, aperture=aperture, blades=6, rotation=0.3, half="right")
    for k in (full, left, right):
        assert k.sum() == pytest.approx(1.0, abs=1e-5) and k.min() >= 0
    np.testing.assert_allclose((left + right) / 2, full, atol=1e-6)
    c = full.shape[1] // 2
    assert left[:, c + 1:].sum() == 0 and right[:, :c].sum() == 0


def test_polygon_aperture_differs_from_disc_and_fits_in_it():
    disc = aperture_psf(8, aperture="disc")
    hexa = aperture_psf(8, aperture="polygon", blades=6)
    assert np.abs(disc - hexa).max() > 1e-3
    assert ((hexa > 0) <= (disc > 0)).all()  # inscribed in the circle of the same radius
    assert (hexa > 0).sum() < (disc > 0).sum()
    delta = aperture_psf(0.3)
    assert delta.sum() == delta[delta.shape[0] // 2, delta.shape[1] // 2] == 1.0  # in focus: a delta


def test_layer_levels_include_the_focal_plane():
    lv = layer_levels(-3.0, 12.0, 8)
    assert 0.0 in lv and np.all(np.diff(lv) > 0) and lv[0] == -3.0 and lv[-1] == 12.0
    assert len(lv) <= 8
    assert np.all(np.diff(np.abs(lv[lv > 0])) > 0)
    assert len(layer_levels(2.0, 2.0, 8)) == 1


def test_thin_lens_radius_sign_and_scale():
    depth = np.linspace(1.0, 10.0, 100, dtype=np.float32)[None, :].repeat(4, 0)
    r = defocus_radius(depth, focus=3.0, strength=10.0)
    assert np.all(np.diff(r[0]) > 0)  # farther -> more positive
    assert r[0, 0] < 0 < r[0, -1]  # in front of focus negative, behind positive
    assert np.abs(r).max() == pytest.approx(10.0, rel=0.02)
    near = np.argmin(np.abs(depth[0] - 3.0))
    assert abs(r[0, near]) < 0.2


def test_random_depth_and_sample_radius():
    rng = np.random.default_rng(0)
    for _ in range(5):
        d = random_depth((40, 60), rng)
        assert d.shape == (40, 60) and d.dtype == np.float32 and np.isfinite(d).all() and (d > 0).all()
    img = np.random.default_rng(0).random((40, 60, 3), dtype=np.float32)
    s = SynthSettings(max_radius=5.0, min_radius=4.0)
    out = synthesize(img, np.random.default_rng(2), s)
    assert out.radius.shape == (40, 60) and out.radius.dtype == np.float32
    assert np.abs(out.radius).max() <= 5.0
    assert out.info["depth"] == "random" and 4.0 <= out.info["strength"] <= 5.0


def test_depth_maps_with_unknown_or_infinite_distances_render():
    """Stereo and sensor depth maps have holes (NaN) and sky (inf); a NaN focus once sent the
    layer search into endless recursion."""
    img = dead_leaves((48, 48), np.random.default_rng(0))
    depth = np.tile(np.linspace(1.0, 8.0, 48, dtype=np.float32), (48, 1))
    depth[:6, :6] = np.nan
    depth[:, -12:] = np.inf
    for seed in range(8):  # random focus quantiles, some falling among the infinite depths
        out = synthesize(img, np.random.default_rng(seed), CLEAN, depth)
        assert np.isfinite(out.radius).all() and np.isfinite(out.blurred).all()
        assert not np.isnan(out.info["focus"])
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="focus"):
        synthesize(img, rng, CLEAN, depth, focus=float("nan"))
    with pytest.raises(ValueError, match="positive finite distances"):
        synthesize(img, rng, CLEAN, np.full((48, 48), np.nan, np.float32))


def test_render_defocus_refuses_a_radius_map_that_does_not_fit():
    from kpac_cli.synth import render_defocus

    img = np.random.default_rng(0).random((32, 32, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="radius must be 32x32"):
        render_defocus(img, np.full((16, 16), 2.0, np.float32))  # was a silently cropped image
    with pytest.raises(ValueError, match="finite"):
        render_defocus(img, np.full((32, 32), np.nan, np.float32))
    with pytest.raises(ValueError, match="HxWx3"):
        render_defocus(img[..., 0], np.zeros((32, 32), np.float32))


def test_settings_refuse_nan_and_infinity():
    # NaN noise passed the check and rendered without noise; NaN gamma rendered NaN images.
    for field, value in (("noise_sigma", float("nan")), ("noise_sigma", float("inf")),
                         ("gamma", float("nan")), ("gamma", float("inf")), ("highlight_boost", float("inf"))):
        with pytest.raises(ValueError, match=field):
            SynthSettings(**{field: value})


def test_random_depth_edges_follow_the_photo():
    from kpac_cli.synth.scenes import superpixels

    img = dead_leaves((96, 96), np.random.default_rng(5), min_leaf=6.0, texture=False)
    labels = superpixels(img)
    same = labels[:, 1:] == labels[:, :-1]
    jumps = 0
    for seed in range(6):
        d = 1.0 / random_depth((96, 96), np.random.default_rng(seed), image=img)
        rel = np.abs(np.diff(d, axis=1)) / d[:, 1:]
        assert rel[same].max() < 0.05  # inside a superpixel: smooth (a tilted plane at most)
        jumps += int((rel[~same] > 0.2).sum())  # the occlusion edges are between superpixels
    assert jumps > 0


def test_dead_leaves_scene_statistics():
    img, depth = dead_leaves((128, 128), np.random.default_rng(0), return_depth=True)
    assert img.shape == (128, 128, 3) and img.dtype == np.float32
    assert 0 <= img.min() and img.max() <= 1 and depth.shape == (128, 128) and (depth > 0).all()
    # Natural images have a ~1/f^2 power spectrum: fit the radially averaged slope.
    g = img.mean(axis=2) - img.mean()
    p = np.abs(np.fft.fft2(g)) ** 2
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(128), np.fft.fftfreq(128), indexing="ij"))
    sel = (f > 0.02) & (f < 0.3)
    slope = np.polyfit(np.log(f[sel]), np.log(p[sel]), 1)[0]
    assert -3.0 < slope < -1.3, slope
    assert len(np.unique(depth)) > 10  # many leaves at their own depths


# --- determinism ----------------------------------------------------------------------


def test_synthesize_is_deterministic(texture):
    s = SynthSettings(dual_pixel=True, aperture="polygon")
    a = synthesize(texture, np.random.default_rng(11), s)
    b = synthesize(texture, np.random.default_rng(11), s)
    c = synthesize(texture, np.random.default_rng(12), s)
    for f in ("blurred", "radius", "left", "right"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.blurred, c.blurred)
    np.testing.assert_array_equal(a.sharp, texture)  # the target is the clean input


# --- sources and datasets -------------------------------------------------------------


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_sharp_sources_enumerates_files_skimage_and_procedural(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    iio.imwrite(tmp_path / "a" / "x.png", np.full((20, 30, 3), 200, np.uint8))
    iio.imwrite(tmp_path / "a" / "sub" / "y.JPG", np.full((20, 30), 100, np.uint8))  # grey
    tifffile.imwrite(tmp_path / "a" / "z.tif", np.full((20, 30, 3), 65535, np.uint16))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    iio.imwrite(tmp_path / "x.png", np.zeros((10, 10, 3), np.uint8))  # same stem as a/x.png
    srcs = sharp_sources([tmp_path / "a", tmp_path / "x.png"], include_skimage=True, procedural=2,
                         procedural_size=(32, 48))
    names = [s.name for s in srcs]
    assert names[:4] == ["sub_y", "x", "z", "x_2"]
    assert "skimage_astronaut" in names and names[-2:] == ["leaves_0000", "leaves_0001"]
    assert len(set(names)) == len(names)
    grey = srcs[0].load()
    assert grey.shape == (20, 30, 3) and grey.dtype == np.float32 and np.allclose(grey, 100 / 255, atol=0.02)
    assert np.allclose(srcs[2].load(), 1.0)
    img, depth = srcs[-1].load_with_depth()
    assert img.shape == (32, 48, 3) and depth.shape == (32, 48)
    np.testing.assert_array_equal(img, srcs[-1].load())  # procedural scenes are reproducible
    with pytest.raises(FileNotFoundError):
        sharp_sources([tmp_path / "missing"])
    clone = pickle.loads(pickle.dumps(srcs))  # data-loader workers get them pickled
    assert [s.name for s in clone] == names
    np.testing.assert_array_equal(clone[1].load(), srcs[1].load())


def test_source_names_stay_unique_when_a_numbered_name_is_a_file_name(tmp_path):
    """a.jpg and a.png are a and a_2; a_2.png must not be a_2 too, or the summary's sources mislead."""
    for name in ("a.jpg", "a.png", "a_2.png"):
        iio.imwrite(tmp_path / name, np.full((24, 24, 3), 90, np.uint8))
    srcs = sharp_sources([tmp_path], include_skimage=False)
    assert [(s.name, Path(s.origin).name) for s in srcs] == [("a", "a.jpg"), ("a_2", "a.png"), ("a_2_2", "a_2.png")]
    summary = write_dataset(srcs, tmp_path / "out", count=3, crop=16, seed=0, settings=CLEAN)
    assert sorted(r["source"] for r in summary["samples"]) == ["a", "a_2", "a_2_2"]


def test_write_dataset_dpdd_layout_and_determinism(tmp_path):
    srcs = sharp_sources(None, include_skimage=False, procedural=2, procedural_size=(72, 90))
    s = SynthSettings(dual_pixel=True, max_radius=6)
    kw = dict(count=5, crop=48, seed=3, settings=s, split="val")
    summary = write_dataset(srcs, tmp_path / "a", **kw)
    write_dataset(srcs, tmp_path / "b", **kw)
    other = write_dataset(srcs, tmp_path / "c", **{**kw, "seed": 4})

    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert a == b  # byte-identical, manifest included
    assert a != _tree(tmp_path / "c") and other["count"] == 5
    assert summary["count"] == 5 and summary["failed"] == [] and summary["seed"] == 3
    dirs = dataset_dirs("val", True)
    assert set(dirs.values()) == {"val_c/source", "val_c/target", "val_c/radius", "val_l/source", "val_r/source"}
    stems = None
    for role, d in dirs.items():
        files = sorted((tmp_path / "a" / d).iterdir())
        assert len(files) == 5
        names = [f.stem for f in files]
        stems = stems or names
        assert names == stems  # matching names across directories
    assert {n.split("_", 1)[1] for n in stems} == {"leaves_0000", "leaves_0001"}  # both sources used
    assert len(summary["files"]) == 25 and all((tmp_path / "a" / f).is_file() for f in summary["files"])
    assert not list((tmp_path / "a").rglob(".*"))  # no temporary files left behind

    name = stems[0]
    blurred = iio.imread(tmp_path / "a" / "val_c" / "source" / f"{name}.png")
    sharp = iio.imread(tmp_path / "a" / "val_c" / "target" / f"{name}.png")
    radius = tifffile.imread(tmp_path / "a" / "val_c" / "radius" / f"{name}.tiff")
    assert blurred.shape == sharp.shape == (48, 48, 3) and blurred.dtype == np.uint8
    assert radius.shape == (48, 48) and radius.dtype == np.float32 and np.abs(radius).max() <= 6
    manifest = json.loads((tmp_path / "a" / "synth_val.json").read_text())
    assert manifest["count"] == 5 and manifest["settings"]["dual_pixel"] is True
    assert [r["name"] for r in manifest["samples"]] == [Path(f).stem for f in summary["files"][::5]]


def test_write_dataset_16_bit_and_unreadable_source(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    srcs = sharp_sources([bad], include_skimage=False, procedural=1, procedural_size=(40, 40))
    summary = write_dataset(srcs, tmp_path / "out", count=4, crop=64, seed=0, settings=CLEAN, bit_depth=16)
    assert summary["count"] == 2 and summary["requested"] == 4
    assert [f["source"] for f in summary["failed"]] == ["bad"]
    files = sorted((tmp_path / "out" / "train_c" / "source").iterdir())
    assert len(files) == 2 and all(f.suffix == ".png" for f in files)
    img, info = read_image(files[0])
    assert info.bit_depth == 16 and img.shape == (40, 40, 3)  # smaller than the crop: not upscaled
    assert not (tmp_path / "out" / "train_l").exists()


def test_settings_validation():
    with pytest.raises(ValueError):
        SynthSettings(min_radius=5, max_radius=2)
    with pytest.raises(ValueError):
        SynthSettings(aperture="triangle")
    for boost in (0.5, float("nan")):  # below 1 it would do what 1 does (nothing)
        with pytest.raises(ValueError, match="highlight_boost"):
            SynthSettings(highlight_boost=boost)
    with pytest.raises(ValueError):
        synthesize(np.zeros((8, 8, 3), np.float32), np.random.default_rng(0), depth=np.ones((4, 4)))


def test_core_does_not_import_the_cli_stack():
    code = "import sys, kpac_cli.synth; print(sorted(m for m in ('typer', 'rich') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


# --- the command ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runner_app():
    from typer.testing import CliRunner

    from kpac_cli.cli import app

    return CliRunner(), app


def test_cli_synth_json(runner_app, tmp_path):
    runner, app = runner_app
    out = tmp_path / "ds"
    res = runner.invoke(app, ["synth", "-o", str(out), "--count", "3", "--crop", "40", "--no-skimage",
                              "--procedural", "2", "--procedural-size", "56", "--dual", "--max-radius", "5",
                              "--aperture", "polygon", "--json", "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["count"] == 3 and summary["settings"]["aperture"] == "polygon"
    for d in ("train_c/source", "train_c/target", "train_l/source", "train_r/source"):
        assert len(list((out / d).glob("*.png"))) == 3


def test_cli_synth_says_which_sources_gave_samples_smaller_than_the_crop(runner_app, tmp_path):
    import imageio.v3 as iio

    runner, app = runner_app
    rng = np.random.default_rng(0)
    iio.imwrite(tmp_path / "big.png", (rng.random((64, 64, 3)) * 255).astype(np.uint8))
    iio.imwrite(tmp_path / "wide.png", (rng.random((30, 64, 3)) * 255).astype(np.uint8))
    out = tmp_path / "ds"
    res = runner.invoke(app, ["synth", str(tmp_path / "big.png"), str(tmp_path / "wide.png"), "-o", str(out),
                              "--count", "4", "--crop", "48", "--no-skimage"])
    assert res.exit_code == 0, res.output
    assert "note: 1 source(s) smaller than --crop 48 in a side gave smaller samples (never upscaled): wide" in res.stderr
    sizes = {iio.imread(p).shape[:2] for p in (out / "train_c/source").glob("*.png")}
    assert sizes == {(48, 48), (30, 48)}
    res = runner.invoke(app, ["synth", str(tmp_path / "big.png"), "-o", str(tmp_path / "ds2"), "--count", "2",
                              "--crop", "48", "--no-skimage"])
    assert res.exit_code == 0 and "note:" not in res.stderr


def test_cli_synth_errors(runner_app, tmp_path):
    runner, app = runner_app
    res = runner.invoke(app, ["synth", "-o", str(tmp_path / "x"), "--no-skimage"])
    assert res.exit_code == 2  # nothing to synthesise from
    res = runner.invoke(app, ["synth", "-o", str(tmp_path / "x"), "--procedural", "1", "--bit-depth", "12"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["synth", str(tmp_path / "missing"), "-o", str(tmp_path / "x")])
    assert res.exit_code == 2
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    res = runner.invoke(app, ["synth", str(bad), "-o", str(tmp_path / "x"), "--no-skimage", "--count", "1"])
    assert res.exit_code == 1
    res = runner.invoke(app, ["synth", "--help"])
    assert res.exit_code == 0 and "Example" in res.output


def _photos(root: Path, names=("a", "b")) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for n in names:
        iio.imwrite(root / f"{n}.png", (rng.random((48, 48, 3)) * 255).astype(np.uint8))
        paths.append(root / f"{n}.png")
    return paths


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_cli_synth_refuses_a_dataset_in_place_and_overwrite_leaves_exactly_one(runner_app, tmp_path):
    runner, app = runner_app
    a, b = _photos(tmp_path / "photos")
    out = tmp_path / "syn1"
    common = ["-o", str(out), "--crop", "24", "--max-radius", "3", "-q"]
    res = runner.invoke(app, ["synth", str(a), str(b), "--count", "3", *common])
    assert res.exit_code == 0, res.output
    first = _tree(out)
    res = runner.invoke(app, ["synth", str(a), "--count", "2", *common])
    assert res.exit_code == 2 and "--overwrite" in res.stderr and len(res.stderr.splitlines()) == 1
    assert _tree(out) == first  # untouched
    # --overwrite: the folder holds the new dataset and nothing of the old one (dual-pixel views included)
    for extra in (["--dual"], []):
        res = runner.invoke(app, ["synth", str(a), "--count", "2", "--overwrite", *extra, *common])
        assert res.exit_code == 0, res.output
        manifest = json.loads((out / "synth_train.json").read_text())
        assert _files(out) == {"synth_train.json", *manifest["files"]} and manifest["count"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["synth_train.json", "train_c"]
    # another split is another dataset: written beside it, left alone
    res = runner.invoke(app, ["synth", str(b), "--count", "1", "--split", "val", *common])
    assert res.exit_code == 0, res.output
    assert len(json.loads((out / "synth_val.json").read_text())["files"]) == 3
    assert (out / "synth_train.json").is_file()


def test_cli_synth_overwrite_clears_an_interrupted_run_but_never_foreign_files(runner_app, tmp_path):
    runner, app = runner_app
    (a,) = _photos(tmp_path / "photos", ("a",))
    out = tmp_path / "syn"
    common = ["-o", str(out), "--crop", "24", "--max-radius", "3", "-q"]
    res = runner.invoke(app, ["synth", str(a), "--count", "3", *common])
    assert res.exit_code == 0, res.output
    (out / "synth_train.json").unlink()  # as if the run had been killed before its summary
    (out / ".synth_train.incomplete").touch()  # ... which leaves its marker
    common += ["--count", "1"]
    res = runner.invoke(app, ["synth", str(a), *common])
    assert res.exit_code == 2 and "--overwrite" in res.stderr
    res = runner.invoke(app, ["synth", str(a), "--overwrite", *common])
    assert res.exit_code == 0, res.output
    assert _files(out) == {"synth_train.json", *json.loads((out / "synth_train.json").read_text())["files"]}
    # a file kpac synth did not write, where it writes: refused even with --overwrite, and kept
    mine = out / "train_c" / "source" / "IMG_0001.png"
    mine.write_bytes(b"my photo")
    before = _tree(out)
    res = runner.invoke(app, ["synth", str(a), "--overwrite", *common])
    assert res.exit_code == 2 and "IMG_0001.png" in res.stderr and len(res.stderr.splitlines()) == 1
    assert _tree(out) == before
    # a file merely named like a sample, with no kpac synth run to have written it: not ours
    other = tmp_path / "other"
    (other / "train_c" / "source").mkdir(parents=True)
    (other / "train_c" / "source" / "00042_my_photo.png").write_bytes(b"my photo")
    res = runner.invoke(app, ["synth", str(a), "--overwrite", "-o", str(other), "--crop", "24", "--max-radius", "3", "-q"])
    assert res.exit_code == 2 and "00042_my_photo.png" in res.stderr
    assert (other / "train_c" / "source" / "00042_my_photo.png").read_bytes() == b"my photo"


def test_write_dataset_refuses_to_mix_datasets(tmp_path):
    srcs = sharp_sources(None, include_skimage=False, procedural=1, procedural_size=(40, 40))
    kw = dict(count=2, crop=24, seed=0, settings=CLEAN)
    write_dataset(srcs, tmp_path, **kw)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_dataset(srcs, tmp_path, **{**kw, "count": 1})
    summary = write_dataset(srcs, tmp_path, **{**kw, "count": 1}, overwrite=True)
    assert _files(tmp_path) == {"synth_train.json", *summary["files"]}


def test_cli_synth_uses_scikit_image_photos_only_when_asked(runner_app, tmp_path):
    """They are kpac's held-out benchmark photos: as for kpac train, only with --skimage."""
    runner, app = runner_app
    common = ["--procedural", "1", "--procedural-size", "32", "--count", "1", "--crop", "16", "--max-radius", "2"]
    res = runner.invoke(app, ["synth", "-o", str(tmp_path / "a"), *common])
    assert res.exit_code == 0, res.output
    assert "1 sources" in res.stderr
    res = runner.invoke(app, ["synth", "-o", str(tmp_path / "b"), "--no-skimage", *common])  # still accepted
    assert res.exit_code == 0 and "1 sources" in res.stderr, res.output
    res = runner.invoke(app, ["synth", "-o", str(tmp_path / "c"), "--skimage", *common])
    assert res.exit_code == 0, res.output
    assert f"{1 + len(SKIMAGE_PHOTOS)} sources" in res.stderr
    res = runner.invoke(app, ["synth", "-o", str(tmp_path / "d")])
    assert res.exit_code == 2 and "--skimage" in res.stderr


@pytest.mark.parametrize("args, flag", [
    (["--min-radius", "5", "--max-radius", "2"], "--min-radius"),
    (["--max-radius", "-1"], "--max-radius"),
    (["--noise", "-0.1"], "--noise"),
    (["--noise", "nan"], "--noise"),
    (["--highlight-boost", "0"], "--highlight-boost"),
    (["--highlight-boost", "0.5"], "--highlight-boost"),  # would be off, as at 1
    (["--aperture", "triangle"], "--aperture"),
    (["--blades", "2"], "--blades"),
    (["--layers", "0"], "--layers"),
])
def test_cli_synth_errors_name_the_flag(runner_app, tmp_path, args, flag):
    runner, app = runner_app
    res = runner.invoke(app, ["synth", "-o", str(tmp_path / "x"), "--procedural", "1", *args])
    assert res.exit_code == 2 and res.stderr.startswith(f"error: {flag} "), res.output
    assert not any(name in res.stderr for name in ("min_radius", "max_radius", "noise_sigma", "highlight_boost"))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, message", [
    (["--blades", "8"], "--blades applies to --aperture polygon"),
    (["--no-skimage", str(Path(__file__)), "--procedural-size", "64"], "--procedural-size applies to --procedural"),
])
def test_cli_synth_options_that_would_change_nothing_are_usage_errors(runner_app, tmp_path, args, message):
    runner, app = runner_app
    res = runner.invoke(app, ["synth", "-o", str(tmp_path / "x"), "--count", "1", *args])
    assert res.exit_code == 2 and res.stderr.startswith(f"error: {message}"), res.output
    assert not (tmp_path / "x").exists()


def test_cli_synth_summary_shows_the_folder_as_it_is(runner_app, tmp_path):
    runner, app = runner_app
    out = tmp_path / "set [v2]"
    res = runner.invoke(app, ["synth", "-o", str(out), "--procedural", "1", "--procedural-size", "32", "--count", "1",
                              "--crop", "16", "--max-radius", "2"])
    assert res.exit_code == 0, res.output
    assert f"to {out} in" in res.stderr


def test_cli_synth_output_is_spelled_as_in_the_other_commands(runner_app, tmp_path):
    """-o/--output as in kpac deblur, blurmap and convert; --out, the first spelling, still works."""
    runner, app = runner_app
    common = ["--procedural", "1", "--procedural-size", "32", "--count", "1", "--crop", "16", "--max-radius", "2", "-q"]
    trees = []
    for flag in ("-o", "--output", "--out"):
        out = tmp_path / flag.strip("-")
        res = runner.invoke(app, ["synth", flag, str(out), *common])
        assert res.exit_code == 0, res.output
        trees.append({k: v for k, v in _tree(out).items() if k.endswith(".png")})
    assert trees[0] and trees[0] == trees[1] == trees[2]  # the same dataset whichever way it is asked for
    res = runner.invoke(app, ["synth", "--help"], env={"COLUMNS": "300"})
    assert res.exit_code == 0 and "--output" in res.stdout


def test_cli_synth_never_reads_its_own_datasets_as_sharp_photos(runner_app, tmp_path):
    """-o inside a SOURCES folder: later runs must not take the blurred images, targets and
    radius maps written there for sharp photos (nor those of a dataset written elsewhere in it)."""
    runner, app = runner_app
    photos = tmp_path / "photos"
    _photos(photos)
    common = ["--crop", "24", "--max-radius", "3", "-q", "--json"]

    def sources(*args):
        res = runner.invoke(app, ["synth", str(photos), *args, *common])
        assert res.exit_code == 0, res.output
        return sorted({s["source"] for s in json.loads(res.stdout)["samples"]})

    assert sources("-o", str(photos / "ds"), "--count", "2") == ["a", "b"]
    assert sources("-o", str(photos / "ds"), "--count", "4", "--split", "val", "--dual") == ["a", "b"]
    assert sources("-o", str(photos / "ds"), "--count", "4", "--overwrite") == ["a", "b"]
    assert sources("-o", str(photos / "other"), "--count", "4") == ["a", "b"]
    # a dataset folder given by name is used as given
    names = [s.name for s in sharp_sources([photos / "ds" / "train_c" / "target"], include_skimage=False,
                                           skip_datasets=True)]
    assert len(names) == 4 and all(n.split("_", 1)[1] in ("a", "b") for n in names)
    # the library's default (kpac train's enumeration) is unchanged
    assert len(sharp_sources([photos], include_skimage=False)) > 2


def test_cli_synth_sigterm_stops_like_ctrl_c(tmp_path):
    """SIGTERM (a job scheduler's stop) ends the run with exit code 143 and an error line, and
    leaves no temporary file of an atomic write behind, as Ctrl-C does with 130."""
    import os
    import signal
    import time

    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "kpac_cli", "synth", "-o", str(out), "--procedural", "1", "--procedural-size", "96",
           "--count", "100000", "--crop", "64", "--max-radius", "4", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("train_c/target/*.png")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == (f"error: terminated: the --split train dataset in {out} is incomplete "
                                            "(no synth_train.json); rerun with --overwrite to replace it")
    # only the in-progress marker, which says the samples are kpac's, stays hidden
    assert [p.name for p in out.rglob(".*")] == [".synth_train.incomplete"]


def test_cli_synth_overwrite_never_deletes_its_sources(runner_app, tmp_path):
    """A dataset's targets used as sources of a run that --overwrite's that very dataset would be
    read, then deleted as stale: refused before any work."""
    runner, app = runner_app
    photos = tmp_path / "photos"
    _photos(photos)
    common = ["--crop", "24", "--max-radius", "3", "-q"]
    assert runner.invoke(app, ["synth", str(photos), "-o", str(tmp_path / "ds"), "--count", "2", *common]).exit_code == 0
    targets = tmp_path / "ds" / "train_c" / "target"
    before = {p.name: p.read_bytes() for p in targets.iterdir()}
    res = runner.invoke(app, ["synth", str(targets), "-o", str(tmp_path / "ds"), "--count", "3", "--overwrite", *common])
    assert res.exit_code == 2 and "a source, but part of the --split train dataset" in res.output, res.output
    assert {p.name: p.read_bytes() for p in targets.iterdir()} == before
    # another split of the same folder replaces nothing the sources are
    res = runner.invoke(app, ["synth", str(targets), "-o", str(tmp_path / "ds"), "--count", "2", "--split", "val", *common])
    assert res.exit_code == 0, res.output


def test_cli_synth_warns_when_a_split_repeats_another(runner_app, tmp_path):
    """Sample i draws from (--seed, i) in every split: a val split with the train split's seed and
    sources is a copy of its first samples, which would make validation scores meaningless."""
    runner, app = runner_app
    photos = tmp_path / "photos"
    _photos(photos)
    out = tmp_path / "ds"
    common = [str(photos), "-o", str(out), "--crop", "24", "--max-radius", "3", "-q"]
    assert runner.invoke(app, ["synth", *common, "--count", "2"]).exit_code == 0
    res = runner.invoke(app, ["synth", *common, "--count", "3", "--split", "val"])
    assert res.exit_code == 0, res.output
    assert ("warning: 2 of the 3 samples repeat those of the 'train' split in " in res.stderr
            and "same --seed 0" in res.stderr), res.stderr
    for name in ("00000_a.png", "00001_b.png"):  # what the warning is about
        assert (out / "val_c/source" / name).read_bytes() == (out / "train_c/source" / name).read_bytes()
    res = runner.invoke(app, ["synth", *common, "--count", "3", "--split", "test", "--seed", "1"])
    assert res.exit_code == 0 and "warning" not in res.stderr, res.output
    res = runner.invoke(app, ["synth", str(photos), "-o", str(out), "--crop", "16", "--max-radius", "3", "-q",
                              "--count", "3", "--split", "other"])  # other crops at the same seed
    assert res.exit_code == 0 and "warning" not in res.stderr, res.output


def test_cli_synth_out_of_memory_is_an_error_line(runner_app, tmp_path, monkeypatch):
    """A huge --max-radius (or source) runs out of memory: one error line and exit 1, no traceback."""
    import kpac_cli.synth.dataset as dataset

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(dataset, "synthesize", no_memory)
    runner, app = runner_app
    res = runner.invoke(app, ["synth", "-o", str(tmp_path / "x"), "--procedural", "1", "--procedural-size", "32",
                              "--count", "1", "--max-radius", "50000", "-q"])
    assert res.exit_code == 1, res.output
    assert res.stderr.strip() == ("error: cannot write the dataset: out of memory (--max-radius 50000: a smaller one, "
                                  "--max-side or --crop needs less)")


def test_cli_synth_names_the_folder_without_images(runner_app, tmp_path):
    runner, app = runner_app
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no photo")
    res = runner.invoke(app, ["synth", str(tmp_path / "empty"), "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and f"no sharp images in {tmp_path / 'empty'}" in res.stderr, res.output


def test_cli_synth_names_an_unreadable_source_once(runner_app, tmp_path):
    runner, app = runner_app
    photos = tmp_path / "photos"
    photos.mkdir()
    iio.imwrite(photos / "good.png", (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))
    (photos / "bad.png").write_bytes(b"\x89PNG but no image")
    res = runner.invoke(app, ["synth", str(photos), "-o", str(tmp_path / "ds"), "--count", "2", "-q"])
    assert res.exit_code == 1, res.output  # one of the two samples could not be made
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {photos / 'bad.png'}: "), res.stderr
    assert errors[0].count(str(photos / "bad.png")) == 1, errors[0]


@pytest.mark.parametrize("where,said", [
    ("-", "-o -: kpac synth writes a dataset folder, not to stdout; give the folder to write"),
    ("notes.txt", "-o {tmp}/notes.txt: is a file (give the dataset folder)"),
    ("notes.txt/ds", "-o {tmp}/notes.txt/ds: cannot create it: {tmp}/notes.txt is not a folder"),
])
def test_cli_synth_refuses_an_output_that_cannot_be_the_dataset_folder(runner_app, tmp_path, monkeypatch, where, said):
    """'-' is stdout elsewhere in kpac: never a folder named '-'; and a folder below a file is
    refused before any rendering, as a file is."""
    runner, app = runner_app
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("a file")
    out = where if where == "-" else str(tmp_path / where)
    res = runner.invoke(app, ["synth", "-o", out, "--procedural", "1", "--procedural-size", "16", "--count", "1"])
    assert res.exit_code == 2, res.output
    assert " ".join(res.stderr.split()) == "error: " + said.format(tmp=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_cli_synth_refuses_stdin_as_a_source(runner_app, tmp_path, monkeypatch):
    runner, app = runner_app
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["synth", "-", "-o", "ds", "--count", "1"], input=b"\x89PNG")
    assert res.exit_code == 2 and "kpac synth reads image files and folders, not stdin ('-')" in res.stderr, res.output
    assert not (tmp_path / "ds").exists()


def test_cli_synth_says_a_write_failure_in_words(runner_app, tmp_path, monkeypatch):
    """A read-only -o folder: the path and the reason, not Python's "[Errno 13] ...: 'PATH'"."""
    import kpac_cli.synth as synth

    target = tmp_path / "ro" / "train_c" / "source"

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(target))

    monkeypatch.setattr(synth, "write_dataset", read_only)
    runner, app = runner_app
    res = runner.invoke(app, ["synth", "-o", str(tmp_path / "ro"), "--procedural", "1", "--procedural-size", "16",
                              "--count", "1", "-q"])
    assert res.exit_code == 1, res.output
    assert " ".join(res.stderr.split()) == f"error: cannot write the dataset: {target}: Permission denied"


def test_cli_synth_overwrite_where_every_source_fails_keeps_the_earlier_dataset(runner_app, tmp_path):
    """A run that could write no sample (exit 1) used to replace the earlier dataset by an empty one."""
    runner, app = runner_app
    out = tmp_path / "ds"
    common = ["-o", str(out), "--count", "2", "--crop", "16", "--max-radius", "3"]
    res = runner.invoke(app, ["synth", *map(str, _photos(tmp_path / "photos")), *common, "-q"])
    assert res.exit_code == 0, res.output
    before = {name: (out / name).read_bytes() for name in _files(out)}
    bad = tmp_path / "bad" / "x.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG but no image")
    res = runner.invoke(app, ["synth", str(bad.parent), *common, "--overwrite"])
    assert res.exit_code == 1, res.output
    assert {name: (out / name).read_bytes() for name in _files(out)} == before
    assert "wrote no samples: every source failed; the --split train dataset already in" in " ".join(res.stderr.split())
    # into a new folder: nothing is left behind, neither an empty manifest nor empty folders
    res = runner.invoke(app, ["synth", str(bad.parent), "-o", str(tmp_path / "new"), "--count", "2", "--json", "-q"])
    assert res.exit_code == 1 and json.loads(res.stdout)["count"] == 0, res.output
    assert not (tmp_path / "new").exists()


def test_a_photo_given_twice_is_refused_not_drawn_twice(tmp_path):
    # a folder and one of its files, or a file twice: it would be two sources under two names
    from PIL import Image
    from typer.testing import CliRunner

    from kpac_cli.cli import app

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a", "b"):
        Image.fromarray((np.random.default_rng(1).random((40, 40, 3)) * 255).astype(np.uint8)).save(photos / f"{name}.png")
    runner = CliRunner()
    for given in ([photos, photos / "a.png"], [photos / "a.png", tmp_path / "photos" / "." / "a.png"]):
        res = runner.invoke(app, ["synth", *map(str, given), "-o", str(tmp_path / "ds"), "--count", "2", "--crop", "32"])
        assert res.exit_code == 2 and "a.png is given twice" in res.stderr, res.output
        assert not (tmp_path / "ds").exists()
    res = runner.invoke(app, ["synth", str(photos), "-o", str(tmp_path / "ds"), "--count", "2", "--crop", "32", "-q"])
    assert res.exit_code == 0, res.output


def test_the_order_sources_are_listed_in_does_not_change_the_dataset(tmp_path):
    """kpac synth c.png a.png b.png writes what kpac synth a.png b.png c.png writes (as kpac train
    orders its sources by name): a benchmark regenerates from its photos, however they are listed."""
    paths = _photos(tmp_path / "photos", ("c", "a", "b"))
    kw = dict(count=4, crop=24, seed=0, settings=replace(CLEAN, max_radius=3))
    write_dataset(sharp_sources(paths, include_skimage=False), tmp_path / "listed", **kw)
    write_dataset(sharp_sources(sorted(paths), include_skimage=False), tmp_path / "sorted", **kw)
    assert _tree(tmp_path / "listed") == _tree(tmp_path / "sorted")


def test_manifest_records_the_kpac_version_and_each_source(tmp_path):
    """What made the dataset, to regenerate and check it: kpac's version, and each source's name,
    origin, size and (for a file) the SHA-256 of its bytes; no path, so reruns elsewhere match."""
    from kpac_cli import __version__

    (a,) = _photos(tmp_path / "photos", ("a",))
    srcs = sharp_sources([a], include_skimage=False, procedural=1, procedural_size=(40, 56))
    summary = write_dataset(srcs, tmp_path / "ds", count=2, crop=24, seed=0, settings=CLEAN)
    manifest = json.loads((tmp_path / "ds" / "synth_train.json").read_text())
    assert manifest["kpac_version"] == __version__ == summary["kpac_version"]
    assert manifest["sources"] == [
        {"name": "a", "origin": "file", "size": [48, 48], "sha256": hashlib.sha256(a.read_bytes()).hexdigest()},
        {"name": "leaves_0000", "origin": "procedural:0", "size": [40, 56]},
    ]
    assert str(tmp_path) not in (tmp_path / "ds" / "synth_train.json").read_text()


def _stop_after_first_sample(done: int, total: int) -> None:
    raise KeyboardInterrupt


def test_an_overwrite_stopped_midway_leaves_no_manifest_of_the_old_dataset(tmp_path):
    """Ctrl-C during --overwrite: the old manifest would describe files the new run has already
    replaced (another seed, other settings); it goes, the in-progress marker says what is left."""
    srcs = sharp_sources(None, include_skimage=False, procedural=2, procedural_size=(40, 40))
    kw = dict(count=3, crop=24, settings=CLEAN)
    write_dataset(srcs, tmp_path / "ds", seed=0, **kw)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(srcs, tmp_path / "ds", seed=1, overwrite=True, progress=_stop_after_first_sample, **kw)
    assert not (tmp_path / "ds" / "synth_train.json").exists()
    from kpac_cli.synth.dataset import left_incomplete

    assert left_incomplete(tmp_path / "ds")
    write_dataset(srcs, tmp_path / "ds", seed=1, overwrite=True, **kw)  # rerun: the new dataset, whole
    write_dataset(srcs, tmp_path / "fresh", seed=1, **kw)
    assert _tree(tmp_path / "ds") == _tree(tmp_path / "fresh") and not left_incomplete(tmp_path / "ds")


def _disk_full_after_first_sample(done: int, total: int) -> None:
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("stop, code, said", [
    (_stop_after_first_sample, 130, "error: interrupted"),
    (_disk_full_after_first_sample, 1, "error: cannot write the dataset: No space left on device"),
])
def test_cli_synth_stopped_says_the_split_is_incomplete(runner_app, tmp_path, monkeypatch, stop, code, said):
    """A run stopped after some samples leaves them without a manifest: the error line says so,
    and what reruns the command."""
    import kpac_cli.synth as synth

    runner, app = runner_app
    (a,) = _photos(tmp_path / "photos", ("a",))
    write = synth.write_dataset
    monkeypatch.setattr(synth, "write_dataset", lambda *args, **kw: write(*args, **{**kw, "progress": stop}))
    out = tmp_path / "ds"
    res = runner.invoke(app, ["synth", str(a), "-o", str(out), "--count", "3", "--crop", "24", "-q"])
    assert res.exit_code == code, res.output
    assert " ".join(res.stderr.split()) == (f"{said}: the --split train dataset in {out} is incomplete "
                                            "(no synth_train.json); rerun with --overwrite to replace it")


def test_cli_synth_names_a_folder_it_cannot_list(runner_app, tmp_path, monkeypatch):
    """A source folder without read permission: a one-line usage error that names it, no traceback."""
    import os

    photos = tmp_path / "photos"
    _photos(photos)
    listdir = os.listdir

    def no_permission(path="."):
        if Path(path) == photos:
            raise PermissionError(13, "Permission denied", str(path))
        return listdir(path)

    monkeypatch.setattr(os, "listdir", no_permission)
    runner, app = runner_app
    res = runner.invoke(app, ["synth", str(photos), "-o", str(tmp_path / "ds"), "--count", "1"])
    assert res.exit_code == 2, res.output
    assert " ".join(res.stderr.split()) == f"error: {photos}: cannot list folder (Permission denied)"
    assert not (tmp_path / "ds").exists()
