"""Checkpoints: safetensors with config + provenance; the authors' .npz without running pickle code."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from kpac_cli.checkpoints import (
    CheckpointMismatchError,
    UnsafeCheckpointError,
    load_checkpoint,
    load_official_npz,
    read_metadata,
    read_official_npz,
    save_checkpoint,
    update_provenance,
)
from kpac_cli.model import KPACConfig, build_model


def _npz_with_pickle(path, payload: bytes) -> None:
    """A .npz whose params.npy is an object array header followed by ``payload``."""
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header = header + " " * (63 - len(header) % 64) + "\n"
    npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + payload
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("params.npy", npy)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > should_not_exist",))


def test_crafted_pickle_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.npz"
    _npz_with_pickle(path, pickle.dumps([_RunsCode()], protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system|refusing"):
        read_official_npz(path)
    assert not (tmp_path / "should_not_exist").exists()


def test_truncated_and_foreign_npz_are_clear_errors(tmp_path):
    good = tmp_path / "good.npz"
    arrays = np.empty(2, dtype=object)
    arrays[0], arrays[1] = np.zeros((2, 2), np.float32), np.ones(3, np.float32)
    np.savez(good, params=arrays)
    assert [a.shape for a in read_official_npz(good)] == [(2, 2), (3,)]
    bad = tmp_path / "truncated.npz"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointMismatchError):
        read_official_npz(bad)
    with pytest.raises(CheckpointMismatchError, match="match none"):
        load_official_npz(good)  # readable, but no KPAC variant has these shapes


def test_official_npz_needs_latin1_and_we_read_it(shared_dir):
    path = shared_dir / "reference" / "official-tf-3level" / "single_3level.npz"
    with pytest.raises(ValueError):
        np.load(path)["params"]  # object arrays are refused without allow_pickle
    arrays = read_official_npz(path)
    assert len(arrays) == 66 and all(a.dtype == np.float32 for a in arrays)


def test_safetensors_round_trip_keeps_config_and_provenance(tmp_path):
    cfg = KPACConfig(levels=2, blocks=3, dilations=(1, 2, 4), shape_attention=False)
    torch.manual_seed(0)
    model = build_model(cfg)
    path = save_checkpoint(tmp_path / "m.safetensors", model, {"name": "test", "iterations": 12})
    config, prov = read_metadata(path)
    assert config == cfg and prov["iterations"] == 12 and "kpac_version" in prov
    loaded = load_checkpoint(path).build()
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.kpac-tmp"))


def test_saved_checkpoint_is_world_readable(tmp_path):
    # An exported model is meant to be shared: normal permissions, not a temp file's 0600.
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "m.safetensors", build_model(KPACConfig(levels=2, channels=8)))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o044 == 0o044


def test_weights_that_do_not_fit_the_declared_architecture(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", build_model(KPACConfig(levels=2)))
    # rewrite the metadata to claim a 3-level model
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    meta["config"] = KPACConfig(levels=3).to_json()
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(CheckpointMismatchError, match="do not fit"):
        load_checkpoint(path).build()


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", build_model(KPACConfig(levels=2, channels=8)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointMismatchError):
        load_checkpoint(path)


def test_torch_files_load_only_with_weights_only(tmp_path):
    model = build_model(KPACConfig(levels=2, channels=8))
    ok = tmp_path / "ok.pt"
    torch.save({"config": model.config.to_dict(), "model": model.state_dict()}, ok)
    assert load_checkpoint(ok).config == model.config
    evil = tmp_path / "evil.pt"
    torch.save({"config": model.config.to_dict(), "model": model.state_dict(), "x": _RunsCode()}, evil)
    with pytest.raises(CheckpointMismatchError, match="refused|unreadable"):
        load_checkpoint(evil)


def test_update_provenance_keeps_weights_and_merges_fields(tmp_path):
    torch.manual_seed(1)
    model = build_model(KPACConfig(levels=2, channels=8))
    path = save_checkpoint(tmp_path / "m.safetensors", model, {"name": "m", "iterations": 5})
    update_provenance(path, scores={"psnr_gain_db": 1.5})
    config, prov = read_metadata(path)
    assert prov["iterations"] == 5 and prov["scores"] == {"psnr_gain_db": 1.5} and config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), load_checkpoint(path).build().state_dict().items()):
        assert torch.equal(a, b), k


# --- kpac convert ---------------------------------------------------------------------


@pytest.fixture
def convert_cli(tmp_path, monkeypatch):
    """`kpac convert` on a stand-in .npz (the loader is replaced by a tiny model: these tests are about the command)."""
    from typer.testing import CliRunner

    from kpac_cli.cli import app

    monkeypatch.setattr("kpac_cli.cli.convert.load_official_npz", lambda path: build_model(KPACConfig(levels=2, channels=8)))
    src = tmp_path / "single_2level.npz"
    src.write_bytes(b"stand-in")

    def invoke(*args):
        return CliRunner().invoke(app, ["convert", *map(str, args)])

    return invoke, src


def _one_error_line(res) -> str:
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output, res.output
    return lines[0]


def test_convert_missing_input_says_it_does_not_exist(tmp_path, convert_cli):
    invoke, _ = convert_cli
    res = invoke(tmp_path / "nothere.npz", "-o", tmp_path / "m.safetensors")
    assert res.exit_code == 2
    line = _one_error_line(res)
    assert "nothere.npz: no such file" in line and "not an official" not in line


def test_convert_existing_output_is_a_usage_error_as_for_export(tmp_path, convert_cli):
    invoke, src = convert_cli
    out = tmp_path / "m.safetensors"
    out.write_text("precious")
    res = invoke(src, "-o", out)
    assert res.exit_code == 2 and "exists (use --overwrite)" in _one_error_line(res)
    assert out.read_text() == "precious"
    res = invoke(src, "-o", out, "--overwrite")
    assert res.exit_code == 0, res.output
    assert load_checkpoint(out).config == KPACConfig(levels=2, channels=8)


def test_convert_to_a_folder_or_an_unwritable_place_is_one_line(tmp_path, convert_cli):
    invoke, src = convert_cli
    folder = tmp_path / "folder"
    folder.mkdir()
    res = invoke(src, "-o", folder, "--overwrite")
    assert res.exit_code == 2 and "is a folder" in _one_error_line(res)
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "m.safetensors"
    res = invoke(src, "-o", out)
    assert res.exit_code == 1 and f"cannot write {out}" in _one_error_line(res)


def test_convert_prints_a_long_destination_on_one_line(tmp_path, convert_cli):
    invoke, src = convert_cli
    out = tmp_path / ("a-rather-long-folder-name-" * 3) / "o3.safetensors"  # created, as the help says
    res = invoke(src, "-o", out)
    assert res.exit_code == 0, res.output
    assert f"-> {out}: single_2level" in res.stderr


def test_convert_quiet_prints_nothing_but_errors(tmp_path, convert_cli):
    invoke, src = convert_cli
    out = tmp_path / "m.safetensors"
    res = invoke(src, "-o", out, "--quiet")
    assert res.exit_code == 0 and res.stderr == "" and res.stdout == "", res.output
    assert load_checkpoint(out).config == KPACConfig(levels=2, channels=8)
    res = invoke(src, "-o", out, "-q")  # errors are still said
    assert res.exit_code == 2 and "exists (use --overwrite)" in _one_error_line(res)


def test_models_quiet_keeps_the_list_and_drops_the_message(monkeypatch):
    """The table is stdout's data: --quiet leaves it; only the stderr message goes."""
    from typer.testing import CliRunner

    from kpac_cli.cli import app

    res = CliRunner().invoke(app, ["models", "-q"])
    assert res.exit_code == 0 and "kpac models" in res.stdout and res.stderr == "", res.output
    monkeypatch.setattr("kpac_cli.cli.models.survey_models", lambda: ([], {}))
    res = CliRunner().invoke(app, ["models"])
    assert res.exit_code == 0 and res.stderr == "no shipped models found\n"
    res = CliRunner().invoke(app, ["models", "--quiet"])
    assert res.exit_code == 0 and res.stderr == "" and "kpac models" in res.stdout


