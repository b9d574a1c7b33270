"""ONNX export and the onnxruntime backend agree with PyTorch (fp32, within 1e-5)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from kpac_cli.engine import TiledInference  # noqa: E402
from kpac_cli.export import OnnxBackend, export_onnx, read_balance_views, read_config, read_metadata  # noqa: E402
from kpac_cli.model import PAPER_CONFIGS, KPACConfig, build_model  # noqa: E402

ATOL = 1e-5


def make_model(cfg: KPACConfig):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(0.0, 0.1)
    return model


def rand(shape, seed=1):
    return (torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1)


@pytest.fixture(scope="module", params=list(PAPER_CONFIGS))
def exported(request, tmp_path_factory):
    cfg = PAPER_CONFIGS[request.param]
    model = make_model(cfg)
    path = tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx"
    export_onnx(model, path)
    return model, path


def test_dynamic_sizes_match_pytorch(exported):
    model, path = exported
    backend = OnnxBackend(path, threads=1)
    cfg = model.config
    for h, w in [(64, 96), (48, 136)]:  # multiples of 8: the graph is used as is
        x = rand((1, cfg.in_channels, h, w))
        with torch.inference_mode():
            expected = model(x).numpy()
        got = backend.run(x.numpy())
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_config_travels_in_the_file(exported):
    model, path = exported
    assert read_config(path) == model.config


def test_any_size_is_padded_like_the_engine(exported):
    """run() pads to the stride (reflect, bottom/right) and crops, as the engine's whole path."""
    model, path = exported
    cfg = model.config
    x = rand((1, cfg.in_channels, 50, 75))
    ref = rand((1, 3, 50, 75), seed=2) if cfg.in_views == 2 else x
    expected = TiledInference(model, torch.device("cpu"), torch.no_grad, channels_last=False)(x, ref, None).output
    got = OnnxBackend(path, threads=1).run(x, ref)  # tensors in, tensor out
    assert isinstance(got, torch.Tensor) and got.shape == (1, 3, 50, 75)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_dual_default_reference_is_the_mean_view():
    model = make_model(PAPER_CONFIGS["dual"])
    backend = OnnxBackend(model, threads=1)  # exported in memory
    x = rand((1, 6, 32, 48))
    with torch.inference_mode():
        expected = model(x).numpy()
    np.testing.assert_allclose(backend.run(x.numpy()), expected, atol=ATOL, rtol=0)


def test_batch_axis_is_dynamic():
    model = make_model(PAPER_CONFIGS["single_2level"])
    backend = OnnxBackend(model, threads=1)
    x = rand((2, 3, 32, 48))
    with torch.inference_mode():
        expected = model(x).numpy()
    np.testing.assert_allclose(backend.run(x.numpy()), expected, atol=ATOL, rtol=0)


def test_wrong_channels_is_an_error():
    backend = OnnxBackend(make_model(PAPER_CONFIGS["single_2level"]), threads=1)
    with pytest.raises(ValueError, match="expected input"):
        backend.run(np.zeros((1, 6, 32, 32), np.float32))


def test_static_export_has_fixed_size(tmp_path):
    import onnx

    model = make_model(PAPER_CONFIGS["single_2level"])
    path = tmp_path / "static.onnx"
    export_onnx(model, path, dynamic=False, sample_hw=(40, 56))
    dims = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 40, 56]


def test_export_cli_check(tmp_path):
    from typer.testing import CliRunner

    from kpac_cli.cli import app


    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(app, ["export", "--onnx", str(out), "--config", "single_2level", "--check",
                                   "--check-size", "96x64", "--json"])
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout.strip().splitlines()[-1])
    assert out.is_file() and record["dynamic"] is True
    assert record["check"]["max_abs_diff"] < ATOL
    assert record["check"]["onnxruntime_seconds"] > 0
    # refuses to overwrite without --overwrite (usage error)
    res = CliRunner().invoke(app, ["export", "--onnx", str(out), "--config", "single_2level"])
    assert res.exit_code == 2


