"""The command line in shell pipelines and scripts: what a stderr that takes no more does to a
batch, the exit status of a command whose model (or checkpoint to convert) is missing or
damaged, and what is said when two inputs of one name in two formats claim one output."""

from __future__ import annotations

import errno
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kpac_cli.checkpoints import save_checkpoint
from kpac_cli.cli import app
from kpac_cli.images import ImageInfo, write_image
from kpac_cli.model import KPACConfig, build_model

runner = CliRunner()


@pytest.fixture(autouse=True)
def _wide_stderr(monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # error lines are checked whole, not as wrapped


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A small random-weight model: it exercises the plumbing, not the deblurring."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models")
    return save_checkpoint(folder / "tiny.safetensors", build_model(KPACConfig(levels=2, channels=8)), {"name": "tiny"})


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _photo(path: Path, seed: int = 0, fmt: str = "png") -> Path:
    arr = np.random.default_rng(seed).random((20, 24, 3), dtype=np.float32)
    info = ImageInfo(path=None, format=fmt, bit_depth=8, channels=3, alpha=None, icc_profile=None, exif=None,
                     orientation_applied=1, size=arr.shape[:2])
    write_image(path, arr, info, format=fmt)
    return path


# --------------------------------------------------------------------------------------------
# a stderr that takes no more


class _FailingStderr(io.TextIOBase):
    """A stderr whose every write fails as ``error`` says (its reader gone, a full disk)."""

    def __init__(self, error: int) -> None:
        self.error = error
        self.attempts = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.attempts += 1
        exc = BrokenPipeError if self.error == errno.EPIPE else OSError
        raise exc(self.error, "stderr fails")

    def isatty(self) -> bool:
        return False


@pytest.mark.parametrize("error", [errno.EPIPE, errno.ENOSPC, errno.EBADF], ids=["reader-gone", "disk-full", "closed"])
def test_a_stderr_that_takes_no_more_loses_the_messages_not_the_batch(tmp_path, tiny_model, monkeypatch, error):
    """`kpac deblur photos/ -o out/ 2>&1 | head -1`, `2>/dev/full`, `2>&-`: the error line of a
    bad file cannot be written, yet the photos after it are deblurred, their --json records
    delivered, and the exit status is the batch's (1: one image failed), not rich's."""
    good_a, good_b = _photo(tmp_path / "a.png", 0), _photo(tmp_path / "c.png", 1)
    bad = tmp_path / "b.png"
    bad.write_text("not an image")
    stderr, stdout = _FailingStderr(error), io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setattr(sys, "stdout", stdout)
    out = tmp_path / "out"
    code = app(["deblur", str(good_a), str(bad), str(good_b), "-o", str(out), "--model", str(tiny_model), "--json"],
               standalone_mode=False)
    assert stderr.attempts >= 1  # the error line was tried
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png"]
    records = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert [(Path(r["input"]).name, r["status"]) for r in records] == [("a.png", "ok"), ("b.png", "failed"), ("c.png", "ok")]


def test_a_stderr_that_takes_no_more_leaves_a_good_batch_at_status_0(tmp_path, tiny_model, monkeypatch):
    """The summary line that cannot be written is no failure of the work."""
    monkeypatch.setattr(sys, "stderr", _FailingStderr(errno.EPIPE))
    code = app(["deblur", str(_photo(tmp_path / "a.png")), "-o", str(tmp_path / "out"), "--model", str(tiny_model)],
               standalone_mode=False)
    assert code == 0 and (tmp_path / "out" / "a.png").is_file()


# --------------------------------------------------------------------------------------------
# a missing or damaged model: a usage error (2) for every command


def _truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


