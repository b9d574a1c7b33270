"""Checkpoints: safetensors with config + provenance; the authors' .npz without running pickle code."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import zipfile
from pathlib import Path

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
    sums = folder / "SHA256SUMS"  # a file SHA256SUMS still lists is missing, not gone
    sums.write_text("".join(line for line in sums.read_text().splitlines(keepends=True) if "cut" not in line))
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
    assert res.exit_code == 2
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
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output  # not an uncaught exception
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
    assert res.exit_code == 2 and "item 5" in _one_error_line(res)
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


# --- hostile or damaged .npz containers ------------------------------------------------------


def _npz_member(path, data: bytes, compression=zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        zf.writestr("params.npy", data)


def _patch_zip(path, local_offset: int, central_offset: int, value: int, mask: bool = False) -> None:
    """Change one byte of the first local header and of the central directory entry."""
    data = bytearray(path.read_bytes())
    for sig, off in ((b"PK\x03\x04", local_offset), (b"PK\x01\x02", central_offset)):
        i = data.find(sig) + off
        data[i] = data[i] | value if mask else value
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["magic only", "version only", "header not a literal", "header cut short",
                                  "encrypted member", "unknown compression"])
def test_npz_with_a_malformed_header_or_member_is_one_line_naming_the_file(tmp_path, kind):
    path = tmp_path / "bad.npz"
    if kind == "magic only":
        _npz_member(path, b"\x93NUMPY")
    elif kind == "version only":
        _npz_member(path, b"\x93NUMPY\x01\x00")
    elif kind == "header not a literal":
        _npz_member(path, b"\x93NUMPY\x01\x00\x05\x00abcde")
    elif kind == "header cut short":
        _npz_member(path, b"\x93NUMPY\x01\x00\x40\x00{'descr': '|O', 'fortran_order': False, 'shape': (")
    elif kind == "encrypted member":
        _npz_member(path, b"\x93NUMPY")
        _patch_zip(path, 6, 8, 1, mask=True)  # general-purpose flag bit 0: encrypted
    else:
        _npz_member(path, b"\x93NUMPY")
        _patch_zip(path, 8, 10, 99)  # compression method 99 (AES), which zipfile cannot read
    with pytest.raises(CheckpointMismatchError, match="bad.npz: .*params.npy"):
        read_official_npz(path)
    out = tmp_path / "bad.safetensors"
    res = _convert(path, "-o", out)
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    assert str(path) in _one_error_line(res)
    assert not out.exists()


def _with_metadata(path, **changes):
    """Rewrite a kpac safetensors file with some metadata entries replaced (weights kept)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    meta.update(changes)
    save_file(load_file(str(path)), str(path), metadata=meta)
    return path


