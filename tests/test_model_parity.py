"""The network reproduces the authors' TensorFlow outputs on the reference fixtures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kpac_cli.checkpoints import load_official_npz
from kpac_cli.model import PAPER_CONFIGS, KPACConfig, build_model, count_parameters

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


#: Every case of the reference fixtures, as checked by the two tests above.
CHECKED_CASES = {"single_2level", "single_2level_96x144", "single_3level", "dual"}


def test_every_reference_case_is_checked(shared_dir):
    """A case added to the reference fixtures fails here until a test above covers it."""
    present = {p.name.removesuffix("_expected.npy") for p in (shared_dir / "reference").glob("*/*_expected.npy")}
    assert present == CHECKED_CASES


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
        k, rates = block0.kernel_size, block0.dilations
        branches = torch.cat([F.leaky_relu(F.conv2d(enc, block0.branch_kernel(i), padding=d * (k - 1) // 2, dilation=d), 0.2)
                              for i, d in enumerate(rates)], 1)  # rates 1..5, each block0.branch_channels wide
        attended = branches * alpha0.repeat_interleave(block0.branch_channels, 1) * beta0.repeat(1, len(rates), 1, 1)
        dec = model.decoder
        d1 = F.leaky_relu(dec.d1(mid.features), 0.2)
        d1_2 = F.leaky_relu(dec.d1_2(torch.cat([d1, skips[1]], 1)), 0.2)
        d2 = F.leaky_relu(dec.d2(d1_2), 0.2)
        beta1 = model.blocks[1].shape_attention(out0)
        residual_from_d2 = dec.d2_2(torch.cat([d2, skips[0]], 1))
    checks = {
        "enc_c0_2_f1": skips[0], "enc_c2_2_f2": skips[1], "enc_out_c3_2": enc,
        "block0_branches_concat": branches, "block0_attended": attended,
        "block0_scale_attention": alpha0, "block0_shape_attention": beta0, "block0_out_cf": out0,
        "block1_scale_attention": alpha1, "block1_shape_attention": beta1,
        "block1_out_cf": out1, "dec_cm_2": mid.features,
        "dec_d1": d1, "dec_d1_2": d1_2, "dec_d2": d2, "dec_d2_2_residual": residual,
    }
    assert sorted(checks) == sorted(k for k in inter.files if k != "input")  # every tensor the fixture holds
    for key, ours in checks.items():
        assert np.abs(nhwc(ours) - inter[key]).max() < ATOL, key
    assert np.abs(nhwc(residual_from_d2) - inter["dec_d2_2_residual"]).max() < ATOL  # the decoder's steps are these


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


# --- what the network refuses, and how it says so ------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return build_model(KPACConfig(levels=2, channels=8)).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_an_input_of_another_float_type_than_the_model_is_refused_naming_both(tiny, dtype):
    """PyTorch's own words would be "Input type (double) and bias type (float) should be the same"."""
    with pytest.raises(ValueError, match=rf"the input is {dtype} but the model's parameters are torch.float32: .*input.to"):
        tiny(torch.zeros(1, 3, 8, 8, dtype=dtype))


def test_a_reference_of_another_float_type_is_refused_not_promoted(tiny):
    """A float64 reference would silently make the output float64."""
    with pytest.raises(ValueError, match="the reference is torch.float64 but the model's parameters are torch.float32"):
        tiny(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8, dtype=torch.float64))


def test_other_float_types_run_where_the_model_or_autocast_takes_them(tiny):
    with torch.no_grad():
        assert tiny.double()(torch.zeros(1, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64
        tiny.float()
        with torch.autocast("cpu", torch.bfloat16):
            assert torch.isfinite(tiny(torch.zeros(1, 3, 8, 8, dtype=torch.bfloat16))).all()


@pytest.mark.parametrize("shape", [(1, 3, 0, 8), (1, 3, 8, 0)])
def test_an_empty_image_is_refused_naming_the_shape(tiny, shape):
    with pytest.raises(ValueError, match=rf"H and W > 0, got \({shape[0]}, 3, {shape[2]}, {shape[3]}\)"):
        tiny(torch.zeros(shape))


@pytest.mark.parametrize("which", ["input", "reference"])
def test_a_numpy_array_is_refused_saying_how_to_make_a_tensor(tiny, which):
    array = np.zeros((1, 3, 8, 8), np.float32)
    args = (array,) if which == "input" else (torch.zeros(1, 3, 8, 8), array)
    with pytest.raises(TypeError, match=rf"expected a torch.Tensor {which}, got ndarray .*torch.from_numpy"):
        tiny(*args)


@pytest.mark.parametrize("shape", [(8, 8), (3, 8, 8), (1, 4, 8, 8), (1, 6, 8, 8)])
def test_a_wrong_shape_is_refused_naming_the_expected_one(tiny, shape):
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\), got"):
        tiny(torch.zeros(shape))
