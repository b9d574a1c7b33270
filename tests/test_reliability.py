"""kpac survives whatever it is fed and never destroys data.

For every hostile input (see ``hostile.py``): a one-line error on stderr that names the file
and the problem, exit code 1, the rest of the batch still processed, no traceback and no
partial output. Also: decompression bombs, dual-pixel pairs that do not fit, unreadable
inputs, unwritable or full output folders, outputs that would clobber inputs, and model files
that are malicious or broken. Interruptions and concurrent runs are in ``test_signals.py``.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import kpac_cli.images.atomic as atomic_mod
from hostile import (
    PNG_SIGNATURE,
    bomb_png,
    chunk,
    dual_pixel_cases,
    evil_npz,
    evil_pt,
    fuzz_seeds,
    image_cases,
    malformed_pt_cases,
    mismatched_checkpoint,
    png_bytes,
    smooth_rgb,
    truncated_checkpoint,
    write_cases,
)
from kpac_cli.checkpoints import save_checkpoint
from kpac_cli.cli import app
from kpac_cli.images import ImageError, read_image
from kpac_cli.model import KPACConfig, build_model

runner = CliRunner()
TINY = {"levels": 2, "channels": 8}
IS_ROOT_LIKE = hasattr(os, "geteuid") and os.geteuid() == 0


# --------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True)
def _wide_stderr(monkeypatch):
    # Error lines are checked for content here; whether the console wraps long lines at the
    # terminal width is checked on its own (test_long_messages_are_never_wrapped).
    monkeypatch.setenv("COLUMNS", "10000")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random-weight models: they exercise the plumbing, not the deblurring."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    single = build_model(KPACConfig(**TINY))
    return {
        "single": save_checkpoint(folder / "single.safetensors", single, {"name": "tiny"}),
        "dual": save_checkpoint(folder / "dual.safetensors", build_model(KPACConfig(**TINY, in_views=2)), {"name": "tiny-dual"}),
        "state_dict": single.state_dict(),
    }


def kpac(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


def deblur(model, *args, input=None):
    return kpac("deblur", *args, "--model", model, "--device", "cpu", input=input)


def stderr_lines(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.strip()]


def error_lines(res) -> list[str]:
    return [line for line in stderr_lines(res) if line.startswith("error:")]


def assert_no_traceback(res) -> None:
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr


def assert_one_error(res, name: str, match: str = "") -> str:
    """Exactly one stderr line mentions ``name``: an ``error:`` line matching ``match``."""
    lines = [line for line in stderr_lines(res) if name in line]
    assert len(lines) == 1, f"expected one line naming {name}, got:\n{res.stderr}"
    assert lines[0].startswith("error:"), lines[0]
    if match:
        assert re.search(match, lines[0], re.IGNORECASE), f"{lines[0]!r} does not match {match!r}"
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Temporary files (hidden ``*.kpac-tmp``) under ``folder``."""
    return sorted(str(p) for p in folder.rglob("*") if p.name.endswith(".kpac-tmp"))


def out_name(src_name: str) -> str:
    p = Path(src_name)
    ext = p.suffix.lower()
    return p.stem + (ext if ext in (".png", ".tif", ".tiff", ".jpg", ".jpeg") else ".tif")


def write_png(path: Path, h: int = 24, w: int = 32, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(smooth_rgb(h, w, seed)))
    return path


# --------------------------------------------------------------------------------------------
# the hostile image corpus


def test_hostile_corpus_in_one_batch(tmp_path, models):
    """Every bad file fails alone with its own one-line error; every good one is deblurred."""
    cases = image_cases()
    paths = write_cases(tmp_path / "in", cases)
    control = write_png(tmp_path / "in" / "control.png")
    out = tmp_path / "out"
    res = deblur(models["single"], *paths.values(), control, "-o", out)
    assert res.exit_code == 1, res.stderr
    assert_no_traceback(res)

    produced = {p.name for p in out.iterdir()}
    expected_outputs = {"control.png"}
    failed = 0
    for c in cases:
        src, dst = paths[c.name], out / out_name(c.name)
        mentions = [line for line in error_lines(res) if str(src) in line]
        succeeded = not mentions
        if c.ok is not None:
            assert succeeded == c.ok, f"{c.name} ({c.why}): {mentions or 'succeeded'}"
        if succeeded:
            expected_outputs.add(dst.name)
            img, info = read_image(dst)  # complete and decodable
            assert img.shape[:2] == read_image(src)[1].size and info.frames == 1, c.name
        else:
            failed += 1
            assert_one_error(res, str(src), c.match)
            assert not dst.exists(), f"partial output for {c.name}"
    assert produced == expected_outputs
    assert leftovers(tmp_path) == []
    summary = stderr_lines(res)[-1]
    assert summary == f"{len(expected_outputs)} deblurred, 0 skipped, {failed} failed"
    assert len(error_lines(res)) == failed
    # besides: one note for each multi-frame image (only its first frame is deblurred) and for
    # each float image with values outside [0, 1] (clipped)
    notes = [line for line in stderr_lines(res) if line.startswith("note:")]
    written = [paths[c.name] for c in cases if (out / out_name(c.name)).exists()]
    multi = sorted(str(p) for p in written if read_image(p)[1].frames > 1)
    clipped = sorted(str(p) for p in written if read_image(p)[1].clipped_float_values)
    assert clipped, "the corpus has a float image with NaN and values outside [0, 1]"
    assert sorted(n.split()[1].rstrip(":") for n in notes if "first of" in n) == multi
    assert sorted(n.split()[1].rstrip(":") for n in notes if "outside [0, 1]" in n and "clipped" in n) == clipped
    assert len(notes) == len(multi) + len(clipped)
    assert len(stderr_lines(res)) == failed + len(notes) + 1  # nothing else on stderr


def test_odd_but_valid_images_come_out_right(tmp_path, models):
    names = ["one_by_one.png", "gray_alpha.png", "palette.png", "float.tif", "animated.png", "multipage.tif"]
    cases = [c for c in image_cases() if c.name in names]
    paths = write_cases(tmp_path / "in", cases)
    out = tmp_path / "out"
    res = deblur(models["single"], *paths.values(), "-o", out)
    assert res.exit_code == 0, res.stderr

    img, _ = read_image(out / "one_by_one.png")
    assert img.shape == (1, 1, 3)
    _, src_info = read_image(paths["gray_alpha.png"])
    _, info = read_image(out / "gray_alpha.png")
    assert info.channels == 2 and np.array_equal(info.alpha, src_info.alpha)  # alpha untouched
    _, info = read_image(out / "palette.png")
    assert info.channels == 3 and info.bit_depth == 8
    img, info = read_image(out / "float.tif")  # NaN / inf in the input: finite output
    assert info.bit_depth == 32 and np.isfinite(img).all()  # float in, float out
    for name in ("animated.png", "multipage.tif"):  # the first frame / page
        assert read_image(paths[name])[1].frames == 3
        img, info = read_image(out / name)
        assert img.shape == (24, 32, 3) and info.frames == 1


@pytest.mark.parametrize("case", image_cases(), ids=lambda c: c.name)
def test_hostile_bytes_on_stdin(case, models):
    """The same corpus through a pipe: an image on stdout, or nothing and one error line."""
    res = deblur(models["single"], "-", "-o", "-", input=case.data)
    assert_no_traceback(res)
    assert res.exit_code in (0, 1), res.stderr
    by_name = case.name.endswith(".dng")  # without a file name there is no RAW extension
    if case.ok is not None and not by_name:
        assert (res.exit_code == 0) == case.ok, res.stderr
    if res.exit_code == 0:
        info = read_image(case.data)[1]
        n = info.clipped_float_values
        assert stderr_lines(res) == ([f"note: <stdin>: only the first of {info.frames} frames (pages) was deblurred"] if info.frames > 1 else []) + (
            [f"note: <stdin>: {n:,} float values outside [0, 1] were clipped"] if n > 1 else [])
        img, info = read_image(res.stdout_bytes)
        assert img.shape[:2] == read_image(case.data)[1].size
        if case.data.startswith(PNG_SIGNATURE):
            assert info.format == "png"
    else:
        assert res.stdout_bytes == b""  # never a partial image on stdout
        line = assert_one_error(res, "<stdin>", "" if by_name else case.match)
        assert "\n" not in line
        assert stderr_lines(res)[-1] == "0 deblurred, 0 skipped, 1 failed"