@pytest.mark.parametrize("provenance", ["[1, 2]", '"trained by me"', "null", "3"])
def test_provenance_that_is_not_a_json_object_is_invalid_metadata(tmp_path, monkeypatch, provenance):
    from typer.testing import CliRunner

    from kpac_cli.cli import app

    folder = tmp_path / "weights"
    path = _with_metadata(_weights_folder(folder, "odd", listed=False), provenance=provenance)
    with pytest.raises(CheckpointMismatchError, match="odd.safetensors: invalid kpac metadata \\(provenance must be a JSON object"):
        read_metadata(path)
    with pytest.raises(CheckpointMismatchError, match="provenance must be a JSON object"):
        load_checkpoint(path)
    monkeypatch.setenv("KPAC_WEIGHTS_DIR", str(folder))
    res = CliRunner().invoke(app, ["models"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert "odd.safetensors: invalid kpac metadata" in _one_error_line(res)


@pytest.mark.parametrize("config, found", [("[]", "list"), ('"levels"', "str"), ("null", "NoneType")])
def test_config_that_is_not_a_json_object_says_so(tmp_path, config, found):
    path = _with_metadata(save_checkpoint(tmp_path / "m.safetensors", build_model(KPACConfig(levels=2, channels=8))),
                          config=config)
    with pytest.raises(CheckpointMismatchError, match=f"invalid kpac metadata \\(a KPACConfig is a JSON object of fields, got {found}\\)"):
        read_metadata(path)


def test_models_lists_a_model_whose_scores_are_not_numbers(tmp_path, monkeypatch):
    """Scores are free-form metadata: figures that are not numbers are left to --json, never a crash."""
    from typer.testing import CliRunner

    from kpac_cli.cli import app

    folder = tmp_path / "weights"
    folder.mkdir()
    scores = {"blur_detection": {"auc": "0.95"}, "pixel4_dual_pixel_capture": {"input_psnr": "29", "single_psnr": 30.1}}
    save_checkpoint(folder / "mine.safetensors", build_model(KPACConfig(levels=2, channels=8)), {"scores": scores})
    monkeypatch.setenv("KPAC_WEIGHTS_DIR", str(folder))
    res = CliRunner().invoke(app, ["models"])
    assert res.exit_code == 0 and res.exception is None, res.output
    assert "mine" in res.stdout and res.stderr == ""
    res = CliRunner().invoke(app, ["models", "--json"])
    assert res.exit_code == 0, res.output
    records = {r["name"]: r for r in map(json.loads, res.stdout.splitlines())}
    assert records["mine"]["provenance"]["scores"] == scores
    # `.default` marks two models, one per kind of input: `.default_for` tells them apart
    defaults = {r["name"]: r["default_for"] for r in records.values() if r["default"]}
    assert defaults == {"kpac-3level": "single-image", "kpac-dual": "dual-pixel"}
    assert records["mine"]["default_for"] is None


def test_models_prints_metadata_with_brackets_verbatim(tmp_path, monkeypatch):
    """A model's own metadata is text: '[/x]' in its scores or iterations is shown as written,
    neither a crash on rich markup nor swallowed as a style tag."""
    from typer.testing import CliRunner

    from kpac_cli.cli import app

    folder = tmp_path / "weights"
    folder.mkdir()
    provenance = {"iterations": "[/i]", "scores": {"psnr": "[/x]", "ssim": "[b]0.9"}}
    save_checkpoint(folder / "mine.safetensors", build_model(KPACConfig(levels=2, channels=8)), provenance)
    monkeypatch.setenv("KPAC_WEIGHTS_DIR", str(folder))
    res = CliRunner().invoke(app, ["models"])
    assert res.exit_code == 0 and res.exception is None, res.output
    assert "[/i]" in res.stdout and "psnr [/x]" in res.stdout and "ssim [b]0.9" in res.stdout, res.stdout


def test_models_names_a_file_whose_weights_do_not_fit_its_declared_architecture(tmp_path, monkeypatch):
    """A listed model must load: metadata declaring 3 levels over 2-level weights is an error (exit 1)."""
    from typer.testing import CliRunner

    import kpac_cli.checkpoints.registry as registry
    from kpac_cli.cli import app

    folder = tmp_path / "weights"
    _weights_folder(folder, "good")
    liar = _weights_folder(folder, "liar")
    _with_metadata(liar, config=KPACConfig(levels=3, channels=8).to_json())
    monkeypatch.setattr(registry, "weights_dirs", lambda: [folder])
    (folder / "SHA256SUMS").unlink()  # the digests are not what is checked here
    models, unusable = registry.survey_models()
    assert [m.name for m in models] == ["good"] and list(unusable) == ["liar"]
    assert "liar.safetensors: weights do not fit the declared architecture" in unusable["liar"]
    for args in (["models"], ["models", "--json"]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 1, res.output
        assert "liar.safetensors: weights do not fit" in _one_error_line(res)
        assert "good" in res.stdout and "liar" not in res.stdout


def test_sha256sums_in_upper_case_or_naming_a_file_with_spaces_is_read_as_sha256sum_does(tmp_path, monkeypatch):
    import hashlib

    import kpac_cli.checkpoints.registry as registry

    folder = tmp_path / "weights"
    folder.mkdir()
    upper = save_checkpoint(folder / "upper.safetensors", build_model(KPACConfig(levels=2, channels=8)), {})
    spaced = save_checkpoint(folder / "my model.safetensors", build_model(KPACConfig(levels=2, channels=8)), {})
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (upper, spaced)}
    (folder / "SHA256SUMS").write_text(f"{digest[upper].upper()}  upper.safetensors\n"
                                       f"{digest[spaced]} *my model.safetensors\n")
    monkeypatch.setattr(registry, "weights_dirs", lambda: [folder])
    # a sound file listed with an upper-case digest is not called damaged
    assert registry.resolve_model("upper") == (upper, "upper")
    models, unusable = registry.survey_models()
    assert sorted(m.name for m in models) == ["my model", "upper"] and unusable == {}
    # a listed name with a space is checked, not skipped
    _truncate(spaced)
    with pytest.raises(CheckpointMismatchError, match="my model.safetensors is damaged"):
        registry.resolve_model("my model")
    assert "damaged" in registry.survey_models()[1]["my model"]


@pytest.mark.parametrize("name", ["single_2level.npz", "renamed.safetensors"])
def test_an_authors_npz_given_as_a_model_says_to_convert_it(tmp_path, name):
    from PIL import Image
    from typer.testing import CliRunner

    from kpac_cli.cli import app

    path = _official_npz(tmp_path / "single_2level.npz", _tf_arrays(KPACConfig(levels=2)))
    if name != path.name:
        path = path.rename(tmp_path / name)
    with pytest.raises(CheckpointMismatchError, match=f"{name}: an .npz file .*kpac convert") as info:
        load_checkpoint(path)
    assert "not a readable safetensors" not in str(info.value)
    photo = tmp_path / "a.png"
    Image.fromarray(np.full((24, 24, 3), 128, np.uint8)).save(photo)
    res = CliRunner().invoke(app, ["deblur", str(photo), "-m", str(path), "-o", str(tmp_path / "b.png"), "--device", "cpu"])
    assert res.exit_code == 2 and "kpac convert" in _one_error_line(res)
    assert not (tmp_path / "b.png").exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".PT", ".Pth"])