def _truncated_npz(path: Path) -> Path:
    """An .npz (a zip) cut short, as an interrupted download leaves the authors' release."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("params.npy", b"\x93NUMPY" + bytes(4000))
    path.write_bytes(buffer.getvalue()[:2000])
    return path


def _model_command(command: str, model: Path, tmp_path: Path) -> tuple[list[str], Path]:
    """(arguments, the output it would write) for ``command`` run with ``model``."""
    photo = _photo(tmp_path / "a.png")
    if command == "deblur":
        return ["deblur", photo, "-o", tmp_path / "o.png", "--model", model, "--device", "cpu"], tmp_path / "o.png"
    if command == "blurmap":
        return ["blurmap", photo, "-o", tmp_path / "maps", "--model", model, "--device", "cpu"], tmp_path / "maps"
    if command == "export":
        return ["export", "--onnx", tmp_path / "m.onnx", "--model", model], tmp_path / "m.onnx"
    return ["convert", model, "-o", tmp_path / "c.safetensors"], tmp_path / "c.safetensors"


@pytest.mark.parametrize("state", ["damaged", "missing"])
@pytest.mark.parametrize("command", ["deblur", "blurmap", "export", "convert"])
def test_a_missing_or_damaged_model_is_a_usage_error_for_every_command(tmp_path, tiny_model, command, state):
    if command == "convert":  # its model is the authors' .npz
        model = _truncated_npz(tmp_path / "single_2level.npz") if state == "damaged" else tmp_path / "nothere.npz"
    else:
        model = _truncated(tiny_model, tmp_path / "cut.safetensors") if state == "damaged" else tmp_path / "nothere.safetensors"
    args, output = _model_command(command, model, tmp_path)
    res = invoke(*args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and model.name in lines[0], res.stderr
    assert not output.exists()


# --------------------------------------------------------------------------------------------
# a camera's RAW+JPEG pair: one name in two formats


@pytest.fixture
def raw_and_jpeg(tmp_path) -> Path:
    """A camera folder: IMG_1 shot as RAW and JPEG (the RAW's content does not matter: the
    command is refused when planning), and IMG_2 as JPEG only."""
    shoot = tmp_path / "shoot"
    shoot.mkdir()
    (shoot / "IMG_1.DNG").write_bytes(b"II*\0" + bytes(64))
    _photo(shoot / "IMG_1.JPG", 0, "jpeg")
    _photo(shoot / "IMG_2.JPG", 1, "jpeg")
    return shoot


@pytest.mark.parametrize("options,clash,hint", [
    (["--save-blurmap"], "IMG_1_blurmap.png", None),
    (["--format", "tiff"], "IMG_1.tif", "leave out --format tiff"),
    (["--bit-depth", "32"], "IMG_1.tif", "leave out --bit-depth 32"),
])
def test_a_raw_and_jpeg_pair_that_would_share_an_output_is_refused_saying_what_to_do(raw_and_jpeg, tmp_path, tiny_model, options, clash, hint):
    out = tmp_path / "out"
    res = invoke("deblur", raw_and_jpeg, "-o", out, "--model", tiny_model, *options)
    assert res.exit_code == 2, res.output
    [line] = res.stderr.splitlines()
    assert "IMG_1.JPG" in line and "IMG_1.DNG" in line and f"would both be written to {out / clash}" in line
    assert "RAW+JPEG" in line and "its own output folder" in line and "*.DNG" in line and "*.JPG" in line
    assert "rename one" not in line  # no answer for a camera's files
    assert (hint in line) if hint else ("leave out" not in line)
    assert not out.exists()


def test_the_pair_is_deblurred_to_two_names_when_each_keeps_its_format(raw_and_jpeg, tmp_path, tiny_model):
    """Without --format the RAW becomes IMG_1.tif and the JPEG IMG_1.JPG: nothing is refused,
    nothing is written over (the RAW here is no real one, and fails alone)."""
    out = tmp_path / "out"
    res = invoke("deblur", raw_and_jpeg, "-o", out, "--model", tiny_model)
    assert res.exit_code == 1, res.output
    assert sorted(p.name for p in out.iterdir()) == ["IMG_1.jpg", "IMG_2.jpg"]
    [error] = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert "IMG_1.DNG" in error
