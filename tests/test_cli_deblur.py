"""`kpac deblur` end to end: parity through the CLI, formats, pipelines, batches, exit codes."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import typer
from typer.testing import CliRunner

from hostile import StdoutThatStops
from kpac_cli.checkpoints import save_checkpoint
from kpac_cli.cli import app
from kpac_cli.images import ImageInfo, read_image, write_image
from kpac_cli.model import KPACConfig, build_model

runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Small random-weight models that exercise the plumbing (they are not deblurring models)."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    single = save_checkpoint(folder / "single.safetensors", build_model(KPACConfig(levels=2, channels=8)), {"name": "tiny"})
    dual = save_checkpoint(folder / "dual.safetensors", build_model(KPACConfig(levels=2, channels=8, in_views=2)), {"name": "tiny-dual"})
    return single, dual


def _write(path: Path, arr: np.ndarray, bit_depth: int, channels: int = 3, fmt: str = "png") -> Path:
    info = ImageInfo(path=None, format=fmt, bit_depth=bit_depth, channels=channels, alpha=None, icc_profile=None, exif=None, orientation_applied=1, size=arr.shape[:2])
    write_image(path, arr, info)
    return path


@pytest.mark.parametrize(
    "folder,ckpt,inputs,expected",
    [
        ("official-tf-2level", "single_2level.npz", ["single_2level_input.png"], "single_2level_expected.npy"),
        ("official-tf-2level", "single_2level.npz", ["single_2level_96x144_input.png"], "single_2level_96x144_expected.npy"),
        ("official-tf-3level", "single_3level.npz", ["single_3level_input.png"], "single_3level_expected.npy"),
        ("official-tf-dual", "dual.npz", ["dual_input_l.png", "dual_input_r.png", "dual_input_c.png"], "dual_expected.npy"),
    ],
)
def test_convert_then_deblur_reproduces_the_authors_outputs(shared_dir, tmp_path, folder, ckpt, inputs, expected):
    ref = shared_dir / "reference" / folder
    model = tmp_path / "m.safetensors"
    assert invoke("convert", ref / ckpt, "-o", model).exit_code == 0
    out = tmp_path / "out.tif"
    if len(inputs) == 1:
        args = [ref / inputs[0]]
    else:
        args = ["--left", ref / inputs[0], "--right", ref / inputs[1], "--center", ref / inputs[2]]
    for tile in ("0", "128"):
        res = invoke("deblur", *args, "-o", out, "--model", model, "--bit-depth", "32", "--tile", tile, "--overwrite", "--device", "cpu")
        assert res.exit_code == 0, res.output
        y = tifffile.imread(out) * 2 - 1  # back to the network's [-1, 1] units
        assert np.abs(y - np.load(ref / expected)).max() < 1e-5


def test_sixteen_bit_png_stays_sixteen_bit(tmp_path, tiny_models):
    rng = np.random.default_rng(0)
    src = _write(tmp_path / "in16.png", rng.integers(0, 65536, (40, 52, 3)).astype(np.float32) / 65535, 16)
    res = invoke("deblur", src, "-o", tmp_path / "out", "--model", tiny_models[0])
    assert res.exit_code == 0, res.output
    img, info = read_image(tmp_path / "out" / "in16.png")
    assert info.bit_depth == 16 and info.format == "png" and img.shape == (40, 52, 3)
    # and the values are not 8-bit values in disguise
    assert np.any(np.abs(img * 255 - np.round(img * 255)) > 1e-3)


def test_alpha_passes_through_unchanged(tmp_path, tiny_models):
    rng = np.random.default_rng(1)
    alpha = rng.integers(0, 256, (33, 47)).astype(np.float32) / 255
    info = ImageInfo(path=None, format="png", bit_depth=8, channels=4, alpha=alpha, icc_profile=None, exif=None, orientation_applied=1, size=(33, 47))
    write_image(tmp_path / "rgba.png", rng.random((33, 47, 3), dtype=np.float32), info)
    assert invoke("deblur", tmp_path / "rgba.png", "-o", tmp_path / "o", "--model", tiny_models[0]).exit_code == 0
    _, out_info = read_image(tmp_path / "o" / "rgba.png")
    assert out_info.channels == 4 and np.array_equal(out_info.alpha, alpha)


def test_colours_under_full_transparency_neither_bleed_nor_change(tmp_path, tiny_models):
    """Straight alpha: what lies under alpha 0 (black, white, noise) is invisible, so the visible
    pixels come out the same whatever it is, and it is written back as it was."""
    rng = np.random.default_rng(3)
    rgb = rng.random((40, 56, 3), dtype=np.float32)
    alpha = np.ones((40, 56), np.float32)
    alpha[:, 30:] = 0  # a cut-out: the right part transparent
    alpha[:, 29] = 0.5  # an antialiased edge: visible, its colour counts
    visible = alpha > 0
    outs = []
    for name, under in (("black", 0.0), ("white", 1.0), ("noise", rng.random((40, 56, 3), dtype=np.float32))):
        img = np.where(visible[..., None], rgb, under).astype(np.float32)
        info = ImageInfo(path=None, format="png", bit_depth=16, channels=4, alpha=alpha, icc_profile=None, exif=None, orientation_applied=1, size=(40, 56))
        write_image(tmp_path / f"{name}.png", img, info)
        res = invoke("deblur", tmp_path / f"{name}.png", "-o", tmp_path / "o", "--model", tiny_models[0])
        assert res.exit_code == 0, res.output
        out, out_info = read_image(tmp_path / "o" / f"{name}.png")
        written, written_info = read_image(tmp_path / f"{name}.png")
        assert np.array_equal(out[~visible], written[~visible])  # hidden colours kept exactly
        assert np.array_equal(out_info.alpha, written_info.alpha)
        outs.append(out[visible])
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
    assert np.abs(outs[0] - rgb[visible]).max() > 0.01  # and the model did change the visible pixels


def test_options_that_cannot_apply_are_refused_not_ignored(tmp_path, tiny_models):
    src = _write(tmp_path / "a.png", np.random.default_rng(2).random((16, 16, 3), dtype=np.float32), 8)
    for args, said in ((["-o", tmp_path / "o", "--format", "png", "--jpeg-quality", "80"], "--jpeg-quality applies to JPEG outputs"),
                       (["-o", tmp_path / "b.tif", "--jpeg-quality", "80"], "this run writes TIFF"),
                       (["-o", "-", "--suffix", "_s"], "--suffix names outputs in a folder"),
                       (["-o", tmp_path / "o", "--bit-depth", "32", "--jpeg-quality", "80"], "this run writes TIFF"),  # float is TIFF only
                       (["-o", tmp_path / "o", "--center", src], "--center is the centre view of dual-pixel pairs")):
        res = invoke("deblur", src, *args, "--model", tiny_models[0])
        assert res.exit_code == 2 and said in res.stderr, (args, res.output)
    assert not (tmp_path / "o").exists() and not (tmp_path / "b.tif").exists()
    res = invoke("deblur", src, "-o", tmp_path / "c.jpg", "--jpeg-quality", "80", "--model", tiny_models[0])
    assert res.exit_code == 0, res.output  # where it applies, it is taken
    res = invoke("deblur", src, "-o", tmp_path / "o2", "--jpeg-quality", "80", "--model", tiny_models[0])
    assert res.exit_code == 0, res.output  # a folder: JPEG inputs would be written as JPEG


def test_an_output_named_in_a_format_kpac_only_reads_says_so(tmp_path, tiny_models):
    src = _write(tmp_path / "a.png", np.random.default_rng(2).random((16, 16, 3), dtype=np.float32), 8)
    for name, kind in (("x.heic", "HEIC/HEIF"), ("x.DNG", "camera RAW"), ("x.bmp", None)):
        res = invoke("deblur", src, "-o", tmp_path / name, "--model", tiny_models[0])
        said = f"kpac reads {kind} but does not write it" if kind else "not an image file name"
        assert res.exit_code == 2 and said in res.stderr, (name, res.output)
        assert not (tmp_path / name).exists()


def test_jpeg_quality_is_taken_for_an_output_folder_named_like_an_image(tmp_path, tiny_models):
    photos = tmp_path / "photos"
    photos.mkdir()
    _write(photos / "a.jpg", np.random.default_rng(2).random((48, 64, 3), dtype=np.float32), 8, fmt="jpeg")
    (tmp_path / "existing.png").mkdir()
    for folder, out in ((tmp_path / "shots.tif", f"{tmp_path / 'shots.tif'}/"), (tmp_path / "existing.png", tmp_path / "existing.png")):
        sizes = []
        for quality in ("30", "95"):  # the folder's name says nothing of the JPEG written in it
            res = invoke("deblur", photos, "-o", out, "--jpeg-quality", quality, "--overwrite", "--model", tiny_models[0])
            assert res.exit_code == 0, res.output
            sizes.append((folder / "a.jpg").stat().st_size)
        assert sizes[0] < sizes[1], out


def test_stdin_to_stdout_pipeline(tmp_path, tiny_models):
    src = _write(tmp_path / "a.png", np.random.default_rng(2).random((30, 30, 3), dtype=np.float32), 8)
    proc = subprocess.run(
        [sys.executable, "-m", "kpac_cli", "deblur", "-", "-o", "-", "--model", str(tiny_models[0])],
        input=src.read_bytes(), capture_output=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout[:8] == b"\x89PNG\r\n\x1a\n"
    img, info = read_image(proc.stdout)
    assert img.shape == (30, 30, 3) and info.bit_depth == 8
    assert proc.stderr == b""  # quiet when piped


def test_batch_json_records_exit_codes_and_resume(tmp_path, tiny_models):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        _write(photos / f"p{i}.png", np.random.default_rng(i).random((24, 24, 3), dtype=np.float32), 8)
    (photos / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "out"
    res = invoke("deblur", photos, "-o", out, "--model", tiny_models[0], "--json", "--suffix", "_sharp")
    assert res.exit_code == 1  # one image failed, the others were still done
    records = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["status"] for r in records) == ["failed", "ok", "ok", "ok"]
    failed = next(r for r in records if r["status"] == "failed")
    assert "broken.png" in failed["error"] and "\n" not in failed["error"]
    assert sorted(p.name for p in out.iterdir()) == ["p0_sharp.png", "p1_sharp.png", "p2_sharp.png"]
    ok = next(r for r in records if r["status"] == "ok")
    assert {"input", "output", "width", "height", "model", "device", "precision", "tile", "seconds", "error"} <= set(ok)
    assert set(failed) >= set(ok) - {"extra"}  # every record has the same keys, null where nothing ran
    assert failed["precision"] is None and ok["precision"] == "fp32"
    assert ok["tile"] is None  # 24x24 fits in memory whole
    res = invoke("deblur", photos / "p0.png", "-o", tmp_path / "t.png", "--model", tiny_models[0], "--json", "--tile", "50")
    assert json.loads(res.stdout)["tile"] is None  # raised to the smallest tile, 128, which covers 24x24: it ran whole
    before = (out / "p0_sharp.png").stat().st_mtime_ns
    (photos / "broken.png").unlink()
    res = invoke("deblur", photos, "-o", out, "--model", tiny_models[0], "--suffix", "_sharp")
    assert res.exit_code == 1 and "exists" in res.output  # never overwrites silently
    res = invoke("deblur", photos, "-o", out, "--model", tiny_models[0], "--suffix", "_sharp", "--skip-existing")
    assert res.exit_code == 0
    assert (out / "p0_sharp.png").stat().st_mtime_ns == before


def test_output_equal_to_input_is_refused(tmp_path, tiny_models):
    src = _write(tmp_path / "x.png", np.random.default_rng(3).random((16, 16, 3), dtype=np.float32), 8)
    data = src.read_bytes()
    res = invoke("deblur", src, "-o", src, "--model", tiny_models[0], "--overwrite")
    assert res.exit_code == 1 and src.read_bytes() == data


@pytest.mark.parametrize(
    "args",
    [
        ["deblur", "-o", "out"],  # no inputs
        ["deblur", "nonexistent.png", "-o", "out"],
        ["deblur", "x.png", "-o", "out", "--tile", "banana"],
        ["deblur", "x.png", "-o", "out", "--bit-depth", "12"],
        ["deblur", "--left", "l.png", "-o", "out"],
        ["deblur", "x.png", "-o", "out", "--overwrite", "--skip-existing"],
        ["deblur", "x.png", "-o", "out", "--precision", "bf16", "--fp32"],  # which one was meant?
    ],
)
def test_usage_errors_exit_2(tmp_path, args, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "x.png", np.zeros((8, 8, 3), np.float32), 8)
    assert invoke(*args).exit_code == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["deblur", "x.png", "-o", "out", "--tilee", "64"], "No such option: --tilee (Possible options: --compile, --left, --tile) (see python -m kpac_cli deblur -h)"),
        (["deblur", "x.png", "-o", "out", "--strength", "lots"], "Invalid value for '--strength': Input should be a valid number"),
        (["deblur", "x.png"], "Missing option '-o' / '--output'. (see python -m kpac_cli deblur -h)"),
        (["debulr", "x.png"], "No such command 'debulr'. Did you mean 'deblur'? (see python -m kpac_cli -h)"),
    ],
)
def test_command_line_parse_errors_are_one_line_like_kpacs_own(args, message):
    """The parser's own refusals read like kpac's usage errors: one line on stderr, exit 2."""
    res = subprocess.run([sys.executable, "-m", "kpac_cli", *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: " + message), res.stderr


def test_no_arguments_still_show_the_help():
    res = subprocess.run([sys.executable, "-m", "kpac_cli"], capture_output=True, text=True, timeout=120)
    assert "Usage: python -m kpac_cli [OPTIONS] COMMAND" in res.stdout and "deblur" in res.stdout
    assert "error" not in res.stderr.lower()


def test_maps_kpac_blurmap_wrote_in_an_input_folder_are_not_deblurred(tmp_path, tiny_models):
    """An overlay or mask that kpac blurmap left beside the photos says so in its metadata:
    a folder listing leaves it out, whatever its name; named on the command line it is an input."""
    from kpac_cli.blurmap import encode_mask, encode_rgb

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(7)
    _write(photos / "a.png", rng.random((24, 32, 3), dtype=np.float32), 8)
    (photos / "a_overlay.png").write_bytes(encode_rgb(rng.random((24, 32, 3), dtype=np.float32), kind="overlay"))
    (photos / "b.tif").write_bytes(encode_mask(rng.random((24, 32)) > 0.5, "tiff"))
    res = invoke("deblur", photos, "-o", tmp_path / "out", "--model", tiny_models[0], "--json", "-q")
    assert res.exit_code == 0, res.output
    assert [json.loads(line)["input"] for line in res.stdout.splitlines()] == [str(photos / "a.png")]
    res = invoke("deblur", photos / "a_overlay.png", "-o", tmp_path / "out2", "--model", tiny_models[0], "-q")
    assert res.exit_code == 0 and (tmp_path / "out2" / "a_overlay.png").exists()
    (photos / "a.png").unlink()
    res = invoke("deblur", photos, "-o", tmp_path / "out3", "--model", tiny_models[0])
    assert res.exit_code == 2 and "only maps that kpac blurmap wrote" in res.output


def test_a_folder_of_only_unread_formats_says_which(tmp_path, monkeypatch):
    from kpac_cli.images import heif

    monkeypatch.setattr(heif, "available", lambda: False)  # a kpac without the heic extra
    photos = tmp_path / "iphone"
    (photos / "sub").mkdir(parents=True)
    for name in ("IMG_0001.HEIC", "IMG_0002.heic", "sub/IMG_0003.HEIC", "shared.webp", ".hidden.heic", "notes.txt"):
        (photos / name).write_bytes(b"\0" * 16)
    res = invoke("deblur", photos, "-o", tmp_path / "out")
    assert res.exit_code == 2 and res.output.strip() == (
        "error: no images kpac reads in the inputs, only 2 HEIC files, 1 WebP file: not supported; convert them to JPEG, PNG or "
        'TIFF (or, for HEIC, pip install "kpac[heic]")')
    assert "3 HEIC files" in invoke("deblur", photos, "-r", "-o", tmp_path / "out").output
    (photos / "shared.webp").unlink()
    (photos / "IMG_0001.HEIC").unlink()
    (photos / "IMG_0002.heic").unlink()
    res = invoke("deblur", photos, "-o", tmp_path / "out")  # nothing at the top: the plain message
    assert res.exit_code == 2 and res.output.strip() == "error: no images found in the inputs"


def test_unread_formats_beside_the_photos_are_said_to_be_left_out(tmp_path, tiny_models, monkeypatch):
    from kpac_cli.images import heif

    monkeypatch.setattr(heif, "available", lambda: False)  # a kpac without the heic extra
    photos = tmp_path / "mixed"
    photos.mkdir()
    _write(photos / "a.png", np.random.default_rng(3).random((24, 32, 3), dtype=np.float32), 8)
    for name in ("b.HEIC", "c.heic", "d.avif"):
        (photos / name).write_bytes(b"\0" * 16)
    res = invoke("deblur", photos, "-o", tmp_path / "out", "--model", tiny_models[0])
    assert res.exit_code == 0 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]
    assert ("note: 1 AVIF file, 2 HEIC files in the input folders left out: formats kpac does not read "
            '(convert them to JPEG, PNG or TIFF (or, for HEIC, pip install "kpac[heic]"))') in " ".join(res.stderr.split())
    res = invoke("deblur", photos, "-o", tmp_path / "out2", "--model", tiny_models[0], "-q")
    assert res.exit_code == 0 and "note" not in res.stderr


def test_dual_pixel_folders_matched_by_name(tmp_path, tiny_models):
    rng = np.random.default_rng(4)
    for side in ("L", "R"):
        (tmp_path / side).mkdir()
        for name in ("a.png", "b.png"):
            _write(tmp_path / side / name, rng.random((24, 32, 3), dtype=np.float32), 8)
    res = invoke("deblur", "--left", tmp_path / "L", "--right", tmp_path / "R", "-o", tmp_path / "out", "--model", tiny_models[1])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]
    (tmp_path / "R" / "b.png").unlink()
    res = invoke("deblur", "--left", tmp_path / "L", "--right", tmp_path / "R", "-o", tmp_path / "out2", "--model", tiny_models[1])
    assert res.exit_code == 2 and "b.png" in res.output


def test_dual_pixel_rerun_into_a_views_folder_does_not_take_its_outputs_for_views(tmp_path, tiny_models):
    rng = np.random.default_rng(4)
    for side, mark in (("L", "_l"), ("R", "_r")):
        (tmp_path / side).mkdir()
        _write(tmp_path / side / f"a{mark}.png", rng.random((24, 32, 3), dtype=np.float32), 8)
    args = ("deblur", "--left", tmp_path / "L", "--right", tmp_path / "R", "--model", tiny_models[1], "--suffix", "_sharp", "--json")
    for where in ("L", "R"):
        res = invoke(*args, "-o", tmp_path / where)
        assert res.exit_code == 0, res.output
        assert (tmp_path / where / "a_sharp.png").is_file()
        for side in ("L", "R"):  # a new pair, then a resume
            _write(tmp_path / side / f"b_{side.lower()}.png", rng.random((24, 32, 3), dtype=np.float32), 8)
        res = invoke(*args, "-o", tmp_path / where, "--skip-existing")
        assert res.exit_code == 0, res.output
        records = [json.loads(line) for line in res.stdout.splitlines()]
        assert [(Path(r["output"]).name, r["status"]) for r in records] == [("a_sharp.png", "skipped"), ("b_sharp.png", "ok")]
        for made in (tmp_path / "L" / "b_l.png", tmp_path / "R" / "b_r.png", *(tmp_path / where).glob("*_sharp.png")):
            made.unlink()  # back to the one pair, for the other folder


def test_dual_pixel_folders_to_an_image_file_name_are_refused_as_single_inputs_are(tmp_path, tiny_models):
    rng = np.random.default_rng(4)
    for side in ("L", "R"):
        (tmp_path / side).mkdir()
        _write(tmp_path / side / "a.png", rng.random((24, 32, 3), dtype=np.float32), 8)
    res = invoke("deblur", "--left", tmp_path / "L", "--right", tmp_path / "R", "-o", tmp_path / "sharp.png", "--model", tiny_models[1])
    assert res.exit_code == 2 and "looks like a file name" in res.stderr, res.output
    assert not (tmp_path / "sharp.png").exists()  # no folder named like an image
    _write(tmp_path / "L" / "b.png", rng.random((24, 32, 3), dtype=np.float32), 8)
    _write(tmp_path / "R" / "b.png", rng.random((24, 32, 3), dtype=np.float32), 8)
    res = invoke("deblur", "--left", tmp_path / "L", "--right", tmp_path / "R", "-o", tmp_path / "sharp.png", "--model", tiny_models[1])
    assert res.exit_code == 2 and "there are 2 pairs" in res.stderr and not (tmp_path / "sharp.png").exists()
    res = invoke("deblur", "--left", tmp_path / "L", "--right", tmp_path / "R", "-o", f"{tmp_path / 'sharp.png'}/", "--model", tiny_models[1])
    assert res.exit_code == 0 and (tmp_path / "sharp.png" / "b.png").is_file()  # a trailing / asks for the folder


def test_dual_pixel_names_keep_their_dots_and_recursive_is_refused(tmp_path, tiny_models):
    rng = np.random.default_rng(4)
    for side in ("L", "R"):
        (tmp_path / side).mkdir()
        for name in ("scan.001.png", "scan.002.png"):  # two pairs, not two writers of scan.png
            _write(tmp_path / side / name, rng.random((24, 32, 3), dtype=np.float32), 8)
    res = invoke("deblur", "--left", tmp_path / "L", "--right", tmp_path / "R", "-o", tmp_path / "out", "--model", tiny_models[1])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scan.001.png", "scan.002.png"]
    res = invoke("deblur", "--left", tmp_path / "L", "--right", tmp_path / "R", "-r", "-o", tmp_path / "out2", "--model", tiny_models[1])
    assert res.exit_code == 2 and "--recursive" in res.stderr and not (tmp_path / "out2").exists()


def test_dual_pixel_views_with_transparency(tmp_path, tiny_models):
    """The photo of a pair is its centre view: what lies under alpha 0 is written back from it."""
    rng = np.random.default_rng(8)
    alpha = np.ones((24, 32), np.float32)
    alpha[:, 20:] = 0
    info = ImageInfo(path=None, format="png", bit_depth=8, channels=4, alpha=alpha, icc_profile=None, exif=None, orientation_applied=1, size=(24, 32))
    views = {v: rng.random((24, 32, 3), dtype=np.float32) for v in ("l", "r", "c")}
    for v, img in views.items():
        write_image(tmp_path / f"x_{v}.png", img, info)
    res = invoke("deblur", "--left", tmp_path / "x_l.png", "--right", tmp_path / "x_r.png", "--center", tmp_path / "x_c.png",
                 "-o", tmp_path / "out.png", "--model", tiny_models[1])
    assert res.exit_code == 0, res.output
    out, out_info = read_image(tmp_path / "out.png")
    centre, _ = read_image(tmp_path / "x_c.png")
    assert np.array_equal(out[:, 20:], centre[:, 20:]) and not np.array_equal(out[:, :20], centre[:, :20])
    assert np.array_equal(out_info.alpha, read_image(tmp_path / "x_l.png")[1].alpha)


def test_dual_pixel_dpdd_root_given_alone(tmp_path, tiny_models):
    rng = np.random.default_rng(5)
    root = tmp_path / "DPDD"
    for side in ("l", "r", "c"):
        (root / f"test_{side}" / "source").mkdir(parents=True)
        _write(root / f"test_{side}" / "source" / "x.png", rng.random((24, 32, 3), dtype=np.float32), 8)
    res = invoke("deblur", "--left", root, "-o", tmp_path / "out", "--model", tiny_models[1])
    assert res.exit_code == 0, res.output
    explicit = invoke("deblur", "--left", root / "test_l" / "source", "--right", root / "test_r" / "source",
                      "--center", root / "test_c" / "source", "-o", tmp_path / "out2", "--model", tiny_models[1])
    assert explicit.exit_code == 0, explicit.output
    assert (tmp_path / "out" / "x.png").read_bytes() == (tmp_path / "out2" / "x.png").read_bytes()
    res = invoke("deblur", "--left", tmp_path / "out", "-o", tmp_path / "out3", "--model", tiny_models[1])
    assert res.exit_code == 2 and "not a DPDD folder" in res.output
    res = invoke("deblur", "--right", root, "-o", tmp_path / "out3", "--model", tiny_models[1])
    assert res.exit_code == 2 and "--left" in res.output


def test_single_model_refuses_dual_input_and_vice_versa(tmp_path, tiny_models):
    src = _write(tmp_path / "x.png", np.zeros((16, 16, 3), np.float32), 8)
    other = _write(tmp_path / "y.png", np.zeros((16, 16, 3), np.float32), 8)
    res = invoke("deblur", src, "-o", tmp_path / "o", "--model", tiny_models[1])
    assert res.exit_code == 2 and "dual-pixel" in res.stderr, res.output
    res = invoke("deblur", "--left", src, "--right", other, "-o", tmp_path / "o2", "--model", tiny_models[0])
    assert res.exit_code == 2 and "single-image" in res.stderr, res.output


def test_version_help_and_module_entry_point():
    assert invoke("--version").stdout.startswith("kpac ")
    for cmd in ("deblur", "models", "convert"):
        res = invoke(cmd, "--help")
        assert res.exit_code == 0 and "Example" in res.stdout, cmd
    proc = subprocess.run([sys.executable, "-m", "kpac_cli", "--version"], capture_output=True, text=True, check=True)
    assert proc.stdout.startswith("kpac ")


def test_torchrun_ranks_share_the_files_and_match_a_single_process(tmp_path, tiny_models):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(5):
        _write(photos / f"p{i}.png", np.random.default_rng(10 + i).random((28, 36, 3), dtype=np.float32), 8)
    single = invoke("deblur", photos, "-o", tmp_path / "single", "--model", tiny_models[0], "--device", "cpu")
    assert single.exit_code == 0
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "kpac_cli", "deblur", str(photos), "-o", str(tmp_path / "multi"), "--model", str(tiny_models[0]), "--json",
         "--jpeg-quality", "90"],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(Path(r["input"]).name for r in records) == [f"p{i}.png" for i in range(5)]  # each file once
    for i in range(5):
        a, _ = read_image(tmp_path / "single" / f"p{i}.png")
        b, _ = read_image(tmp_path / "multi" / f"p{i}.png")
        assert np.array_equal(a, b)
    assert proc.stderr.count("5 deblurred, 0 skipped, 0 failed") == 1  # one summary, from rank 0, over all ranks
    assert proc.stderr.count("note: --jpeg-quality: no output is a JPEG") == 1  # what is said of the plan: once


def test_output_that_is_not_a_regular_file_is_refused(tmp_path, tiny_models):
    src = _write(tmp_path / "x.png", np.random.default_rng(5).random((16, 16, 3), dtype=np.float32), 8)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    res = invoke("deblur", src, "-o", fifo, "--model", tiny_models[0], "--overwrite")
    assert res.exit_code == 1 and "not a regular file" in res.output
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_camera_raw_to_sixteen_bit_tiff(shared_dir, tmp_path, tiny_models):
    dng = shared_dir / "samples" / "raw" / "canon_eos_6d.dng"
    res = invoke("deblur", dng, "-o", tmp_path / "out", "--model", tiny_models[0], "--raw-half-size", "--json")
    assert res.exit_code == 0, res.output
    out = tmp_path / "out" / "canon_eos_6d.tif"
    img, info = read_image(out)
    assert info.format == "tiff" and info.bit_depth == 16 and img.ndim == 3 and min(img.shape[:2]) > 100


def test_linear_raw_is_deblurred_on_the_tone_curve_and_written_linear(shared_dir, tmp_path, tiny_models):
    # the models were trained on gamma-encoded photos: --raw-linear must not change what the
    # model sees, only how the result is stored
    from kpac_cli.images import srgb_decode

    dng = shared_dir / "samples" / "raw" / "canon_eos_6d.dng"
    for name, extra in (("srgb", []), ("linear", ["--raw-linear"])):
        res = invoke("deblur", dng, "-o", tmp_path / name, "--model", tiny_models[0], "--raw-half-size", *extra)
        assert res.exit_code == 0, res.output
    srgb = read_image(tmp_path / "srgb" / "canon_eos_6d.tif")[0]
    linear = read_image(tmp_path / "linear" / "canon_eos_6d.tif")[0]
    assert linear.mean() < srgb.mean() - 0.05  # stored in linear light: darker
    # LibRaw's sRGB development is its linear one on the sRGB curve, so both runs saw the same
    # input and their results agree once decoded (to within the curve's rounding near black)
    diff = np.abs(srgb_decode(srgb) - linear)
    assert np.quantile(diff, 0.99) < 2e-3 and diff.mean() < 5e-4, (np.quantile(diff, 0.99), diff.mean())


def test_python_api_deblurs_files_like_the_cli(tmp_path, tiny_models):
    from kpac_cli.engine import Deblurrer, EngineOptions, OutputOptions, deblur_file

    src = _write(tmp_path / "in16.png", np.random.default_rng(8).random((20, 28, 3), dtype=np.float32), 16)
    d = Deblurrer(tiny_models[0], EngineOptions(device="cpu"))
    first = deblur_file(d, src, tmp_path / "out.png")
    assert first.status == "ok" and read_image(tmp_path / "out.png")[1].bit_depth == 16
    again = deblur_file(d, src, tmp_path / "out.png")
    assert again.status == "failed" and "exists" in again.error
    assert deblur_file(d, src, tmp_path / "out.png", OutputOptions(overwrite=True)).status == "ok"
    cli = invoke("deblur", src, "-o", tmp_path / "cli.png", "--model", tiny_models[0])
    assert cli.exit_code == 0
    assert np.array_equal(read_image(tmp_path / "cli.png")[0], read_image(tmp_path / "out.png")[0])


def test_python_api_refuses_arrays_outside_its_convention(tiny_models):
    # 0-255 data read as 0-1 would saturate every pixel, and one NaN would spread over the
    # whole output: refused with a message that says what to do, not answered with garbage
    from kpac_cli.engine import Deblurrer, EngineOptions

    d = Deblurrer(tiny_models[0], EngineOptions(device="cpu", tile=0))
    img = np.random.default_rng(3).random((24, 40, 3), dtype=np.float32)
    assert d.deblur(img).shape == img.shape
    assert d.deblur((img * 1.1).astype(np.float64)).shape == img.shape  # an overshoot, float64
    nan = img.copy()
    nan[3, 4, 1] = np.nan
    for bad, match in [((img * 255).astype(np.uint8), "dtype uint8 \\(divide by 255\\)"),
                       ((img * 65535).astype(np.uint16), "divide by 65535"),
                       (img * 255, "0-255 data\\? divide by 255"), (img - 0.5, "must be in \\[0, 1\\]"),
                       (nan, "1 non-finite"), (img[:0], "empty"), (img[..., :0], "empty"), (img > 0.5, "dtype bool")]:
        with pytest.raises(ValueError, match=match):
            d.deblur(bad)
    with pytest.raises(ValueError, match="non-finite"):
        Deblurrer(tiny_models[1], EngineOptions(device="cpu")).deblur(np.concatenate([img, img], 2), nan)
    with pytest.raises(ValueError, match="centre view is for dual-pixel"):  # it would replace the input it corrects
        d.deblur(img, img)
    with pytest.raises(ValueError, match="tile must be"):
        EngineOptions(tile="abc")


def test_strength_scales_the_correction(tmp_path, tiny_models):
    from kpac_cli.engine import Deblurrer, EngineOptions

    rng = np.random.default_rng(12)
    image = rng.random((40, 52, 3), dtype=np.float32)
    full = Deblurrer(tiny_models[0], EngineOptions(device="cpu")).run(image).output
    half = Deblurrer(tiny_models[0], EngineOptions(device="cpu", strength=0.5)).run(image).output
    none = Deblurrer(tiny_models[0], EngineOptions(device="cpu", strength=0.0, tile=16)).run(image).output
    inp = torch.from_numpy(image).permute(2, 0, 1)[None] * 2 - 1
    assert (full - inp).abs().max() > 1e-3  # the model does change the image
    torch.testing.assert_close(none, inp, rtol=0, atol=1e-6)
    torch.testing.assert_close(half, (full + inp) / 2, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="strength"):
        EngineOptions(strength=1.5)

    src = _write(tmp_path / "in.png", image, 16)
    res = invoke("deblur", src, "-o", tmp_path / "zero.png", "--model", tiny_models[0], "--strength", "0", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.splitlines()[0])["strength"] == 0.0
    assert np.array_equal(read_image(tmp_path / "zero.png")[0], read_image(src)[0])  # 16 bits kept exactly
    assert invoke("deblur", src, "-o", tmp_path / "bad.png", "--model", tiny_models[0], "--strength", "2").exit_code == 2


@pytest.mark.parametrize("flag,value,said", [
    ("--strength", "2", "--strength must be in [0, 1], got 2"),
    ("--strength", "nan", "--strength must be in [0, 1], got nan"),
    ("--jpeg-quality", "0", "--jpeg-quality must be 1-100, got 0"),
    ("--max-pixels", "0", "--max-pixels must be at least 1, got 0"),
])
def test_values_out_of_range_are_one_line_errors(tmp_path, flag, value, said):
    # typer's own range check printed a boxed error over several lines
    res = invoke("deblur", tmp_path / "a.png", "-o", tmp_path / "b.png", flag, value)
    assert res.exit_code == 2 and res.output.strip() == f"error: {said}", res.output


def test_dihedral_transforms_invert_and_differ():
    from kpac_cli.engine.deblurrer import dihedral

    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    seen = []
    for k in range(8):
        y = dihedral(x, k)
        assert torch.equal(dihedral(y, k, inverse=True), x)
        assert y.shape == ((2, 3, 5, 4) if k & 4 else x.shape)
        seen.append(y.flatten().tolist())
    assert len({tuple(v) for v in seen}) == 8  # eight different arrangements of the same pixels


def test_self_ensemble_averages_the_flipped_runs(tmp_path, tiny_models):
    from kpac_cli.engine import Deblurrer, EngineOptions

    rng = np.random.default_rng(5)
    image = rng.random((150, 140, 3), dtype=np.float32)  # larger than the smallest tile (128)
    plain = Deblurrer(tiny_models[0], EngineOptions(device="cpu", tile=0))

    def mapped_back_run(k: int) -> torch.Tensor:
        """The model on the k-th flip/transpose of the photo (made with numpy), mapped back."""
        t = image
        if k & 1:
            t = t[:, ::-1]
        if k & 2:
            t = t[::-1]
        if k & 4:
            t = np.swapaxes(t, 0, 1)
        out = plain.run(np.ascontiguousarray(t)).output[0].permute(1, 2, 0).numpy()
        if k & 4:
            out = np.swapaxes(out, 0, 1)
        if k & 2:
            out = out[::-1]
        if k & 1:
            out = out[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)[None]

    runs = torch.stack([mapped_back_run(k) for k in range(8)])
    assert (runs[7] - runs[0]).abs().max() > 1e-3  # the model does see the photo differently
    for n in (2, 4, 8):
        got = Deblurrer(tiny_models[0], EngineOptions(device="cpu", ensemble=n, tile=0)).run(image).output
        torch.testing.assert_close(got, runs[:n].mean(0), rtol=0, atol=1e-6)
    tiled = Deblurrer(tiny_models[0], EngineOptions(device="cpu", ensemble=8, tile=128))
    stages = []
    out = tiled.run(image, progress=lambda stage, done, total: stages.append(stage)).output
    torch.testing.assert_close(out, runs.mean(0), rtol=0, atol=1e-5)  # tiling stays exact
    assert tiled.last_stats.tile == 128
    assert {s.split()[-1] for s in stages} == {f"{k}/8" for k in range(1, 9)}  # progress names each pass
    for bad in (3, 2.0, True):
        with pytest.raises(ValueError, match="ensemble"):
            EngineOptions(ensemble=bad)
    with pytest.raises(ValueError, match="at most 4"):
        Deblurrer(tiny_models[1], EngineOptions(device="cpu", ensemble=8))

    src = _write(tmp_path / "in.png", image, 16)
    res = invoke("deblur", src, "-o", tmp_path / "e.png", "--model", tiny_models[0], "--ensemble", "4", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.splitlines()[0])["ensemble"] == 4
    expected = np.clip((runs[:4].mean(0)[0].permute(1, 2, 0).numpy() + 1) / 2, 0, 1)
    assert np.abs(read_image(tmp_path / "e.png")[0] - expected).max() < 1 / 65535 + 1e-6
    res = invoke("deblur", src, "-o", tmp_path / "bad.png", "--model", tiny_models[0], "--ensemble", "3")
    assert res.exit_code == 2 and res.stderr == "error: --ensemble must be 1, 2, 4 or 8, got 3\n"  # the flag, as typed


def test_dual_pixel_self_ensemble_flips_and_swaps_the_views(tiny_models):
    from kpac_cli.engine import Deblurrer, EngineOptions

    rng = np.random.default_rng(9)
    views = rng.random((40, 56, 6), dtype=np.float32)
    center = rng.random((40, 56, 3), dtype=np.float32)
    plain = Deblurrer(tiny_models[1], EngineOptions(device="cpu"))

    def mapped_back_run(k: int) -> np.ndarray:
        v, c = views, center
        if k & 1:  # a mirrored camera: its left photodiodes see what the right ones saw
            v, c = np.concatenate([v[:, ::-1, 3:], v[:, ::-1, :3]], axis=2), c[:, ::-1]
        if k & 2:
            v, c = v[::-1], c[::-1]
        out = plain.run(np.ascontiguousarray(v), np.ascontiguousarray(c)).output[0].permute(1, 2, 0).numpy()
        if k & 2:
            out = out[::-1]
        if k & 1:
            out = out[:, ::-1]
        return out

    runs = np.stack([mapped_back_run(k) for k in range(4)])
    for n in (2, 4):
        got = Deblurrer(tiny_models[1], EngineOptions(device="cpu", ensemble=n)).run(views, center).output
        np.testing.assert_allclose(got[0].permute(1, 2, 0).numpy(), runs[:n].mean(0), rtol=0, atol=1e-6)
    unswapped = plain.run(np.ascontiguousarray(views[:, ::-1]), np.ascontiguousarray(center[:, ::-1])).output
    assert np.abs(unswapped[0].permute(1, 2, 0).numpy()[:, ::-1] - runs[1]).max() > 1e-4  # the swap matters


@pytest.mark.parametrize("command", ["deblur", "train", "eval", "blurmap", "models", "convert", "synth", "bench", "export"])
def test_every_command_has_help_with_an_example(command):
    res = invoke(command, "--help")
    assert res.exit_code == 0, res.output
    assert "example" in res.stdout.lower()


def test_help_shows_every_option_text_in_full():
    """Typer renders help as rich markup, where '[word ...]' is a style tag and vanishes: every
    option's help (its brackets escaped as '\\[') must reach the screen."""
    def flat(text: str) -> str:
        return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", text)).strip()

    for name, command in typer.main.get_command(app).commands.items():
        shown = flat(runner.invoke(app, [name, "--help"], env={"COLUMNS": "120"}).stdout)
        for param in command.params:
            if getattr(param, "help", None):
                assert flat(param.help.replace("\\[", "[")) in shown, (name, param.name)


def test_progress_shows_file_names_with_brackets_as_they_are():
    from kpac_cli.cli.common import progress_bar

    with progress_bar(True) as progress:
        task = progress.add_task("  IMG_0042 [edited].jpg", total=1)
        shown = progress.columns[0].render(progress.tasks[task])
    assert shown.plain == "  IMG_0042 [edited].jpg"


def test_models_table_shows_a_bracketed_file_name_as_it_is(tmp_path, tiny_models, monkeypatch):
    (tmp_path / "mine [v2].safetensors").write_bytes(Path(tiny_models[0]).read_bytes())
    monkeypatch.setenv("KPAC_WEIGHTS_DIR", str(tmp_path))
    res = invoke("models")
    assert res.exit_code == 0, res.output
    assert "mine [v2]" in res.stdout


@pytest.mark.slow
def test_compile_flag_gives_the_same_images_and_reports_compile_time(tmp_path, tiny_models):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(11)
    for i in range(2):  # same size: the second photo reuses the compiled shapes
        _write(photos / f"p{i}.png", rng.random((90, 120, 3), dtype=np.float32), 16)
    plain = invoke("deblur", photos, "-o", tmp_path / "plain", "--model", tiny_models[0], "--tile", "64", "--quiet")
    res = invoke("deblur", photos, "-o", tmp_path / "compiled", "--model", tiny_models[0], "--tile", "64", "--compile", "--json")
    assert plain.exit_code == 0 and res.exit_code == 0, res.output
    records = sorted((json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")), key=lambda r: r["input"])
    assert records[0]["compile_seconds"] > 0 and records[1]["compile_seconds"] == 0
    assert "torch.compile:" in res.stderr
    for i in range(2):
        a = read_image(tmp_path / "plain" / f"p{i}.png")[0]
        b = read_image(tmp_path / "compiled" / f"p{i}.png")[0]
        assert np.abs(a - b).max() <= 1.5 / 65535  # at most one 16-bit code (float rounding)


def test_models_lists_a_warm_started_model_with_all_its_iterations(tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    folder.mkdir()
    net = build_model(KPACConfig(levels=2, channels=8))
    save_checkpoint(folder / "warm.safetensors", net, {"iterations": 500, "total_iterations": 4500, "trained_on": "x"})
    save_checkpoint(folder / "fresh.safetensors", net, {"iterations": 700, "total_iterations": 700, "trained_on": "y"})
    monkeypatch.setenv("KPAC_WEIGHTS_DIR", str(folder))
    monkeypatch.setenv("COLUMNS", "200")
    res = invoke("models")
    assert res.exit_code == 0, res.output
    rows = {line.split("│")[1].strip(): line for line in res.stdout.splitlines() if line.startswith("│")}
    assert "4500 (500 in its last run)" in rows["warm"]
    assert "700" in rows["fresh"] and "last run" not in rows["fresh"]


def test_models_shows_the_headline_scores_of_each_model(tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    folder.mkdir()
    capture = {"input_psnr": 29.22, "single_psnr": 29.37, "dual_psnr": 29.69}
    scores = {"heldout_synthetic_psnr_gain_db": 1.74, "heldout_synthetic_ensemble_psnr_gain_db": 1.84,
              "pixel4_dual_pixel_capture": capture,
              "blur_detection": {"auc": 0.9544, "size_spearman": 1.0}, "heldout_synthetic": [{"max_radius": 3.0}]}
    save_checkpoint(folder / "single.safetensors", build_model(KPACConfig(levels=2, channels=8)), {"scores": scores})
    save_checkpoint(folder / "dual.safetensors", build_model(KPACConfig(levels=2, channels=8, in_views=2)),
                    {"scores": {"heldout_synthetic_psnr_gain_db": 2.5, "heldout_synthetic_ensemble_psnr_gain_db": 2.6,
                                "heldout_synthetic_ensemble_size": 4, "pixel4_dual_pixel_capture": capture}})
    save_checkpoint(folder / "imported.safetensors", build_model(KPACConfig(levels=2, channels=8)), {"scores": {"psnr": 25.2}})
    save_checkpoint(folder / "unscored.safetensors", build_model(KPACConfig(levels=2, channels=8)), {})
    monkeypatch.setenv("KPAC_WEIGHTS_DIR", str(folder))
    monkeypatch.setenv("COLUMNS", "200")
    res = invoke("models")
    assert res.exit_code == 0, res.output
    cells: dict[str, list[str]] = {}
    name = None
    for line in res.stdout.splitlines():
        if line.startswith("│"):
            parts = [c.strip() for c in line.split("│")[1:-1]]
            name = parts[0] or name  # a multi-line cell continues the row above
            cells.setdefault(name, []).append(parts[-1])
    assert cells["single"] == ["held-out synthetic +1.74 dB (+1.84 with --ensemble 8)", "Pixel 4 capture 29.22 -> 29.37 dB", "blur detection AUC 0.954"]
    assert cells["dual"] == ["held-out synthetic +2.50 dB (+2.60 with --ensemble 4)",
                             "Pixel 4 capture 29.22 -> 29.69 dB"]  # the dual model's figure
    assert cells["imported"] == ["psnr 25.2"] and cells["unscored"] == ["-"]


def test_saved_blurmap_honours_the_polarity_the_model_declares(tmp_path):
    # `kpac deblur --save-blurmap` writes the same detection map as `kpac blurmap`: for a model
    # whose checkpoint declares that its attention is high on sharp regions, the map is flipped
    torch.manual_seed(3)
    net = build_model(KPACConfig(levels=2, channels=8))
    plain = save_checkpoint(tmp_path / "plain.safetensors", net, {"name": "tiny"})
    sharp = save_checkpoint(tmp_path / "sharp.safetensors", net, {"name": "tiny", "blurmap_polarity": "sharp"})
    src = _write(tmp_path / "a.png", np.random.default_rng(5).random((40, 48, 3), dtype=np.float32), 8)
    maps = {}
    for name, model in (("plain", plain), ("sharp", sharp)):
        res = invoke("deblur", src, "-o", tmp_path / name, "--model", model, "--device", "cpu", "--save-blurmap")
        assert res.exit_code == 0, res.output
        maps[name] = read_image(tmp_path / name / "a_blurmap.png")[0][..., 0].astype(np.float64)
    assert maps["plain"].std() > 1e-3  # the map is not flat, so a flip shows
    np.testing.assert_allclose(maps["sharp"], 1 - maps["plain"], atol=2 / 65535)
    res = invoke("blurmap", src, "-o", tmp_path / "bm", "--model", sharp, "--device", "cpu")
    assert res.exit_code == 0, res.output
    (written,) = [p for p in (tmp_path / "bm").iterdir() if p.suffix == ".png"]
    np.testing.assert_allclose(maps["sharp"], read_image(written)[0][..., 0], atol=2 / 65535)


def test_models_stop_quietly_when_the_reader_goes_away_and_say_a_full_disk(tmp_path, tiny_models, monkeypatch):
    import kpac_cli.cli.common as common
    import kpac_cli.cli.models as models_cli
    from rich.console import Console

    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.safetensors").write_bytes(Path(tiny_models[0]).read_bytes())
    monkeypatch.setenv("KPAC_WEIGHTS_DIR", str(tmp_path))
    stdout = StdoutThatStops(1, BrokenPipeError(32, "Broken pipe"))
    monkeypatch.setattr(common, "sys", type("Sys", (), {"stdout": stdout}))
    res = invoke("models", "--json")  # as `kpac models --json | head -1`
    assert res.exit_code == 141 and res.stderr == ""  # as a shell reports a writer that SIGPIPE ended
    assert [json.loads(line)["name"] for line in stdout.lines] == ["a"]
    full = StdoutThatStops(0, OSError(28, "No space left on device"))
    monkeypatch.setattr(models_cli, "Console", lambda: Console(file=full))
    res = invoke("models")  # the table, to a full disk
    assert res.exit_code == 1 and res.stderr.splitlines() == ["error: cannot write to stdout: No space left on device"]


def test_records_without_a_stdout_are_an_error_not_a_traceback(tmp_path, tiny_models, monkeypatch):
    import kpac_cli.cli.common as common

    src = _write(tmp_path / "a.png", np.random.default_rng(2).random((16, 16, 3), dtype=np.float32), 8)
    fake_sys = type("Sys", (), {"stdout": None})  # started with stdout closed (`>&-`)
    monkeypatch.setattr(common, "sys", fake_sys)
    res = invoke("deblur", src, "-o", tmp_path / "b.png", "--json", "--model", tiny_models[0])
    assert res.exit_code == 1
    assert res.stderr.splitlines() == ["error: cannot write to stdout: it is closed",
                                       "stopped (stdout failed): 1 deblurred, 0 skipped, 0 failed, 0 not finished"]
    assert read_image(tmp_path / "b.png")[1].size == (16, 16)
    fake_sys.stdout.close()
    fake_sys.stdout = None  # the table of kpac models, which rich would have dropped without a word
    res = invoke("models")
    assert res.exit_code == 1 and res.stderr.splitlines() == ["error: cannot write to stdout: it is closed"]
    fake_sys.stdout.close()


def test_an_input_given_twice_is_named_as_such(tmp_path, tiny_models):
    # "photos/a.png and photos/a.png would both be written ...; rename one" was the wrong advice
    photos = tmp_path / "photos"
    photos.mkdir()
    (tmp_path / "other").mkdir()
    _write(photos / "a.png", np.random.default_rng(0).random((20, 24, 3), dtype=np.float32), 8)
    _write(tmp_path / "other" / "a.png", np.random.default_rng(1).random((20, 24, 3), dtype=np.float32), 8)
    for given in ([photos / "a.png", photos / "a.png"], [photos, photos / "a.png"], [photos / "a.png", tmp_path / "photos" / "." / "a.png"]):
        res = invoke("deblur", *given, "-o", tmp_path / "out", "--model", tiny_models[0])
        assert res.exit_code == 2 and "is given twice" in res.output, res.output
        assert not (tmp_path / "out").exists()
    # two different photos of one name are still told apart
    res = invoke("deblur", photos / "a.png", tmp_path / "other" / "a.png", "-o", tmp_path / "out", "--model", tiny_models[0])
    assert res.exit_code == 2 and "would both be written to" in res.output and "given twice" not in res.output


def test_an_output_folder_that_cannot_be_made_fails_before_the_work(tmp_path, tiny_models, monkeypatch):
    # -o below a file: every image used to be deblurred first and then fail at its write
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        _write(photos / f"p{i}.png", np.random.default_rng(i).random((20, 24, 3), dtype=np.float32), 8)
    (tmp_path / "notes.txt").write_text("a file")
    from kpac_cli.engine import Deblurrer

    ran = []
    monkeypatch.setattr(Deblurrer, "run", lambda *a, **k: ran.append(1))
    # a usage error, as blurmap and synth say it: no per-image failures, no image read
    for out in (tmp_path / "notes.txt" / "out", tmp_path / "notes.txt" / "deeper" / "x.png"):
        res = invoke("deblur", photos, "-o", out, "--model", tiny_models[0], "--json")
        assert res.exit_code == 2 and not ran, res.output
        assert res.stdout == ""
        assert res.stderr == f"error: -o {out}: cannot create it: {tmp_path / 'notes.txt'} is not a folder\n"
    res = invoke("deblur", photos / "p0.png", "-o", tmp_path / "notes.txt" / "p0.png", "--model", tiny_models[0])
    assert res.exit_code == 2 and not ran and "notes.txt is not a folder" in res.stderr
    # a subfolder of -o blocked by a file (only -r makes it) fails that image alone, before its work
    (photos / "sub").mkdir()
    _write(photos / "sub" / "q.png", np.random.default_rng(5).random((20, 24, 3), dtype=np.float32), 8)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sub").write_text("a file")
    monkeypatch.undo()
    res = invoke("deblur", photos, "-r", "-o", tmp_path / "out", "--model", tiny_models[0], "--json")
    recs = {r["input"]: r for r in map(json.loads, res.stdout.splitlines()) if "status" in r}
    assert res.exit_code == 1, res.output
    assert recs[str(photos / "sub" / "q.png")]["error"] == (f"{tmp_path / 'out' / 'sub' / 'q.png'}: cannot create its folder: "
                                                          f"{tmp_path / 'out' / 'sub'} is not a folder")
    assert [recs[str(photos / f"p{i}.png")]["status"] for i in range(2)] == ["ok", "ok"]


@pytest.mark.parametrize("fast", [False, True])
def test_emulated_bf16_on_the_cpu_is_said_once(tmp_path, tiny_models, monkeypatch, fast):
    # asked for explicitly on a CPU without bf16 hardware it runs several times slower than fp32
    import kpac_cli.engine.deblurrer as engine

    monkeypatch.setattr(engine, "cpu_has_fast_bf16", lambda: fast)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        _write(photos / f"p{i}.png", np.random.default_rng(i).random((20, 24, 3), dtype=np.float32), 8)
    res = invoke("deblur", photos, "-o", tmp_path / "out", "--model", tiny_models[0], "--device", "cpu", "--precision", "bf16")
    assert res.exit_code == 0, res.output
    assert res.stderr.count("bf16 on this CPU is emulated") == (0 if fast else 1)
    res = invoke("deblur", photos, "-o", tmp_path / "out2", "--model", tiny_models[0], "--device", "cpu")
    assert "emulated" not in res.stderr  # fp32, the default on the CPU


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, where no file can be created")
def test_a_write_error_names_the_output_not_its_temporary_file(tmp_path, tiny_models):
    src = _write(tmp_path / "a.png", np.random.default_rng(0).random((20, 24, 3), dtype=np.float32), 8)
    res = invoke("deblur", src, "-o", "/proc/kpac-out.png", "--model", tiny_models[0], "-q")
    assert res.exit_code == 1 and res.output.strip().startswith("error: /proc/kpac-out.png: cannot write (")
    assert "kpac-tmp" not in res.output
    res = invoke("blurmap", src, "-o", "/proc/kpac-maps", "--model", tiny_models[0], "-q")
    assert res.exit_code == 1 and "/proc/kpac-maps/a_blurmap.png: cannot create its folder (" in res.output
    assert "Errno" not in res.output


def test_counting_images_below_reads_headers_of_sub_folder_files_only(tmp_path, monkeypatch):
    """The note's count opens no top-level file (planning has read those already) and leaves
    kpac's own maps out, as -r would."""
    import kpac_cli.engine.batch as batch
    from kpac_cli.blurmap.render import encode_map

    photos = tmp_path / "photos"
    (photos / "trip").mkdir(parents=True)
    for name in ("a.png", "b.tif", "trip/c.png", "trip/d.jpg"):
        _write(photos / name, np.random.default_rng(len(name)).random((8, 8, 3), dtype=np.float32), 8)
    (photos / "trip" / "c_blurmap.png").write_bytes(encode_map(np.zeros((8, 8), np.float32), "png"))
    opened = []
    kind = batch.blurmap_kind
    monkeypatch.setattr(batch, "blurmap_kind", lambda path: opened.append(path.name) or kind(path))
    assert batch.images_below([str(photos), str(photos / "a.png")]) == 2
    assert sorted(opened) == ["c.png", "c_blurmap.png", "d.jpg"]


def test_images_in_sub_folders_left_out_without_r_are_said(tmp_path, tiny_models):
    photos = tmp_path / "photos"
    (photos / "trip").mkdir(parents=True)
    for name in ("a.png", "trip/b.png", "trip/c.png"):
        _write(photos / name, np.random.default_rng(len(name)).random((16, 16, 3), dtype=np.float32), 8)
    res = invoke("deblur", photos, "-o", photos / "out", "--model", tiny_models[0])
    assert res.exit_code == 0, res.output
    assert "2 image(s) in sub-folders of the input folders are left out (-r takes them" in res.stderr
    assert sorted(p.name for p in (photos / "out").iterdir()) == ["a.png"]
    # a second run: its own outputs (in a sub-folder of the input) are not counted
    res = invoke("deblur", photos, "-o", photos / "out", "--model", tiny_models[0], "--skip-existing")
    assert "2 image(s) in sub-folders" in res.stderr
    res = invoke("deblur", photos, "-o", tmp_path / "all", "-r", "--model", tiny_models[0])
    assert res.exit_code == 0 and "left out" not in res.stderr


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="needs /dev/null")
def test_an_output_that_is_a_device_is_refused_in_plain_words(tmp_path, tiny_models):
    src = _write(tmp_path / "a.png", np.random.default_rng(0).random((16, 16, 3), dtype=np.float32), 8)
    res = invoke("deblur", src, "-o", "/dev/null", "--model", tiny_models[0])
    assert res.exit_code == 2
    assert res.output.strip() == "error: -o /dev/null is neither a folder nor a regular file; give an image file name (.png, .tif, .jpg) or a folder"


def test_sixteen_bits_asked_for_jpeg_photos_are_said_to_be_eight(tmp_path, tiny_models):
    # in a folder a JPEG photo stays JPEG: --bit-depth 16 cannot apply to it, and that is said
    photos = tmp_path / "photos"
    photos.mkdir()
    _write(photos / "a.jpg", np.random.default_rng(0).random((16, 16, 3), dtype=np.float32), 8, fmt="jpeg")
    _write(photos / "b.png", np.random.default_rng(1).random((16, 16, 3), dtype=np.float32), 8)
    res = invoke("deblur", photos, "-o", tmp_path / "out", "--bit-depth", "16", "--json", "--model", tiny_models[0])
    assert res.exit_code == 0, res.output
    records = {Path(r["input"]).name: r for r in map(json.loads, res.stdout.splitlines())}
    note = "JPEG holds 8 bits: written as 8-bit, not the 16 of --bit-depth (--format png or tiff keeps 16)"
    assert records["a.jpg"]["notes"] == [note] and "notes" not in records["b.png"]
    assert f"note: {photos / 'a.jpg'}: {note}" in res.stderr
    assert read_image(tmp_path / "out" / "a.jpg")[1].bit_depth == 8
    assert read_image(tmp_path / "out" / "b.png")[1].bit_depth == 16


def test_a_torch_compile_that_cannot_build_stops_the_batch_in_one_line(tmp_path, tiny_models, monkeypatch):
    # no C++ compiler (CPU) or no Triton (GPU): every photo would fail alike
    def compile_without_a_compiler(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n\nSet TORCHDYNAMO_VERBOSE=1 for the internal stack trace")
        return run

    monkeypatch.setattr(torch, "compile", compile_without_a_compiler)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        _write(photos / f"p{i}.png", np.random.default_rng(i).random((16, 16, 3), dtype=np.float32), 8)
    res = invoke("deblur", photos, "-o", tmp_path / "out", "--compile", "--model", tiny_models[0])
    assert res.exit_code == 1
    assert res.stderr.splitlines() == [
        "error: torch.compile failed: InvalidCxxCompiler: No working C++ compiler found; run without --compile",
        "stopped (torch.compile failed): 0 deblurred, 0 skipped, 0 failed, 2 not finished; rerun without --compile",
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_json_records_reach_a_redirected_stdout_while_the_progress_shows(tmp_path, tiny_models):
    # `kpac deblur photos/ -o out/ --json | jq .` at a terminal: the bar is on stderr (the
    # terminal), and the records must still go down the pipe, one per line
    import pty
    import threading

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        _write(photos / f"p{i}.png", np.random.default_rng(i).random((16, 16, 3), dtype=np.float32), 8)
    main, secondary = pty.openpty()
    shown = bytearray()
    reader = threading.Thread(target=_drain, args=(main, shown))
    reader.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "kpac_cli", "deblur", photos, "-o", tmp_path / "out", "--json",
                               "--model", tiny_models[0], "--device", "cpu"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=secondary, timeout=120)
    finally:
        os.close(secondary)
        reader.join(timeout=10)
        os.close(main)
    assert proc.returncode == 0, shown.decode(errors="replace")
    records = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert sorted(Path(r["input"]).name for r in records) == ["p0.png", "p1.png"]
    assert b"images" in shown and b'"status"' not in shown  # the bar was shown; the records were not


def _drain(fd: int, into: bytearray) -> None:
    """Read a pseudo-terminal until its other end is closed (a full one would block the writer)."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other end is closed
            return
        if not chunk:
            return
        into += chunk


def test_options_that_no_input_uses_are_noted_not_silently_ignored(tmp_path, tiny_models):
    # --raw-* develop camera RAW files, --recursive descends into folders, --jpeg-quality sets
    # JPEG outputs: given where none is, each is said on stderr, and the run goes on
    src = _write(tmp_path / "a.png", np.random.default_rng(2).random((16, 16, 3), dtype=np.float32), 8)
    photos = tmp_path / "photos"
    photos.mkdir()
    _write(photos / "b.png", np.random.default_rng(3).random((16, 16, 3), dtype=np.float32), 8)
    res = invoke("deblur", src, "-o", tmp_path / "o", "--raw-wb", "auto", "--raw-linear", "-r", "--model", tiny_models[0], "--json")
    assert res.exit_code == 0, res.output
    assert [json.loads(line)["status"] for line in res.stdout.splitlines()] == ["ok"]  # stdout: the records alone
    notes = [line for line in res.stderr.splitlines() if line.startswith("note:")]
    assert notes == ["note: --recursive: no input is a folder, so there are no sub-folders to descend into; it changes nothing here",
                     "note: --raw-wb, --raw-linear: no input is a camera RAW file, and these options develop RAW files only; "
                     "they change nothing here"], res.stderr
    res = invoke("deblur", photos, "-o", tmp_path / "o2", "--jpeg-quality", "80", "--model", tiny_models[0])
    assert res.exit_code == 0 and (tmp_path / "o2" / "b.png").is_file(), res.output
    assert "note: --jpeg-quality: no output is a JPEG (this run writes PNG); it changes nothing here" in res.stderr
    res = invoke("deblur", photos, "-o", tmp_path / "o3", "--jpeg-quality", "80", "--raw-half-size", "-q", "--model", tiny_models[0])
    assert res.exit_code == 0 and res.stderr == "", res.output  # --quiet: not said
    # where they apply, nothing is said: a folder input with -r
    res = invoke("deblur", photos, "-o", tmp_path / "o4", "-r", "--model", tiny_models[0])
    assert res.exit_code == 0 and "note:" not in res.stderr, res.output


def test_raw_and_jpeg_options_are_not_noted_where_one_input_takes_them():
    from kpac_cli.engine.batch import Job, options_without_effect

    jobs = [Job("a", Path("a.png"), Path("o/a.png"), "a.png", "png"), Job("b", Path("b.DNG"), Path("o/b.jpg"), "b.DNG", "jpeg")]
    assert options_without_effect(jobs, ["a.png", "b.DNG"], recursive=False, overwrite=True,
                                  raw_options=["--raw-wb"], jpeg_quality=True) == []
    said = options_without_effect(jobs[:1], ["a.png"], recursive=False, overwrite=False, raw_options=["--raw-wb"], jpeg_quality=True)
    assert [note.split(":")[0] for note in said] == ["--raw-wb", "--jpeg-quality"]


def test_stdout_output_refuses_skip_existing_and_notes_overwrite(tmp_path, tiny_models):
    # -o - has no output file: nothing to keep (a shell's "> FILE" has emptied it already), nothing to replace
    src = _write(tmp_path / "a.png", np.random.default_rng(2).random((16, 16, 3), dtype=np.float32), 8)
    res = invoke("deblur", src, "-o", "-", "--skip-existing", "--model", tiny_models[0])
    assert res.exit_code == 2 and res.stdout == "", res.output
    assert res.stderr == "error: --skip-existing keeps existing output files; -o - writes to stdout, where there is none to keep\n"
    res = invoke("deblur", src, "-o", "-", "--overwrite", "--model", tiny_models[0])
    assert res.exit_code == 0 and res.stdout_bytes.startswith(b"\x89PNG"), res.stderr
    assert res.stderr == "note: --overwrite: -o - writes to stdout, with no output file to replace; it changes nothing here\n"


def test_save_blurmap_with_a_model_without_scale_attention_is_refused_before_the_work(tmp_path, monkeypatch):
    # every image used to be deblurred and then fail alone, one error per file, exit 1
    from kpac_cli.engine import Deblurrer

    model = save_checkpoint(tmp_path / "plain.safetensors", build_model(KPACConfig(levels=2, channels=8, scale_attention=False)),
                            {"name": "plain"})
    src = _write(tmp_path / "a.png", np.random.default_rng(2).random((16, 16, 3), dtype=np.float32), 8)
    ran = []
    monkeypatch.setattr(Deblurrer, "run", lambda *a, **k: ran.append(1))
    res = invoke("deblur", src, "-o", tmp_path / "o", "--save-blurmap", "--model", model)
    assert res.exit_code == 2 and not ran and not (tmp_path / "o").exists(), res.output
    assert " ".join(res.stderr.split()) == ("error: --save-blurmap: model plain has no scale attention (built with "
                                            "scale_attention=False), which the blur map is made of")
    monkeypatch.undo()
    res = invoke("deblur", src, "-o", tmp_path / "o", "--model", model)  # without it the model deblurs as ever
    assert res.exit_code == 0 and (tmp_path / "o" / "a.png").is_file(), res.output


def test_format_may_be_given_as_an_extension(tmp_path, tiny_models):
    # Real-ESRGAN's --ext habit: ".jpg" names the format as "jpg" does
    _write(tmp_path / "a.png", np.random.default_rng(0).random((20, 24, 3), dtype=np.float32), 8)
    for given, written in ((".jpg", "a.jpg"), ("TIF", "a.tif"), (".PNG", "a.png")):
        out = tmp_path / f"out{written}"
        res = invoke("deblur", tmp_path / "a.png", "-o", f"{out}/", "--ext", given, "--model", tiny_models[0])
        assert res.exit_code == 0, res.output
        assert [p.name for p in out.iterdir()] == [written]
    res = invoke("deblur", tmp_path / "a.png", "-o", tmp_path / "o", "--ext", ".webp", "--model", tiny_models[0])
    assert res.exit_code == 2 and "unknown --format 'webp'" in res.stderr