def test_update_provenance_never_rewrites_a_torch_file(tmp_path, suffix):
    """A .pt training state would be replaced by a safetensors file of weights alone."""
    net = build_model(KPACConfig(levels=2, channels=8))
    path = tmp_path / f"last{suffix}"
    torch.save({"config": net.config.to_dict(), "model": net.state_dict(), "iteration": 7}, path)
    before = path.read_bytes()
    with pytest.raises(CheckpointMismatchError, match=f"last{suffix}: .*safetensors files only"):
        update_provenance(path, scores={"psnr": 30.0})
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["iteration"] == 7


def test_a_plain_folder_named_like_a_shipped_model_does_not_hide_it(tmp_path, monkeypatch):
    """`kpac deblur x.png -m kpac-2level -o kpac-2level/` run twice: the output folder is no model."""
    from PIL import Image
    from typer.testing import CliRunner

    from kpac_cli.checkpoints.registry import resolve_model
    from kpac_cli.cli import app

    shipped = _weights_folder(tmp_path / "weights", "kpac-2level")
    monkeypatch.setenv("KPAC_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kpac-2level").mkdir()
    assert resolve_model("kpac-2level") == (shipped, "kpac-2level")
    photo = tmp_path / "a.png"
    Image.fromarray(np.full((24, 24, 3), 128, np.uint8)).save(photo)
    res = CliRunner().invoke(app, ["deblur", str(photo), "-m", "kpac-2level", "-o", "kpac-2level/", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "kpac-2level" / "a.png").is_file()
    # a training run folder of that name is still the run's model, and a spelled-out path a folder
    run = _run_folder(tmp_path / "elsewhere", exported=True)
    monkeypatch.chdir(run.parent)
    run.rename(run.parent / "kpac-2level")
    assert resolve_model("kpac-2level") == (Path("kpac-2level") / "model.safetensors", "kpac-2level")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="is a folder, not a model"):
        resolve_model("./kpac-2level")