def invoke_export(*args):
    from typer.testing import CliRunner

    from kpac_cli.cli import app

    return CliRunner().invoke(app, ["export", *map(str, args)])


@pytest.fixture(scope="module")
def dual_export(tmp_path_factory):
    """kpac-dual exported by `kpac export` (its checkpoint asks for balanced views)."""
    path = tmp_path_factory.mktemp("onnx") / "kpac-dual.onnx"
    res = invoke_export("--onnx", path, "-m", "kpac-dual", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["balance_views"] is True
    return path


def vignetted_dual(h=64, w=96):
    """HxWx6 views in [0, 1] with strong opposite horizontal vignetting (ratio 0.43..2.3)."""
    rng = np.random.default_rng(0)
    left = rng.uniform(0.2, 0.7, (h, w, 3)).astype(np.float32)
    right = np.roll(left, 2, axis=1)  # a little disparity
    ramp = np.linspace(0.6, 1.4, w, dtype=np.float32)[None, :, None]
    return np.concatenate([left * ramp, right / ramp], axis=2).clip(0, 1)


def test_dual_export_preprocesses_like_the_engine(dual_export):
    """The file says the views are to be balanced, and OnnxBackend does it as Deblurrer does:
    the network sees balanced views, the default centre is the views as captured."""
    from kpac_cli.engine import Deblurrer, EngineOptions

    meta = read_metadata(dual_export)
    assert json.loads(meta["kpac_balance_views"]) is True and read_balance_views(dual_export)
    image = vignetted_dual()
    engine = Deblurrer("kpac-dual", EngineOptions(device="cpu", tile=None))
    assert engine.balance_views
    x = image.transpose(2, 0, 1)[None] * 2 - 1
    backend = OnnxBackend(dual_export, threads=1)
    assert backend.balance_views
    expected = engine.run(image).output.numpy()
    np.testing.assert_allclose(backend.run(x), expected, atol=ATOL, rtol=0)
    # an explicit centre is used as given, as by the engine
    centre = 0.9 * image.reshape(64, 96, 2, 3).mean(axis=2)
    expected = engine.run(image, centre).output.numpy()
    np.testing.assert_allclose(backend.run(x, centre.transpose(2, 0, 1)[None] * 2 - 1), expected, atol=ATOL, rtol=0)
    # without balancing the output is far off: the test sees the difference
    unbalanced = OnnxBackend(dual_export, threads=1, balance_views=False).run(x)
    assert np.abs(unbalanced - engine.run(image).output.numpy()).max() > 1e-2


def test_balance_is_recorded_only_when_asked(tmp_path):
    dual = make_model(PAPER_CONFIGS["dual"])
    assert not read_balance_views(export_onnx(dual, None))
    assert read_balance_views(export_onnx(dual, None, balance_views=True))
    single = make_model(PAPER_CONFIGS["single_2level"])
    assert not read_balance_views(export_onnx(single, None, balance_views=True))  # one view: nothing to balance
    # random weights have no checkpoint asking for it
    res = invoke_export("--onnx", tmp_path / "d.onnx", "--config", "dual", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["balance_views"] is False
    assert not OnnxBackend(tmp_path / "d.onnx", threads=1).balance_views


def test_static_size_must_be_a_multiple_of_the_stride(tmp_path):
    out = tmp_path / "s.onnx"
    res = invoke_export("--onnx", out, "--config", "single_3level", "--static", "100x60")
    assert res.exit_code == 2
    assert "stride 8" in res.output and "96x56" in res.output and "104x64" in res.output
    assert not out.exists()
    # the library refuses too rather than fixing the graph to another size
    with pytest.raises(ValueError, match="stride 8"):
        export_onnx(make_model(PAPER_CONFIGS["single_3level"]), None, dynamic=False, sample_hw=(60, 100))
    # a multiple of the stride is exported at exactly that size
    import onnx

    res = invoke_export("--onnx", out, "--config", "single_2level", "--static", "100x60")
    assert res.exit_code == 0, res.output
    assert [d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim] == [1, 3, 60, 100]


def test_missing_output_folder_is_created_as_by_convert(tmp_path):
    out = tmp_path / "no_such_dir" / "deeper" / "x.onnx"
    res = invoke_export("--onnx", out, "--config", "single_2level")
    assert res.exit_code == 0, res.output
    assert read_config(out) == PAPER_CONFIGS["single_2level"]
    # the message goes to stderr (stdout is for --json), on one line however long the path
    assert res.stdout == "" and f"wrote {out} (" in res.stderr
    assert not [p for p in out.parent.iterdir() if p.name != "x.onnx"]  # written atomically: no temp file left


def test_unwritable_output_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "x.onnx"
    res = invoke_export("--onnx", out, "--config", "single_2level")
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    assert res.stderr.startswith("error: cannot write") and str(out) in res.stderr and len(res.stderr.splitlines()) == 1
    res = invoke_export("--onnx", tmp_path, "--config", "single_2level", "--overwrite")  # a folder
    assert res.exit_code == 2 and "is a folder" in res.stderr and len(res.stderr.splitlines()) == 1


def test_onnx_dash_is_refused_rather_than_written_as_a_file_named_dash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke_export("--onnx", "-", "--config", "single_2level")  # '-' is stdout in `kpac deblur -o -`
    assert res.exit_code == 2 and res.stderr.startswith("error: --onnx -:") and len(res.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["new-folder/", "model", "model.onx"])
def test_onnx_destination_must_be_an_onnx_file_name(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # 'new-folder/' arrives without its slash: a file 'new-folder' was written
    res = invoke_export("--onnx", name, "--config", "single_2level")
    assert res.exit_code == 2 and "give a file name ending in .onnx" in res.stderr and len(res.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    assert invoke_export("--onnx", "MODEL.ONNX", "--config", "single_2level").exit_code == 0


@pytest.mark.parametrize("opset", ["12", "30"])
def test_unsupported_opset_is_a_one_line_usage_error(tmp_path, opset):
    out = tmp_path / "x.onnx"
    res = invoke_export("--onnx", out, "--config", "single_2level", "--opset", opset)
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit)
    assert res.stderr.startswith("error: --opset must be between 13 and") and len(res.stderr.splitlines()) == 1
    assert not out.exists()


def test_an_opset_the_exporter_refuses_is_a_usage_error_even_unannounced(tmp_path, monkeypatch):
    import kpac_cli.export as E

    with pytest.raises(ValueError, match="opset 30"):
        export_onnx(make_model(PAPER_CONFIGS["single_2level"]), None, opset=30)
    monkeypatch.setattr(E, "max_opset", lambda: None)  # a PyTorch that does not state its range
    out = tmp_path / "x.onnx"
    res = invoke_export("--onnx", out, "--config", "single_2level", "--opset", "30")
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit)
    assert "error:" in res.stderr and "opset 30" in res.stderr and len(res.stderr.splitlines()) == 1
    assert not out.exists()


def test_quiet_prints_nothing_but_errors_and_warnings(tmp_path, monkeypatch):
    out = tmp_path / "q.onnx"
    res = invoke_export("--onnx", out, "--config", "single_2level", "--quiet")
    assert res.exit_code == 0 and res.stdout == "" and res.stderr == "", res.output
    assert read_config(out) == PAPER_CONFIGS["single_2level"]
    res = invoke_export("--onnx", out, "--config", "single_2level", "-q")
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and "exists" in res.stderr
    # the --check figures are summary; a difference too large is a warning, said with its figure
    import kpac_cli.export as E

    check = {"width": 96, "height": 64, "max_abs_diff": 3e-3, "torch_seconds": 0.1, "torch_fast_seconds": 0.1,
             "onnxruntime_seconds": 0.1}
    monkeypatch.setattr(E, "check_export", lambda *a, **k: dict(check))
    res = invoke_export("--onnx", out, "--config", "single_2level", "--overwrite", "--check", "-q")
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines() == ["warning: max abs diff 3.00e-03 between onnxruntime and PyTorch is above 1e-4"]
    res = invoke_export("--onnx", out, "--config", "single_2level", "--overwrite", "--check")
    assert res.exit_code == 0 and len(res.stderr.splitlines()) == 4 and "max abs diff 3.00e-03" in res.stderr


def test_model_and_config_together_are_a_usage_error(tmp_path):
    out = tmp_path / "cfg.onnx"
    for model in ("kpac-dual", "default"):  # the default typed out counts as asking for it
        res = invoke_export("--onnx", out, "-m", model, "--config", "single_2level")
        assert res.exit_code == 2 and isinstance(res.exception, SystemExit)
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "--config" in lines[0] and "--model" in lines[0]
        assert not out.exists()
    res = invoke_export("--onnx", out, "--config", "single_2level")  # --config alone: random weights, as before
    assert res.exit_code == 0, res.output
    assert read_config(out) == PAPER_CONFIGS["single_2level"]


def test_export_never_writes_over_its_model_even_with_overwrite(tmp_path):
    from kpac_cli.checkpoints import load_checkpoint, save_checkpoint

    model = save_checkpoint(tmp_path / "X.safetensors", make_model(KPACConfig(levels=2, channels=8)))
    before = model.read_bytes()
    res = invoke_export("--onnx", model, "-m", model, "--overwrite")
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "is the model file" in lines[0]
    assert model.read_bytes() == before and load_checkpoint(model).config == KPACConfig(levels=2, channels=8)
    # without --overwrite the error says the same, not "exists (use --overwrite)", which would not help
    res = invoke_export("--onnx", model, "-m", model)
    assert res.exit_code == 2 and "is the model file" in res.stderr and "use --overwrite" not in res.stderr, res.stderr
    # the same file under another name: a hard link
    link = tmp_path / "link.onnx"
    link.hardlink_to(model)
    res = invoke_export("--onnx", link, "-m", model, "--overwrite")
    assert res.exit_code == 2 and "is the model file" in res.stderr
    assert link.read_bytes() == before


def test_check_warning_is_printed_with_json_too(tmp_path, monkeypatch):
    """--json puts the record on stdout; a difference too large is still a warning on stderr."""
    import kpac_cli.export as E

    check = {"width": 96, "height": 64, "max_abs_diff": 3e-3, "torch_seconds": 0.1, "torch_fast_seconds": 0.1,
             "onnxruntime_seconds": 0.1}
    monkeypatch.setattr(E, "check_export", lambda *a, **k: dict(check))
    out = tmp_path / "j.onnx"
    for extra in ([], ["-q"]):
        res = invoke_export("--onnx", out, "--config", "single_2level", "--overwrite", "--check", "--json", *extra)
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["check"]["max_abs_diff"] == 3e-3
        assert res.stderr.splitlines() == ["warning: max abs diff 3.00e-03 between onnxruntime and PyTorch is above 1e-4"]
    check["max_abs_diff"] = 1e-6
    res = invoke_export("--onnx", out, "--config", "single_2level", "--overwrite", "--check", "--json")
    assert res.exit_code == 0 and res.stderr == "", res.output


@pytest.mark.parametrize("args, flag", [(["--static", "96x"], "--static"), (["--check-size", "0x64"], "--check-size"),
                                        (["--static", "96x64", "--check-size", "big"], "--check-size")])
def test_size_errors_name_the_flag(tmp_path, args, flag):
    out = tmp_path / "s.onnx"
    res = invoke_export("--onnx", out, "--config", "single_2level", *args)
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit)
    assert res.stderr.startswith(f"error: {flag}: ") and len(res.stderr.splitlines()) == 1, res.stderr
    assert not out.exists()


def test_check_size_with_static_is_refused_not_ignored(tmp_path):
    out = tmp_path / "s.onnx"
    res = invoke_export("--onnx", out, "--config", "single_2level", "--static", "96x64", "--check", "--check-size", "128x128")
    assert res.exit_code == 2 and "--check-size with --static" in res.stderr and not out.exists(), res.output


def test_check_size_without_check_is_refused_not_ignored(tmp_path):
    """--check-size sizes the --check image: without --check nothing would use it."""
    out = tmp_path / "s.onnx"
    res = invoke_export("--onnx", out, "--config", "single_2level", "--check-size", "128x128")
    assert res.exit_code == 2 and "--check-size applies to --check" in res.stderr, res.output
    assert not out.exists()


# --- kpac bench with the onnxruntime backend ---------------------------------------------


def test_bench_throughput_runs_the_onnxruntime_backend_in_fp32():
    """`kpac bench --backends onnxruntime` times the configs with its first backend: onnxruntime
    runs fp32 only, so the throughput rows are fp32 rather than a crash on bf16."""
    from kpac_cli.bench import config_throughput

    configs = {"tiny": KPACConfig(levels=2, channels=8)}
    rows = config_throughput(configs, 16, 24, "cpu", None, "onnxruntime", rounds=1, warmup=0)
    assert [(r["config"], r["precision"], r["backend"]) for r in rows] == [("tiny", "fp32", "onnxruntime")]
    assert rows[0]["seconds"] > 0
    with pytest.raises(ValueError, match="fp32"):  # asked for explicitly: still refused
        config_throughput(configs, 16, 24, "cpu", ["bf16"], "onnxruntime", rounds=1, warmup=0)
    assert config_throughput({}, 16, 24, "cpu", None, "eager", rounds=1, warmup=0) == []  # no configs: no rows


@pytest.mark.parametrize("configs", [",", "", " , "])
def test_bench_configs_naming_none_is_a_usage_error(configs, monkeypatch):
    """An empty --configs list is refused (it used to run every paper config)."""
    from typer.testing import CliRunner

    import kpac_cli.bench as core
    from kpac_cli.cli import app

    ran = []
    monkeypatch.setattr(core, "run_benchmark", lambda *a, **k: ran.append(a) or {})
    res = CliRunner().invoke(app, ["bench", "--device", "cpu", "--configs", configs])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    assert res.stderr.startswith("error: --configs") and "single_2level" in res.stderr and len(res.stderr.splitlines()) == 1
    assert not ran


def test_export_without_the_onnx_package_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    """PyTorch's exporter needs onnx too: without it, one error line, not its traceback."""
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)  # import fails as if not installed
    out = tmp_path / "m.onnx"
    with pytest.raises(ImportError, match=r"onnx package is not installed: pip install 'kpac\[onnx\]'"):
        export_onnx(make_model(KPACConfig(levels=2, channels=8)), out)
    res = invoke_export("--onnx", out, "--config", "single_2level")
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert res.stderr == "error: the onnx package is not installed: pip install 'kpac[onnx]'\n"
    assert not out.exists()