# --- a training run folder as --model -------------------------------------------------


def _run_folder(root, exported: bool):
    """What `kpac train` leaves: log.jsonl, last.pt, best.pt and, once exported, model.safetensors."""
    run = root / "runs" / "l1"
    run.mkdir(parents=True)
    (run / "log.jsonl").write_text('{"event": "start"}\n')
    for name in ("last.pt", "best.pt"):
        (run / name).write_bytes(b"training state, never loaded as a model")
    if exported:
        torch.manual_seed(0)
        save_checkpoint(run / "model.safetensors", build_model(KPACConfig(levels=2, channels=8)), {"name": "l1"})
    return run


def test_run_folder_with_an_exported_model_resolves_to_it(tmp_path):
    from kpac_cli.checkpoints.registry import resolve_model

    run = _run_folder(tmp_path, exported=True)
    assert resolve_model(run) == (run / "model.safetensors", "l1")
    assert resolve_model(f"{run}/") == (run / "model.safetensors", "l1")


def test_run_folder_without_an_exported_model_says_how_to_export_it(tmp_path):
    from kpac_cli.checkpoints.registry import resolve_model

    run = _run_folder(tmp_path, exported=False)
    with pytest.raises(FileNotFoundError) as info:
        resolve_model(run)
    assert str(info.value) == (f"{run} is a training run folder without an exported model; "
                               f"export it with kpac train --export-only --resume {run}")
    # an export of best.pt (kpac train --export-only --from best) is named
    save_checkpoint(run / "model-best.safetensors", build_model(KPACConfig(levels=2, channels=8)), {})
    with pytest.raises(FileNotFoundError, match="model-best.safetensors: pass that file"):
        resolve_model(run)
    # a folder that is no run folder is not called one
    (tmp_path / "photos").mkdir()
    with pytest.raises(FileNotFoundError, match="photos is a folder, not a model"):
        resolve_model(tmp_path / "photos")