def test_arrays_that_do_not_fit_a_given_config_are_named_in_the_files_layout():
    from kpac_cli.checkpoints import model_from_official_arrays

    single, dual = KPACConfig(levels=2, channels=8), KPACConfig(levels=2, channels=8, in_views=2)
    arrays = _tf_arrays(single)
    assert model_from_official_arrays(arrays, single).config == single
    # the file's shape and the expected one, both HWIO: they differ only where the file is wrong
    with pytest.raises(CheckpointMismatchError, match=r"array 0 \(encoder.c0.weight\) has shape \(5, 5, 3, 8\), expected \(5, 5, 6, 8\)"):
        model_from_official_arrays(arrays, dual)
    # a 1-D array where a kernel belongs is a mismatch, not a PyTorch error
    with pytest.raises(CheckpointMismatchError, match=r"array 0 \(encoder.c0.weight\) has shape \(8,\), expected \(5, 5, 3, 8\)"):
        model_from_official_arrays([arrays[1]] + arrays[1:], single)


_DTYPE_F4 = b"cnumpy\ndtype\nX\x02\x00\x00\x00f4\x85R"  # numpy.dtype('f4')


@pytest.mark.parametrize("kind", ["zero-stride view", "never filled"])
def test_npz_declaring_arrays_larger_than_its_data_is_refused_before_copying(tmp_path, kind):
    """A few hundred bytes must not make the reader build gigabytes (or weights from uninitialised memory)."""
    n = 1 << 24  # 64 MiB of float32 declared
    size = b"J" + n.to_bytes(4, "little") + b"\x85"
    if kind == "zero-stride view":  # numpy.ndarray((n,), f4, b'....', 0, (0,)): one value seen n times
        item = b"cnumpy\nndarray\n(" + size + _DTYPE_F4 + b"C\x04\x00\x00\x80?K\x00K\x00\x85tR"
    else:  # _reconstruct(ndarray, (n,), f4) with no state: an allocation, no data
        item = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + size + _DTYPE_F4 + b"\x87R"
    path = tmp_path / "small.npz"
    _npz_with_pickle(path, b"\x80\x02](" + item + b"e.")
    assert path.stat().st_size < 400
    with pytest.raises(CheckpointMismatchError, match=r"small.npz: params.npy item 0 \(shape \(16777216,\)\) declares more data"):
        read_official_npz(path)


def test_unknown_model_says_when_kpac_weights_dir_is_not_a_folder(tmp_path, monkeypatch):
    from kpac_cli.checkpoints.registry import resolve_model

    _weights_folder(tmp_path / "weights", "mine")
    monkeypatch.setenv("KPAC_WEIGHTS_DIR", str(tmp_path / "weigths"))  # misspelt
    with pytest.raises(FileNotFoundError, match=r"unknown model 'mine' .*KPAC_WEIGHTS_DIR \(.*weigths\) is not a folder"):
        resolve_model("mine")
    monkeypatch.setenv("KPAC_WEIGHTS_DIR", str(tmp_path / "weights"))
    assert resolve_model("mine") == (tmp_path / "weights" / "mine.safetensors", "mine")
    with pytest.raises(FileNotFoundError, match="unknown model 'other'") as info:
        resolve_model("other")
    assert "KPAC_WEIGHTS_DIR" not in str(info.value)