def test_check_without_onnxruntime_fails_before_writing_the_file(tmp_path, monkeypatch):
    """--check needs onnxruntime: without it the command fails, and leaves no file that a rerun
    would then call existing."""
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    out = tmp_path / "m.onnx"
    res = invoke_export("--onnx", out, "--config", "single_2level", "--check", "--check-size", "32x32")
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert res.stderr.startswith("error: onnxruntime is not installed: pip install 'kpac[onnx]'")
    assert len(res.stderr.splitlines()) == 1
    assert not out.exists()


def test_a_static_graph_refuses_other_sizes_naming_its_own(tmp_path):
    """OnnxBackend pads to the stride; a static graph then takes only its own size, said as such."""
    model = make_model(KPACConfig(levels=2, channels=8))
    path = tmp_path / "static.onnx"
    export_onnx(model, path, dynamic=False, sample_hw=(40, 56))
    backend = OnnxBackend(path, threads=1)
    x = rand((1, 3, 37, 56))  # padded to 40x56: the graph's size
    expected = TiledInference(model, torch.device("cpu"), torch.no_grad, channels_last=False)(x, x, None).output
    torch.testing.assert_close(backend.run(x), expected, atol=ATOL, rtol=0)
    for shape in ((1, 3, 48, 56), (2, 3, 40, 56)):
        with pytest.raises(ValueError, match=rf"exported for input of shape 1x3x40x56 only .*got {'x'.join(map(str, shape))}"):
            backend.run(rand(shape))