def test_deblur_takes_a_run_folder_as_train_init_does(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from kpac_cli.cli import app

    photo = tmp_path / "a.png"
    Image.fromarray(np.full((24, 24, 3), 128, np.uint8)).save(photo)
    run = _run_folder(tmp_path, exported=False)
    args = ["deblur", str(photo), "-o", str(tmp_path / "b.png"), "--model", str(run), "--device", "cpu"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "model file not found" not in res.stderr
    assert _one_error_line(res) == (f"error: {run} is a training run folder without an exported model; "
                                    f"export it with kpac train --export-only --resume {run}")
    assert not (tmp_path / "b.png").exists()
    torch.manual_seed(0)
    save_checkpoint(run / "model.safetensors", build_model(KPACConfig(levels=2, channels=8)), {"name": "l1"})
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "b.png").is_file()


# --- shipped models that are damaged --------------------------------------------------


def _weights_folder(folder, name: str, listed: bool = True):
    """A weights folder holding a tiny model NAME.safetensors, listed in SHA256SUMS if ``listed``."""
    import hashlib

    folder.mkdir(parents=True, exist_ok=True)
    path = save_checkpoint(folder / f"{name}.safetensors", build_model(KPACConfig(levels=2, channels=8)), {"name": name})
    if listed:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        with open(folder / "SHA256SUMS", "a") as f:
            f.write(f"{digest}  {path.name}\n")
    return path


def _truncate(path, by: int = 1000) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-by])


LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:3e18f021e27c\nsize 8242596\n"


