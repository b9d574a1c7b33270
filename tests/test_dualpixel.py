"""Dual-pixel view balancing (kpac_cli.engine.dualpixel) and where the engine applies it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from kpac_cli.checkpoints import Checkpoint
from kpac_cli.engine import Deblurrer, EngineOptions
from kpac_cli.engine.dualpixel import balance_views
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
    target is a centre crop at another brightness, so a gain is fitted before scoring)."""
    root = shared_dir / "samples" / "defocused" / "dp_pixel4"
    if not root.is_dir():
        pytest.skip("dp_pixel4 capture not in the reference material")
    left, right, target = read_dual_pixel_capture(root)
    combined = left + right
    gamma = GammaEncoding.for_combined(combined)

    torch.set_num_threads(2)
    out = Deblurrer("kpac-dual", EngineOptions(tile=512)).deblur(np.concatenate([gamma.encode(2 * left), gamma.encode(2 * right)], 2), gamma.encode(combined))
    torch.set_num_threads(1)
    gained = psnr_with_gain(gamma.decode(out), target) - psnr_with_gain(combined, target)
    assert gained > 0.1, f"kpac-dual changes PSNR by {gained:+.2f} dB on the real capture"