def test_empty_stdin(models):
    res = deblur(models["single"], "-", "-o", "-", input=b"")
    assert res.exit_code == 1 and res.stdout_bytes == b""
    assert_one_error(res, "<stdin>", "empty|no image data")


# --------------------------------------------------------------------------------------------
# decompression bombs


def _run_measured(args: list[str], timeout: float = 120.0) -> tuple[int, str, int, float]:
    """Run ``args``; returns (exit code, stderr, the child's own peak RSS in bytes, seconds)."""
    import tempfile

    with tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # rusage of this very child
        finally:
            watchdog.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - t0
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return proc.returncode, stderr, rss, seconds


@pytest.mark.skipif(not hasattr(os, "wait4"), reason="needs os.wait4 to measure a child's peak memory")
def test_decompression_bomb_refused_before_allocation(tmp_path, models):
    """A 30 GB PNG (by its header) costs no more memory or time than a 16x16 one."""
    good = write_png(tmp_path / "small.png", 16, 16)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(100_000, 100_000))
    base = [sys.executable, "-m", "kpac_cli", "deblur", "--model", str(models["single"]), "--device", "cpu"]

    rc, err, base_rss, base_s = _run_measured(base + [str(good), "-o", str(tmp_path / "o1")])
    assert rc == 0, err
    rc, err, rss, secs = _run_measured(base + [str(bomb), "-o", str(tmp_path / "o2")])
    assert rc == 1 and "Traceback" not in err
    assert re.search(rf"error: {re.escape(str(bomb))}: image is too large: 100000x100000", err), err
    assert rss < base_rss + (64 << 20), f"peak RSS {rss >> 20} MiB vs {base_rss >> 20} MiB for a 16x16 image"
    assert secs < base_s + 10
    # Raising --max-pixels past the header does not open the door: 64 bytes of image data
    # cannot hold the image, and that is noticed before the pixel buffer is allocated.
    rc, err, rss, _ = _run_measured(base + [str(bomb), "-o", str(tmp_path / "o3"), "--max-pixels", str(10**11)])
    assert rc == 1 and "Traceback" not in err and str(bomb) in err, err
    assert rss < base_rss + (64 << 20), f"peak RSS {rss >> 20} MiB vs {base_rss >> 20} MiB"
    assert not (tmp_path / "o2").exists() or not any((tmp_path / "o2").iterdir())


def test_max_pixels_is_overridable(tmp_path, models):
    src = write_png(tmp_path / "p.png", 30, 40)  # 1200 pixels
    res = deblur(models["single"], src, "-o", tmp_path / "a", "--max-pixels", "1199")
    assert res.exit_code == 1
    assert_one_error(res, str(src), r"too large: 40x30 = 1,200 pixels exceeds the limit of 1,199 \(raise it with --max-pixels")
    res = deblur(models["single"], src, "-o", tmp_path / "b", "--max-pixels", "1200")
    assert res.exit_code == 0, res.stderr
    assert read_image(tmp_path / "b" / "p.png")[0].shape == (30, 40, 3)


# --------------------------------------------------------------------------------------------
# dual-pixel pairs


def _dual_files(root: Path, case: str, stem: str = "x") -> tuple[Path, Path]:
    left_bytes, right_bytes = dual_pixel_cases()[case]
    left, right = root / "L" / f"{stem}.png", root / "R" / f"{stem}.png"
    left.parent.mkdir(parents=True, exist_ok=True)
    right.parent.mkdir(parents=True, exist_ok=True)
    left.write_bytes(left_bytes)
    if right_bytes is not None:
        right.write_bytes(right_bytes)
    return left, right


DUAL_PROBLEMS = [
    ("size_mismatch", r"size 32x24 differs from its partner .*30x24"),
    ("depth_mismatch", r"bit depth 8 differs from its partner .*16-bit"),
    ("missing_partner", r"no such file|no right view"),
    ("broken_right", r"not a recognised image"),
]


@pytest.mark.parametrize("case,match", DUAL_PROBLEMS)
def test_dual_pixel_pair_problems_are_clear_errors(tmp_path, models, case, match):
    left, right = _dual_files(tmp_path, case)
    out = tmp_path / "out.png"
    res = deblur(models["dual"], "--left", left, "--right", right, "-o", out)
    assert res.exit_code in (1, 2)
    assert_no_traceback(res)
    errors = error_lines(res)
    assert len(errors) == 1 and re.search(match, errors[0]), res.stderr
    assert str(left) in errors[0] or str(right) in errors[0]
    assert not out.exists()
    # folders: the same, matched by name
    res = deblur(models["dual"], "--left", left.parent, "--right", right.parent, "-o", tmp_path / "o")
    assert res.exit_code in (1, 2)
    assert_no_traceback(res)
    errors = error_lines(res)
    assert len(errors) == 1 and re.search(match, errors[0]) and "x.png" in errors[0], res.stderr


@pytest.mark.parametrize("case", ["size_mismatch", "depth_mismatch", "broken_right"])
def test_a_bad_dual_pixel_pair_fails_alone(tmp_path, models, case):
    _dual_files(tmp_path, "good", "a")
    left, right = _dual_files(tmp_path, case, "b")
    _dual_files(tmp_path, "good", "c")
    out = tmp_path / "out"
    res = deblur(models["dual"], "--left", tmp_path / "L", "--right", tmp_path / "R", "-o", out)
    assert_no_traceback(res)
    assert res.exit_code == 1, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png"]
    line = error_lines(res)[0]
    assert len(error_lines(res)) == 1 and ("b.png" in line)


# --------------------------------------------------------------------------------------------
# file-system trouble


def test_unreadable_input(tmp_path, models):
    a = write_png(tmp_path / "in" / "a.png")
    write_png(tmp_path / "in" / "b.png", seed=1)
    a.chmod(0)
    try:
        try:
            with open(a, "rb"):
                pytest.skip("file permissions do not apply here (running as root): chmod 000 does not block reads")
        except PermissionError:
            pass
        res = deblur(models["single"], tmp_path / "in", "-o", tmp_path / "out")
        assert res.exit_code == 1
        assert_no_traceback(res)
        assert_one_error(res, str(a), "permission denied")
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.png"]
    finally:
        a.chmod(0o644)


def test_unwritable_output_folder(tmp_path, models):
    src = write_png(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        try:
            (out / "probe").touch()
            (out / "probe").unlink()
            pytest.skip("file permissions do not apply here (running as root): a 0o500 folder is writable")
        except PermissionError:
            pass
        res = deblur(models["single"], src, "-o", out)
        assert res.exit_code == 1
        assert_no_traceback(res)
        assert_one_error(res, str(out / "a.png"), "permission denied|cannot write")
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)


def test_output_folder_below_a_regular_file(tmp_path, models):
    """Cannot be created (works as root too): one usage error before any image, nothing written."""
    for i, n in enumerate("ab"):
        write_png(tmp_path / "in" / f"{n}.png", seed=i)
    blocker = tmp_path / "file.txt"
    blocker.write_text("precious")
    res = deblur(models["single"], tmp_path / "in", "-o", blocker / "out")
    assert res.exit_code == 2
    assert_no_traceback(res)
    assert_one_error(res, f"-o {blocker / 'out'}", "cannot create it: .*file.txt is not a folder")
    assert blocker.read_text() == "precious"