def test_damaged_or_lfs_pointer_shipped_model_says_so_not_unknown_model(tmp_path, monkeypatch):
    from kpac_cli.checkpoints.registry import resolve_model

    folder = tmp_path / "weights"
    monkeypatch.setenv("KPAC_WEIGHTS_DIR", str(folder))
    damaged = _weights_folder(folder, "foo")
    _truncate(damaged)
    with pytest.raises(CheckpointMismatchError, match=r"foo\.safetensors is damaged \(truncated"):
        resolve_model("foo")
    pointer = _weights_folder(folder, "bar")
    pointer.write_text(LFS_POINTER)
    with pytest.raises(CheckpointMismatchError, match=r"bar\.safetensors is a Git LFS pointer.*git lfs pull"):
        resolve_model("bar")
    (folder / "unlisted.safetensors").write_text(LFS_POINTER)  # not in SHA256SUMS: still recognised
    with pytest.raises(CheckpointMismatchError, match=r"unlisted\.safetensors is a Git LFS pointer"):
        resolve_model("unlisted")

    # as the user sees it: one line naming the file, nothing written
    from PIL import Image
    from typer.testing import CliRunner

    from kpac_cli.cli import app

    photo = tmp_path / "a.png"
    Image.fromarray(np.full((24, 24, 3), 128, np.uint8)).save(photo)
    res = CliRunner().invoke(app, ["deblur", str(photo), "-m", "foo", "-o", str(tmp_path / "b.png"), "--device", "cpu"])
    assert res.exit_code == 2
    line = _one_error_line(res)
    assert f"{damaged} is damaged" in line and "unknown model" not in line
    assert not (tmp_path / "b.png").exists()


