"""The numbers kpac's metrics give, checked against independent computations on real photos."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from kpac_cli import metrics as M


def _photo_pair() -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's chelsea (uint8 RGB) and a noisy copy of it."""
    target = data.chelsea()
    noise = np.random.default_rng(0).integers(-12, 13, target.shape)
    return np.clip(target.astype(np.int64) + noise, 0, 255).astype(np.uint8), target


def test_uint8_photos_score_as_scikit_image_scores_them():
    pred, target = _photo_pair()
    assert M.psnr(pred, target) == pytest.approx(peak_signal_noise_ratio(target, pred), abs=1e-9)
    assert M.ssim(pred, target) == pytest.approx(structural_similarity(target, pred, channel_axis=-1), abs=1e-9)


@pytest.mark.parametrize("metric", [M.psnr, M.ssim])
def test_integer_images_with_a_data_range_of_their_type_are_refused(metric):
    """psnr(uint8, uint8, data_range=255), as one calls scikit-image's, scaled the images to
    [0, 1] and then took 255 for their range: PSNR 48 dB too high, SSIM about 1."""
    pred, target = _photo_pair()
    with pytest.raises(ValueError, match="uint8.*data range is 1, not 255"):
        metric(pred, target, data_range=255)
    assert metric(pred, target, data_range=1) == metric(pred, target)


@pytest.mark.parametrize("metric", [M.psnr, M.ssim, M.mae])
def test_float_photos_in_0_255_are_refused_not_scored(metric):
    """Float 0-255 data with the data range 1 gave a negative PSNR and a plausible-looking
    SSIM (about 0.6 here) without a word."""
    pred, target = _photo_pair()
    with pytest.raises(ValueError, match=r"far outside the data range 0\.\.1 \(0-255 data\? divide by 255"):
        metric(pred.astype(np.float32), target.astype(np.float32))
    with pytest.raises(ValueError, match="prediction values"):
        metric(pred.astype(np.float64), target)


def test_float_photos_in_0_255_score_with_their_data_range():
    pred, target = (a.astype(np.float64) for a in _photo_pair())
    assert M.psnr(pred, target, data_range=255) == pytest.approx(
        peak_signal_noise_ratio(target, pred, data_range=255), abs=1e-9)
    assert M.ssim(pred, target, data_range=255) == pytest.approx(
        structural_similarity(target, pred, channel_axis=-1, data_range=255), abs=1e-9)


def test_overshooting_results_are_still_scored_as_they_are():
    """Unclipped results (Wiener ringing, raw network outputs) go a little outside [0, 1]."""
    pred, target = (a / 255.0 for a in _photo_pair())
    pred = pred * 1.6 - 0.3  # -0.3 .. 1.3
    expected = peak_signal_noise_ratio(target, pred, data_range=1)
    assert M.psnr(pred, target) == pytest.approx(expected, abs=1e-9)
    nan = pred.copy()
    nan[0, 0, 0] = np.nan
    assert np.isnan(M.psnr(nan, target))  # a diverged result still gives its NaN, not an error


def test_quantize_refuses_0_255_floats_which_it_would_clip_to_white():
    _, target = _photo_pair()
    with pytest.raises(ValueError, match="0-255 data"):
        M.quantize(target.astype(np.float32), 8)
    assert np.array_equal(M.quantize(target.astype(np.float32) / 255, 8) * 255, target)


def test_evaluate_records_a_0_255_float_pair_as_failed():
    pred, target = _photo_pair()
    report = M.evaluate([("cat", pred.astype(np.float32), target.astype(np.float32))],
                        lpips_model=None, on_error="skip")
    assert not report.rows
    assert report.failures and "0-255 data" in report.failures[0][1]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_a_data_range_that_is_no_range_is_refused(bad):
    pred, target = (a / 255.0 for a in _photo_pair())
    with pytest.raises(ValueError, match="data_range must be a positive number"):
        M.psnr(pred, target, data_range=bad)


def test_a_target_in_0_255_floats_is_named_in_the_failure():
    pred, target = _photo_pair()
    report = M.evaluate([("cat", pred, target.astype(np.float32))], lpips_model=None, on_error="skip")
    (name, message), = report.failures
    assert name == "cat" and message.startswith(f"target values run from 0 to {target.max()}, far outside")


def test_evaluate_records_a_signed_integer_pair_as_failed_not_a_crash():
    """int32 arrays (a custom reader, PIL mode "I") have no scale to score them by: refused like
    any bad pair, so one of them no longer stops the whole run with a TypeError."""
    pred, target = _photo_pair()
    pairs = [("signed", pred.astype(np.int32), target), ("fine", pred, target)]
    report = M.evaluate(pairs, lpips_model=None, on_error="skip")
    assert [r.name for r in report.rows] == ["fine"]
    assert report.failures == [("signed", "prediction: unsupported image dtype int32: use unsigned integers or floats in [0, 1]")]
    read_int32 = lambda path: np.asarray(target, dtype=np.int32)  # noqa: E731
    with pytest.raises(ValueError, match="^cat: target: unsupported image dtype int32"):
        M.evaluate([("cat", pred, "cat.png")], lpips_model=None, reader=read_int32)


def test_a_prediction_turned_by_90_degrees_is_said_to_be_turned():
    pred, target = _photo_pair()
    report = M.evaluate([("cat", pred.transpose(1, 0, 2), target)], lpips_model=None, on_error="skip")
    (_, message), = report.failures
    assert message == (f"prediction {pred.shape[1::-1] + (3,)} and target {target.shape} have different shapes: the prediction "
                       "is the target's size turned by 90 degrees: an EXIF orientation applied to one of them only?")
    report = M.evaluate([("cat", pred[:-1], target)], lpips_model=None, on_error="skip")
    assert report.failures[0][1].endswith("have different shapes")  # only a turned size is said to be turned


