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