def test_models_names_every_shipped_file_it_cannot_use(tmp_path, monkeypatch):
    """A damaged file or a Git LFS pointer is an error of `kpac models` (exit 1), not a missing row."""
    import json

    import kpac_cli.checkpoints.registry as registry
    from typer.testing import CliRunner

    from kpac_cli.cli import app

    folder = tmp_path / "weights"
    monkeypatch.setattr(registry, "weights_dirs", lambda: [folder])
    _weights_folder(folder, "good")
    _truncate(_weights_folder(folder, "cut"))
    (folder / "pointer.safetensors").write_text(LFS_POINTER)
    models, unusable = registry.survey_models()
    assert [m.name for m in models] == ["good"] and sorted(unusable) == ["cut", "pointer"]
    for args in (["models"], ["models", "-q"], ["models", "--json"]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 1, res.output
        lines = res.stderr.splitlines()
        assert len(lines) == 2 and "cut.safetensors is damaged" in lines[0] and "pointer.safetensors is a Git LFS pointer" in lines[1]
        assert "good" in res.stdout and "cut" not in res.stdout
    assert [json.loads(line)["name"] for line in res.stdout.splitlines()] == ["good"]
    (folder / "pointer.safetensors").unlink()
    (folder / "cut.safetensors").unlink()
    res = CliRunner().invoke(app, ["models"])
    assert res.exit_code == 0 and res.stderr == "", res.output


def test_damaged_override_is_reported_never_replaced_by_another_folders_file(tmp_path, monkeypatch):
    import kpac_cli.checkpoints.registry as registry

    override, fallback = tmp_path / "override", tmp_path / "fallback"
    # the order weights_dirs() gives: $KPAC_WEIGHTS_DIR before the package's and the checkout's folders
    monkeypatch.setattr(registry, "weights_dirs", lambda: [override, fallback])
    mine = _weights_folder(override, "kpac-2level")
    shipped = _weights_folder(fallback, "kpac-2level")
    assert registry.resolve_model("kpac-2level") == (mine, "kpac-2level")  # a sound override wins
    _truncate(mine)
    with pytest.raises(CheckpointMismatchError, match="damaged") as info:
        registry.resolve_model("kpac-2level")
    assert str(mine) in str(info.value) and str(shipped) not in str(info.value)
    assert shipped not in [m.path for m in registry.list_models()]  # not listed in its place either
    # an override not listed in SHA256SUMS is still the one used, and loading it names it
    (override / "SHA256SUMS").unlink()
    assert registry.resolve_model("kpac-2level") == (mine, "kpac-2level")
    with pytest.raises(CheckpointMismatchError, match=str(mine)):
        load_checkpoint(mine)


# --- what the authors' .npz may hold -----------------------------------------------------


def _tf_arrays(cfg: KPACConfig) -> list[np.ndarray]:
    """A model's parameters in the authors' layout and order (HWIO; transposed convs (kh, kw, out, in))."""
    torch.manual_seed(0)
    return [np.ascontiguousarray((p.detach().permute(2, 3, 1, 0) if p.ndim == 4 else p.detach()).numpy())
            for p in build_model(cfg).parameters()]


def _official_npz(path, items, shape=None):
    """An .npz in the authors' format: params.npy an object array of ``items`` (1-D unless ``shape``)."""
    params = np.empty(shape if shape is not None else len(items), dtype=object)
    for index, item in zip(np.ndindex(params.shape), items):
        params[index] = item
    np.savez(path, params=params)
    return path


def _convert(*args):
    """`kpac convert` with the real loader."""
    from typer.testing import CliRunner

    from kpac_cli.cli import app

    return CliRunner().invoke(app, ["convert", *map(str, args)])


def test_only_the_released_variants_convert_not_a_2level_dual_pixel_network(tmp_path):
    single = _official_npz(tmp_path / "single_2level.npz", _tf_arrays(KPACConfig(levels=2)))
    assert load_official_npz(single).config == KPACConfig(levels=2)
    dual2 = _official_npz(tmp_path / "dual2.npz", _tf_arrays(KPACConfig(levels=2, in_views=2)))
    with pytest.raises(CheckpointMismatchError, match="match none of the authors' released variants"):
        load_official_npz(dual2)
    out = tmp_path / "dual2.safetensors"
    res = _convert(dual2, "-o", out)
    assert res.exit_code == 1
    line = _one_error_line(res)
    assert str(dual2) in line and "match none" in line
    assert not out.exists()


@pytest.mark.parametrize("kind", ["2-D object array", "0-d object array", "string items", "complex items"])
def test_malformed_params_npy_is_one_line_naming_the_file(tmp_path, kind):
    arrays = _tf_arrays(KPACConfig(levels=2))
    path = tmp_path / "bad.npz"
    if kind == "2-D object array":
        _official_npz(path, arrays, shape=(1, len(arrays)))
    elif kind == "0-d object array":
        _official_npz(path, arrays[:1], shape=())
    elif kind == "string items":
        _official_npz(path, [np.array(["a", "b"])] + arrays[1:])
    else:
        _official_npz(path, [arrays[0].astype(np.complex64)] + arrays[1:])
    with pytest.raises(CheckpointMismatchError, match="bad.npz: params.npy"):
        read_official_npz(path)
    out = tmp_path / "bad.safetensors"
    res = _convert(path, "-o", out)
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output  # not an uncaught exception
    assert str(path) in _one_error_line(res)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["nan", "int32"])
def test_npz_with_non_finite_or_integer_weights_is_refused_naming_the_array(tmp_path, kind):
    arrays = _tf_arrays(KPACConfig(levels=2))
    if kind == "nan":
        arrays[5] = np.full_like(arrays[5], np.nan)
    else:
        arrays[5] = np.zeros(arrays[5].shape, np.int32)
    path = _official_npz(tmp_path / "single_2level.npz", arrays)
    expected = "non-finite values" if kind == "nan" else "int32 values, not floating-point"
    with pytest.raises(CheckpointMismatchError, match=f"item 5 .*{expected}"):
        read_official_npz(path)
    out = tmp_path / "m.safetensors"
    res = _convert(path, "-o", out)
    assert res.exit_code == 1 and "item 5" in _one_error_line(res)
    assert not out.exists()


def test_float64_npz_converts_unless_a_value_overflows_float32(tmp_path):
    arrays = [a.astype(np.float64) for a in _tf_arrays(KPACConfig(levels=2))]
    arrays[3][0] = 1e300  # beyond float32: infinite once cast, so refused
    path = _official_npz(tmp_path / "f64.npz", arrays)
    with pytest.raises(CheckpointMismatchError, match="item 3 .*non-finite"):
        read_official_npz(path)
    arrays[3][0] = 0.5
    _official_npz(path, arrays)
    assert all(a.dtype == np.float32 for a in read_official_npz(path))