class _FullDisk:
    """A file object that takes half of what it is given, then fails like a full disk."""

    def __init__(self, fh):
        self._fh = fh

    def write(self, data):
        self._fh.write(bytes(data[: len(data) // 2]))
        self._fh.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()
        return False

    def __getattr__(self, name):
        return getattr(self._fh, name)


def _fail_writes_of(monkeypatch, victim: str, where: str) -> None:
    """Make writing output files whose name contains ``victim`` fail with ENOSPC."""
    import builtins

    real_open, real_fsync, real_replace, real_link = builtins.open, os.fsync, os.replace, os.link

    def full_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        return _FullDisk(fh) if "w" in mode and victim in str(file) else fh

    def full_fsync(fd):
        if victim in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    def failing_replace(src, dst, **kwargs):
        if victim in str(dst):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real_replace(src, dst, **kwargs)

    def failing_link(src, dst, **kwargs):
        if victim in str(dst):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real_link(src, dst, **kwargs)

    if where == "write":  # the temporary file is half written when the disk fills up
        monkeypatch.setattr(atomic_mod, "open", full_open, raising=False)
    elif where == "fsync":  # delayed allocation: the error only surfaces at fsync
        if not Path("/proc/self/fd").is_dir():
            pytest.skip("needs /proc/self/fd")
        monkeypatch.setattr(os, "fsync", full_fsync)
    else:  # the commit itself fails (quota): a rename, or the no-clobber hard link
        monkeypatch.setattr(os, "replace", failing_replace)
        monkeypatch.setattr(os, "link", failing_link)


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_disk_full_fails_that_image_only_and_leaves_nothing_behind(tmp_path, models, monkeypatch, where):
    for i, n in enumerate("abc"):
        write_png(tmp_path / "in" / f"{n}.png", seed=i)
    out = tmp_path / "out"
    _fail_writes_of(monkeypatch, "b.png", where)
    res = deblur(models["single"], tmp_path / "in", "-o", out)
    assert res.exit_code == 1
    assert_no_traceback(res)
    assert_one_error(res, str(out / "b.png"), "cannot write|no space|quota")
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png"]  # no temp file, no b.png
    for name in ("a.png", "c.png"):
        read_image(out / name)
    assert stderr_lines(res)[-1] == "2 deblurred, 0 skipped, 1 failed"


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_disk_full_with_overwrite_keeps_the_old_output(tmp_path, models, monkeypatch, where):
    src = write_png(tmp_path / "in" / "b.png")
    out = tmp_path / "out"
    old = write_png(out / "b.png", seed=9)
    before = old.read_bytes()
    _fail_writes_of(monkeypatch, "b.png", where)
    res = deblur(models["single"], src, "-o", out, "--overwrite")
    assert res.exit_code == 1
    assert_no_traceback(res)
    assert_one_error(res, str(old), "cannot write|no space|quota")
    assert old.read_bytes() == before
    assert [p.name for p in out.iterdir()] == ["b.png"]


def test_disk_full_leaves_no_blurmap_of_the_failed_image(tmp_path, models, monkeypatch):
    # the blur map is written before its image; when the image cannot be written, the map of
    # this run goes too, so that the same command, rerun once there is space, finishes the job
    for i, n in enumerate("abc"):
        write_png(tmp_path / "in" / f"{n}.png", seed=i)
    out = tmp_path / "out"
    old = write_png(out / "c_blurmap.png", seed=7)  # an earlier map of an image that then fails
    before = old.read_bytes()
    _fail_writes_of(monkeypatch, "b.png", "replace")
    _fail_writes_of(monkeypatch, "c.png", "write")
    res = deblur(models["single"], tmp_path / "in", "-o", out, "--save-blurmap", "--skip-existing")
    assert res.exit_code == 1
    assert_one_error(res, str(out / "b.png"), "cannot write|no space|quota")
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_blurmap.png", "c_blurmap.png"]
    assert old.read_bytes() == before  # a map this run did not write is left alone
    monkeypatch.undo()
    old.unlink()
    res = deblur(models["single"], tmp_path / "in", "-o", out, "--save-blurmap", "--skip-existing")
    assert res.exit_code == 0, res.stderr
    assert stderr_lines(res)[-1] == "2 deblurred, 1 skipped, 0 failed"
    res = deblur(models["single"], tmp_path / "in" / "b.png", "-o", tmp_path / "out2", "--save-blurmap")
    assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["b.png", "b_blurmap.png"]


def test_a_plain_rerun_after_a_write_failure_with_blurmaps_succeeds(tmp_path, models, monkeypatch):
    write_png(tmp_path / "in" / "b.png")
    out = tmp_path / "out"
    _fail_writes_of(monkeypatch, "b.png", "fsync" if Path("/proc/self/fd").is_dir() else "replace")
    res = deblur(models["single"], tmp_path / "in", "-o", out, "--save-blurmap")
    assert res.exit_code == 1
    assert list(out.iterdir()) == []
    monkeypatch.undo()
    res = deblur(models["single"], tmp_path / "in", "-o", out, "--save-blurmap")
    assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["b.png", "b_blurmap.png"]


def test_output_path_that_is_an_existing_directory(tmp_path, models):
    write_png(tmp_path / "in" / "a.png")
    write_png(tmp_path / "in" / "b.png", seed=1)
    out = tmp_path / "out"
    (out / "a.png").mkdir(parents=True)
    (out / "a.png" / "keep.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        res = deblur(models["single"], tmp_path / "in", "-o", out, *extra)
        assert res.exit_code == 1
        assert_no_traceback(res)
        assert_one_error(res, str(out / "a.png"), "existing directory")
        assert (out / "a.png" / "keep.txt").read_text() == "keep me"
        read_image(out / "b.png")


def test_output_never_replaces_its_input(tmp_path, models):
    photos = tmp_path / "photos"
    srcs = [write_png(photos / f"{n}.png", seed=i) for i, n in enumerate("ab")]
    originals = {p: p.read_bytes() for p in srcs}

    # the folder onto itself
    res = deblur(models["single"], photos, "-o", photos, "--overwrite")
    assert res.exit_code == 1
    assert_no_traceback(res)
    for p in srcs:
        assert_one_error(res, str(p), "is the input file")
    # through a symlinked folder
    link = tmp_path / "link"
    link.symlink_to(photos, target_is_directory=True)
    res = deblur(models["single"], photos, "-o", link, "--overwrite")
    assert res.exit_code == 1
    assert len(error_lines(res)) == 2 and all("is the input file" in e for e in error_lines(res))
    # an output that is a hard link to the input
    out = tmp_path / "out"
    out.mkdir()
    os.link(srcs[0], out / "a.png")
    res = deblur(models["single"], srcs[0], "-o", out, "--overwrite")
    assert res.exit_code == 1
    assert_one_error(res, str(out / "a.png"), "is the input file")
    # a single file onto itself
    res = deblur(models["single"], srcs[1], "-o", srcs[1], "--overwrite")
    assert res.exit_code == 1
    assert {p: p.read_bytes() for p in srcs} == originals
    assert leftovers(tmp_path) == []


def test_existing_outputs_are_kept_without_overwrite(tmp_path, models):
    src = write_png(tmp_path / "in" / "a.png")
    old = write_png(tmp_path / "out" / "a.png", seed=5)
    before = old.read_bytes()
    res = deblur(models["single"], src, "-o", tmp_path / "out")
    assert res.exit_code == 1
    assert_one_error(res, str(old), "exists")
    assert old.read_bytes() == before


# --------------------------------------------------------------------------------------------
# untrusted model files


def test_untrusted_model_files_never_run_code(tmp_path, models, monkeypatch):
    monkeypatch.chdir(tmp_path)
    img = write_png(tmp_path / "a.png")
    marker = tmp_path / "CODE_RAN"
    npz = evil_npz(tmp_path / "evil.npz", marker)
    pt = evil_pt(tmp_path / "evil.pt", marker, models["state_dict"], TINY)
    for model in (npz, pt):
        res = kpac("deblur", img, "-o", tmp_path / "o.png", "--model", model, "--device", "cpu")
        assert res.exit_code == 2, res.stderr  # a model that cannot be used is a usage error
        assert_no_traceback(res)
        assert len(error_lines(res)) == 1
        assert not marker.exists() and not (tmp_path / "o.png").exists()
    res = kpac("convert", npz, "-o", tmp_path / "c.safetensors")
    assert res.exit_code == 2  # as for a damaged --model
    assert_no_traceback(res)
    assert not marker.exists() and not (tmp_path / "c.safetensors").exists()

    # the payloads are live: an unrestricted loader would have run them
    import zipfile

    canary = tmp_path / "canary"
    with zipfile.ZipFile(evil_npz(tmp_path / "canary.npz", canary)) as zf:
        npy = zf.read("params.npy")
    pickle.loads(npy[10 + int.from_bytes(npy[8:10], "little") :])
    assert canary.exists()
    canary.unlink()
    torch.load(evil_pt(tmp_path / "canary.pt", canary, {}, TINY), weights_only=False)
    assert canary.exists()


def _bad_model(kind: str, tmp_path: Path, models) -> tuple[list[str], Path]:
    """(kpac arguments, the model file) for one kind of bad model file."""
    img = write_png(tmp_path / "a.png")
    path = tmp_path / f"{kind}.safetensors"
    if kind == "evil_npz":
        path = evil_npz(tmp_path / "evil.npz", tmp_path / "CODE_RAN")
    elif kind == "convert_evil_npz":
        path = evil_npz(tmp_path / "evil.npz", tmp_path / "CODE_RAN")
        return ["convert", str(path), "-o", str(tmp_path / "c.safetensors")], path
    elif kind == "evil_pt":
        path = evil_pt(tmp_path / "evil.pt", tmp_path / "CODE_RAN", models["state_dict"], TINY)
    elif kind == "mismatched":
        mismatched_checkpoint(path)
    elif kind.startswith("truncated"):
        truncated_checkpoint(models["single"], path, {"truncated_half": 0.5, "truncated_header": 0.001}[kind])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    elif kind.startswith("pt_"):
        path = tmp_path / f"{kind}.pt"
        torch.save(malformed_pt_cases(models["state_dict"], TINY)[kind[3:]], path)
    else:
        raise AssertionError(kind)
    return ["deblur", str(img), "-o", str(tmp_path / "o.png"), "--model", str(path), "--device", "cpu"], path


BAD_MODELS = [
    "evil_npz",
    "convert_evil_npz",
    "evil_pt",
    "mismatched",
    "truncated_half",
    "truncated_header",
    "empty",
    "text",
    "pt_not_tensors",
    "pt_config_is_int",
    "pt_config_bad_field_type",
    "pt_model_is_list",
    "pt_not_a_dict",
]


@pytest.mark.parametrize("kind", BAD_MODELS)
def test_bad_model_file_gives_one_line_naming_it(tmp_path, models, kind):
    args, path = _bad_model(kind, tmp_path, models)
    res = kpac(*args)
    assert res.exit_code == 2, res.stderr  # every command: a model that cannot be used is a usage error
    assert_no_traceback(res)
    lines = stderr_lines(res)
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert str(path) in lines[0], lines[0]
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "c.safetensors").exists()
    assert not (tmp_path / "CODE_RAN").exists()


# --------------------------------------------------------------------------------------------
# how errors are printed


@pytest.mark.parametrize("rel", ["draft[bold]v2.png", "x[/]y.png"])
def test_file_names_that_look_like_markup_are_printed_verbatim(tmp_path, models, rel):
    bad = tmp_path / rel
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"not an image")
    good = write_png(tmp_path / "good.png")
    res = deblur(models["single"], good, bad, "-o", tmp_path / "out")
    assert res.exit_code == 1
    assert_one_error(res, str(bad), "not a recognised image")
    res = deblur(models["single"], tmp_path / ("missing" + rel), "-o", tmp_path / "out2")  # a usage error
    assert res.exit_code == 2
    assert_one_error(res, str(tmp_path / ("missing" + rel)), "not found")


def test_file_names_that_are_not_utf8(tmp_path, models):
    folder = tmp_path / "in"
    folder.mkdir()
    good, bad = os.fsencode(folder) + b"/caf\xe9.png", os.fsencode(folder) + b"/bad\xff.png"
    try:
        with open(good, "wb") as fh:
            fh.write(png_bytes(smooth_rgb(8, 8)))
        with open(bad, "wb") as fh:
            fh.write(b"not an image")
    except (OSError, UnicodeError):
        pytest.skip("this file system only takes UTF-8 names")
    out = tmp_path / "out"
    res = deblur(models["single"], folder, "-o", out)
    assert res.exit_code == 1
    assert_no_traceback(res)
    errors = error_lines(res)
    assert len(errors) == 1 and "bad" in errors[0] and "not a recognised image" in errors[0]
    assert os.listdir(os.fsencode(out)) == [b"caf\xe9.png"]  # the same (byte) name as its input


@pytest.mark.parametrize("what", ["image_error", "usage_error", "interrupted_summary"])
def test_long_messages_are_never_wrapped(tmp_path, models, monkeypatch, what):
    monkeypatch.setenv("COLUMNS", "80")  # what rich assumes when stderr is a pipe or a file
    deep = tmp_path / ("a_rather_long_folder_name_" * 4)
    bad = deep / "broken.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an image")
    if what == "image_error":
        res = deblur(models["single"], bad, "-o", tmp_path / "out")
        assert res.exit_code == 1
        assert_one_error(res, str(bad), "not a recognised image")
    elif what == "usage_error":
        res = deblur(models["single"], deep / "missing.png", "-o", tmp_path / "out")
        assert res.exit_code == 2
        assert_one_error(res, str(deep / "missing.png"), "not found")
    else:
        import kpac_cli.cli.deblur as deblur_cmd

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(deblur_cmd, "run_batch", interrupted)
        res = deblur(models["single"], write_png(deep / "good.png"), "-o", tmp_path / "out")
        assert res.exit_code == 130
        lines = stderr_lines(res)
        assert len(lines) == 1 and lines[0].startswith("interrupted:") and "--skip-existing" in lines[0], res.stderr


def test_stderr_carries_only_error_lines_and_the_summary(tmp_path, models):
    cases = [c for c in image_cases() if c.name in ("bomb.tif", "tiff_bad_ifd.tif", "truncated.tif")]
    paths = write_cases(tmp_path / "in", cases)
    proc = subprocess.run(
        [sys.executable, "-m", "kpac_cli", "deblur", *map(str, paths.values()), str(write_png(tmp_path / "ok.png")),
         "-o", str(tmp_path / "out"), "--model", str(models["single"]), "--device", "cpu"],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "10000", "OMP_NUM_THREADS": "1"}, timeout=120,
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1] == "1 deblurred, 0 skipped, 3 failed"
    assert all(line.startswith("error: ") for line in lines[:-1]), proc.stderr
    assert len(lines) == 4


