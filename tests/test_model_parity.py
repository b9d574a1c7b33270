"""The network reproduces the authors' TensorFlow outputs on the reference fixtures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kpac_cli.checkpoints import load_official_npz
from kpac_cli.model import PAPER_CONFIGS, build_model, count_parameters

ATOL = 1e-5


def _u8_to_input(path) -> torch.Tensor:
    u8 = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return torch.from_numpy((u8 - 127.5) / 127.5).permute(2, 0, 1)[None]


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("name,expected", [("single_2level", 1578277), ("single_3level", 2057893), ("dual", 2061493)])
def test_parameter_counts_match_the_paper(name, expected):
    assert count_parameters(build_model(PAPER_CONFIGS[name])) == expected


@pytest.mark.parametrize(
    "folder,ckpt,case",
    [
        ("official-tf-2level", "single_2level.npz", "single_2level"),
        ("official-tf-2level", "single_2level.npz", "single_2level_96x144"),
        ("official-tf-3level", "single_3level.npz", "single_3level"),
    ],
)
def test_single_image_models_reproduce_tensorflow(shared_dir, folder, ckpt, case):
    ref = shared_dir / "reference" / folder
    model = load_official_npz(ref / ckpt)
    with torch.no_grad():
        out = _hwc(model(_u8_to_input(ref / f"{case}_input.png")))
    expected = np.load(ref / f"{case}_expected.npy")
    assert out.shape == expected.shape
    assert np.abs(out - expected).max() < ATOL


def test_dual_model_reproduces_tensorflow(shared_dir):
    ref = shared_dir / "reference" / "official-tf-dual"
    model = load_official_npz(ref / "dual.npz")
    assert model.config.in_views == 2
    views = torch.cat([_u8_to_input(ref / "dual_input_l.png"), _u8_to_input(ref / "dual_input_r.png")], 1)
    with torch.no_grad():
        out = _hwc(model(views, _u8_to_input(ref / "dual_input_c.png")))
    assert np.abs(out - np.load(ref / "dual_expected.npy")).max() < ATOL


def test_intermediates_match_layer_by_layer(shared_dir):
    ref = shared_dir / "reference" / "official-tf-2level"
    model = load_official_npz(ref / "single_2level.npz")
    inter = np.load(ref / "single_2level_intermediates.npz")
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    x = torch.from_numpy(inter["input"]).permute(0, 3, 1, 2)
    with torch.no_grad():
        skips, enc = model.encode(x)
        block0 = model.blocks[0]
        alpha0, beta0 = block0.scale_attention(enc), block0.shape_attention(enc)
        out0, _ = block0(enc)
        out1, alpha1 = model.blocks[1](out0)
        mid = model.bottleneck(enc)
        residual = model.decode(mid.features, skips)
    checks = {
        "enc_c0_2_f1": skips[0], "enc_c2_2_f2": skips[1], "enc_out_c3_2": enc,
        "block0_scale_attention": alpha0, "block0_shape_attention": beta0, "block0_out_cf": out0,
        "block1_scale_attention": alpha1, "block1_out_cf": out1, "dec_cm_2": mid.features,
        "dec_d2_2_residual": residual,
    }
    for key, ours in checks.items():
        assert np.abs(nhwc(ours) - inter[key]).max() < ATOL, key


def test_output_png_follows_the_authors_rounding(shared_dir):
    """(y + 1) * 127.5, clipped, round half up: equals their PNG up to +-1 on boundary values."""
    ref = shared_dir / "reference" / "official-tf-3level"
    model = load_official_npz(ref / "single_3level.npz")
    with torch.no_grad():
        y = _hwc(model(_u8_to_input(ref / "single_3level_input.png")))
    ours = np.floor(np.clip((y + 1) * np.float32(127.5), 0, 255) + 0.5).astype(np.int16)
    theirs = np.asarray(Image.open(ref / "single_3level_expected.png").convert("RGB"), dtype=np.int16)
    diff = np.abs(ours - theirs)
    assert diff.max() <= 1 and (diff > 0).sum() <= 5