def _safetensors_with(tmp_path, name: str, value: torch.Tensor):
    """A tiny kpac model file whose tensor ``name`` is replaced by ``value`` (metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = save_checkpoint(tmp_path / "m.safetensors", build_model(KPACConfig(levels=2, channels=8)))
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    state = load_file(str(path))
    state[name] = value
    save_file(state, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("kind", ["nan", "inf", "int32"])
def test_safetensors_with_non_finite_or_integer_tensor_is_refused_naming_it(tmp_path, kind):
    name = "blocks.0.fuse.bias"
    shape = build_model(KPACConfig(levels=2, channels=8)).state_dict()[name].shape
    value = {"nan": torch.full(shape, float("nan")), "inf": torch.full(shape, float("inf")),
             "int32": torch.zeros(shape, dtype=torch.int32)}[kind]
    path = _safetensors_with(tmp_path, name, value)
    expected = "int32 values, not floating-point" if kind == "int32" else "non-finite values"
    with pytest.raises(CheckpointMismatchError, match=f"m.safetensors: tensor '{name}' holds .*{expected}"):
        load_checkpoint(path)

    from PIL import Image
    from typer.testing import CliRunner

    from kpac_cli.cli import app

    photo = tmp_path / "a.png"
    Image.fromarray(np.full((24, 24, 3), 128, np.uint8)).save(photo)
    res = CliRunner().invoke(app, ["deblur", str(photo), "-m", str(path), "-o", str(tmp_path / "b.png"), "--device", "cpu"])
    assert res.exit_code == 2 and f"tensor '{name}'" in _one_error_line(res)
    assert not (tmp_path / "b.png").exists()


@pytest.mark.parametrize("field, value", [("channels", 8.0), ("in_views", True), ("dilations", [1, 2.5]),
                                          ("scale_attention", "false")])
def test_config_with_a_value_of_the_wrong_type_is_a_checkpoint_mismatch(tmp_path, field, value):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = save_checkpoint(tmp_path / "m.safetensors", build_model(KPACConfig(levels=2, channels=8)))
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    config = json.loads(meta["config"])
    config[field] = value
    meta["config"] = json.dumps(config)
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(CheckpointMismatchError, match=f"invalid kpac metadata \\({field} must be"):
        read_metadata(path)
    with pytest.raises(ValueError, match=f"{field} must be"):
        KPACConfig(**{**KPACConfig(levels=2, channels=8).to_dict(), field: value})


def test_config_takes_numpy_integers_as_plain_ints():
    cfg = KPACConfig(levels=np.int64(2), channels=np.int32(8), dilations=[np.int64(1), 2])
    assert cfg == KPACConfig(levels=2, channels=8, dilations=(1, 2))
    assert type(cfg.levels) is int and json.loads(cfg.to_json())["levels"] == 2


# --- kpac convert's destination ------------------------------------------------------------


def test_convert_never_writes_over_its_input_even_with_overwrite(tmp_path, convert_cli):
    invoke, src = convert_cli
    res = invoke(src, "-o", src, "--overwrite")
    assert res.exit_code == 2 and "is the input" in _one_error_line(res)
    assert src.read_bytes() == b"stand-in"
    link = tmp_path / "link.safetensors"  # the same file under another name
    link.symlink_to(src)
    res = invoke(src, "-o", link, "--overwrite")
    assert res.exit_code == 2 and "is the input" in _one_error_line(res)
    assert link.is_symlink() and src.read_bytes() == b"stand-in"


@pytest.mark.parametrize("name", ["m2.pt", "m2.pth", "m2", "m2.npz"])
def test_convert_output_must_be_a_safetensors_file(tmp_path, convert_cli, name):
    invoke, src = convert_cli
    out = tmp_path / name
    res = invoke(src, "-o", out)
    assert res.exit_code == 2 and ".safetensors" in _one_error_line(res)
    assert not out.exists()