# --------------------------------------------------------------------------------------------
# property-based: any bytes through the pipe


SEEDS = fuzz_seeds()


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "dup"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
        elif op == "cut":
            del data[i : i + draw(st.integers(1, 64))]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:
            j = draw(st.integers(i, min(len(data), i + 64)))
            data[j:j] = data[i:j]
    return bytes(data)


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.one_of(mutated_images(), st.binary(max_size=256)))
def test_any_bytes_through_the_pipe(models, data):
    res = deblur(models["single"], "-", "-o", "-", "--max-pixels", str(1 << 20), input=data)
    assert_no_traceback(res)
    if res.exit_code == 0:
        img, info = read_image(res.stdout_bytes)
        assert img.shape[:2] == read_image(data, max_pixels=1 << 20)[1].size
        if data.startswith(PNG_SIGNATURE):
            assert res.stdout_bytes.startswith(PNG_SIGNATURE)
    else:
        assert res.exit_code == 1, res.stderr
        assert res.stdout_bytes == b""
        lines = stderr_lines(res)
        assert len(lines) == 2 and lines[0].startswith("error:") and "<stdin>" in lines[0], res.stderr
        with pytest.raises(ImageError):  # it fails because the image is bad, not because of kpac
            read_image(data, max_pixels=1 << 20)


# --------------------------------------------------------------------------------------------
# output names, formats and reruns