# --- what the file tells a runtime that has nothing else --------------------------------


def run_as_the_file_says(path, image):
    """Deblur an HxWxC [0, 1] image with onnxruntime, numpy and the file's metadata only."""
    import onnxruntime as ort

    meta = read_metadata(path)
    stride = int(meta["kpac_stride"])
    h, w = image.shape[:2]
    x = (2 * image - 1).transpose(2, 0, 1)[None].astype(np.float32)  # kpac_input: x = 2 * v - 1, NCHW
    x = np.pad(x, ((0, 0), (0, 0), (0, -h % stride), (0, -w % stride)), mode="reflect")  # bottom and right
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(["output"], {"input": x, "reference": x})[0][0, :, :h, :w]  # single-image: reference = input
    return ((out + 1) / 2).clip(0, 1).transpose(1, 2, 0)  # kpac_output


@pytest.mark.parametrize("levels", [2, 3])
def test_the_metadata_alone_reproduces_the_engine_on_a_photo(tmp_path, levels):
    """The contract written into the file (stride, scaling, layout, padding, clipping) is the
    engine's: followed literally it gives Deblurrer.deblur's output on an odd-sized photo."""
    from skimage import data

    from kpac_cli import __version__
    from kpac_cli.engine import Deblurrer, EngineOptions

    model = make_model(KPACConfig(levels=levels, channels=8))
    path = tmp_path / "m.onnx"
    export_onnx(model, path)
    meta = read_metadata(path)
    assert meta["kpac_stride"] == str(model.config.stride)
    assert "RGB" in meta["kpac_input"] and "not linear" in meta["kpac_input"] and "2 * v - 1" in meta["kpac_input"]
    assert "clipped to [0, 1]" in meta["kpac_output"] and "the input itself" in meta["kpac_reference"]
    photo = data.astronaut()[100:145, 150:217].astype(np.float32) / 255  # 45x67: padded on both sides
    expected = Deblurrer(model, EngineOptions(device="cpu", tile=None, precision="fp32")).deblur(photo)
    np.testing.assert_allclose(run_as_the_file_says(path, photo), expected, atol=ATOL, rtol=0)
    import onnx

    proto = onnx.load(str(path))
    assert proto.producer_name == "kpac" and proto.producer_version == __version__  # not PyTorch's version
    assert meta["kpac_input"] in proto.doc_string and meta["kpac_output"] in proto.doc_string


