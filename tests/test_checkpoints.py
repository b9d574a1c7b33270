"""Checkpoints: safetensors with config + provenance; the authors' .npz without running pickle code."""

from __future__ import annotations

import io
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
    monkeypatch.setattr("kpac_cli.cli.models.list_models", lambda: [])
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