def test_an_output_file_name_always_matches_its_content(tmp_path, models):
    src = write_png(tmp_path / "a.png")
    for name, extra in [("o.png", ["--bit-depth", "32"]), ("o.jpg", ["--bit-depth", "32"]),
                        ("o.png", ["--format", "jpeg"]), ("o.tif", ["--format", "png"]), ("run.2024", [])]:
        res = deblur(models["single"], src, "-o", tmp_path / name, *extra)
        assert res.exit_code == 2, (name, extra, res.stderr)
        assert not (tmp_path / name).exists()
    res = deblur(models["single"], src, "-o", tmp_path / "o.tiff", "--bit-depth", "32")
    assert res.exit_code == 0 and read_image(tmp_path / "o.tiff")[1].bit_depth == 32
    # a trailing slash names a folder, whatever the name looks like
    res = deblur(models["single"], src, "-o", f"{tmp_path / 'run.2024'}/")
    assert res.exit_code == 0, res.stderr
    assert read_image(tmp_path / "run.2024" / "a.png")[1].format == "png"
    res = deblur(models["single"], "-", "-o", f"{tmp_path / 'new'}/", input=src.read_bytes())
    assert res.exit_code == 2 and not (tmp_path / "new").exists()
    # several inputs need a folder: not a file name, not an existing file
    other = write_png(tmp_path / "b.png", seed=1)
    for target in (tmp_path / "two.png", other):
        res = deblur(models["single"], src, other, "-o", target)
        assert res.exit_code == 2, res.stderr
    assert not (tmp_path / "two.png").exists()


def test_unusual_extensions_keep_the_format_of_the_content(tmp_path, models):
    from PIL import Image

    Image.fromarray(smooth_rgb(24, 32, 1)).save(tmp_path / "photo.jfif", "JPEG")
    (tmp_path / "noext").write_bytes(png_bytes(smooth_rgb(24, 32, 2)))
    res = deblur(models["single"], tmp_path / "photo.jfif", tmp_path / "noext", "-o", tmp_path / "out")
    assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["noext.png", "photo.jpg"]
    assert read_image(tmp_path / "out" / "photo.jpg")[1].format == "jpeg"