def test_models_notes_a_kpac_weights_dir_that_is_not_a_folder(tmp_path, monkeypatch):
    """`kpac models` says why the models of a misspelt $KPAC_WEIGHTS_DIR are not in its list."""
    from typer.testing import CliRunner

    from kpac_cli.cli import app

    _weights_folder(tmp_path / "weights", "mine")
    monkeypatch.setenv("KPAC_WEIGHTS_DIR", str(tmp_path / "weigths"))  # misspelt
    for args in (["models"], ["models", "-q", "--json"]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        assert res.stderr.splitlines() == [f"note: $KPAC_WEIGHTS_DIR ({tmp_path / 'weigths'}) is not a folder, so it "
                                           "was not searched: its models are not listed"]
    monkeypatch.setenv("KPAC_WEIGHTS_DIR", str(tmp_path / "weights"))
    res = CliRunner().invoke(app, ["models", "--json"])
    assert res.exit_code == 0 and res.stderr == "", res.output
    assert json.loads(res.stdout.splitlines()[0])["name"] == "mine"


@pytest.mark.parametrize("wrap", ["fast", "compile", "data_parallel"])
def test_a_wrapped_model_is_saved_as_the_network_inside(tmp_path, wrap):
    """The fast CPU view, torch.compile and DataParallel prefix every weight's name: saved as is,
    the file would never load."""
    from kpac_cli.model.fast import FastKPACNet

    torch.manual_seed(0)
    model = build_model(KPACConfig(levels=2, channels=8))
    wrapped = {"fast": FastKPACNet, "compile": torch.compile, "data_parallel": torch.nn.DataParallel}[wrap](model)
    path = save_checkpoint(tmp_path / "m.safetensors", wrapped, {"name": "m"})
    loaded = load_checkpoint(path).build()
    assert loaded.config == model.config
    for (name, value), (loaded_name, loaded_value) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name == loaded_name and torch.equal(value, loaded_value)


def test_saving_something_that_is_no_kpac_network_writes_nothing(tmp_path):
    with pytest.raises(TypeError, match="expected a KPACNet"):
        save_checkpoint(tmp_path / "m.safetensors", torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3)))
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("keep,says", [(0, r"0 bytes: the file is empty"),
                                       (100, r"100 bytes, fewer than its [\d,]+-byte header alone"),
                                       (-1000, r"[\d,]+ of the [\d,]+ bytes its header declares")])
def test_a_half_downloaded_safetensors_is_called_truncated(tmp_path, monkeypatch, keep, says):
    """Not 'incomplete metadata, file not fully covered': the user is told the file is cut short,
    whether given by path, or by name from a weights folder without SHA256SUMS."""
    import kpac_cli.checkpoints.registry as registry

    path = save_checkpoint(tmp_path / "m.safetensors", build_model(KPACConfig(levels=2, channels=8)))
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    expected = rf"m\.safetensors: truncated safetensors file \({says}\): an incomplete download or copy"
    with pytest.raises(CheckpointMismatchError, match=expected):
        load_checkpoint(path)
    with pytest.raises(CheckpointMismatchError, match=expected):
        read_metadata(path)
    monkeypatch.setattr(registry, "weights_dirs", lambda: [tmp_path])
    assert list(registry.survey_models()[1]) == ["m"]
    assert re.search(expected, registry.survey_models()[1]["m"])


def test_a_file_that_is_no_safetensors_is_not_called_truncated(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"<html>not found</html>" * 10)
    with pytest.raises(CheckpointMismatchError, match="not a readable safetensors file") as info:
        load_checkpoint(path)
    assert "truncated" not in str(info.value)


def test_a_half_downloaded_or_lfs_pointer_npz_says_so(tmp_path):
    """`kpac convert` of an incomplete download or an LFS pointer does not call it a foreign file."""
    good = _official_npz(tmp_path / "good.npz", _tf_arrays(KPACConfig(levels=2)))
    half = tmp_path / "single_2level.npz"
    half.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointMismatchError, match=r"single_2level\.npz: truncated or damaged \.npz .*incomplete download"):
        read_official_npz(half)
    pointer = tmp_path / "single_3level.npz"
    pointer.write_text(LFS_POINTER)
    with pytest.raises(CheckpointMismatchError, match=r"single_3level\.npz is a Git LFS pointer.*git lfs pull"):
        read_official_npz(pointer)
    other = tmp_path / "other.npz"
    other.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(CheckpointMismatchError, match=r"other\.npz: not an official KPAC \.npz checkpoint"):
        read_official_npz(other)