def test_the_dual_contract_names_the_views_and_their_balancing():
    dual = make_model(PAPER_CONFIGS["dual"])
    meta = read_metadata(export_onnx(dual, None, balance_views=True))
    assert meta["kpac_stride"] == "8" and "(N, 6, H, W)" in meta["kpac_input"]
    assert "left view RGB then right view RGB" in meta["kpac_input"] and "balanced" in meta["kpac_input"]
    assert "mean of the left and right views as captured" in meta["kpac_reference"]
    assert "balanced" not in read_metadata(export_onnx(dual, None))["kpac_input"]  # not asked: not said


# --- the destination and running out of memory -------------------------------------------


def test_a_file_created_while_exporting_is_not_replaced_without_overwrite(tmp_path, monkeypatch):
    """The existence check runs before the graph is traced (seconds): a file another process
    writes meanwhile is kept, and said to exist, unless --overwrite."""
    import kpac_cli.cli.export as cli_export

    out = tmp_path / "m.onnx"
    load = cli_export._load_model

    def load_while_someone_writes(*args):
        out.write_bytes(b"someone else's")
        return load(*args)

    monkeypatch.setattr(cli_export, "_load_model", load_while_someone_writes)
    res = invoke_export("--onnx", out, "--config", "single_2level")
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    assert res.stderr.startswith(f"error: {out}: exists") and "--overwrite" in res.stderr
    assert len(res.stderr.splitlines()) == 1 and out.read_bytes() == b"someone else's"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary file left
    out.unlink()
    res = invoke_export("--onnx", out, "--config", "single_2level", "--overwrite")
    assert res.exit_code == 0, res.output
    assert read_config(out) == PAPER_CONFIGS["single_2level"]


CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
           "you tried to allocate 240000000000 bytes")
ORT_OOM = "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : BFCArena::AllocateRawInternal Failed to allocate memory for requested buffer"


@pytest.mark.parametrize("message", [CPU_OOM, ORT_OOM])
def test_check_out_of_memory_is_one_line_saying_the_file_was_written(tmp_path, monkeypatch, message):
    import kpac_cli.export as E

    def too_large(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(E, "check_export", too_large)
    out = tmp_path / "m.onnx"
    res = invoke_export("--onnx", out, "--config", "single_2level", "--check", "--check-size", "200000x100000")
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert res.stderr.startswith("error: --check at 200000x100000: out of memory") and len(res.stderr.splitlines()) == 1
    assert f"{out} was written" in res.stderr and read_config(out) == PAPER_CONFIGS["single_2level"]


def test_other_check_errors_are_not_called_out_of_memory(tmp_path, monkeypatch):
    import kpac_cli.export as E

    def broken(*args, **kwargs):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(E, "check_export", broken)
    res = invoke_export("--onnx", tmp_path / "m.onnx", "--config", "single_2level", "--check", "--check-size", "32x32")
    assert isinstance(res.exception, RuntimeError) and "out of memory" not in res.output


def test_a_static_size_too_large_to_trace_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    import kpac_cli.export as E

    sizes = []

    def too_large(model, path, **kwargs):
        sizes.append(kwargs["sample_hw"])
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr(E, "export_onnx", too_large)
    out = tmp_path / "m.onnx"
    res = invoke_export("--onnx", out, "--config", "single_2level", "--static", "400000x200000")
    assert sizes == [(200000, 400000)]
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert res.stderr.startswith("error: out of memory tracing the graph at 400000x200000") and "not written" in res.stderr
    assert len(res.stderr.splitlines()) == 1 and not out.exists()


def test_backend_refuses_integer_images_as_the_network_does():
    """0-255 data is not [-1, 1] units: refused, not run into a wrong image."""
    backend = OnnxBackend(make_model(KPACConfig(levels=2, channels=8)), threads=1)
    photo = np.full((1, 3, 16, 24), 200, np.uint8)
    with pytest.raises(ValueError, match=r"float input in \[-1, 1\], got torch.uint8 \(8-bit images: x / 127.5 - 1\)"):
        backend.run(photo)
    x = rand((1, 3, 16, 24))
    with pytest.raises(ValueError, match="float reference"):
        backend.run(x, torch.zeros(1, 3, 16, 24, dtype=torch.int64))


def test_backend_takes_a_tensor_that_requires_grad():
    model = make_model(KPACConfig(levels=2, channels=8))
    x = rand((1, 3, 16, 24)).requires_grad_()
    got = OnnxBackend(model, threads=1).run(x)
    with torch.no_grad():
        expected = model(x)
    assert isinstance(got, torch.Tensor) and not got.requires_grad
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