def test_float_output_keeps_alpha_gray_and_metadata(tmp_path, models):
    from PIL import Image

    rgba = np.dstack([smooth_rgb(24, 32, 3), np.arange(24 * 32, dtype=np.uint8).reshape(24, 32)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png", icc_profile=b"\0" * 200)
    Image.fromarray(smooth_rgb(24, 32, 4)[..., 0], "L").save(tmp_path / "gray.png")
    res = deblur(models["single"], tmp_path / "rgba.png", tmp_path / "gray.png", "-o", tmp_path / "out", "--bit-depth", "32")
    assert res.exit_code == 0, res.stderr
    img, info = read_image(tmp_path / "out" / "rgba.tif")
    assert info.bit_depth == 32 and info.channels == 4 and info.icc_profile == b"\0" * 200
    np.testing.assert_array_equal(info.alpha, rgba[..., 3] / np.float32(255))
    assert read_image(tmp_path / "out" / "gray.tif")[1].channels == 1


def test_xmp_and_print_resolution_survive_deblur(tmp_path, models):
    """A photographer's 300 dpi JPEG with ratings/keywords in XMP keeps both in every format;
    damaged or oversized metadata in an input is dropped, never fatal."""
    import zlib

    import tifffile
    from PIL import Image

    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:Rating="5"/></rdf:RDF></x:xmpmeta>')
    Image.fromarray(smooth_rgb(24, 32, 6)).save(tmp_path / "photo.jpg", xmp=xmp, dpi=(300, 300))
    for fmt, name in (("jpeg", "photo.jpg"), ("png", "photo.png"), ("tiff", "photo.tif")):
        res = deblur(models["single"], tmp_path / "photo.jpg", "-o", tmp_path / fmt, "--format", fmt)
        assert res.exit_code == 0, res.stderr
        out = tmp_path / fmt / name
        _, info = read_image(out)
        assert info.xmp == xmp and info.dpi == pytest.approx((300, 300), abs=0.01), fmt
        if fmt == "tiff":  # as other programs see it
            with tifffile.TiffFile(out) as t:
                tags = t.pages.first.tags
                assert tags[700].value == xmp and tags[282].value == (300, 1) and tags[296].value == 2
        else:
            with Image.open(out) as im:
                assert im.info["xmp"] == xmp and im.info["dpi"] == pytest.approx((300, 300), abs=0.01)
    # a PNG whose pHYs is cut short and whose XMP inflates to 64 MB: deblurred, metadata dropped
    bad = png_bytes(smooth_rgb(24, 32, 7))
    extra = (chunk(b"pHYs", b"\x00\x00\x2e\x23\x01")
             + chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x01\x00\x00\x00" + zlib.compress(b" " * (64 << 20), 9)))
    (tmp_path / "bad.png").write_bytes(bad[:33] + extra + bad[33:])
    res = deblur(models["single"], tmp_path / "bad.png", "-o", tmp_path / "badout")
    assert res.exit_code == 0, res.stderr
    _, info = read_image(tmp_path / "badout" / "bad.png")
    assert info.xmp is None and info.dpi is None


def test_a_rerun_never_deblurs_its_own_outputs(tmp_path, models):
    photos = tmp_path / "photos"
    for i, n in enumerate("ab"):
        write_png(photos / f"{n}.png", seed=i)
    for extra in ([], ["--skip-existing"]):  # an output folder inside the input folder
        res = deblur(models["single"], photos, "-o", photos / "sharp", "-r", "--save-blurmap", *extra)
        assert res.exit_code == 0, res.stderr
    assert stderr_lines(res)[-1] == "0 deblurred, 2 skipped, 0 failed"
    assert sorted(p.name for p in (photos / "sharp").iterdir()) == ["a.png", "a_blurmap.png", "b.png", "b_blurmap.png"]
    for extra in ([], ["--skip-existing"]):  # outputs beside the inputs, told apart by a suffix
        res = deblur(models["single"], photos, "-o", photos, "--suffix", "_s", *extra)
        assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in photos.glob("*.png")) == ["a.png", "a_s.png", "b.png", "b_s.png"]
    # ... also when the earlier outputs are in another format than this run's
    res = deblur(models["single"], photos, "-o", photos, "--suffix", "_s", "--format", "tiff", "--json")
    assert res.exit_code == 0, res.stderr
    assert sorted(Path(r["input"]).name for r in map(json.loads, res.stdout.splitlines())) == ["a.png", "b.png"]
    assert sorted(p.name for p in photos.glob("*_s.*")) == ["a_s.png", "a_s.tif", "b_s.png", "b_s.tif"]
    # ... and an earlier run's blur maps when this run writes none
    res = deblur(models["single"], photos, "-o", photos, "--suffix", "_s", "--save-blurmap", "--overwrite")
    assert res.exit_code == 0, res.stderr
    res = deblur(models["single"], photos, "-o", photos, "--suffix", "_s", "--overwrite", "--json")
    assert res.exit_code == 0, res.stderr
    assert sorted(Path(r["input"]).name for r in map(json.loads, res.stdout.splitlines())) == ["a.png", "b.png"]
    assert sorted(p.name for p in photos.glob("*_blurmap*")) == ["a_s_blurmap.png", "b_s_blurmap.png"]


def test_a_rerun_through_a_link_to_the_input_folder_never_deblurs_its_own_outputs(tmp_path, models):
    photos = tmp_path / "photos"
    for i, n in enumerate("ab"):
        write_png(photos / f"{n}.png", seed=i)
    (tmp_path / "link").symlink_to(photos, target_is_directory=True)
    for inputs, output in ((photos, tmp_path / "link"), (tmp_path / "link", photos)):
        res = deblur(models["single"], inputs, "-o", output, "--suffix", "_s", "--skip-existing", "--json")
        assert res.exit_code == 0, res.stderr
        assert sorted(Path(r["input"]).name for r in map(json.loads, res.stdout.splitlines())) == ["a.png", "b.png"]
    assert sorted(p.name for p in photos.iterdir()) == ["a.png", "a_s.png", "b.png", "b_s.png"]


def test_an_output_never_replaces_another_input(tmp_path, models):
    # a.tif -> a.jpg with --format jpeg would land on the photo a.jpg: refused before any work,
    # --overwrite or not, whichever order the inputs come in
    photos = tmp_path / "photos"
    write_png(photos / "a.png", seed=1)
    res = deblur(models["single"], photos / "a.png", "-o", photos / "a.tif")
    assert res.exit_code == 0, res.stderr
    (photos / "a.png").unlink()
    (photos / "a.jpg").write_bytes(jpeg := _jpeg_bytes(seed=2))
    for args in ([photos], [photos / "a.jpg", photos / "a.tif"], [photos / "a.tif", photos / "a.jpg"]):
        res = deblur(models["single"], *args, "-o", photos, "--format", "jpeg", "--overwrite")
        assert res.exit_code == 2, (args, res.stderr)
        assert "would be written over the input" in res.stderr or "both be written" in res.stderr, res.stderr
        assert (photos / "a.jpg").read_bytes() == jpeg
    assert sorted(p.name for p in photos.iterdir()) == ["a.jpg", "a.tif"]


def _jpeg_bytes(seed: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(smooth_rgb(24, 32, seed)).save(buf, "JPEG")
    return buf.getvalue()


def test_outputs_keep_their_inputs_spelling_of_the_extension(tmp_path, models):
    photos = tmp_path / "photos"
    for name, seed in (("a.jpg", 1), ("a.JPEG", 2), ("b.tiff", 3)):
        photos.mkdir(exist_ok=True)
        data = _jpeg_bytes(seed) if "jp" in name.lower() else None
        if data is None:
            res = deblur(models["single"], write_png(tmp_path / "b.png", seed=seed), "-o", photos / name)
            assert res.exit_code == 0, res.stderr
        else:
            (photos / name).write_bytes(data)
    res = deblur(models["single"], photos, "-o", tmp_path / "out")
    assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.jpeg", "a.jpg", "b.tiff"]
    res = deblur(models["single"], photos, "-o", tmp_path / "png", "--format", "png")
    assert res.exit_code == 2 and "both be written" in res.stderr  # a.jpg and a.JPEG -> a.png


def test_contradicting_options_are_usage_errors(tmp_path, models):
    src = write_png(tmp_path / "in" / "a.png")
    cases = [
        ["-o", tmp_path / "o", "--format", "jpeg", "--bit-depth", "16"],
        ["-o", tmp_path / "o.jpg", "--bit-depth", "16"],
        ["-o", tmp_path / "o.png", "--suffix", "_s"],  # the file is named already
        ["-o", "-", "--save-blurmap"],  # nowhere to put the map
        ["-o", tmp_path / "o", "--suffix", "/../../escaped"],  # a suffix is not a path
        ["-o", tmp_path / "o", "--raw-exposure", "5"],
        ["-o", tmp_path / "o", "--raw-wb", "tungsten"],
    ]
    for args in cases:
        res = deblur(models["single"], src, *args)
        assert res.exit_code == 2, (args, res.stderr)
        assert_no_traceback(res)
        assert len(error_lines(res)) == 1, res.stderr
    res = deblur(models["single"], src, "-o", tmp_path / "o", "--raw-exposure", "5")
    assert "--raw-exposure" in error_lines(res)[0] and "[-2, 3]" in error_lines(res)[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    # a folder input and an image file name: the folder is not a file
    res = deblur(models["single"], tmp_path / "in", "-o", tmp_path / "result.png")
    assert res.exit_code == 2 and "end it with /" in res.stderr
    assert not (tmp_path / "result.png").exists()


def test_what_a_format_cannot_hold_is_said(tmp_path, models):
    from PIL import Image

    rgba = np.dstack([smooth_rgb(24, 32, 3), np.full((24, 32), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    pages = tmp_path / "pages.tif"
    import tifffile

    tifffile.imwrite(pages, np.stack([smooth_rgb(24, 32, 4), smooth_rgb(24, 32, 5)]), photometric="rgb")
    res = deblur(models["single"], tmp_path / "rgba.png", pages, "-o", tmp_path / "out", "--format", "jpeg", "--json")
    assert res.exit_code == 0, res.stderr
    notes = {Path(r["input"]).name: r["notes"] for r in map(json.loads, res.stdout.splitlines())}
    assert notes == {"rgba.png": ["JPEG has no alpha channel: the transparency was dropped"],
                     "pages.tif": ["only the first of 2 frames (pages) was deblurred"]}
    note_lines = [line for line in stderr_lines(res) if line.startswith("note:")]
    assert len(note_lines) == 2 and any("rgba.png" in n and "alpha" in n for n in note_lines)
    res = deblur(models["single"], tmp_path / "rgba.png", "-o", tmp_path / "out2", "--format", "jpeg", "-q")
    assert res.exit_code == 0 and res.stderr == ""
    # an XMP packet too large for a JPEG segment (kept in PNG and TIFF)
    from PIL.PngImagePlugin import PngInfo

    big = PngInfo()
    big.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta xmlns:x="adobe:ns:meta/">' + "k" * 70000 + "</x:xmpmeta>")
    Image.fromarray(smooth_rgb(24, 32, 6)).save(tmp_path / "xmp.png", pnginfo=big)
    for fmt, said in (("jpeg", True), ("tiff", False)):
        res = deblur(models["single"], tmp_path / "xmp.png", "-o", tmp_path / f"x-{fmt}", "--format", fmt)
        assert res.exit_code == 0, res.stderr
        assert any(line.startswith("note:") and "XMP" in line for line in stderr_lines(res)) == said, res.stderr


def _notes(res) -> dict[str, list[str]]:
    return {Path(r["input"]).name: r.get("notes", []) for r in map(json.loads, res.stdout.splitlines())}


def test_camera_exif_that_a_tiff_output_cannot_carry_is_said(tmp_path, models):
    # TIFF outputs carry the descriptive EXIF tags only; exposure, capture time and the like
    # (the Exif sub-IFD) are not copied, which is said rather than dropped silently
    from PIL import Image

    exif = Image.Exif()
    exif[271], exif[272] = "Canon", "EOS R5"
    exif.get_ifd(0x8769)[0x829A] = 0.01  # ExposureTime
    exif.get_ifd(0x8769)[0x9003] = "2024:05:01 10:00:00"  # DateTimeOriginal
    Image.fromarray(smooth_rgb(24, 32, 8)).save(tmp_path / "cam.jpg", exif=exif.tobytes())
    descriptive = Image.Exif()
    descriptive[271] = "Canon"
    Image.fromarray(smooth_rgb(24, 32, 9)).save(tmp_path / "plain.jpg", exif=descriptive.tobytes())
    for fmt, said in (("tiff", True), ("png", False), ("jpeg", False)):
        res = deblur(models["single"], tmp_path / "cam.jpg", tmp_path / "plain.jpg", "-o", tmp_path / fmt, "--format", fmt, "--json")
        assert res.exit_code == 0, res.stderr
        notes = _notes(res)
        assert any("EXIF" in n for n in notes["cam.jpg"]) == said, (fmt, notes)
        assert not any("EXIF" in n for n in notes["plain.jpg"]), (fmt, notes)  # nothing was lost
        assert any(line.startswith("note:") and "cam.jpg" in line and "EXIF" in line for line in stderr_lines(res)) == said


def test_png_text_chunks_that_other_formats_cannot_hold_are_said(tmp_path, models):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    text = PngInfo()
    text.add_text("Title", "Harbour at dusk")
    text.add_itxt("Author", "Jo")
    Image.fromarray(smooth_rgb(24, 32, 10)).save(tmp_path / "t.png", pnginfo=text)
    for fmt, said in (("jpeg", True), ("tiff", True), ("png", False)):
        res = deblur(models["single"], tmp_path / "t.png", "-o", tmp_path / fmt, "--format", fmt, "--json")
        assert res.exit_code == 0, res.stderr
        notes = _notes(res)["t.png"]
        assert [n for n in notes if "Title" in n and "Author" in n] == ([n for n in notes if "text" in n] if said else []), notes
        assert bool(notes) == said, (fmt, notes)


def test_a_float_image_written_as_png_says_it_became_sixteen_bit(tmp_path, models):
    import tifffile

    tifffile.imwrite(tmp_path / "f.tif", smooth_rgb(24, 32, 11).astype(np.float32) / 255)
    res = deblur(models["single"], tmp_path / "f.tif", "-o", tmp_path / "out", "--format", "png", "--json")
    assert res.exit_code == 0, res.stderr
    assert read_image(tmp_path / "out" / "f.png")[1].bit_depth == 16
    assert any("16" in n and "float" in n for n in _notes(res)["f.tif"]), res.stdout
    for extra in (["--format", "tiff"], ["--format", "png", "--bit-depth", "16"]):  # kept, or asked for
        res = deblur(models["single"], tmp_path / "f.tif", "-o", tmp_path / "o2", *extra, "--json", "--overwrite")
        assert res.exit_code == 0, res.stderr
        assert _notes(res)["f.tif"] == [], (extra, res.stdout)


def test_deblur_file_writes_the_format_its_output_name_asks_for(tmp_path, models):
    from kpac_cli.engine import Deblurrer, EngineOptions, deblur_file
    from kpac_cli.engine.batch import OutputOptions

    src = write_png(tmp_path / "a.png")
    d = Deblurrer(models["single"], EngineOptions(device="cpu"))
    for name, fmt in (("o.tif", "tiff"), ("o.jpeg", "jpeg"), ("o.png", "png")):
        assert deblur_file(d, src, tmp_path / name).status == "ok"
        assert read_image(tmp_path / name)[1].format == fmt
    for name, opts in (("o.webp", None), ("p.png", OutputOptions(format="tiff"))):
        with pytest.raises(ValueError):
            deblur_file(d, src, tmp_path / name, opts)
        assert not (tmp_path / name).exists()


def test_blurmaps_resume_and_never_collide(tmp_path, models):
    src = write_png(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    res = deblur(models["single"], src, "-o", out, "--save-blurmap")
    assert res.exit_code == 0, res.stderr
    blurmap = (out / "a_blurmap.png").read_bytes()
    (out / "a.png").unlink()  # killed between the two writes
    res = deblur(models["single"], src, "-o", out, "--save-blurmap")
    assert res.exit_code == 1 and not (out / "a.png").exists()  # refused before any work
    assert_one_error(res, "a_blurmap.png", "exists")
    res = deblur(models["single"], src, "-o", out, "--save-blurmap", "--skip-existing")
    assert res.exit_code == 0, res.stderr
    assert (out / "a.png").exists() and (out / "a_blurmap.png").read_bytes() == blurmap
    # an input named like another input's blur map: two writers for one file
    write_png(tmp_path / "in" / "a_blurmap.png", seed=1)
    res = deblur(models["single"], tmp_path / "in", "-o", tmp_path / "out2", "--save-blurmap", "--overwrite")
    assert res.exit_code == 2 and "both be written" in res.stderr
    assert not (tmp_path / "out2").exists()


def test_blurmaps_are_added_to_a_finished_batch_without_touching_its_images(tmp_path, models):
    # a batch run without --save-blurmap, then resumed with it: the maps are what is missing
    for i, n in enumerate("ab"):
        write_png(tmp_path / "in" / f"{n}.png", seed=i)
    out = tmp_path / "out"
    assert deblur(models["single"], tmp_path / "in", "-o", out).exit_code == 0
    images = {n: (out / f"{n}.png").read_bytes() for n in "ab"}
    res = deblur(models["single"], tmp_path / "in", "-o", out, "--save-blurmap", "--skip-existing", "--json")
    assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_blurmap.png", "b.png", "b_blurmap.png"]
    assert {n: (out / f"{n}.png").read_bytes() for n in "ab"} == images
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(r["status"], r["blurmap"]) for r in records] == [("skipped", str(out / f"{n}_blurmap.png")) for n in "ab"]
    assert records[0]["notes"] == ["the output exists and was kept (--skip-existing); only a_blurmap.png was written beside it"]
    assert stderr_lines(res)[-1] == "0 deblurred, 2 skipped, 0 failed"
    res = deblur(models["single"], tmp_path / "in", "-o", out, "--save-blurmap", "--skip-existing", "--json")
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["precision"] for r in records] == [None, None]  # nothing left to run
    # and the records name the maps kept, as those of the run that wrote them did
    assert [(r["status"], r["blurmap"]) for r in records] == [("skipped", str(out / f"{n}_blurmap.png")) for n in "ab"]


def test_two_spellings_of_one_output_are_one_claim(tmp_path):
    from kpac_cli.engine.batch import outputs_claimed_twice

    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "link").symlink_to(out)
    spelt = [("a", out / "x.png"), ("b", tmp_path / "link" / "x.png"), ("c", out / "." / "y.png"), ("d", out / "y.png")]
    assert outputs_claimed_twice(spelt) == [("b", tmp_path / "link" / "x.png", "a"), ("d", out / "y.png", "c")]
    # two hard links to one old file are two outputs: each write replaces its own name
    (out / "old.png").write_bytes(b"old")
    os.link(out / "old.png", out / "twin.png")
    assert outputs_claimed_twice([("a", out / "old.png"), ("b", out / "twin.png")]) == []


def test_outputs_that_appear_meanwhile_are_kept(tmp_path, models):
    from kpac_cli.engine import Deblurrer, EngineOptions
    from kpac_cli.engine.batch import OutputOptions, plan_single, run_batch

    src = write_png(tmp_path / "a.png")
    d = Deblurrer(models["single"], EngineOptions(device="cpu"))
    for skip, status in ((True, "skipped"), (False, "failed")):
        out = tmp_path / f"out-{skip}"
        opts = OutputOptions(skip_existing=skip)
        jobs = plan_single([str(src)], str(out), False, opts)

        def another_run_writes_it(job):  # after the preflight, before the write
            out.mkdir(exist_ok=True)
            job.output.write_bytes(b"the other run's image")

        [res] = run_batch(d, jobs, opts, on_start=another_run_writes_it)
        assert res.status == status, res
        assert (out / "a.png").read_bytes() == b"the other run's image"
        assert leftovers(out) == []


def test_a_pipe_is_read_once(tmp_path, models):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    data = png_bytes(smooth_rgb(24, 32, 5))
    writer = threading.Thread(target=fifo.write_bytes, args=(data,))
    writer.start()
    res = deblur(models["single"], fifo, "-o", tmp_path / "out.png")
    writer.join(timeout=30)
    assert res.exit_code == 0, res.stderr
    assert read_image(tmp_path / "out.png")[1].size == (24, 32)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_an_endless_input_named_like_a_file_is_refused_as_stdin_is(tmp_path, models):
    # `kpac deblur /dev/zero ...` (or an endless `<(cmd)`): read only what an image within --max-pixels takes
    res = deblur(models["single"], "/dev/zero", "-o", tmp_path / "b.png", "--max-pixels", "100")
    assert res.exit_code == 2 and "/dev/zero: more than 67110464 bytes" in res.stderr, res.stderr
    assert not (tmp_path / "b.png").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="needs sockets and a pseudo-terminal")
def test_an_input_that_is_a_socket_or_a_terminal_is_one_line_not_a_traceback(tmp_path, models, monkeypatch):
    import pty
    import socket

    monkeypatch.chdir(tmp_path)  # a socket's path is short; a relative name keeps it so
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("s.png")
        res = deblur(models["single"], "s.png", "-o", "b.png")
    assert res.exit_code == 2 and error_lines(res) == ["error: cannot read s.png (No such device or address)"], res.stderr
    main, secondary = pty.openpty()
    try:  # read, a terminal would be waited on for an image typed in
        res = deblur(models["single"], os.ttyname(secondary), "-o", "b.png")
    finally:
        os.close(main)
        os.close(secondary)
    assert res.exit_code == 2 and "is a terminal, not an image" in res.stderr, res.stderr
    assert not (tmp_path / "b.png").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_image_bytes_are_never_sent_to_a_terminal(tmp_path, models):
    import pty

    src = write_png(tmp_path / "a.png")
    main, secondary = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "kpac_cli", "deblur", str(src), "-o", "-", "--model", str(models["single"]),
                               "--device", "cpu"], stdout=secondary, stderr=subprocess.PIPE, timeout=120)
        os.set_blocking(main, False)
        try:
            shown = os.read(main, 1 << 16)
        except (BlockingIOError, OSError):
            shown = b""
    finally:
        os.close(main)
        os.close(secondary)
    assert proc.returncode == 2, proc.stderr
    assert b"terminal" in proc.stderr and PNG_SIGNATURE not in shown


def test_a_reader_that_closes_the_pipe_early_is_an_error(tmp_path, models):
    from kpac_cli.images import png

    # 16-bit noise: an output far larger than a pipe's buffer
    src = png.encode16(np.random.default_rng(6).integers(0, 65536, (256, 256, 3), dtype=np.uint16))
    env = {**os.environ, "COLUMNS": "10000", "OMP_NUM_THREADS": "1"}
    kpac_proc = subprocess.Popen(
        [sys.executable, "-m", "kpac_cli", "deblur", "-", "-o", "-", "--model", str(models["single"]), "--device", "cpu"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    kpac_proc.stdin.write(src)
    kpac_proc.stdin.close()
    kpac_proc.stdout.read(10)  # like `| head -c 10`
    kpac_proc.stdout.close()
    err = kpac_proc.stderr.read().decode()
    assert kpac_proc.wait(timeout=120) == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[0].startswith("error: <stdout>") and "closed" in lines[0], err
    assert "Traceback" not in err


def test_max_pixels_must_be_positive(tmp_path, models):
    res = deblur(models["single"], write_png(tmp_path / "a.png"), "-o", tmp_path / "out", "--max-pixels", "0")
    assert res.exit_code == 2


# --------------------------------------------------------------------------------------------
# stdout that takes no more: `| head -1`, a full disk, no stdout at all


def _kpac_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "kpac_cli", *map(str, args)]


def _batch(folder: Path, n: int) -> Path:
    for i in range(n):
        write_png(folder / f"p{i:02d}.png", h=96, w=96, seed=i)
    return folder


def _through_head_1(cmd: list[str]) -> tuple[int, str, str]:
    """``cmd | head -1``: (cmd's exit code, what head printed, cmd's stderr)."""
    env = {**os.environ, "COLUMNS": "10000", "OMP_NUM_THREADS": "1"}
    producer = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    head = subprocess.Popen(["head", "-1"], stdin=producer.stdout, stdout=subprocess.PIPE)
    producer.stdout.close()  # head alone reads it: when head exits, the pipe has no reader
    shown = head.communicate(timeout=120)[0].decode()
    err = producer.stderr.read().decode()
    return producer.wait(timeout=120), shown, err


def test_a_json_reader_that_goes_away_stops_the_batch_cleanly(tmp_path, models):
    photos = _batch(tmp_path / "photos", 12)
    out = tmp_path / "out"
    code, shown, err = _through_head_1(_kpac_cmd("deblur", photos, "-o", out, "--json", "--model", models["single"], "--device", "cpu"))
    assert code == 141, err  # as a shell reports a writer that SIGPIPE ended; not 1 ("an image failed")
    assert json.loads(shown)["status"] == "ok"
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    said = re.fullmatch(r"stopped \(stdout was closed by its reader\): (\d+) deblurred, 0 skipped, 0 failed, (\d+) not finished; "
                        r"rerun with --skip-existing to finish", lines[0])
    assert said, lines[0]
    done, left = map(int, said.groups())
    assert left > 0 and done + left == 12
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == done and leftovers(out) == []  # every file it counts, each complete
    for name in written:
        assert read_image(out / name)[1].size == (96, 96)
    res = deblur(models["single"], photos, "-o", out, "--skip-existing")
    assert res.exit_code == 0 and len(list(out.iterdir())) == 12


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_records_on_a_full_disk_stop_the_batch_with_one_error_line(tmp_path, models):
    photos = _batch(tmp_path / "photos", 3)
    env = {**os.environ, "COLUMNS": "10000", "OMP_NUM_THREADS": "1"}
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(_kpac_cmd("deblur", photos, "-o", tmp_path / "out", "--json", "--model", models["single"], "--device", "cpu"),
                              stdin=subprocess.DEVNULL, stdout=full, stderr=subprocess.PIPE, env=env, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err and "Exception ignored" not in err, err
    assert [line for line in err.splitlines() if line.strip()] == [
        "error: cannot write to stdout: No space left on device",  # the first record: its image is written
        "stopped (stdout failed): 1 deblurred, 0 skipped, 0 failed, 2 not finished; rerun with --skip-existing to finish",
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p00.png"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_an_image_for_a_full_disk_on_stdout_is_said_in_words(tmp_path, models):
    src = write_png(tmp_path / "a.png", h=20, w=24)
    env = {**os.environ, "COLUMNS": "10000", "OMP_NUM_THREADS": "1"}
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(_kpac_cmd("deblur", src, "-o", "-", "--model", models["single"], "--device", "cpu"),
                              stdin=subprocess.DEVNULL, stdout=full, stderr=subprocess.PIPE, env=env, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err and "Exception ignored" not in err, err
    assert [line for line in err.splitlines() if line.strip()] == [
        "error: <stdout>: cannot write: No space left on device", "0 deblurred, 0 skipped, 1 failed"], err


def test_a_closed_stdin_is_no_image_not_a_traceback(tmp_path, models):
    env = {**os.environ, "COLUMNS": "10000", "OMP_NUM_THREADS": "1"}
    as_shell = ["bash", "-c", 'exec "$@" <&-', "kpac"]  # the shell closes stdin (no preexec_fn: this process has threads)
    proc = subprocess.run(as_shell + _kpac_cmd("deblur", "-", "-o", tmp_path / "b.png", "--model", models["single"], "--device", "cpu"),
                          capture_output=True, env=env, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert err.splitlines()[0] == "error: <stdin>: no image data (input is empty)", err


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_stdin_from_a_terminal_is_refused_rather_than_waited_on(tmp_path, models):
    import pty

    main, secondary = pty.openpty()
    try:
        proc = subprocess.run(_kpac_cmd("deblur", "-", "-o", tmp_path / "b.png", "--model", models["single"], "--device", "cpu"),
                              stdin=secondary, capture_output=True, timeout=60)
    finally:
        os.close(main)
        os.close(secondary)
    assert proc.returncode == 2 and b"stdin, which is a terminal" in proc.stderr, proc.stderr
    assert not (tmp_path / "b.png").exists()


def test_an_endless_stdin_is_refused_not_read_until_memory_runs_out(tmp_path, models):
    # `cat /dev/zero | kpac deblur - -o x.png`: read only what an image within --max-pixels takes
    env = {**os.environ, "COLUMNS": "10000", "OMP_NUM_THREADS": "1"}
    cmd = _kpac_cmd("deblur", "-", "-o", tmp_path / "b.png", "--model", models["single"], "--device", "cpu", "--max-pixels", "100")
    proc = subprocess.run(["bash", "-c", 'head -c 80000000 /dev/zero | "$@"', "kpac", *map(str, cmd)],
                          capture_output=True, env=env, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert "<stdin>: more than 67110464 bytes" in err and not (tmp_path / "b.png").exists()


def test_stdin_under_a_large_max_pixels_is_read_not_reserved_up_front(tmp_path, models):
    # the bytes --max-pixels allows are a limit, not an allocation: 10**15 pixels allow 16 PB,
    # more than any address space, and the default's 3.2 GB fail under a memory limit
    env = {**os.environ, "COLUMNS": "10000", "OMP_NUM_THREADS": "1"}
    src = write_png(tmp_path / "a.png", h=20, w=24)
    cmd = _kpac_cmd("deblur", "-", "-o", tmp_path / "b.png", "--model", models["single"], "--device", "cpu", "--max-pixels", 10**15)
    with open(src, "rb") as stdin:
        proc = subprocess.run(cmd, stdin=stdin, capture_output=True, env=env, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert read_image(tmp_path / "b.png")[1].size == (20, 24)


def test_an_image_for_a_closed_stdout_is_refused_before_the_work(tmp_path, models):
    env = {**os.environ, "COLUMNS": "10000", "OMP_NUM_THREADS": "1"}
    src = write_png(tmp_path / "a.png", h=20, w=24)
    as_shell = ["bash", "-c", 'exec "$@" >&-', "kpac"]  # the shell closes stdout (`kpac deblur a.png -o - >&-`)
    proc = subprocess.run(as_shell + _kpac_cmd("deblur", src, "-o", "-", "--model", models["single"], "--device", "cpu"),
                          capture_output=True, env=env, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert err.splitlines() == ["error: cannot write to stdout: it is closed"], err