def test_an_image_too_small_for_lpips_keeps_its_other_scores():
    """A pair 7 to 30 pixels a side scores PSNR/SSIM/MAE; its LPIPS is n/a with the reason, and
    the LPIPS means are over the images that have one, as the notes say."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = M.LPIPS()  # random weights: what is checked is which images get a number
    pred, target = _photo_pair()
    small = (pred[:20, :24], target[:20, :24])
    report = M.evaluate([("big", pred, target), ("small", *small), ("big2", pred[:64, :64], target[:64, :64])],
                        lpips_model=model, labels={"big": "a", "small": "b", "big2": "a"})
    big, tiny, big2 = report.rows
    assert tiny.psnr == pytest.approx(M.psnr(*small)) and tiny.ssim == pytest.approx(M.ssim(*small))
    assert tiny.lpips is None and tiny.lpips_unavailable.startswith("image too small for LPIPS") and "24x20" in tiny.lpips_unavailable
    assert big.lpips is not None and big.lpips_unavailable is None
    summary = report.summary()
    assert summary["overall"]["count"] == 3 and summary["overall"]["psnr"] == pytest.approx((big.psnr + tiny.psnr + big2.psnr) / 3)
    assert summary["overall"]["lpips"] == pytest.approx((big.lpips + big2.lpips) / 2)
    assert summary["splits"]["b"]["lpips"] is None and summary["splits"]["a"]["lpips"] is not None
    assert report.lpips_unavailable is None
    (note,) = [n for n in report.notes if "LPIPS" in n]
    assert "1 image(s)" in note and "small" in note and "over the other 2 image(s)" in note
    d = report.to_dict(paper=False)
    assert d["images"][1]["lpips"] is None and "too small" in d["images"][1]["lpips_unavailable"]
    assert d["summary"]["splits"]["b"]["lpips"] is None
    assert report.csv_text().splitlines()[2].split(",")[5:] == ["", ""]  # no LPIPS, and no error: it was scored
    assert "| small | b |" in report.markdown(paper=False) and "nan" not in report.markdown(paper=False).lower()


def test_grey_arrays_get_lpips_as_grey_files_do():
    """(H, W) arrays score without LPIPS weights; with them, the pair failed ("LPIPS needs (H, W, 3)
    images"). Grey is replicated to RGB, as the reader does with grey files: the same scores."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = M.LPIPS()
    pred, target = (a[:64, :64, 1] for a in _photo_pair())
    rgb = (np.repeat(a[..., None], 3, axis=2) for a in (pred, target))
    grey_row = M.evaluate([("grey", pred, target)], lpips_model=model).rows[0]
    one_channel_row = M.evaluate([("grey", pred[..., None], target[..., None])], lpips_model=model).rows[0]
    rgb_row = M.evaluate([("grey", *rgb)], lpips_model=model).rows[0]
    for row in (one_channel_row, rgb_row):
        for metric in ("psnr", "ssim", "mae", "lpips"):
            assert getattr(row, metric) == pytest.approx(getattr(grey_row, metric), rel=1e-9)
    assert grey_row.lpips is not None


def _photo_pair_16bit() -> tuple[np.ndarray, np.ndarray]:
    """A crop of scikit-image's astronaut widened to 16 bits with detail below the 8-bit step,
    and a noisy copy of it: 8-bit quantisation changes their scores."""
    rng = np.random.default_rng(1)
    target = data.astronaut()[100:260, 150:330].astype(np.int64) * 257 + rng.integers(-120, 121, (160, 180, 3))
    pred = target + rng.integers(-300, 301, target.shape)
    return (np.clip(a, 0, 65535).astype(np.uint16) for a in (pred, target))


def test_16bit_files_are_scored_at_16_bits_as_scikit_image_scores_them(tmp_path):
    import tifffile

    pred, target = _photo_pair_16bit()
    tifffile.imwrite(tmp_path / "p.tif", pred)
    tifffile.imwrite(tmp_path / "t.tif", target)
    report = M.evaluate([("x", tmp_path / "p.tif", tmp_path / "t.tif")], bit_depth=16, lpips_model=None)
    row = report.rows[0]
    p, t = pred / 65535.0, target / 65535.0
    assert row.psnr == pytest.approx(peak_signal_noise_ratio(target, pred, data_range=65535), abs=1e-6)
    assert row.ssim == pytest.approx(structural_similarity(t, p, channel_axis=-1, data_range=1), abs=1e-6)
    assert row.mae == pytest.approx(np.abs(p - t).mean(), abs=1e-9)
    # the paper's 8-bit setting scores the same files rounded to 8 bits: another number, said as such
    p8, t8 = (np.floor(a / 65535.0 * 255 + 0.5).astype(np.uint8) for a in (pred, target))
    row8 = M.evaluate([("x", tmp_path / "p.tif", tmp_path / "t.tif")], bit_depth=8, lpips_model=None).rows[0]
    assert row8.psnr == pytest.approx(peak_signal_noise_ratio(t8, p8), abs=1e-6)
    assert abs(row8.psnr - row.psnr) > 0.1


def test_gaussian_ssim_is_scikit_image_with_wang_et_al_arguments():
    pred, target = _photo_pair()
    want = structural_similarity(target, pred, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)
    assert M.ssim(pred, target, window="gaussian") == pytest.approx(want, abs=1e-9)
    assert abs(M.ssim(pred, target, window="gaussian") - M.ssim(pred, target)) > 1e-3