def test_load_checkpoint_given_a_model_name_or_a_folder_says_what_takes_them(tmp_path, monkeypatch):
    """load_checkpoint reads files; a researcher who passes a shipped name or a run folder hears
    which functions take those."""
    import kpac_cli.checkpoints.registry as registry

    _weights_folder(tmp_path / "weights", "shipped-one")
    monkeypatch.setattr(registry, "weights_dirs", lambda: [tmp_path / "weights"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model file not found: shipped-one \(it is a shipped model's name: .*resolve_model"):
        load_checkpoint("shipped-one")
    with pytest.raises(FileNotFoundError, match=r"^weights is a folder, not a model file \(.*resolve_model.*Deblurrer"):
        load_checkpoint("weights")
    with pytest.raises(FileNotFoundError, match=r"^model file not found: other\.safetensors$"):
        load_checkpoint("other.safetensors")
    path, _ = registry.resolve_model("shipped-one")
    assert load_checkpoint(path).provenance["name"] == "shipped-one"


def test_a_half_downloaded_or_lfs_pointer_torch_file_says_so(tmp_path):
    """Not torch's 'failed finding central directory' or its advice to load with weights_only=False."""
    model = build_model(KPACConfig(levels=2, channels=8))
    path = tmp_path / "last.pt"
    torch.save({"config": model.config.to_dict(), "model": model.state_dict()}, path)
    assert load_checkpoint(path).config == model.config
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointMismatchError, match=r"last\.pt: truncated or damaged torch file .*incomplete download") as info:
        load_checkpoint(path)
    assert "weights_only" not in str(info.value)
    path.write_text(LFS_POINTER)
    with pytest.raises(CheckpointMismatchError, match=r"last\.pt is a Git LFS pointer, not the weights: run `git lfs pull`"):
        load_checkpoint(path)


def test_a_file_of_a_newer_checkpoint_format_is_refused_saying_to_upgrade(tmp_path):
    """The format version is read: a newer format's tensors may mean something else, so such a
    file is not loaded as if it were of this one."""
    from kpac_cli import __version__

    path = _with_metadata(save_checkpoint(tmp_path / "m.safetensors", build_model(KPACConfig(levels=2, channels=8)),
                                          {"kpac_version": "9.0.0"}), format_version="2")
    with pytest.raises(CheckpointMismatchError, match=rf"m.safetensors: written by kpac 9.0.0 in checkpoint format 2, "
                                                      rf"which this kpac {re.escape(__version__)} does not read .*upgrade kpac"):
        load_checkpoint(path)
    _with_metadata(path, format_version="one")
    with pytest.raises(CheckpointMismatchError, match=r"invalid kpac metadata \(unknown format_version 'one'\)"):
        read_metadata(path)
    _with_metadata(path, format_version="1")  # this format: read as ever
    assert read_metadata(path)[0] == KPACConfig(levels=2, channels=8)


def test_a_config_field_of_a_newer_kpac_says_to_upgrade_not_that_the_file_is_invalid(tmp_path):
    model = build_model(KPACConfig(levels=2, channels=8))
    config = {**model.config.to_dict(), "norm": "group"}  # a field a later version may add
    newer = _with_metadata(save_checkpoint(tmp_path / "new.safetensors", model, {"kpac_version": "99.1"}),
                           config=json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match=r"new.safetensors: written by kpac 99.1, newer than this kpac "
                                                      r".*: upgrade kpac to load it \(unknown KPACConfig fields: \['norm'\]\)"):
        load_checkpoint(newer)
    torch.save({"config": config, "model": model.state_dict(), "provenance": {"kpac_version": "99.1"}}, tmp_path / "new.pt")
    with pytest.raises(CheckpointMismatchError, match=r"new.pt: written by kpac 99.1, newer .*upgrade kpac"):
        load_checkpoint(tmp_path / "new.pt")
    # written by this version (or an older one): the field is an error in the file, said as before
    same = _with_metadata(save_checkpoint(tmp_path / "same.safetensors", model), config=json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match=r"same.safetensors: invalid kpac metadata \(unknown KPACConfig"):
        load_checkpoint(same)


@pytest.mark.parametrize("suffix", [".PT", ".Pth"])
def test_a_torch_file_named_in_upper_case_loads_as_one(tmp_path, suffix):
    """RUN.PT (a copy from a camera card or a Windows share) is a torch file, not a broken safetensors one."""
    from kpac_cli.checkpoints.registry import resolve_model

    model = build_model(KPACConfig(levels=2, channels=8))
    path = tmp_path / f"RUN{suffix}"
    torch.save({"config": model.config.to_dict(), "model": model.state_dict()}, path)
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in model.state_dict().items())
    with pytest.raises(FileNotFoundError, match="model file not found"):  # not "unknown model"
        resolve_model(tmp_path / f"MISSING{suffix}")


# --- the default model, odd weights files, configs that do not fit -----------------------


def test_the_default_model_is_the_shipped_one_whatever_the_current_folder_holds(tmp_path, monkeypatch):
    """`kpac deblur a.png` in a folder holding a file or a run folder named kpac-3level (a run
    made with --run-dir kpac-3level, say) still uses the shipped model: the user named none."""
    from PIL import Image
    from typer.testing import CliRunner

    from kpac_cli.checkpoints.registry import resolve_model
    from kpac_cli.cli import app

    folder = tmp_path / "weights"
    monkeypatch.setenv("KPAC_WEIGHTS_DIR", str(folder))
    single, dual = _weights_folder(folder, "kpac-3level"), _weights_folder(folder, "kpac-dual")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "kpac-3level").write_text("notes, not a model")
    run = _run_folder(tmp_path / "elsewhere", exported=True)
    run.rename(work / "kpac-dual")
    assert resolve_model("default") == (single, "kpac-3level")
    assert resolve_model("default", dual=True) == (dual, "kpac-dual")
    assert resolve_model("kpac-dual") == (Path("kpac-dual") / "model.safetensors", "kpac-dual")  # named: the run
    Image.fromarray(np.full((24, 24, 3), 128, np.uint8)).save(work / "a.png")
    res = CliRunner().invoke(app, ["deblur", "a.png", "-o", "b.png", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (work / "b.png").is_file()


def test_a_shipped_model_listed_in_sha256sums_but_missing_is_named_as_missing(tmp_path, monkeypatch):
    """A shipped file deleted or left out of a package: `kpac models` says so (exit 1) and
    asking for it says the file is missing, not that no such model exists."""
    import kpac_cli.checkpoints.registry as registry
    from typer.testing import CliRunner

    from kpac_cli.cli import app

    folder = tmp_path / "weights"
    monkeypatch.setattr(registry, "weights_dirs", lambda: [folder])
    _weights_folder(folder, "kpac-3level")
    _weights_folder(folder, "kpac-dual").unlink()
    models, unusable = registry.survey_models()
    assert [m.name for m in models] == ["kpac-3level"] and list(unusable) == ["kpac-dual"]
    with pytest.raises(FileNotFoundError, match=r"kpac-dual\.safetensors is missing: .*SHA256SUMS lists it"):
        registry.resolve_model("default", dual=True)
    res = CliRunner().invoke(app, ["models"])
    assert res.exit_code == 1 and "kpac-dual.safetensors is missing" in _one_error_line(res)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_a_model_stored_in_a_smaller_float_type_loads_and_runs(tmp_path, dtype):
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "m.safetensors", build_model(KPACConfig(levels=2, channels=8)), dtype=dtype)
    ckpt = load_checkpoint(path)
    assert all(t.dtype == dtype for t in ckpt.state_dict.values())
    model = ckpt.build()
    for name, value in model.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, ckpt.state_dict[name].float()), name
    with torch.no_grad():
        assert torch.isfinite(model(torch.zeros(1, 3, 8, 8))).all()


