"""The importable API as a script or notebook uses it: what it takes, what it refuses and how.

A small random network keeps every test fast; the conventions checked are those the module
docstrings state (``kpac_cli.engine.deblurrer``, ``kpac_cli.model.network``,
``kpac_cli.metrics.core``).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from kpac_cli import Deblurrer, EngineOptions, KPACConfig, build_model
from kpac_cli.engine import TiledInference
from kpac_cli.metrics import mae, psnr, quantize, ssim

TINY = KPACConfig(levels=2, channels=8, blocks=1)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(TINY).eval()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).random((21, 26, 3), dtype=np.float32)


def _cpu(**kwargs) -> EngineOptions:
    return EngineOptions(device="cpu", **kwargs)


# -- EngineOptions ---------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, names", [
    ("device", "gpu", "unknown device 'gpu'"),
    ("device", "meta", "unknown device 'meta'"),
    ("device", 0, "device must be a name"),
    ("precision", "float32", "unknown precision 'float32'"),
    ("precision", torch.int8, "unknown precision torch.int8"),
    ("strength", "0.5", "strength must be a number in [0, 1], got '0.5'"),
    ("strength", None, "strength must be a number in [0, 1], got None"),
    ("ensemble", "4", "ensemble must be one of 1, 2, 4, 8, got '4'"),
    ("memory_budget", -1, "memory_budget must be a number of bytes"),
    ("memory_budget", "1G", "memory_budget must be a number of bytes"),
    ("channels_last", "no", "channels_last must be True or False, got 'no'"),
    ("compile", "yes", "compile must be True or False, got 'yes'"),
])
def test_engine_options_refuse_a_bad_value_where_it_is_given_naming_the_option(field, value, names):
    with pytest.raises(ValueError) as err:
        EngineOptions(**{field: value})
    assert names in str(err.value)


def test_engine_options_take_torch_devices_and_dtypes(model):
    opts = EngineOptions(device=torch.device("cpu"), precision=torch.bfloat16, memory_budget=float(8 << 20))
    assert (opts.device, opts.precision, opts.memory_budget) == ("cpu", "bf16", 8 << 20)
    d = Deblurrer(model, opts)
    assert d.device.type == "cpu" and d.dtype == torch.bfloat16
    assert EngineOptions(device="CPU", precision="FP32").device == "cpu"


def test_engine_options_keep_numbers_that_json_records_can_hold():
    opts = EngineOptions(strength=np.float32(0.5), ensemble=np.int64(2))
    assert json.loads(json.dumps({"strength": opts.strength, "ensemble": opts.ensemble})) == {"strength": 0.5, "ensemble": 2}


# -- the networks a Deblurrer takes ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_network_of_another_float_dtype_runs_as_its_float32_copy(model, image, dtype):
    other = copy.deepcopy(model).to(dtype)
    expected = Deblurrer(copy.deepcopy(other).float(), _cpu()).deblur(image)
    np.testing.assert_array_equal(Deblurrer(other, _cpu()).deblur(image), expected)
    assert next(other.parameters()).dtype == dtype  # the caller's module is left as it was


def test_a_wrapped_network_is_unwrapped_and_anything_else_refused(model, image):
    expected = Deblurrer(model, _cpu()).deblur(image)
    np.testing.assert_array_equal(Deblurrer(torch.nn.DataParallel(model), _cpu()).deblur(image), expected)
    with pytest.raises(TypeError, match="expected a KPACNet"):
        Deblurrer(torch.nn.Sequential(torch.nn.Identity()), _cpu())
    with pytest.raises(TypeError, match="model must be"):
        Deblurrer(42, _cpu())


# -- the images a Deblurrer takes ---------------------------------------------------------------
def test_torch_tensors_are_taken_also_when_they_require_grad(model, image):
    d = Deblurrer(model, _cpu())
    expected = d.deblur(image)
    tensor = torch.from_numpy(image.copy()).requires_grad_()
    np.testing.assert_array_equal(d.deblur(tensor), expected)
    assert tensor.grad is None
    as_bf16 = torch.from_numpy(image).bfloat16()  # a type NumPy lacks
    np.testing.assert_array_equal(d.deblur(as_bf16), d.deblur(as_bf16.float().numpy()))


@pytest.mark.parametrize("views", [1, 2])
def test_a_read_only_array_is_taken_without_torch_s_undefined_behaviour_warning(image, views, monkeypatch):
    """A memory map or a frozen array is never shared with a tensor: torch.from_numpy warns
    (once per process, so the calls are watched here) that writing to one is undefined."""
    torch.manual_seed(0)
    d = Deblurrer(build_model(KPACConfig(levels=2, channels=8, blocks=1, in_views=views)), _cpu())
    photo = np.concatenate([image] * views, axis=2)
    centre = image[::-1].copy() if views == 2 else None
    expected = d.deblur(photo, centre)
    for array in (photo, centre):
        if array is not None:
            array.flags.writeable = False
    handed: list[bool] = []
    from_numpy = torch.from_numpy
    monkeypatch.setattr(torch, "from_numpy", lambda array: handed.append(array.flags.writeable) or from_numpy(array))
    np.testing.assert_array_equal(d.deblur(photo, centre), expected)
    assert len(handed) == views and all(handed)


@pytest.mark.parametrize("shape, hint", [
    ((3, 21, 26), "channels first? np.moveaxis(image, 0, -1)"),
    ((21, 26), "grey?"),
    ((21, 26, 1), "grey?"),
    ((21, 26, 4), "RGBA? deblur image[..., :3]"),
    ((1, 3, 21, 26), "channels-first batch of one? image[0].permute(1, 2, 0)"),
    ((1, 21, 26, 3), "a batch of one? image[0]"),
])
def test_an_image_of_the_wrong_layout_is_told_what_to_do(model, shape, hint):
    with pytest.raises(ValueError) as err:
        Deblurrer(model, _cpu()).deblur(np.full(shape, 0.5, np.float32))
    assert "this model takes HxWx3 RGB images" in str(err.value) and hint in str(err.value)


def test_a_dual_pixel_model_given_one_view_is_told_to_join_both():
    d = Deblurrer(build_model(KPACConfig(levels=2, channels=8, blocks=1, in_views=2)), _cpu())
    with pytest.raises(ValueError, match=r"HxWx6 \(left RGB, right RGB\) images, got shape \(21, 26, 3\) \(one view\? .*np.concatenate"):
        d.deblur(np.full((21, 26, 3), 0.5, np.float32))


@pytest.mark.parametrize("name", ["photo.png", "IMG_0042.CR2"])
def test_a_file_name_for_an_image_is_refused_saying_how_to_read_it(model, name, tmp_path):
    from pathlib import Path

    d = Deblurrer(model, _cpu())
    for given in (name, tmp_path / name):
        with pytest.raises(TypeError, match=r"image must be an array, not a file name .*kpac_cli.read_image"):
            d.deblur(given)
        with pytest.raises(TypeError, match="not a file name"):
            d.scale_attention(str(given) if isinstance(given, Path) else given)


def test_options_given_as_a_dict_are_refused_by_name(model):
    with pytest.raises(TypeError, match=r"options must be an EngineOptions \(EngineOptions\(\*\*fields\) for a dict\), got dict"):
        Deblurrer(model, {"device": "cpu"})


def test_scale_attention_takes_what_deblur_takes(model, image):
    maps = Deblurrer(model, _cpu()).scale_attention(image.tolist())
    assert [m.shape for m in maps] == [(len(TINY.dilations), 6, 7)]  # ceil(21 / 4) x ceil(26 / 4)


def test_scale_attention_runs_one_pass_whatever_the_self_ensemble(model, image, monkeypatch):
    """The maps are those of the image as given: an ensemble's other passes would be thrown away."""
    expected = Deblurrer(model, _cpu()).scale_attention(image)
    passes = []
    engine_call = TiledInference.__call__
    monkeypatch.setattr(TiledInference, "__call__", lambda self, *args, **kwargs: passes.append(1) or engine_call(self, *args, **kwargs))
    maps = Deblurrer(model, _cpu(ensemble=8, strength=0.5)).scale_attention(image)
    assert len(passes) == 1
    for got, want in zip(maps, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_run_takes_progress_true_as_deblur_does(model, image, capsys):
    d = Deblurrer(model, _cpu())
    result = d.run(image, progress=True)
    assert tuple(result.output.shape) == (1, 3, 21, 26)
    assert "encode" in capsys.readouterr().err  # tqdm's bars
    assert tuple(d.run(image, progress=False).output.shape) == (1, 3, 21, 26)


# -- the bare network ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_the_network_refuses_integer_input_by_name(model, dtype):
    x = torch.zeros(1, 3, 16, 16, dtype=dtype)
    with pytest.raises(ValueError, match=r"expected a float input in \[-1, 1\]"):
        model(x)
    with pytest.raises(ValueError, match="expected a float reference"):
        model(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16, dtype=dtype))


