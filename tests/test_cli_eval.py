"""`kpac eval` end to end: scores equal the library's, baselines, reports, pairing errors, speed, crops."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hostile import StdoutThatStops
from kpac_cli import metrics as M
from kpac_cli.checkpoints import save_checkpoint
from kpac_cli.cli import app
from kpac_cli.engine import Deblurrer, EngineOptions
from kpac_cli.images import ImageInfo, read_image, write_image
from kpac_cli.inverse import convolve, disc_psf, gaussian_psf
from kpac_cli.metrics import lpips_net
from kpac_cli.metrics.crops import PANEL_GAP
from kpac_cli.model import KPACConfig, build_model, count_parameters

runner = CliRunner()
H, W = 48, 64


def invoke(*args):
    return runner.invoke(app, ["eval", *[str(a) for a in args]], catch_exceptions=False)


def records(res) -> list[dict]:
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def _write(path: Path, arr: np.ndarray, bit_depth: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    info = ImageInfo(path=None, format="png", bit_depth=bit_depth, channels=3, alpha=None, icc_profile=None, exif=None,
                     orientation_applied=1, size=arr.shape[:2])
    write_image(path, np.asarray(arr, np.float32), info)
    return path


def _scene(rng, h=H, w=W) -> np.ndarray:
    """A textured image: smoothed noise plus a few sharp edges."""
    img = convolve(rng.random((h, w, 3)), gaussian_psf(1.2))
    img[h // 3 : h // 2, w // 4 : w // 2] += 0.3
    return np.clip(img, 0, 1)


def _read(path) -> np.ndarray:
    return read_image(path)[0]


@pytest.fixture(autouse=True)
def no_lpips_weights(tmp_path, monkeypatch):
    """No LPIPS weights anywhere (empty hub cache, no env var, no lpips package)."""
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    monkeypatch.delenv(M.LPIPS_ENV, raising=False)
    monkeypatch.setattr(lpips_net, "_lpips_package_weights", lambda: None)
    yield
    torch.hub.set_dir(old)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Small random-weight models that exercise the plumbing (they are not deblurring models)."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    single = save_checkpoint(folder / "single.safetensors", build_model(KPACConfig(levels=2, channels=8)), {"name": "tiny"})
    dual = save_checkpoint(folder / "dual.safetensors", build_model(KPACConfig(levels=2, channels=8, in_views=2)), {"name": "tiny-dual"})
    return single, dual


@pytest.fixture(scope="module")
def dpdd(tmp_path_factory) -> Path:
    """A 3-pair DPDD-layout test split (16-bit PNGs; source N goes with target N-1, as in DPDD)."""
    root = tmp_path_factory.mktemp("dpdd")
    rng = np.random.default_rng(7)
    for i in range(3):
        sharp = _scene(rng)
        blurred = convolve(sharp, disc_psf(2.0))
        src, tgt = f"1P0A{917 + 2 * i:04d}", f"1P0A{916 + 2 * i:04d}"
        _write(root / "test_c" / "target" / f"{tgt}.png", sharp, 16)
        _write(root / "test_c" / "source" / f"{src}.png", blurred, 16)
        _write(root / "test_l" / "source" / f"{src}.png", np.clip(blurred + 0.02, 0, 1), 16)
        _write(root / "test_r" / "source" / f"{src}.png", np.clip(blurred - 0.02, 0, 1), 16)
    return root


@pytest.fixture
def folders(tmp_path) -> Path:
    """pred/, gt/ and src/ folders with three same-named 8-bit images."""
    rng = np.random.default_rng(3)
    for n in ("a", "b", "c"):
        t = _scene(rng)
        _write(tmp_path / "gt" / f"{n}.png", t)
        _write(tmp_path / "src" / f"{n}.png", convolve(t, disc_psf(2.5)))
        _write(tmp_path / "pred" / f"{n}.png", np.clip(t + rng.normal(0, 0.03, t.shape), 0, 1))
    return tmp_path


# ------------------------------------------------------------------------------------------ scoring


def test_pred_target_scores_equal_the_library(folders):
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--json")
    assert res.exit_code == 0, res.output
    recs = records(res)
    per_image, summary = recs[:-1], recs[-1]
    expect = M.evaluate(M.pair_folders(folders / "pred", folders / "gt"), lpips_model=None)
    assert [r["name"] for r in per_image] == [r.name for r in expect.rows] == ["a", "b", "c"]
    for got, want in zip(per_image, expect.rows):
        assert got["status"] == "ok"
        assert got["psnr"] == pytest.approx(want.psnr, abs=1e-12)
        assert got["ssim"] == pytest.approx(want.ssim, abs=1e-12)
        assert got["mae"] == pytest.approx(want.mae, abs=1e-12)
    # and the same as computing the metrics by hand on 8-bit-quantised images
    p, t = M.quantize(_read(folders / "pred" / "b.png")), M.quantize(_read(folders / "gt" / "b.png"))
    assert per_image[1]["psnr"] == pytest.approx(M.psnr(p, t), abs=1e-12)
    assert per_image[1]["ssim"] == pytest.approx(M.ssim(p, t), abs=1e-12)
    assert summary["summary"] is True and summary["count"] == 3 and summary["failed"] == 0
    assert summary["psnr"] == pytest.approx(expect.summary()["overall"]["psnr"], abs=1e-12)
    # Gaussian SSIM and 16-bit scoring are passed through
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--json", "--ssim", "gaussian", "--bit-depth", "16")
    g = records(res)[1]
    p16, t16 = M.quantize(_read(folders / "pred" / "b.png"), 16), M.quantize(_read(folders / "gt" / "b.png"), 16)
    assert g["ssim"] == pytest.approx(M.ssim(p16, t16, "gaussian"), abs=1e-12)


def test_terminal_tables_and_conventions_footer(folders):
    res = invoke("--pred", folders / "pred", "--target", folders / "gt")
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "per image" in out and "summary" in out
    for name in ("a", "b", "c"):
        assert any(line.strip("│┃ ").startswith(name) for line in out.splitlines())
    assert "8-bit quantisation" in out and "7x7 uniform window" in out and "LPIPS: unavailable" in out


def test_file_names_with_brackets_are_shown_as_they_are(tmp_path):
    """Rich reads '[edited]' as a style tag: names must reach the table verbatim, not be eaten."""
    rng = np.random.default_rng(5)
    for folder in ("pred", "gt"):
        _write(tmp_path / folder / "shot [edited].png", _scene(rng))
    res = invoke("--pred", tmp_path / "pred", "--target", tmp_path / "gt")
    assert res.exit_code == 0, res.output
    assert "shot [edited]" in res.stdout


def test_identity_psnr_is_psnr_of_source(folders):
    res = invoke("--source", folders / "src", "--target", folders / "gt", "--method", "identity", "--json")
    assert res.exit_code == 0, res.output
    recs = records(res)
    for r in recs[:-1]:
        s = M.quantize(_read(folders / "src" / f"{r['name']}.png"))
        t = M.quantize(_read(folders / "gt" / f"{r['name']}.png"))
        assert r["psnr"] == pytest.approx(M.psnr(s, t), abs=1e-12)
        assert r["mae"] == pytest.approx(M.mae(s, t), abs=1e-12)
    assert recs[-1]["method"] == "identity" and recs[-1]["model"] is None


def test_wiener_beats_identity_on_a_disc_blurred_pair(tmp_path):
    rng = np.random.default_rng(11)
    sharp = _scene(rng, 96, 96)
    # defocus happens in linear light: the baseline decodes the photo's tone curve (gamma 2.2)
    blurred = np.clip(convolve(sharp**2.2, disc_psf(3.0)) ** (1 / 2.2) + rng.normal(0, 0.3 / 255, sharp.shape), 0, 1)
    _write(tmp_path / "gt" / "x.png", sharp, 16)
    _write(tmp_path / "src" / "x.png", blurred, 16)
    args = ("--source", tmp_path / "src", "--target", tmp_path / "gt", "--json")
    ident = records(invoke(*args, "--method", "identity"))[0]
    given = records(invoke(*args, "--method", "wiener", "--wiener-radius", "3"))[0]
    est = records(invoke(*args, "--method", "wiener"))[0]
    assert given["wiener_radius"] == 3.0 and given["psnr"] > ident["psnr"] + 3
    assert abs(est["wiener_radius"] - 3.0) <= 0.5 and est["psnr"] > ident["psnr"] + 2
    assert "notes" not in est  # a disc blur in range: the estimate is a fair one
    # the regularisation is chosen per image unless given, and recorded either way
    fixed = records(invoke(*args, "--method", "wiener", "--wiener-radius", "3", "--wiener-snr", "30"))[0]
    assert fixed["wiener_snr"] == 30.0 and given["wiener_snr"] != 30.0 and given["psnr"] > fixed["psnr"]


def test_wiener_says_when_its_disc_estimate_hits_the_end_of_its_range(tmp_path):
    """A blur the disc model cannot fit (16 px, beyond the candidate radii, in strong noise): the
    baseline's low score is said not to be a fair comparison, in the image's record and the report."""
    sharp = M.quantize(read_image(_write(tmp_path / "gt" / "far.png", _scene(np.random.default_rng(5), 128, 128)))[0])
    linear = convolve(sharp**2.2, disc_psf(16.0)) + np.random.default_rng(4).normal(0, 0.2, sharp.shape)
    _write(tmp_path / "src" / "far.png", np.clip(linear, 0, 1) ** (1 / 2.2))
    args = ("--source", tmp_path / "src", "--target", tmp_path / "gt", "--method", "wiener", "--no-lpips")
    res = invoke(*args, "--json", "--report", tmp_path / "r.md")
    assert res.exit_code == 0, res.output
    rec, summary = records(res)
    assert rec["wiener_radius"] == 12.0 and rec["psnr"] is not None
    (note,) = rec["notes"]
    assert "radius 12 px is the largest candidate (1 to 12 px)" in note and "no fair measure" in note
    (said,) = summary["notes"]
    assert said.startswith("wiener: on 1 of 1 image(s) the disc radius or snr estimate is at the end of its range (far)")
    assert f"- {said}" in (tmp_path / "r.md").read_text()
    res = invoke(*args)
    assert f"note: {said}" in " ".join(res.stdout.split())  # the text report, as one line


def test_dpdd_single_and_dual_models(dpdd, tiny_models):
    single, dual = tiny_models
    res = invoke("--data", dpdd, "--allow-subset", "--model", single, "--device", "cpu", "--limit", "2", "--json")
    assert res.exit_code == 0, res.output
    recs = records(res)
    assert [r["name"] for r in recs[:-1]] == ["1P0A0917", "1P0A0919"]  # named after the sources
    assert recs[0]["target"].endswith("1P0A0916.png") and recs[-1]["images"] == 2
    d = Deblurrer(single, EngineOptions(device="cpu"))
    out = d.deblur(_read(dpdd / "test_c" / "source" / "1P0A0917.png"))
    assert recs[0]["psnr"] == pytest.approx(M.psnr(M.quantize(out), M.quantize(_read(dpdd / "test_c" / "target" / "1P0A0916.png"))), abs=1e-9)

    # the dual model is inferred from its config: left/right views in, centre view as reference
    res = invoke("--data", dpdd, "--allow-subset", "--model", dual, "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    recs = records(res)
    assert len(recs) == 4 and all(r["status"] == "ok" for r in recs[:-1])
    d = Deblurrer(dual, EngineOptions(device="cpu"))
    name = "1P0A0921"
    views = np.concatenate([_read(dpdd / v / "source" / f"{name}.png") for v in ("test_l", "test_r")], axis=2)
    out = d.deblur(views, _read(dpdd / "test_c" / "source" / f"{name}.png"))
    want = M.psnr(M.quantize(out), M.quantize(_read(dpdd / "test_c" / "target" / "1P0A0920.png")))
    assert recs[2]["name"] == name and recs[2]["psnr"] == pytest.approx(want, abs=1e-9)
    # a single-image model refuses --dual; a dual model needs the DPDD layout
    assert invoke("--data", dpdd, "--allow-subset", "--model", single, "--dual").exit_code == 2
    assert invoke("--source", dpdd / "test_c" / "source", "--target", dpdd / "test_c" / "target",
                  "--pair-by", "order", "--model", dual).exit_code == 2


def test_ensemble_scores_the_self_ensemble_and_says_so(dpdd, tiny_models, tmp_path):
    single, dual = tiny_models
    report = tmp_path / "r.json"
    res = invoke("--data", dpdd, "--allow-subset", "--model", single, "--device", "cpu", "--limit", "1",
                 "--ensemble", "4", "--json", "--report", report)
    assert res.exit_code == 0, res.output
    d = Deblurrer(single, EngineOptions(device="cpu", ensemble=4))
    out = d.deblur(_read(dpdd / "test_c" / "source" / "1P0A0917.png"))
    want = M.psnr(M.quantize(out), M.quantize(_read(dpdd / "test_c" / "target" / "1P0A0916.png")))
    assert records(res)[0]["psnr"] == pytest.approx(want, abs=1e-9)
    assert '"ensemble": 4' in report.read_text()  # the report states how the numbers were made
    # and so does its description of the method, as it does of --strength
    assert "self-ensemble of 4 passes" in json.loads(report.read_text())["conventions"]["method"]
    assert "self-ensemble" not in records(invoke("--data", dpdd, "--allow-subset", "--model", single, "--device", "cpu",
                                                 "--limit", "1", "--json"))[-1]["conventions"]["method"]
    assert invoke("--data", dpdd, "--allow-subset", "--model", dual, "--ensemble", "8").exit_code == 2


def test_dpdd_count_is_checked(dpdd):
    res = invoke("--data", dpdd, "--method", "identity")
    assert res.exit_code == 2
    assert "found 3 pairs" in res.output and "76" in res.output and "--allow-subset" in res.output
    res = invoke("--data", dpdd, "--method", "identity", "--allow-subset", "--json")
    assert res.exit_code == 0 and records(res)[-1]["count"] == 3


def test_pred_with_dpdd_ground_truth(dpdd, tmp_path):
    # results named after the DPDD sources, scored against the (differently named) targets
    for p in sorted((dpdd / "test_c" / "source").iterdir()):
        _write(tmp_path / "out" / p.name, _read(p))
    res = invoke("--pred", tmp_path / "out", "--data", dpdd, "--allow-subset", "--json")
    assert res.exit_code == 0, res.output
    ident = records(invoke("--data", dpdd, "--allow-subset", "--method", "identity", "--json"))
    got = records(res)
    for a, b in zip(got[:-1], ident[:-1]):
        assert a["name"] == b["name"]
        assert a["psnr"] == pytest.approx(b["psnr"], abs=0.05)  # 8-bit copy of a 16-bit input
    (tmp_path / "out" / "1P0A0919.png").unlink()
    res = invoke("--pred", tmp_path / "out", "--data", dpdd, "--allow-subset")
    assert res.exit_code == 2 and "1P0A0919" in res.output


# ------------------------------------------------------------------------------------------ reports


def test_reports_parse_and_hold_every_image(folders, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("name,label\na,indoor\nb,outdoor\nc,outdoor\n")
    out = tmp_path / "reports"
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--labels", labels,
                 "--report", out / "r.json", "--report", out / "r.csv", "--report", out / "r.md", "--quiet")
    assert res.exit_code == 0, res.output
    names = {"a", "b", "c"}

    d = json.loads((out / "r.json").read_text())
    assert {im["name"] for im in d["images"]} == names
    assert d["summary"]["splits"]["outdoor"]["count"] == 2
    assert d["run"]["method"] == "predictions" and d["run"]["images"] == 3
    assert "method" in d["conventions"]

    with open(out / "r.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["name"] for r in rows} == names and {r["split"] for r in rows} == {"indoor", "outdoor"}
    assert all(math.isfinite(float(r["psnr"])) for r in rows)

    md = (out / "r.md").read_text()
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in md.splitlines() if ln.startswith("|")]
    assert names <= {c[0] for c in cells}
    assert any(c[0] == "ours (indoor)" for c in cells)
    assert "## Run" in md


def test_lpips_without_weights_is_unavailable_not_a_number(folders, tmp_path):
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--report", tmp_path / "r.json",
                 "--report", tmp_path / "r.md", "--json")
    assert res.exit_code == 0, res.output
    recs = records(res)
    assert all(r["lpips"] is None for r in recs[:-1])
    assert recs[-1]["lpips"] is None and "LPIPS weights not available" in recs[-1]["lpips_unavailable"]
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["lpips_unavailable"] and all(im["lpips"] is None for im in d["images"])
    assert "unavailable: LPIPS weights not available" in (tmp_path / "r.md").read_text()
    # a missing explicit weights file is a usage error, not a silent "unavailable"
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--lpips-weights", tmp_path / "nope.pth")
    assert res.exit_code == 2 and "nope.pth" in res.output


def test_lpips_weights_file_gives_numbers(folders, tmp_path):
    torch.manual_seed(1)
    net = M.LPIPS()
    net.save(tmp_path / "lpips.pth")  # random weights: checks the wiring only
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--lpips-weights", tmp_path / "lpips.pth", "--json")
    assert res.exit_code == 0, res.output
    rec = records(res)[0]
    p, t = M.quantize(_read(folders / "pred" / "a.png")), M.quantize(_read(folders / "gt" / "a.png"))
    assert rec["lpips"] == pytest.approx(M.lpips(p, t, M.load_lpips(tmp_path / "lpips.pth")), rel=1e-6)
    assert records(res)[-1]["lpips_unavailable"] is None


def test_an_image_too_small_for_lpips_keeps_its_other_scores(folders, tmp_path):
    torch.manual_seed(1)
    M.LPIPS().save(tmp_path / "lpips.pth")  # random weights: checks which images get a number
    _write(folders / "pred" / "small.png", _read(folders / "pred" / "a.png")[:20, :24])
    _write(folders / "gt" / "small.png", _read(folders / "gt" / "a.png")[:20, :24])
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--lpips-weights", tmp_path / "lpips.pth", "--json",
                 "--report", tmp_path / "r.json", "--report", tmp_path / "r.csv")
    assert res.exit_code == 0, res.output
    recs = {r.get("name", "summary"): r for r in records(res)}
    small, summary = recs["small"], recs["summary"]
    assert small["status"] == "ok" and small["psnr"] > 20 and small["ssim"] > 0 and small["lpips"] is None
    assert small["lpips_unavailable"] == "image too small for LPIPS (AlexNet needs at least 31 pixels a side): 24x20"
    assert recs["a"]["lpips"] is not None and recs["a"]["lpips_unavailable"] is None
    assert summary["count"] == 4 and summary["failed"] == 0 and summary["lpips_unavailable"] is None
    assert summary["lpips"] == pytest.approx(np.mean([recs[n]["lpips"] for n in "abc"]), rel=1e-12)
    assert summary["psnr"] == pytest.approx(np.mean([recs[n]["psnr"] for n in ("a", "b", "c", "small")]), rel=1e-12)
    assert any("LPIPS n/a for 1 image(s)" in n and "small" in n and "other 3 image(s)" in n for n in summary["notes"])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"]["overall"]["lpips"] == summary["lpips"] and report["notes"] == summary["notes"]
    with open(tmp_path / "r.csv", newline="") as fh:
        rows = {r["name"]: r for r in csv.DictReader(fh)}
    assert rows["small"]["lpips"] == "" and rows["small"]["error"] == "" and rows["small"]["psnr"]


def test_a_prediction_turned_by_90_degrees_is_said_to_be_turned(folders):
    _write(folders / "pred" / "b.png", _read(folders / "gt" / "b.png").transpose(1, 0, 2))
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--no-lpips", "--json")
    assert res.exit_code == 1
    b = next(r for r in records(res) if r.get("name") == "b")
    assert b["status"] == "failed" and b["error"] == (
        f"b: prediction ({W}, {H}, 3) and target ({H}, {W}, 3) have different shapes: the prediction is the "
        "target's size turned by 90 degrees: an EXIF orientation applied to one of them only?")


# ------------------------------------------------------------------------------------------ errors


def test_mismatched_pairing_exits_2_naming_the_files(folders):
    (folders / "pred" / "c.png").rename(folders / "pred" / "extra_pred.png")
    res = invoke("--pred", folders / "pred", "--target", folders / "gt")
    assert res.exit_code == 2
    assert "extra_pred" in res.output and "c" in res.output.split("without a prediction")[1]
    (folders / "pred" / "zz.png").write_bytes((folders / "pred" / "a.png").read_bytes())
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--pair-by", "order")
    assert res.exit_code == 2 and "4 images" in res.output and "but 3" in res.output


def test_pairing_errors_name_the_folders_as_given(folders):
    # --source holds blurry inputs: calling them predictions would send the user to the wrong folder
    (folders / "src" / "c.png").rename(folders / "src" / "extra_src.png")
    res = invoke("--source", folders / "src", "--target", folders / "gt", "--method", "identity", "--no-lpips")
    assert res.exit_code == 2, res.output
    assert f"1 source(s) without a target in {folders / 'gt'}: extra_src" in res.stderr
    assert f"1 target(s) without a source in {folders / 'src'}: c" in res.stderr
    assert "prediction" not in res.stderr
    # --pred with --source: the inputs shown in the crops are sources, not targets
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--source", folders / "src", "--no-lpips")
    assert res.exit_code == 2, res.output
    assert f"1 source(s) without a prediction in {folders / 'pred'}: extra_src" in res.stderr
    assert f"1 prediction(s) without a source in {folders / 'src'}: c" in res.stderr


def test_pairing_by_order_pairs_stems_whatever_the_extensions(folders, tmp_path):
    # photo.jpg / photo.left.jpg against photo.left.png / photo.png: the extension must not reorder
    from PIL import Image

    (tmp_path / "p").mkdir()
    for stem, n in (("photo", "a"), ("photo.left", "b")):
        Image.open(folders / "pred" / f"{n}.png").save(tmp_path / "p" / f"{stem}.jpg")
        _write(tmp_path / "t" / f"{stem}.png", _read(folders / "gt" / f"{n}.png"))
    res = invoke("--pred", tmp_path / "p", "--target", tmp_path / "t", "--pair-by", "order", "--no-lpips", "--json")
    assert res.exit_code == 0, res.output
    got = {r["name"]: Path(r["target"]).name for r in records(res)[:-1]}
    assert got == {"photo": "photo.png", "photo.left": "photo.left.png"}
    assert "natural order" in records(res)[-1]["pairing"]  # the report says which order paired them


def test_failed_pair_exits_1_and_the_others_are_scored(folders):
    (folders / "pred" / "b.png").write_bytes(b"not an image")
    _write(folders / "pred" / "c.png", np.zeros((H // 2, W, 3)))  # wrong size
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--json")
    assert res.exit_code == 1
    recs = records(res)
    status = {r["name"]: r["status"] for r in recs[:-1]}
    assert status == {"a": "ok", "b": "failed", "c": "failed"}
    assert len({frozenset(r) for r in recs[:-1]}) == 1  # one set of keys: error null when ok, scores null when failed
    assert recs[0]["error"] is None and recs[0]["psnr"] > 0 and recs[1]["psnr"] is None
    assert recs[-1]["count"] == 1 and recs[-1]["failed"] == 2
    assert {f["name"] for f in recs[-1]["failures"]} == {"b", "c"}
    assert "different shapes" in next(r for r in recs if r["name"] == "c")["error"]
    res = invoke("--pred", folders / "pred", "--target", folders / "gt")
    assert res.exit_code == 1 and "2 failed" in res.stdout


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--pred", "pred"],
        ["--pred", "pred", "--target", "gt", "--method", "identity"],
        ["--source", "src", "--target", "gt", "--method", "magic"],
        ["--source", "src"],
        ["--pred", "pred", "--target", "gt", "--report", "r.txt"],
        ["--pred", "pred", "--target", "gt", "--bit-depth", "12"],
        ["--pred", "pred", "--target", "gt", "--ssim", "box"],
        ["--pred", "pred", "--target", "gt", "--limit", "0"],
        ["--source", "src", "--target", "gt", "--method", "wiener", "--wiener-radius", "-1"],
        ["--source", "src", "--target", "gt", "--method", "wiener", "--wiener-radius", "inf"],
        ["--pred", "pred", "--target", "nowhere"],
        ["--speed", "--model", "no-such-model"],
        ["--speed", "--model", "m.safetensors", "--speed-size", "big"],
    ],
)
def test_usage_errors_exit_2(folders, monkeypatch, args):
    monkeypatch.chdir(folders)
    assert invoke(*args).exit_code == 2


# ------------------------------------------------------------------------------------------ speed, crops


def test_speed_record(tiny_models):
    res = invoke("--speed", "--model", tiny_models[0], "--device", "cpu", "--speed-size", "64x48",
                 "--speed-runs", "2", "--speed-warmup", "1", "--json")
    assert res.exit_code == 0, res.output
    (rec,) = records(res)
    sp = rec["summary"] and rec["speed"]
    assert {"params", "flops", "seconds", "seconds_median", "times", "device", "precision"} <= set(sp)
    cfg = KPACConfig(levels=2, channels=8)
    assert sp["params"] == count_parameters(build_model(cfg))
    assert (sp["width"], sp["height"], sp["runs"], len(sp["times"])) == (64, 48, 2, 2)
    from kpac_cli.model.flops import count_flops

    assert sp["flops"] == count_flops(cfg, 48, 64)["total"]
    res = invoke("--speed", "--model", tiny_models[0], "--device", "cpu", "--speed-size", "64x48", "--speed-runs", "1")
    assert res.exit_code == 0 and "parameters" in res.stdout and "FLOPs" in res.stdout


def test_save_crops_writes_one_png_per_image(folders, tmp_path):
    crops = tmp_path / "crops"
    res = invoke("--source", folders / "src", "--target", folders / "gt", "--method", "wiener", "--wiener-radius", "2.5",
                 "--save-crops", crops, "--json")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in crops.iterdir()) == ["a.png", "b.png", "c.png"]
    img, info = read_image(crops / "a.png")
    assert info.format == "png" and info.bit_depth == 8
    assert img.shape[1] == 3 * W + 2 * PANEL_GAP and img.shape[0] > H
    rec = records(res)[0]
    assert rec["crops"].endswith("a.png") and len(rec["crop_box"]) == 3
    # existing predictions without inputs: prediction | target
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--save-crops", tmp_path / "c2", "--quiet")
    assert res.exit_code == 0
    assert read_image(tmp_path / "c2" / "b.png")[0].shape[1] == 2 * W + PANEL_GAP


def test_help_has_examples():
    res = invoke("--help")
    assert res.exit_code == 0 and "Example" in res.stdout and "--save-crops" in res.stdout


# ------------------------------------------------------------------------------------------ outputs, options and reports


def test_a_crops_folder_that_cannot_be_created_is_a_usage_error(folders, tmp_path, monkeypatch):
    args = ("--pred", folders / "pred", "--target", folders / "gt", "--no-lpips", "--json")
    (tmp_path / "afile").write_text("a file where a folder is needed")
    res = invoke(*args, "--save-crops", tmp_path / "afile" / "crops" / "here")
    assert res.exit_code == 2 and res.stdout == "", res.output  # refused before any image is scored
    assert res.stderr.strip() == (f"error: --save-crops {tmp_path / 'afile' / 'crops' / 'here'}: "
                                  f"cannot create the folder: {tmp_path / 'afile'} is not a folder")
    # a folder the file system refuses (no permission) is said as plainly
    def refuse(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    res = invoke(*args, "--save-crops", tmp_path / "crops")
    assert res.exit_code == 2 and res.stdout == "", res.output
    assert res.stderr.strip() == f"error: --save-crops {tmp_path / 'crops'}: cannot create the folder (Permission denied)"


def test_existing_report_and_crops_are_refused_without_overwrite(folders, tmp_path):
    args = ("--source", folders / "src", "--target", folders / "gt", "--method", "identity", "--quiet")
    report = tmp_path / "r.md"
    report.write_text("mine\n")
    res = invoke(*args, "--report", report)
    assert res.exit_code == 2 and "r.md exists" in res.output and "--overwrite" in res.output
    assert report.read_text() == "mine\n"  # refused before any work
    crops = tmp_path / "crops"
    crops.mkdir()
    (crops / "b.png").write_bytes(b"mine")
    res = invoke(*args, "--save-crops", crops)
    assert res.exit_code == 2 and "b.png exists" in res.output
    assert sorted(p.name for p in crops.iterdir()) == ["b.png"] and (crops / "b.png").read_bytes() == b"mine"
    res = invoke(*args, "--report", report, "--save-crops", crops, "--overwrite")
    assert res.exit_code == 0, res.output
    assert "## Summary" in report.read_text() and read_image(crops / "b.png")[1].format == "png"
    # not even --overwrite replaces a file the run reads; a file is no crops folder
    res = invoke(*args, "--save-crops", folders / "src", "--overwrite")
    assert res.exit_code == 2 and "input of this evaluation" in res.output
    assert invoke(*args, "--save-crops", report).exit_code == 2
    # ... nor a file known under another name (a hard link of a target)
    link = tmp_path / "link.md"
    os.link(next((folders / "gt").iterdir()), link)
    res = invoke(*args, "--report", link, "--overwrite")
    assert res.exit_code == 2 and "input of this evaluation" in res.output


@pytest.mark.parametrize("method", ["identity", "wiener"])
@pytest.mark.parametrize("flag", [["--ensemble", "8"], ["--ensemble", "2"], ["--device", "cpu"], ["--precision", "fp32"], ["--tile", "256"],
                                  ["--strength", "0.5"], ["--fp32"]])
def test_engine_flags_with_a_baseline_are_usage_errors(folders, method, flag):
    res = invoke("--source", folders / "src", "--target", folders / "gt", "--method", method, *flag)
    assert res.exit_code == 2 and flag[0] in res.output and f"--method {method}" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_invalid_engine_values_and_misplaced_flags_are_rejected(folders, tiny_models):
    pairs = ("--source", folders / "src", "--target", folders / "gt")
    preds = ("--pred", folders / "pred", "--target", folders / "gt")
    for args, message in (
        ((*pairs, "--method", "identity", "--ensemble", "3"), "--ensemble must be 1, 2, 4 or 8, got 3"),
        ((*pairs, "--model", tiny_models[0], "--ensemble", "3"), "--ensemble must be 1, 2, 4 or 8, got 3"),
        ((*pairs, "--model", tiny_models[0], "--precision", "fp64"), "--precision must be one of"),
        ((*preds, "--tile", "256"), "--tile is not used by --pred"),
        (("--speed", "--model", tiny_models[0], "--tile", "256"), "--tile is not used by --speed"),  # it times untiled
        ((*pairs, "--method", "identity", "--wiener-snr", "10"), "--wiener-snr applies to --method wiener"),
        ((*pairs, "--method", "identity", "--speed-runs", "3"), "--speed-runs applies to --speed"),
    ):
        res = invoke(*args)
        assert res.exit_code == 2 and message in res.output, (args, res.output)


def test_tile_error_names_the_flag_as_deblur_does(folders):
    res = invoke("--source", folders / "src", "--target", folders / "gt", "--tile", "-1")
    deblur = runner.invoke(app, ["deblur", str(folders / "src" / "a.png"), "-o", str(folders / "x.png"), "--tile", "-1"])
    assert res.exit_code == deblur.exit_code == 2
    assert res.output.strip() == deblur.output.strip() == "error: --tile: use auto, 0 (no tiling) or a tile size in pixels; got -1"


def test_no_lpips_is_not_computed_everywhere(folders, tmp_path):
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--no-lpips", "--report", tmp_path / "r.md")
    assert res.exit_code == 0, res.output
    (all_row,) = [ln for ln in res.stdout.splitlines() if ln.strip("│ ").startswith("all ")]
    assert all_row.rstrip(" │").endswith("not computed") and "unavailable" not in res.stdout
    (a_row,) = [ln for ln in res.stdout.splitlines() if ln.strip("│ ").startswith("a ")]  # per image, as in the Markdown
    assert a_row.rstrip(" │").endswith("not computed")
    md = (tmp_path / "r.md").read_text()
    assert "LPIPS: not computed" in md and "unavailable" not in md


def test_markdown_report_shows_the_paper_rows_where_the_terminal_does(folders, dpdd, tmp_path):
    res = invoke("--source", folders / "src", "--target", folders / "gt", "--method", "identity", "--report", tmp_path / "f.md")
    assert res.exit_code == 0, res.output
    md = (tmp_path / "f.md").read_text()
    assert "Table 4" not in res.stdout and "Table 4" not in md
    # both folders of the pairs are recorded, in the title and the run
    assert f"source {folders / 'src'}, target {folders / 'gt'}" in md.splitlines()[0]
    assert f"- **data**: source {folders / 'src'}, target {folders / 'gt'}" in md
    res = invoke("--data", dpdd, "--allow-subset", "--method", "identity", "--report", tmp_path / "d.md")
    assert res.exit_code == 0, res.output
    assert "Table 4" in res.stdout and "Table 4" in (tmp_path / "d.md").read_text()
    # its SSIM column was scored with the uniform window: beside Gaussian-window SSIM it does not compare
    res = invoke("--data", dpdd, "--allow-subset", "--method", "identity", "--ssim", "gaussian", "--report", tmp_path / "g.md")
    assert res.exit_code == 0, res.output
    assert "Table 4" not in res.stdout and "Table 4" not in (tmp_path / "g.md").read_text()


def test_paper_rows_come_with_their_note_in_every_report_that_shows_them(folders, dpdd, tmp_path):
    reports = [tmp_path / "f.json", tmp_path / "f.md"]
    res = invoke("--source", folders / "src", "--target", folders / "gt", "--method", "identity",
                 *[a for r in reports for a in ("--report", r)])
    assert res.exit_code == 0, res.output
    assert json.loads(reports[0].read_text())["paper"] is None  # not DPDD: no paper rows, as on the terminal
    reports = [tmp_path / "d.json", tmp_path / "d.md"]
    res = invoke("--data", dpdd, "--allow-subset", "--method", "identity", *[a for r in reports for a in ("--report", r)])
    assert res.exit_code == 0, res.output
    note = "ours are on 3 images, so they do not compare"
    paper = json.loads(reports[0].read_text())["paper"]
    assert paper["rows"] and note in paper["note"]
    assert note in reports[1].read_text()
    assert note in " ".join(res.stdout.split())  # the terminal's footer, however wrapped


def test_a_mean_over_no_image_is_na_in_every_report(folders, tmp_path):
    """Every pair failed: the terminal says n/a, and so do the files (null in JSON), never nan."""
    (tmp_path / "short").mkdir()
    for n in ("a", "b", "c"):
        _write(tmp_path / "short" / f"{n}.png", np.zeros((H // 2, W, 3)))
    reports = [tmp_path / "r.md", tmp_path / "r.json", tmp_path / "r.csv"]
    args = ("--pred", tmp_path / "short", "--target", folders / "gt", "--no-lpips")
    res = invoke(*args, *[a for r in reports for a in ("--report", r)])
    assert res.exit_code == 1, res.output
    (all_row,) = [ln for ln in res.stdout.splitlines() if ln.strip("│ ").startswith("all ")]
    assert all_row.split("│")[3:6] == [" n/a ".rjust(len(c)) for c in all_row.split("│")[3:6]]
    md = reports[0].read_text()
    assert "| ours (all images) | measured | 0 | n/a | n/a | n/a | not computed |" in md and "nan" not in md
    overall = json.loads(reports[1].read_text())["summary"]["overall"]
    assert [overall[k] for k in ("psnr", "ssim", "mae")] == [None, None, None]
    assert "nan" not in reports[2].read_text()
    summary = records(invoke(*args, "--json"))[-1]
    assert summary["count"] == 0 and [summary[k] for k in ("psnr", "ssim", "mae")] == [None, None, None]


def test_a_per_image_table_left_out_for_length_is_said(folders, monkeypatch):
    import kpac_cli.cli.eval as eval_cli

    args = ("--pred", folders / "pred", "--target", folders / "gt", "--no-lpips")
    res = invoke(*args)
    assert "per image" in res.stdout and "not listed here" not in res.stdout
    monkeypatch.setattr(eval_cli, "PER_IMAGE_TABLE_MAX", 2)  # three images: one too many to list
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    assert "per image" not in res.stdout and "summary" in res.stdout
    assert "per-image scores of the 3 images are not listed here (more than 2): --report FILE.csv or --json gives every one" in res.stdout


def test_speed_times_every_pass_of_the_ensemble(tiny_models):
    from kpac_cli.engine.device import cpu_name
    from kpac_cli.model.flops import count_flops

    args = ("--speed", "--model", tiny_models[0], "--device", "cpu", "--speed-size", "64x48", "--speed-runs", "1",
            "--speed-warmup", "0", "--json")
    (one,) = records(invoke(*args))
    (eight,) = records(invoke(*args, "--ensemble", "8"))
    cfg = KPACConfig(levels=2, channels=8)
    single = count_flops(cfg, 48, 64)["total"]
    assert one["speed"]["ensemble"] == 1 and one["speed"]["flops"] == single
    sp = eight["speed"]
    assert eight["ensemble"] == 8 and sp["ensemble"] == 8
    assert sp["flops"] == 4 * single + 4 * count_flops(cfg, 64, 48)["total"]  # 4 of the 8 passes are transposed
    assert sp["seconds_per_pass"] == pytest.approx(sp["seconds"] / 8)
    # a speed-only record states no scoring settings, and names the CPU as kpac bench does
    assert eight["method"] == "kpac" and not {"bit_depth", "ssim_window", "images", "pairing"} & set(eight)
    assert sp["device_name"] == cpu_name()
    res = invoke(*args[:-1], "--ensemble", "2")
    assert res.exit_code == 0 and "2 passes" in res.stdout and "per pass" in res.stdout


# ------------------------------------------------------------------------------------------ same flags as kpac deblur


def test_strength_scales_the_correction_as_deblur_does(dpdd, tiny_models, tmp_path):
    single, _ = tiny_models
    base = ("--data", dpdd, "--allow-subset", "--limit", "2", "--json")
    model = ("--model", single, "--device", "cpu")
    ident = records(invoke(*base, "--method", "identity"))
    full = records(invoke(*base, *model))
    zero = records(invoke(*base, *model, "--strength", "0"))
    res = invoke(*base, *model, "--strength", "0.5", "--report", tmp_path / "r.json", "--report", tmp_path / "r.md")
    assert res.exit_code == 0, res.output
    half = records(res)
    for i in range(2):
        # strength 0 is the input unchanged: exactly the blurry input's scores
        assert zero[i]["psnr"] == ident[i]["psnr"] and zero[i]["ssim"] == ident[i]["ssim"]
        assert full[i]["psnr"] != ident[i]["psnr"]
        low, high = sorted((ident[i]["psnr"], full[i]["psnr"]))
        assert low < half[i]["psnr"] < high
        assert half[i]["strength"] == 0.5 and "strength" not in full[i]
    # and exactly what the engine gives at that strength
    d = Deblurrer(single, EngineOptions(device="cpu", strength=0.5))
    out = d.deblur(_read(dpdd / "test_c" / "source" / "1P0A0917.png"))
    want = M.psnr(M.quantize(out), M.quantize(_read(dpdd / "test_c" / "target" / "1P0A0916.png")))
    assert half[0]["psnr"] == pytest.approx(want, abs=1e-9)
    # stated wherever the numbers go, as --ensemble is
    assert half[-1]["strength"] == 0.5 and zero[-1]["strength"] == 0 and full[-1]["strength"] is None
    assert json.loads((tmp_path / "r.json").read_text())["run"]["strength"] == 0.5
    md = (tmp_path / "r.md").read_text()
    assert "- **strength**: 0.5" in md and "strength 0.5" in half[-1]["conventions"]["method"]


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_strength_out_of_range_is_a_one_line_usage_error(folders, tiny_models, value):
    res = invoke("--source", folders / "src", "--target", folders / "gt", "--model", tiny_models[0], "--strength", value)
    assert res.exit_code == 2 and res.stderr.startswith("error: --strength must be in [0, 1]"), res.output
    assert len(res.stderr.splitlines()) == 1


def test_strength_is_refused_where_nothing_is_scored_from_the_model(folders, tiny_models):
    speed = ("--speed", "--model", tiny_models[0], "--device", "cpu", "--speed-size", "64x48")
    res = invoke(*speed, "--strength", "0.5")
    assert res.exit_code == 2 and "--strength is not used by --speed" in res.stderr, res.output
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--strength", "0.5")
    assert res.exit_code == 2 and "--strength is not used by --pred" in res.stderr, res.output
    # not said to apply to --speed, which has no use for it either
    res = invoke("--source", folders / "src", "--target", folders / "gt", "--method", "identity", "--strength", "0.5")
    assert res.exit_code == 2 and res.stderr.rstrip().endswith("engine options apply to --method kpac"), res.output
    res = invoke("--source", folders / "src", "--target", folders / "gt", "--method", "identity", "--ensemble", "2")
    assert res.exit_code == 2 and res.stderr.rstrip().endswith("apply to --method kpac and --speed"), res.output


def test_fp32_is_precision_fp32_and_contradicting_precisions_are_refused(tiny_models, folders):
    speed = ("--speed", "--model", tiny_models[0], "--device", "cpu", "--speed-size", "64x48", "--speed-runs", "1",
             "--speed-warmup", "0", "--json")
    # auto states no preference: --fp32 completes it
    for extra in (["--fp32"], ["--precision", "fp32", "--fp32"], ["--precision", "auto", "--fp32"]):
        res = invoke(*speed, *extra)
        assert res.exit_code == 0, res.output
        (rec,) = records(res)
        assert rec["precision"] == "fp32" and rec["speed"]["precision"] == "fp32"
    for precision in ("bf16", "fp16"):
        res = invoke(*speed, "--precision", precision, "--fp32")
        assert res.exit_code == 2 and len(res.stderr.splitlines()) == 1, res.output
        assert res.stderr.startswith(f"error: --precision {precision} and --fp32 contradict each other")


# ------------------------------------------------------------------------------------------ conventions, labels, inputs


def test_unquantised_scoring_is_not_described_as_rounded(folders):
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--bit-depth", "0", "--no-lpips")
    assert res.exit_code == 0, res.output
    footer = next(ln for ln in res.stdout.splitlines() if ln.startswith("Conventions:"))
    assert "round half up" not in footer and "no quantisation" in footer
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--bit-depth", "16", "--no-lpips")
    assert "16-bit quantisation (round half up)" in res.stdout


def test_split_labels_with_brackets_are_shown_as_they_are(folders, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("a,[night]\nb,day [x]\nc,day [x]\n")
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--labels", labels, "--no-lpips")
    assert res.exit_code == 0, res.output
    rows = [[c.strip() for c in ln.strip("│ ").split("│")] for ln in res.stdout.splitlines() if ln.startswith("│")]
    per_image = {r[0]: r[1] for r in rows if r[0] in ("a", "b", "c")}
    assert per_image == {"a": "[night]", "b": "day [x]", "c": "day [x]"}
    summary = {r[0]: r[1] for r in rows if r[0] not in ("a", "b", "c")}
    assert summary == {"all": "3", "[night]": "1", "day [x]": "2"}


def test_labels_file_is_never_replaced_by_a_report(folders, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("a,indoor\nb,outdoor\nc,outdoor\n")
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--labels", labels, "--report", labels,
                 "--overwrite", "--no-lpips", "--quiet")
    assert res.exit_code == 2 and "input of this evaluation" in res.stderr, res.output
    assert labels.read_text() == "a,indoor\nb,outdoor\nc,outdoor\n"


def test_inputs_shown_only_in_crops_do_not_fail_the_scores(folders, tmp_path):
    (folders / "src" / "b.png").write_bytes(b"not an image")
    args = ("--pred", folders / "pred", "--target", folders / "gt", "--source", folders / "src", "--no-lpips", "--json")
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    recs = records(res)
    assert [r["status"] for r in recs[:-1]] == ["ok", "ok", "ok"] and recs[-1]["count"] == 3
    # with --save-crops the unreadable input costs that image's crops, not its score
    res = invoke(*args, "--save-crops", tmp_path / "crops")
    assert res.exit_code == 1
    recs = records(res)
    assert [r["status"] for r in recs[:-1]] == ["ok", "ok", "ok"] and recs[-1]["count"] == 3
    assert "b.png" in recs[1]["crops_error"] and "crops_error" not in recs[0]
    assert recs[1]["crops_error"].startswith(f"crops not written: {folders / 'src' / 'b.png'}: ")  # named once
    assert sorted(p.name for p in (tmp_path / "crops").iterdir()) == ["a.png", "c.png"]


def test_pairing_by_order_refuses_two_predictions_of_one_name(folders, tmp_path):
    img, info = read_image(folders / "pred" / "b.png")
    write_image(folders / "pred" / "a.tif", img, info, format="tiff", bit_depth=8)
    (folders / "pred" / "b.png").unlink()
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--pair-by", "order",
                 "--save-crops", tmp_path / "crops", "--no-lpips")
    assert res.exit_code == 2 and "share the name 'a'" in res.stderr, res.output
    assert not (tmp_path / "crops").exists()


def test_a_failed_pair_is_named_on_stderr_whatever_its_name(folders, tmp_path):
    # "c" and "a" are letters of the messages themselves: the pair must still be named
    _write(folders / "pred" / "c.png", np.zeros((H // 2, W, 3)))
    _write(folders / "pred" / "a.png", np.zeros((5, 5, 3)))
    _write(folders / "gt" / "a.png", np.zeros((5, 5, 3)))
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--no-lpips", "--report", tmp_path / "r.json")
    assert res.exit_code == 1, res.output
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == [
        "error: a: image too small for SSIM (uniform window 7x7 needs at least 7 pixels a side): 5x5",
        f"error: c: prediction ({H // 2}, {W}, 3) and target ({H}, {W}, 3) have different shapes",
    ]
    failures = json.loads((tmp_path / "r.json").read_text())["failures"]
    assert [f["error"] for f in failures] == [e.removeprefix("error: ") for e in errors]
    # a message that quotes the file already names the pair
    (folders / "pred" / "b.png").write_bytes(b"not an image")
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--no-lpips")
    assert f"error: {folders / 'pred' / 'b.png'}: " in res.stderr, res.output


def test_a_report_under_a_file_is_refused_before_any_work(folders, tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder is needed")
    good = tmp_path / "r.json"
    for bad in (tmp_path / "blocker" / "r.md", tmp_path / "blocker" / "sub" / "r.md"):
        res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--no-lpips", "--report", good, "--report", bad)
        assert res.exit_code == 2 and res.stdout == "", res.output
        assert res.stderr == f"error: --report {bad}: cannot create its folder: {tmp_path / 'blocker'} is not a folder\n"
    assert not good.exists()


def test_a_report_that_cannot_be_written_is_not_listed_as_written(folders, tmp_path, monkeypatch):
    import kpac_cli.images as images

    bad, good = tmp_path / "r.md", tmp_path / "r.json"
    real_write = images.atomic_write_bytes

    def full_disk_for_markdown(path, data, **kwargs):
        if Path(path).suffix == ".md":
            raise OSError(28, "No space left on device")
        return real_write(path, data, **kwargs)

    monkeypatch.setattr(images, "atomic_write_bytes", full_disk_for_markdown)  # eval imports it when it writes
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--no-lpips", "--report", good, "--report", bad)
    assert res.exit_code == 1 and f"cannot write report {bad}: No space left on device" in res.stderr, res.output
    assert not bad.exists()
    assert good.is_file()
    listed = [ln for ln in res.stderr.splitlines() if ln.startswith("reports: ")]
    assert listed == [f"reports: {good}"]


def test_quiet_keeps_errors_on_stderr_as_its_help_says(folders):
    (folders / "pred" / "b.png").write_bytes(b"not an image")
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--no-lpips", "--quiet", "--json")
    assert res.exit_code == 1
    assert res.stderr.startswith("error: ") and "b.png" in res.stderr and len(res.stderr.splitlines()) == 1
    help_text = " ".join(invoke("--help").stdout.replace("│", " ").split())
    assert "errors are still printed" in help_text


def test_pairing_options_of_the_other_mode_are_refused(folders, dpdd, tmp_path):
    for p in sorted((dpdd / "test_c" / "source").iterdir()):
        _write(tmp_path / "out" / p.name, _read(p))
    # DPDD pairs by its layout (sources with targets by sorted order, results by source name)
    for args in (("--data", dpdd, "--method", "identity"), ("--pred", tmp_path / "out", "--data", dpdd)):
        res = invoke(*args, "--allow-subset", "--pair-by", "order")
        assert res.exit_code == 2 and "--pair-by" in res.stderr and len(res.stderr.splitlines()) == 1, res.output
    # and folders have no DPDD split
    for flag in (["--split", "val"], ["--allow-subset"]):
        res = invoke("--pred", folders / "pred", "--target", folders / "gt", *flag)
        assert res.exit_code == 2 and flag[0] in res.stderr and "--data" in res.stderr, res.output


def test_json_mode_says_the_notes_the_tables_would_show(folders, tmp_path):
    # --json prints no tables: images left unscored or unlabelled must still be said
    for d in ("pred", "gt"):
        _write(folders / d / "more" / "d.png", _read(folders / "gt" / "a.png"))
    (tmp_path / "labels.csv").write_text("a,indoor\nb,outdoor\n")
    args = ("--pred", folders / "pred", "--target", folders / "gt", "--no-lpips", "--labels", tmp_path / "labels.csv", "--json")
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    notes = records(res)[-1]["notes"]
    assert notes == [
        "1 image(s) have no split label: c",
        f"--pred {folders / 'pred'}: 1 image(s) in its sub-folders are not scored (only the folder's own images are paired; "
        "give a sub-folder to score those)",
        f"--target {folders / 'gt'}: 1 image(s) in its sub-folders are not scored (only the folder's own images are paired; "
        "give a sub-folder to score those)",
    ]
    assert [ln for ln in res.stderr.splitlines() if ln.startswith("note: ")] == [f"note: {n}" for n in notes]
    assert "note" not in invoke(*args, "--quiet").stderr


@pytest.mark.parametrize("error,code,said", [
    (BrokenPipeError(32, "Broken pipe"), 141, ["stopped (stdout was closed by its reader); no report written"]),
    (OSError(28, "No space left on device"), 1, ["error: cannot write to stdout: No space left on device",
                                                 "stopped (stdout failed); no report written"]),
], ids=["reader_gone", "disk_full"])
def test_records_that_cannot_be_written_stop_the_evaluation(folders, tmp_path, monkeypatch, error, code, said):
    import kpac_cli.cli.common as common

    stdout = StdoutThatStops(1, error)
    monkeypatch.setattr(common, "sys", type("Sys", (), {"stdout": stdout}))
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--json", "--report", tmp_path / "r.md")
    assert res.exit_code == code  # 141: as a shell reports a writer that SIGPIPE ended
    assert [json.loads(line)["name"] for line in stdout.lines] == ["a"]
    assert [line for line in res.stderr.splitlines() if line.strip()] == said
    assert not (tmp_path / "r.md").exists()  # a report of the first images would pass for the whole set


def test_images_in_sub_folders_are_said_to_be_left_out(folders, tmp_path):
    # a deblur --recursive output keeps its sub-folders: only the folder's own images pair, and
    # a mean over fewer images than there are must not pass for all of them
    for d in ("pred", "gt"):
        _write(folders / d / "more" / "d.png", _read(folders / "gt" / "a.png"))
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    said = "1 image(s) in its sub-folders are not scored"
    assert f"--pred {folders / 'pred'}: {said}" in res.output and f"--target {folders / 'gt'}: {said}" in res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["images"]) == 3 and sum(said in n for n in report["notes"]) == 2
    res = invoke("--pred", folders / "pred" / "more", "--target", folders / "gt" / "more")
    assert res.exit_code == 0 and "not scored" not in res.output


def test_the_model_sees_a_transparent_photo_as_kpac_deblur_does(tmp_path, tiny_models):
    """Colours under alpha 0 (here black beside bright visible pixels) are not shown to the model
    by kpac deblur; eval --method kpac ran the model on them, so its score was not that of the
    photo kpac deblur writes. Now both score alike."""
    rng = np.random.default_rng(11)
    sharp = _scene(rng)
    blurred = np.clip(convolve(sharp, disc_psf(2.0)) + 0.3, 0, 1)
    alpha = np.ones((H, W), np.float32)
    alpha[:, : W // 3] = 0.0
    blurred[:, : W // 3] = 0.0  # what straight alpha often leaves under transparency
    info = ImageInfo(path=None, format="png", bit_depth=8, channels=4, alpha=alpha, icc_profile=None, exif=None,
                     orientation_applied=1, size=(H, W))
    (tmp_path / "src").mkdir()
    write_image(tmp_path / "src" / "a.png", blurred.astype(np.float32), info)
    _write(tmp_path / "gt" / "a.png", sharp)
    res = runner.invoke(app, ["deblur", str(tmp_path / "src" / "a.png"), "-o", str(tmp_path / "pred" / "a.png"),
                              "--model", str(tiny_models[0])], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    via_file = records(invoke("--pred", tmp_path / "pred", "--target", tmp_path / "gt", "--no-lpips", "--json"))[0]
    in_memory = records(invoke("--source", tmp_path / "src", "--target", tmp_path / "gt", "--model", tiny_models[0],
                               "--device", "cpu", "--no-lpips", "--json"))[0]
    assert in_memory["psnr"] == pytest.approx(via_file["psnr"], abs=1e-9)


def test_images_in_formats_kpac_does_not_read_are_said_to_be_left_out(folders, tmp_path):
    # a WebP of one name on both sides pairs with nothing and is passed over: the report must not
    # hold a mean over fewer images than the folders without a word
    from PIL import Image

    for d in ("pred", "gt"):
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(folders / d / "d.webp")
    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    said = "1 image(s) in a format kpac does not read are not scored (d.webp)"
    assert f"--pred {folders / 'pred'}: {said}" in res.output and f"--target {folders / 'gt'}: {said}" in res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["images"]) == 3 and sum(said in n for n in report["notes"]) == 2


def test_reports_record_the_command_and_versions_that_made_them(folders, tmp_path):
    import skimage

    from kpac_cli import __version__

    res = invoke("--pred", folders / "pred", "--target", folders / "gt", "--bit-depth", "16", "--ssim", "gaussian",
                 "--no-lpips", "--report", tmp_path / "r.json", "--report", tmp_path / "r.md", "--json", "--quiet")
    assert res.exit_code == 0, res.output
    command = (f"kpac eval --pred {folders / 'pred'} --target {folders / 'gt'} --bit-depth 16 --ssim gaussian --no-lpips "
               f"--report {tmp_path / 'r.json'} --report {tmp_path / 'r.md'} --json --quiet")
    versions = {"kpac": __version__, "scikit-image": skimage.__version__, "numpy": np.__version__, "torch": str(torch.__version__)}
    for run in (json.loads((tmp_path / "r.json").read_text())["run"], records(res)[-1]):
        assert run["command"] == command
        assert versions.items() <= run["versions"].items()
    md = (tmp_path / "r.md").read_text()
    assert f"- **command**: `{command}`" in md and f"scikit-image {skimage.__version__}" in md