def test_a_nan_in_an_8_bit_float_model_is_refused_naming_the_tensor(tmp_path):
    name = "blocks.0.fuse.bias"
    shape = build_model(KPACConfig(levels=2, channels=8)).state_dict()[name].shape
    path = _safetensors_with(tmp_path, name, torch.full(shape, float("nan")).to(torch.float8_e4m3fn))
    with pytest.raises(CheckpointMismatchError, match=f"tensor '{name}' holds non-finite values"):
        load_checkpoint(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy pickle"])
def test_a_torch_file_named_safetensors_says_what_it_is(tmp_path, monkeypatch, legacy):
    """Not "header too large" (safetensors' reading of the first bytes as a length)."""
    from kpac_cli.checkpoints import registry

    model = build_model(KPACConfig(levels=2, channels=8))
    path = tmp_path / "renamed.safetensors"
    torch.save({"config": model.config.to_dict(), "model": model.state_dict()}, path,
               _use_new_zipfile_serialization=not legacy)
    for read in (load_checkpoint, read_metadata):
        with pytest.raises(CheckpointMismatchError, match=r"renamed\.safetensors: a .*torch\.save writes.*not a safetensors file.*\.pt") as info:
            read(path)
        assert "header" not in str(info.value)
    monkeypatch.setattr(registry, "weights_dirs", lambda: [tmp_path])
    assert "torch.save writes" in registry.survey_models()[1]["renamed"]
    path.unlink()  # the authors' .npz is a zip too: named as what it is
    _official_npz(tmp_path / "npz.npz", _tf_arrays(KPACConfig(levels=2, channels=8))).rename(path)
    assert "authors' release format" in registry.survey_models()[1]["renamed"]


def _model_declaring(tmp_path, **config) -> Path:
    """A tiny 2-level model file whose metadata declares ``config`` instead of its own."""
    path = save_checkpoint(tmp_path / "m.safetensors", build_model(KPACConfig(levels=2, channels=8)))
    _with_metadata(path, config=json.dumps({**KPACConfig(levels=2, channels=8).to_dict(), **config}))
    return path


@pytest.mark.parametrize("config, says", [({"channels": 4 * 10**9}, "too large"),
                                          ({"kernel_size": 100001}, "wrong shapes"),
                                          ({"dilations": list(range(1, 100_001))}, r"\.\.\. \(689,\d+ characters\)")])
def test_a_config_declaring_a_huge_network_is_refused_before_it_is_allocated(tmp_path, config, says):
    """channels 4e9 or a 100001-px kernel would be allocated (an out-of-memory traceback, or
    minutes of initialisation) if the network were built before the shapes were compared."""
    from kpac_cli.checkpoints.safetensors_io import check_weights_fit

    path = _model_declaring(tmp_path, **config)
    with pytest.raises(CheckpointMismatchError, match=f"m.safetensors: weights do not fit .*{says}") as info:
        load_checkpoint(path).build()
    assert len(str(info.value)) < 1000  # the declared config is cut short, not printed whole
    with pytest.raises(CheckpointMismatchError, match="weights do not fit"):
        check_weights_fit(path, read_metadata(path)[0])


def test_a_config_declaring_more_blocks_than_the_file_has_tensors_is_refused_unbuilt(tmp_path, monkeypatch):
    """100,000 blocks would take hours to build, even on the meta device."""
    from kpac_cli.checkpoints import safetensors_io
    from kpac_cli.checkpoints.safetensors_io import check_weights_fit

    path = _model_declaring(tmp_path, blocks=100_000)

    def never(config):
        raise AssertionError(f"built a network of {config.blocks} blocks")

    monkeypatch.setattr(safetensors_io, "build_model", never)
    with pytest.raises(CheckpointMismatchError, match=r"100000 KPAC blocks declared, \d+ tensors stored"):
        load_checkpoint(path).build()
    with pytest.raises(CheckpointMismatchError, match="100000 KPAC blocks declared"):
        check_weights_fit(path, read_metadata(path)[0])


@pytest.mark.parametrize("stored", ["float64", "mixed"])
def test_update_provenance_keeps_every_tensor_bit_for_bit_in_its_own_type(tmp_path, stored):
    """Not rebuilt through a float32 network: float64 weights kept their float32 rounding, and
    a file mixing types had every tensor cast to the type of its first."""
    from safetensors.torch import load_file, save_file

    path = save_checkpoint(tmp_path / "m.safetensors", build_model(KPACConfig(levels=2, channels=8)))
    meta = dict(_metadata_of(path))
    state = load_file(str(path))
    if stored == "float64":
        state = {k: v.double() + 1e-12 for k, v in state.items()}  # not representable in float32
    else:
        state = {k: v.half() if k.endswith("bias") else v for k, v in state.items()}
    save_file(state, str(path), metadata=meta)
    assert update_provenance(path, note="scored")["note"] == "scored"
    after = load_file(str(path))
    assert after.keys() == state.keys()
    for name, value in state.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), name
    assert read_metadata(path)[1]["note"] == "scored"


def _metadata_of(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()