# -- metrics ------------------------------------------------------------------------------------
def test_ssim_of_channels_first_images_says_so(image):
    chw = np.moveaxis(image, -1, 0)
    with pytest.raises(ValueError, match="looks channels first"):
        ssim(chw, chw)
    assert psnr(chw, chw * 0.5) == psnr(image, image * 0.5)  # pooled over everything: the layout does not matter


@pytest.mark.parametrize("metric", [psnr, ssim, mae])
def test_empty_images_are_refused_by_name(metric):
    empty = np.zeros((0, 5, 3))
    with pytest.raises(ValueError, match=r"images are empty \(shape \(0, 5, 3\)\)"):
        metric(empty, empty)


@pytest.mark.parametrize("bit_depth", ["8", True])
def test_quantize_refuses_a_bit_depth_that_is_no_number(bit_depth):
    with pytest.raises(ValueError, match=f"bit_depth must be an integer in 1..32 or None, got {bit_depth!r}"):
        quantize(np.zeros((2, 2)), bit_depth)


def test_build_model_refuses_a_dict_saying_how_to_make_a_config():
    with pytest.raises(TypeError, match=r"build_model takes a KPACConfig, got dict \(a dict of fields: KPACConfig.from_dict"):
        build_model({"levels": 2})


def test_a_shipped_model_named_as_a_file_says_its_name(tmp_path, monkeypatch):
    from kpac_cli import resolve_model

    monkeypatch.chdir(tmp_path)  # no such file here
    with pytest.raises(FileNotFoundError, match="named without its folder and suffix: 'kpac-3level'"):
        resolve_model("kpac-3level.safetensors")
    with pytest.raises(FileNotFoundError) as err:
        resolve_model("elsewhere.safetensors")
    assert str(err.value) == "model file not found: elsewhere.safetensors"


def test_engine_options_tile_words_are_spelt_as_device_and_precision_are():
    assert EngineOptions(tile=" AUTO ").tile == "auto" and EngineOptions(tile="Whole").tile is None
    assert EngineOptions(tile="None").tile is None and EngineOptions(tile=" 256 ").tile == 256
    with pytest.raises(ValueError, match="tile must be"):
        EngineOptions(tile="big")


def test_progress_that_is_neither_a_flag_nor_a_callable_is_refused_by_name():
    d = Deblurrer(build_model(KPACConfig(levels=2, channels=8)))
    image = np.zeros((8, 8, 3), np.float32)
    for bad in ("yes", 1, np.True_):
        with pytest.raises(TypeError, match="progress must be True, False, None or a callable"):
            d.deblur(image, progress=bad)
    seen = []
    d.deblur(image, progress=lambda stage, done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1]
