"""Training: data pairing, augmentation, the loop, checkpoints, resume, export, the CLI.

Everything runs on tiny models (2 levels, 8 channels) and tiny crops on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import uniform_filter, zoom
from typer.testing import CliRunner

from kpac_cli.checkpoints import load_checkpoint
from kpac_cli.images import ImageError, read_image, read_image_codes
from kpac_cli.model import KPACConfig, build_model
from kpac_cli.train import (
    CropSchedule,
    DataError,
    LRSchedule,
    TrainConfig,
    TrainingError,
    VGGWeightsMissing,
    dpdd_split,
    export_model,
    folder_pairs,
    load_state,
    train,
)
from kpac_cli.train import data as D
from kpac_cli.train import loop as L
from kpac_cli.train import state as S

TINY = KPACConfig(levels=2, channels=8)
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# Fixtures: a tiny DPDD-layout dataset of 16-bit PNGs
# --------------------------------------------------------------------------------------


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def write_png(path: Path, img: np.ndarray, filters: str = "none", rng: np.random.Generator | None = None) -> None:
    """A minimal PNG encoder (8/16-bit grey/RGB/RGBA); ``filters='random'`` uses all 5 row filters."""
    h, w, c = img.shape
    bits = 16 if img.dtype == np.uint16 else 8
    data = img.astype(">u2" if bits == 16 else "u1").reshape(h, -1).view(np.uint8).astype(np.int32)
    bpp = c * bits // 8
    rows, prev = [], np.zeros(data.shape[1], np.int32)
    for y in range(h):
        x = data[y]
        a = np.concatenate([np.zeros(bpp, np.int32), x[:-bpp]])
        cc = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
        ft = int(rng.integers(5)) if filters == "random" else 0
        pred = [0 * x, a, prev, (a + prev) // 2, _paeth(a, prev, cc)][ft]
        rows.append(bytes([ft]) + ((x - pred) % 256).astype(np.uint8).tobytes())
        prev = x

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, bits, {1: 0, 3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(rows), 1)) + chunk(b"IEND", b""))


def _to16(a: np.ndarray) -> np.ndarray:
    return np.round(np.clip(a, 0, 1) * 65535).astype(np.uint16)


def make_dpdd(root: Path, counts=None, size=(48, 64), dual=False, seed=0) -> Path:
    """DPDD layout; sharp = blocky random texture, source = its box blur. Names differ like DPDD's."""
    counts = counts or {"train": 6, "val": 2}
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        views = ["c", "l", "r"] if dual else ["c"]
        for v in views:
            for sub in (["source", "target"] if v == "c" else ["source"]):
                (root / f"{split}_{v}" / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            sharp = zoom(rng.random((size[0] // 4, size[1] // 4, 3)), (4, 4, 1), order=0)
            blur = uniform_filter(sharp, size=(5, 5, 1), mode="reflect")
            write_png(root / f"{split}_c/source/IMG{2 * i + 1:04d}.png", _to16(blur))
            write_png(root / f"{split}_c/target/IMG{2 * i:04d}.png", _to16(sharp))
            if dual:
                write_png(root / f"{split}_l/source/IMG{2 * i + 1:04d}_L.png", _to16(np.roll(blur, 1, 1)))
                write_png(root / f"{split}_r/source/IMG{2 * i + 1:04d}_R.png", _to16(np.roll(blur, -1, 1)))
    return root


@pytest.fixture(scope="module")
def dpdd(tmp_path_factory) -> Path:
    return make_dpdd(tmp_path_factory.mktemp("dpdd"))


def tiny_cfg(out: Path, data: Path, **kw) -> TrainConfig:
    base = dict(out=out, data=data, allow_count_mismatch=True, model=TINY, iterations=12, batch=2, crop="32", lr=1e-3,
                val_every=1000, val_count=2, val_crop=32, save_every=1000, log_every=5, workers=0, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_state(path)["model"]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------
# Reading, pairing, augmentation
# --------------------------------------------------------------------------------------


def test_16bit_png_read_exactly_with_all_row_filters(tmp_path):
    rng = np.random.default_rng(1)
    for c in (3, 4, 1):
        a = (rng.random((23, 37, c)) * 65535).astype(np.uint16)
        a[:10] = np.linspace(0, 65535, 37).astype(np.uint16)[None, :, None]  # smooth rows: filters matter
        write_png(tmp_path / "x.png", a, "random", rng)
        got, depth = read_image_codes(tmp_path / "x.png")
        assert got.dtype == np.uint16 and depth == 16
        want = np.repeat(a[:, :, :1], 3, 2) if c == 1 else a[:, :, :3]
        np.testing.assert_array_equal(got, want)
    b = (rng.random((9, 11, 3)) * 255).astype(np.uint8)
    write_png(tmp_path / "y.png", b, "random", rng)
    np.testing.assert_array_equal(read_image_codes(tmp_path / "y.png")[0], b)


def test_quantise_to_8_bits_rounds(tmp_path):
    a = np.array([0, 128, 129, 257, 385, 386, 65535], np.uint16)
    b = np.array([0, 1, 127, 128, 254, 255, 7], np.uint8)
    for folder in ("s", "t"):
        (tmp_path / folder).mkdir()
        for name, img in (("a", a), ("b", b)):
            write_png(tmp_path / folder / f"{name}.png", np.repeat(img[None, :, None], 3, 2))
    pairs = folder_pairs(tmp_path / "s", tmp_path / "t")
    eight, sixteen = D.PairStore(pairs, 8), D.PairStore(pairs, 16)
    np.testing.assert_array_equal(eight.load(0)["source"][0, :, 0], np.round(a / 257).astype(np.uint8))
    np.testing.assert_array_equal(sixteen.load(0)["source"][0, :, 0], a)
    for store in (eight, sixteen):  # 8-bit data stays as it is at either training depth
        got = store.load(1)["target"]
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got[0, :, 0], b)
    # Training sees exactly the pixels kpac's reader gives (16-bit) or their 8-bit rounding.
    clean = D.paired_validation(sixteen, [0], 0, dual=False)[0]["input"].transpose(1, 2, 0)
    np.testing.assert_array_equal(clean, read_image(tmp_path / "s/a.png")[0])
    np.testing.assert_array_equal(D.paired_validation(eight, [0], 0, dual=False)[0]["input"][0, 0],
                                  np.round(a / 257).astype(np.float32) / np.float32(255))


def test_unreadable_training_image_names_the_file(tmp_path, dpdd, cli):
    src, tgt = tmp_path / "blurred", tmp_path / "sharp"
    src.mkdir(), tgt.mkdir()
    for i, (a, b) in enumerate(zip(sorted((dpdd / "train_c/source").iterdir()), sorted((dpdd / "train_c/target").iterdir()))):
        (src / f"p{i:02d}.png").write_bytes(a.read_bytes())
        (tgt / f"p{i:02d}.png").write_bytes(b.read_bytes())
    (tgt / "p03.png").write_bytes((tgt / "p03.png").read_bytes()[:200])  # truncated
    with pytest.raises(ImageError, match="p03.png"):
        train(tiny_cfg(tmp_path / "r", None, source=src, target=tgt, cache="yes", iterations=2))
    r = CliRunner().invoke(cli, ["train", "--source", str(src), "--target", str(tgt), "--run-dir", str(tmp_path / "r2"),
                                 "--levels", "2", "--channels", "8", "--crop", "32", "--cache", "yes", "--workers", "0"])
    assert r.exit_code == 2 and "p03.png" in r.output and "Traceback" not in r.output


def test_crop_schedule():
    s = CropSchedule("128:20000,256:60000,512")
    assert [s.size_at(i) for i in (0, 19999, 20000, 59999, 60000, 10**7)] == [128, 128, 256, 256, 512, 512]
    assert CropSchedule("64").size_at(5) == 64 and CropSchedule("64:10").size_at(11) == 64
    for bad in ("", "abc", "128,256", "128:10,64:5,32", "4"):
        with pytest.raises(ValueError):
            CropSchedule(bad)
    with pytest.raises(ValueError, match="multiples"):
        CropSchedule("60").check_multiple(8)


def test_lr_schedule_parses_and_steps():
    s = LRSchedule("2e-4:100,1e-4:200,5e-5")
    assert [s.at(i) for i in (0, 99, 100, 199, 200, 10**6)] == [2e-4, 2e-4, 1e-4, 1e-4, 5e-5, 5e-5]
    assert LRSchedule(1e-4).at(7) == 1e-4
    for bad in ("", "x", "1e-4,1e-5", "1e-4:10,1e-5:5,1e-6", "0", "-1e-4", "nan"):
        with pytest.raises(ValueError):
            LRSchedule(bad)
    with pytest.raises(ValueError, match="learning-rate"):
        TrainConfig(procedural=1, lr="1e-4:5,0").validate()


def test_training_follows_the_lr_schedule_and_a_resume_may_retune_it(tmp_path, dpdd):
    res = train(tiny_cfg(tmp_path / "a", dpdd, iterations=10, lr="1e-3:5,2e-4", log_every=5, save_every=5))
    rows = [json.loads(line) for line in (tmp_path / "a/log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["lr"]) for r in rows if r["event"] == "train"] == [(5, 1e-3), (10, 2e-4)]
    assert load_state(tmp_path / "a/last.pt")["optimizer"]["param_groups"][0]["lr"] == 2e-4
    assert "2e-4" in load_checkpoint(res.model_path).provenance["optimizer"]
    # Resume for 5 more iterations with a new rate for the iterations still to come.
    train(tiny_cfg(tmp_path / "a", dpdd, iterations=15, lr="1e-3:5,2e-4:10,5e-5", log_every=5, resume=True))
    assert load_state(tmp_path / "a/last.pt")["optimizer"]["param_groups"][0]["lr"] == 5e-5


def test_cli_resume_accepts_a_new_lr_schedule_but_not_a_new_seed(tmp_path, dpdd):
    from kpac_cli.cli import app

    train(tiny_cfg(tmp_path / "r", dpdd, iterations=4))
    runner = CliRunner()
    r = runner.invoke(app, ["train", "--resume", str(tmp_path / "r"), "--iterations", "6", "--lr", "1e-3:5,1e-5", "--quiet"])
    assert r.exit_code == 0, r.output
    state = load_state(tmp_path / "r/last.pt")
    assert state["step"] == 6 and state["optimizer"]["param_groups"][0]["lr"] == 1e-5
    r = runner.invoke(app, ["train", "--resume", str(tmp_path / "r"), "--iterations", "8", "--seed", "3"])
    assert r.exit_code == 2 and "--seed cannot change" in r.output
    # a run goes on from its last checkpoint: another file named is refused, not silently replaced by last.pt
    shutil.copy(tmp_path / "r/last.pt", tmp_path / "r/snap.pt")
    r = runner.invoke(app, ["train", "--resume", str(tmp_path / "r/snap.pt"), "--iterations", "8"])
    assert r.exit_code == 2 and "continues from its last checkpoint" in r.output and "--init" in r.output
    assert load_state(tmp_path / "r/last.pt")["step"] == 6
    # a weight average may start on resume (from the resumed weights) and is kept from then on
    r = runner.invoke(app, ["train", "--resume", str(tmp_path / "r"), "--iterations", "7", "--ema", "0.9", "--quiet"])
    assert r.exit_code == 0, r.output
    state = load_state(tmp_path / "r/last.pt")
    assert state["step"] == 7 and state["train_config"]["ema"] == 0.9 and state["ema"].keys() == state["model"].keys()
    r = runner.invoke(app, ["train", "--resume", str(tmp_path / "r"), "--iterations", "8", "--ema", "1"])
    assert r.exit_code == 2 and "ema must lie in [0, 1)" in r.output


def test_init_carries_weights_to_fewer_levels_and_to_dual_pixel(tmp_path, dpdd):
    three = train(tiny_cfg(tmp_path / "three", dpdd, model=KPACConfig(levels=3, channels=8), iterations=2, crop="32",
                           val_count=0))
    src = load_checkpoint(three.model_path).state_dict
    messages = []
    two = train(tiny_cfg(tmp_path / "two", dpdd, model=TINY, init=three.model_path, iterations=0, val_count=0),
                callback=lambda ev: messages.append(ev.data.get("text", "")) if ev.kind == "message" else None)
    got = load_checkpoint(two.model_path)
    assert got.config == TINY and all(torch.equal(v, src[k]) for k, v in got.state_dict.items())
    assert any("carried the weights" in m for m in messages)
    dual = train(tiny_cfg(tmp_path / "dual", None, procedural=2, max_radius=3, model=None, dual=True, init=three.model_path,
                          iterations=0, val_count=0))
    w = load_checkpoint(dual.model_path).state_dict["encoder.c0.weight"]
    assert load_checkpoint(dual.model_path).config.in_views == 2
    assert load_checkpoint(dual.model_path).provenance["balance_views"] is True  # synthetic views: no vignetting
    assert "balance_views" not in load_checkpoint(two.model_path).provenance
    assert torch.equal(w[:, :3], src["encoder.c0.weight"] / 2) and torch.equal(w[:, 3:], w[:, :3])
    with pytest.raises(TrainingError, match="channels"):
        train(tiny_cfg(tmp_path / "wide", dpdd, model=KPACConfig(levels=2, channels=12), init=three.model_path,
                       iterations=0, val_count=0))


def test_dpdd_pairs_by_sorted_order_and_checks_counts(tmp_path):
    root = make_dpdd(tmp_path / "d", {"train": 3}, size=(8, 8))
    pairs = dpdd_split(root, "train", allow_count_mismatch=True)
    assert [(p.source.name, p.target.name) for p in pairs] == [
        ("IMG0001.png", "IMG0000.png"), ("IMG0003.png", "IMG0002.png"), ("IMG0005.png", "IMG0004.png")]
    # Not the published 350: refused unless allowed, and the message says why.
    with pytest.raises(DataError, match=r"3 image pairs.*350.*--allow-count-mismatch"):
        dpdd_split(root, "train")
    # A missing target: refused even when other counts are allowed, naming both folders.
    (root / "train_c/target/IMG0002.png").unlink()
    with pytest.raises(DataError, match=r"train_c/source has 3, train_c/target has 2"):
        dpdd_split(root, "train", allow_count_mismatch=True)
    with pytest.raises(DataError, match="train_l/source is missing"):
        dpdd_split(root, "train", dual=True, allow_count_mismatch=True)


def test_folder_pairs_by_name_then_sorted_order(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    src, tgt = tmp_path / "s", tmp_path / "t"
    src.mkdir(), tgt.mkdir()
    for n in ("b", "a"):
        write_png(src / f"{n}.png", img)
        write_png(tgt / f"{n}.png", img)
    assert [(p.source.name, p.target.name) for p in folder_pairs(src, tgt)] == [("a.png", "a.png"), ("b.png", "b.png")]
    write_png(src / "c.png", img)
    with pytest.raises(DataError, match=r"1 image\(s\) in .* have no target of the same name \(e.g. c.png\)"):
        folder_pairs(src, tgt)
    t2 = tmp_path / "t2"
    t2.mkdir()
    for n in ("x", "y", "z"):
        write_png(t2 / f"{n}.png", img)
    notes = []
    pairs = folder_pairs(src, t2, log=notes.append)
    assert [(p.source.stem, p.target.stem) for p in pairs] == [("a", "x"), ("b", "y"), ("c", "z")]
    assert "sorted order" in notes[0]
    (t2 / "z.png").unlink()
    with pytest.raises(DataError, match="counts differ"):
        folder_pairs(src, t2)


def test_samples_are_a_function_of_key_and_augmented(dpdd):
    store = D.PairStore(dpdd_split(dpdd, "train", allow_count_mismatch=True), 8)
    ds = D.PairedDataset(store, seed=3, noise_max=0.03)
    a, b = ds[(5, 16)], ds[(5, 16)]
    assert a["input"].shape == (3, 16, 16) and a["target"].dtype == np.float32
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(ds[(6, 16)]["target"], a["target"])
    # Without noise the input is exactly the (quantised) source crop; noise only touches the input.
    clean = D.PairedDataset(store, seed=3, noise_max=0.0)[(5, 16)]
    np.testing.assert_array_equal(clean["target"], a["target"])
    np.testing.assert_allclose(np.round(clean["input"] * 255), clean["input"] * 255, atol=1e-3)  # 8-bit values
    assert not np.array_equal(clean["input"], a["input"])
    # Every epoch visits every image once.
    assert sorted(ds.order(k) for k in range(6)) == list(range(6))


def test_hflip_swaps_dual_pixel_views():
    left, right = np.arange(12.0).reshape(2, 2, 3), -np.arange(12.0).reshape(2, 2, 3)
    out = D.flip_views({"left": left, "right": right}, hflip=True, vflip=False)
    np.testing.assert_array_equal(out["left"], right[:, ::-1])
    np.testing.assert_array_equal(out["right"], left[:, ::-1])


def test_ranks_draw_disjoint_samples():
    crop = CropSchedule("32").size_at
    s0, s1 = (D.StepBatchSampler(0, 5, 4, crop, rank=r, world=2) for r in (0, 1))
    k0 = {k for b in s0 for k, _ in b}
    k1 = {k for b in s1 for k, _ in b}
    assert not k0 & k1 and k0 | k1 == set(range(40))
    resumed = list(D.StepBatchSampler(3, 5, 4, crop, rank=1, world=2))
    assert resumed == list(s1)[3:]


def test_synthetic_samples_deterministic_and_dual():
    from kpac_cli.synth import SynthSettings, sharp_sources

    srcs = sharp_sources([], include_skimage=False, procedural=2, procedural_size=(64, 64))
    ds = D.SyntheticDataset(srcs, SynthSettings(max_radius=4, dual_pixel=True, layers=3), seed=1, dual=True)
    a, b = ds[(3, 24)], ds[(3, 24)]
    assert a["input"].shape == (6, 24, 24) and a["reference"].shape == (3, 24, 24) and a["target"].shape == (3, 24, 24)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(ds[(4, 24)]["input"], a["input"])


class _Stripes:
    """A sharp "photo" of horizontal stripes, 4 px light and 4 px dark (period 8 px)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def load(self) -> np.ndarray:
        rows = ((np.arange(self.size) // 4) % 2).astype(np.float32) * 0.6 + 0.2
        return np.repeat(np.repeat(rows[:, None, None], self.size, axis=1), 3, axis=2)


def _stripe_periods(target: np.ndarray) -> tuple[float, float]:
    """Stripe period (px) of a (3, H, W) crop down its rows and across its columns: twice the
    mean spacing of the profile's crossings of its mean (inf: no stripes that way)."""
    def period(profile):
        sign = np.sign(profile - profile.mean())
        at = np.flatnonzero(sign[1:] * sign[:-1] < 0)
        return 2 * (at[-1] - at[0]) / (len(at) - 1) if len(at) > 1 else float("inf")
    g = target.mean(axis=0)
    return period(g.mean(axis=1)), period(g.mean(axis=0))


def test_synthetic_sources_keep_their_order_when_names_clash(tmp_path):
    """Unique source names (a_2.png beside a.png and a.jpg) do not reorder a run's sources, so
    the held-out split and the draws stay those of the runs made before."""
    photos = tmp_path / "p"
    photos.mkdir()
    for name in ("a.jpg", "a.png", "a_2.png", "a_2-x.png"):
        write_png(photos / name, np.full((16, 16, 3), 80, np.uint8))
    sources = D._synth_sources(TrainConfig(synthetic=(photos,), crop="32", max_radius=2))
    # a, a_2, a_2 (a clash, in listing order) and a_2-x, as the names were before they were unique
    assert [Path(s.origin).name for s in sources] == ["a.jpg", "a.png", "a_2.png", "a_2-x.png"]
    assert len({s.name for s in sources}) == 4


def test_synthetic_training_skips_the_datasets_kpac_synth_wrote_among_the_photos(tmp_path):
    from kpac_cli.synth import SynthSettings, sharp_sources, write_dataset

    photos = tmp_path / "p"
    photos.mkdir()
    write_png(photos / "a.png", np.full((40, 40, 3), 80, np.uint8))
    write_dataset(sharp_sources([photos], include_skimage=False), photos / "synth", count=2, crop=16, seed=0,
                  settings=SynthSettings(max_radius=2))
    sources = D._synth_sources(TrainConfig(synthetic=(photos,), crop="32", max_radius=2))
    assert [s.name for s in sources] == ["a"]  # not the blurred renders, targets and radius maps


@pytest.mark.parametrize("transpose", [False, True])
def test_synthetic_scenes_are_transposed_half_the_time_when_asked(transpose):
    from kpac_cli.synth import SynthSettings

    ds = D.SyntheticDataset([_Stripes(160)], SynthSettings(max_radius=1, layers=2, noise_sigma=0), seed=3, noise_max=0,
                            transpose=transpose)
    orientations = []
    for key in range(24):
        down, across = _stripe_periods(ds[(key, 64)]["target"])
        assert {down, across} & {float("inf")}, (down, across)  # stripes one way only, never mixed
        orientations.append(across < down)  # True: the stripes stand vertical
    assert (0 < sum(orientations) < 24) if transpose else not any(orientations), orientations


def test_synthetic_scenes_rescaled_into_the_asked_range():
    from kpac_cli.synth import SynthSettings

    settings = SynthSettings(max_radius=1, layers=2, noise_sigma=0)
    plain = D.SyntheticDataset([_Stripes(200)], settings, seed=3, noise_max=0, flips=False)
    assert {_stripe_periods(plain[(k, 64)]["target"])[0] for k in range(8)} == {8.0}
    rescaled = D.SyntheticDataset([_Stripes(200)], settings, seed=3, noise_max=0, flips=False, rescale=0.5)
    periods = [_stripe_periods(rescaled[(k, 64)]["target"])[0] for k in range(24)]
    # downscaled by a factor in [0.5, 1]: periods from 4 to 8 px
    assert all(3.9 < p < 8.1 for p in periods) and min(periods) < 5.5 and max(periods) > 6.5, periods
    # a photo too small to be downscaled that far is downscaled only as far as it fits
    small = D.SyntheticDataset([_Stripes(96)], settings, seed=3, noise_max=0, flips=False, rescale=0.5)
    assert all(_stripe_periods(small[(k, 64)]["target"])[0] > 8 * 70 / 96 - 0.1 for k in range(12))


class _Tint:
    """A sharp "photo" of one muted colour (luma 0.5) with a faint horizontal ramp."""

    colour = np.array([0.6, 0.48, 0.42], np.float32)

    def load(self) -> np.ndarray:
        ramp = np.linspace(-0.05, 0.05, 160, dtype=np.float32)[:, None, None]
        return np.broadcast_to(self.colour + ramp, (160, 160, 3)).copy()


def test_synthetic_scenes_made_more_colourful_within_the_asked_range():
    from kpac_cli.synth import SynthSettings
    from kpac_cli.synth.scenes import scale_saturation

    luma = np.array([0.2126, 0.7152, 0.0722], np.float32)
    chroma = lambda img: float(np.abs(img - (img @ luma)[..., None]).mean())  # noqa: E731
    img = _Tint().load()
    np.testing.assert_allclose(chroma(scale_saturation(img, 2.0)), 2 * chroma(img), rtol=1e-5)
    single = img[..., :1]
    assert chroma(scale_saturation(img, 0.0)) < 1e-6 and scale_saturation(single, 2.0) is single
    settings = SynthSettings(max_radius=1, layers=2, noise_sigma=0)
    plain = D.SyntheticDataset([_Tint()], settings, seed=3, noise_max=0, flips=False)
    vivid = D.SyntheticDataset([_Tint()], settings, seed=3, noise_max=0, flips=False, saturation=2.0)
    base = chroma(plain[(0, 48)]["target"].transpose(1, 2, 0))
    ratios = [chroma(vivid[(k, 48)]["target"].transpose(1, 2, 0)) / base for k in range(16)]
    assert all(0.99 < r < 2.01 for r in ratios) and min(ratios) < 1.4 and max(ratios) > 1.6, ratios
    assert {round(chroma(plain[(k, 48)]["target"].transpose(1, 2, 0)) / base, 4) for k in range(8)} == {1.0}


def test_rescale_and_transpose_are_checked_and_described(tmp_path):
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="rescale"):
            TrainConfig(procedural=2, rescale=bad).validate()
    with pytest.raises(ValueError, match="saturation"):
        TrainConfig(procedural=2, saturation=0.5).validate()
    for scene_change in ({"transpose": True}, {"saturation": 1.5}):
        with pytest.raises(ValueError, match="synthetic data"):
            TrainConfig(data=tmp_path, **scene_change).validate()
    res = train(TrainConfig(out=tmp_path / "s", procedural=3, model=TINY, iterations=2, batch=1, crop="32", max_radius=3,
                            rescale=0.6, transpose=True, saturation=1.5, val_count=1, val_crop=32, workers=0, tensorboard=False))
    assert ("rescaled by [0.6, 1], transposed half the time, colour saturation x [1, 1.5]"
            in load_checkpoint(res.model_path).provenance["trained_on"])


# --------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------


def test_training_reduces_the_loss_and_exports(tmp_path, dpdd):
    events = []
    cfg = tiny_cfg(tmp_path / "run", dpdd, iterations=60, lr=3e-3, val_every=30, val_crop=0, save_every=25)
    res = train(cfg, callback=events.append)
    assert res.step == 60 and not res.interrupted and res.skipped == 0
    assert np.mean(res.losses[-8:]) < 0.9 * np.mean(res.losses[:8])
    kinds = [e.kind for e in events]
    assert kinds[0] in ("load", "start") and kinds[-1] == "end" and kinds.count("step") == 60 and kinds.count("val") == 2
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "train"] == list(range(5, 61, 5))
    assert [r["step"] for r in log if r["event"] == "val"] == [30, 60]
    # at the end: once before the final validation (it may take minutes), once with its scores
    assert [r["step"] for r in log if r["event"] == "checkpoint" and r["kind"] == "last"] == [25, 50, 60, 60]
    # The exported model is kpac's checkpoint format and holds the final weights.
    ck = load_checkpoint(res.model_path)
    assert ck.config == TINY
    assert_same_tensors(ck.state_dict, weights(res.last_checkpoint))
    prov = ck.provenance
    assert prov["iterations"] == 60 and prov["stage"] == "l1" and prov["batch"] == 2 and prov["crop"] == "32"
    assert "DPDD" in prov["trained_on"] and prov["scores"]["psnr"] == pytest.approx(res.scores["psnr"])
    assert prov["hardware"]["device"] == "cpu" and prov["wall_clock_s"] >= 0
    assert prov["hardware"]["precision"] == str(L.resolve_precision(cfg.precision, torch.device("cpu"))).removeprefix("torch.")
    model = ck.build()
    x = torch.zeros(1, 3, 16, 16)
    assert model(x).shape == x.shape
    # last.pt is also readable by the generic loader (config + model keys).
    assert load_checkpoint(res.last_checkpoint).config == TINY


def test_resume_after_sigterm_is_bit_exact(tmp_path, dpdd):
    straight = train(tiny_cfg(tmp_path / "a", dpdd, iterations=10, val_every=4))

    def stop_at_5(ev):
        if ev.kind == "step" and ev.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # noticed at the next iteration, which then completes

    part = train(tiny_cfg(tmp_path / "b", dpdd, iterations=10, val_every=4), callback=stop_at_5)
    assert part.interrupted and part.signal == signal.SIGTERM and part.step == 5 and part.model_path is None
    assert load_state(tmp_path / "b/last.pt")["step"] == 5
    # Resume with a DataLoader worker this time: samples do not depend on who draws them.
    done = train(tiny_cfg(tmp_path / "b", dpdd, iterations=10, val_every=4, resume=True, workers=1))
    assert done.step == 10 and len(done.losses) == 5
    assert done.losses == straight.losses[5:]
    a, b = load_state(tmp_path / "a/last.pt"), load_state(tmp_path / "b/last.pt")
    assert_same_tensors(a["model"], b["model"])
    for (ka, va), (kb, vb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert ka == kb and all(torch.equal(va[n], vb[n]) for n in va)
    assert_same_tensors(load_checkpoint(straight.model_path).state_dict, load_checkpoint(done.model_path).state_dict)


def test_ema_averages_the_weights_and_is_what_gets_validated_and_exported(tmp_path, dpdd):
    cfg = tiny_cfg(tmp_path / "e", dpdd, iterations=1, ema=0.5, val_every=1)
    torch.manual_seed(cfg.seed)
    w0 = build_model(TINY).state_dict()  # the weights the run starts from
    res = train(cfg)
    st = load_state(tmp_path / "e/last.pt")
    w1, avg = st["model"], st["ema"]
    assert avg.keys() == w1.keys()
    for k in w1:  # one step with decay 0.5: the mean of the weights before and after it
        assert not torch.equal(w1[k], w0[k]), k
        torch.testing.assert_close(avg[k], (w0[k] + w1[k]) / 2, rtol=0, atol=1e-7)
    exported = load_checkpoint(res.model_path)
    assert_same_tensors(exported.state_dict, avg)
    assert_same_tensors(load_checkpoint(L.export_model(tmp_path / "e", tmp_path / "x.safetensors")).state_dict, avg)
    assert exported.provenance["weight_average"] == "exponential moving average, decay 0.5"
    # a checkpoint loaded as a model (kpac deblur --model RUN/best.pt, --init, --blend-with) is the average too
    assert_same_tensors(load_checkpoint(tmp_path / "e/last.pt").state_dict, avg)
    assert_same_tensors(L._init_weights(tmp_path / "e")[1], avg)
    # validation scored the average, not the raw weights
    bundle = L.build_data(cfg.replace(model=TINY), TINY.stride, rank=0, local_world=1, log=lambda *a, **k: None)
    cpu = torch.device("cpu")

    def val_psnr(state):
        model = build_model(TINY)
        model.load_state_dict(state)
        model.to(memory_format=torch.channels_last)  # as the run validates
        return L.validate(model, bundle.val, cpu, L.resolve_precision(cfg.precision, cpu), channels_last=True)["psnr"]

    assert res.scores["psnr"] == val_psnr(avg) != val_psnr(w1)


def test_resume_with_ema_is_bit_exact(tmp_path, dpdd):
    straight = train(tiny_cfg(tmp_path / "a", dpdd, iterations=8, ema=0.9))
    part = train(tiny_cfg(tmp_path / "b", dpdd, iterations=4, ema=0.9))
    assert part.step == 4
    done = train(tiny_cfg(tmp_path / "b", dpdd, iterations=8, ema=0.9, resume=True))
    assert done.step == 8 and done.losses == straight.losses[4:]
    assert_same_tensors(load_state(tmp_path / "a/last.pt")["ema"], load_state(tmp_path / "b/last.pt")["ema"])
    assert_same_tensors(load_checkpoint(straight.model_path).state_dict, load_checkpoint(done.model_path).state_dict)


def test_nonfinite_loss_skips_the_batch(tmp_path, dpdd, monkeypatch):
    calls = {"n": 0}
    real = L.l1_loss

    def flaky(pred, target):
        calls["n"] += 1
        loss = real(pred, target)
        return loss * float("nan") if calls["n"] in (3, 4) else loss

    monkeypatch.setattr(L, "l1_loss", flaky)
    events = []
    res = train(tiny_cfg(tmp_path / "r", dpdd, iterations=8), callback=events.append)
    assert res.step == 8 and res.skipped == 2
    assert np.isnan(res.losses[2]) and np.isnan(res.losses[3]) and np.isfinite(res.losses[4])
    assert [e.step for e in events if e.kind == "nonfinite"] == [3, 4]
    st = load_state(tmp_path / "r/last.pt")
    assert all(int(s["step"]) == 6 for s in st["optimizer"]["state"].values())  # 8 batches, 6 optimiser steps
    assert all(torch.isfinite(t).all() for t in st["model"].values())


def test_persistent_nonfinite_loss_stops_without_writing(tmp_path, dpdd, monkeypatch):
    train(tiny_cfg(tmp_path / "r", dpdd, iterations=4))
    before = (tmp_path / "r/last.pt").read_bytes()
    (tmp_path / "r/model.safetensors").unlink()
    monkeypatch.setattr(L, "l1_loss", lambda p, t: (p - t).abs().mean() * float("inf"))
    with pytest.raises(TrainingError, match=r"3 non-finite losses in a row.*last good checkpoint"):
        train(tiny_cfg(tmp_path / "r", dpdd, iterations=20, resume=True, max_nonfinite=3))
    assert (tmp_path / "r/last.pt").read_bytes() == before
    assert not (tmp_path / "r/model.safetensors").exists()


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, dpdd, monkeypatch):
    train(tiny_cfg(tmp_path / "r", dpdd, iterations=4))
    good = weights(tmp_path / "r/last.pt")

    def torn(obj, f):  # as if killed half-way through the write
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(S, "_write", torn)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_cfg(tmp_path / "r", dpdd, iterations=8, save_every=2, resume=True))
    st = load_state(tmp_path / "r/last.pt")
    assert st["step"] == 4
    assert_same_tensors(st["model"], good)
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.endswith((".tmp", ".kpac-tmp"))]
    # A writer killed with SIGKILL cannot clean up; its temp file goes at the next start.
    monkeypatch.undo()
    (tmp_path / "r/.last.pt.99999.tmp").write_bytes(b"torn")
    train(tiny_cfg(tmp_path / "r", dpdd, iterations=5, resume=True))
    assert load_state(tmp_path / "r/last.pt")["step"] == 5 and not (tmp_path / "r/.last.pt.99999.tmp").exists()


def test_perceptual_stage_without_vgg_weights_stops_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cfg = tiny_cfg(tmp_path / "p", tmp_path / "no-such-dataset", stage="perceptual")
    t0 = time.monotonic()
    with pytest.raises(VGGWeightsMissing) as e:
        train(cfg)
    msg = str(e.value)
    assert str(tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth") in msg and "--vgg-weights" in msg
    assert time.monotonic() - t0 < 5 and not (tmp_path / "p").exists()
    with pytest.raises(VGGWeightsMissing, match="not found"):
        train(cfg.replace(vgg_weights=tmp_path / "missing.pth"))


def _fake_vgg19(path: Path) -> None:
    """A file in torchvision's vgg19 layout (random values; the shapes are what matters)."""
    from kpac_cli.train.vgg import VGG19Features

    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in VGG19Features().state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # extra keys are ignored
    torch.save(state, path)


def test_perceptual_stage_runs_from_an_l1_model(tmp_path, dpdd):
    l1 = train(tiny_cfg(tmp_path / "l1", dpdd, iterations=3, val_count=0))
    _fake_vgg19(tmp_path / "vgg.pth")
    res = train(tiny_cfg(tmp_path / "perc", dpdd, model=None, stage="perceptual", init=l1.model_path, iterations=3,
                         vgg_weights=tmp_path / "vgg.pth", val_count=0))
    ck = load_checkpoint(res.model_path)
    assert ck.config == TINY and ck.provenance["stage"] == "perceptual" and "VGG" in ck.provenance["loss"]
    assert ck.provenance["init"] == str(l1.model_path)
    assert load_state(tmp_path / "perc/last.pt")["optimizer"]["param_groups"][0]["lr"] == 1e-3
    assert TrainConfig(stage="perceptual").learning_rate == 5e-5 and TrainConfig(stage="perceptual").total_iterations == 100_000


def test_synthetic_training_runs(tmp_path):
    res = train(TrainConfig(out=tmp_path / "s", procedural=3, model=TINY, iterations=3, batch=1, crop="32", max_radius=3,
                            val_count=1, val_crop=32, workers=0, tensorboard=False))
    assert res.step == 3 and "psnr" in res.scores
    assert "synthetic" in load_checkpoint(res.model_path).provenance["trained_on"]


def test_dual_pixel_dpdd_training(tmp_path):
    root = make_dpdd(tmp_path / "dual", {"train": 2, "val": 1}, size=(32, 32), dual=True)
    pairs = dpdd_split(root, "train", dual=True, allow_count_mismatch=True)
    assert pairs[0].left.name == "IMG0001_L.png" and pairs[0].right.name == "IMG0001_R.png"
    sample = D.PairedDataset(D.PairStore(pairs), noise_max=0, dual=True)[(0, 16)]
    assert sample["input"].shape == (6, 16, 16) and sample["reference"].shape == (3, 16, 16)
    res = train(tiny_cfg(tmp_path / "r", root, dual=True, model=None, iterations=2, val_crop=16))
    cfg = load_checkpoint(res.model_path).config
    assert cfg.in_views == 2 and cfg.levels == 3 and "psnr" in res.scores  # --dual alone: the paper's dual model


def test_paired_folders_16bit_uncached_with_holdout(tmp_path, dpdd):
    src, tgt = tmp_path / "blurred", tmp_path / "sharp"
    src.mkdir(), tgt.mkdir()
    files = sorted((dpdd / "train_c/source").iterdir())[:5] + sorted((dpdd / "val_c/source").iterdir())
    targets = sorted((dpdd / "train_c/target").iterdir())[:5] + sorted((dpdd / "val_c/target").iterdir())
    # 14 pairs, none twice (a held-out pair must be no training pair): the second 7 take other targets
    for i, (a, b) in enumerate(zip(files * 2, targets + targets[1:] + targets[:1])):
        (src / f"p{i:02d}.png").write_bytes(a.read_bytes())
        (tgt / f"p{i:02d}.png").write_bytes(b.read_bytes())
    notes = []
    res = train(tiny_cfg(tmp_path / "r", None, source=src, target=tgt, bit_depth=16, cache="no", iterations=2),
                callback=lambda e: notes.append(e.data.get("text", "")) if e.kind == "message" else None)
    assert any("holding out 1" in n for n in notes) and "psnr" in res.scores
    assert "paired folders" in load_checkpoint(res.model_path).provenance["trained_on"]
    store = D.PairStore(folder_pairs(src, tgt), 16)
    assert store.load(0)["source"].dtype == np.uint16


def test_bf16_and_channels_last_on_cpu(tmp_path, dpdd):
    res = train(tiny_cfg(tmp_path / "r", dpdd, iterations=2, precision="bf16", channels_last=True))
    assert res.skipped == 0 and all(np.isfinite(res.losses))
    with pytest.raises(TrainingError, match="fp16 training needs a CUDA GPU"):
        train(tiny_cfg(tmp_path / "r2", dpdd, precision="fp16"))


def _start_event(cfg: TrainConfig) -> dict:
    """The start event's data of a run of ``cfg``, after checking its losses were finite."""
    events = []
    res = train(cfg, callback=lambda e: events.append(e.data) if e.kind == "start" else None)
    assert res.skipped == 0 and all(np.isfinite(res.losses))
    return events[0]


def test_bf16_without_hardware_bf16_warns(tmp_path, dpdd, monkeypatch):
    monkeypatch.setattr(L, "cpu_has_fast_bf16", lambda: False)
    warnings = []
    train(tiny_cfg(tmp_path / "r", dpdd, iterations=1, precision="bf16"),
          callback=lambda e: warnings.append(e.data["text"]) if e.kind == "message" and e.data.get("level") == "warning" else None)
    assert any("emulated" in w for w in warnings)
    monkeypatch.setattr(L, "cpu_has_fast_bf16", lambda: True)
    warnings.clear()
    train(tiny_cfg(tmp_path / "r2", dpdd, iterations=1, precision="bf16"),
          callback=lambda e: warnings.append(e.data["text"]) if e.kind == "message" and e.data.get("level") == "warning" else None)
    assert not any("emulated" in w for w in warnings)


def test_cpu_defaults_channels_last_and_bf16_only_with_hardware_bf16(tmp_path, dpdd, monkeypatch):
    # this machine's own answer agrees with the flags its kernel reports
    flags = next((ln.split() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), None) \
        if Path("/proc/cpuinfo").exists() else None
    if flags is not None:
        assert L.cpu_has_fast_bf16() == bool({"amx_bf16", "avx512_bf16"} & set(flags))
    cpu = torch.device("cpu")
    monkeypatch.setattr(L, "cpu_has_fast_bf16", lambda: False)
    assert L.resolve_precision("auto", cpu) == torch.float32
    start = _start_event(tiny_cfg(tmp_path / "a", dpdd, iterations=2))
    assert start["precision"] == "float32" and start["channels_last"] is True
    monkeypatch.setattr(L, "cpu_has_fast_bf16", lambda: True)
    assert L.resolve_precision("auto", cpu) == torch.bfloat16
    assert L.resolve_precision("fp32", cpu) == torch.float32  # an explicit choice wins
    start = _start_event(tiny_cfg(tmp_path / "b", dpdd, iterations=2, channels_last=False))
    assert start["precision"] == "bfloat16" and start["channels_last"] is False


def test_optimiser_state_lives_beside_the_checkpoint(tmp_path, dpdd):
    run = tmp_path / "r"
    train(tiny_cfg(run, dpdd, iterations=4, save_every=2))
    companions = sorted(p.name for p in run.glob("last.optim-*.pt"))
    assert len(companions) == 1  # the one of step 2 was removed after step 4 was saved
    head = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert head["optimizer"]["state"] == {} and head["optimizer_state"]["file"] == companions[0]
    full = load_state(run / "last.pt")
    assert full["optimizer"]["state"] and all("exp_avg_sq" in v for v in full["optimizer"]["state"].values())
    export_model(run, tmp_path / "m.safetensors")
    # a damaged or missing companion is an error when resuming, never a resume without moments
    companion = run / companions[0]
    data = companion.read_bytes()
    companion.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(S.CheckpointError, match="damaged"):
        load_state(run / "last.pt")
    companion.unlink()
    with pytest.raises(S.CheckpointError, match="missing"):
        train(tiny_cfg(run, dpdd, iterations=6, resume=True))
    assert load_state(run / "last.pt", optimizer=False)["step"] == 4  # the weights still read, and export
    export_model(run, tmp_path / "m2.safetensors")


def test_a_checkpoint_with_inline_optimiser_state_still_resumes(tmp_path, dpdd):
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny_cfg(a, dpdd, iterations=6))
    train(tiny_cfg(b, dpdd, iterations=3))
    inline = load_state(b / "last.pt")  # as earlier versions wrote it: one file
    S.atomic_save(inline, b / "last.pt")
    for p in b.glob("last.optim-*.pt"):
        p.unlink()
    train(tiny_cfg(b, dpdd, iterations=6, resume=True))
    assert_same_tensors(weights(a / "last.pt"), weights(b / "last.pt"))


def test_config_errors(tmp_path, dpdd):
    with pytest.raises(TrainingError, match="no training data"):
        train(TrainConfig(out=tmp_path / "x"))
    with pytest.raises(TrainingError, match="multiples of the model stride 4"):
        train(tiny_cfg(tmp_path / "x", dpdd, crop="30"))
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(tiny_cfg(tmp_path / "x", dpdd, resume=True))
    with pytest.raises(DataError, match="350"):
        train(tiny_cfg(tmp_path / "x", dpdd, allow_count_mismatch=False))


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli():
    from kpac_cli.cli import app

    return app


def test_cli_train_resume_and_export(tmp_path, dpdd, cli):
    runner = CliRunner()
    run = tmp_path / "run"
    common = ["--levels", "2", "--channels", "8", "--batch", "2", "--crop", "32", "--val-crop", "32",
              "--val-count", "2", "--workers", "0", "--no-tensorboard"]
    r = runner.invoke(cli, ["train", "--data", str(dpdd), "--allow-count-mismatch", "--run-dir", str(run),
                            "--iterations", "3", "--json", *common])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["step"] == 3 and rec["model_path"] == str(run / "model.safetensors")
    # A finished run is not overwritten by accident.
    r = runner.invoke(cli, ["train", "--data", str(dpdd), "--allow-count-mismatch", "--run-dir", str(run), *common])
    assert r.exit_code == 2 and "--resume" in r.output
    # Resuming takes the stored recipe; only execution settings (and the schedules) may change.
    r = runner.invoke(cli, ["train", "--resume", str(run), "--batch", "3"])
    assert r.exit_code == 2 and "--batch cannot change" in r.output
    r = runner.invoke(cli, ["train", "--resume", str(run), "--iterations", "5", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 5
    out = tmp_path / "exported.safetensors"
    r = runner.invoke(cli, ["train", "--export-only", "--resume", str(run), "--from", "best", "-o", str(out)])
    assert r.exit_code == 0, r.output
    ck = load_checkpoint(out)
    assert ck.config == TINY and ck.provenance["exported_from"] == "best.pt"
    assert export_model(run).name == "model.safetensors"


def test_cli_usage_errors(tmp_path, dpdd, cli):
    runner = CliRunner()
    r = runner.invoke(cli, ["train", "--data", str(dpdd), "--run-dir", str(tmp_path / "r"), "--levels", "2", "--channels", "8"])
    assert r.exit_code == 2 and "350" in r.output
    r = runner.invoke(cli, ["train", "--source", str(dpdd)])
    assert r.exit_code == 2 and "together" in r.output
    r = runner.invoke(cli, ["train", "--data", str(dpdd), "--levels", "4"])
    assert r.exit_code == 2 and "levels" in r.output


def test_cli_export_only_refuses_an_existing_output(tmp_path, dpdd, cli):
    train(tiny_cfg(tmp_path / "run", dpdd, iterations=2, val_count=0))
    precious = tmp_path / "precious.safetensors"
    precious.write_text("my notes")
    runner = CliRunner()
    r = runner.invoke(cli, ["train", "--export-only", "--resume", str(tmp_path / "run"), "-o", str(precious)])
    assert r.exit_code == 2 and "exists" in r.output and "Traceback" not in r.output
    assert precious.read_text() == "my notes"
    out = tmp_path / "new.safetensors"
    r = runner.invoke(cli, ["train", "--export-only", "--resume", str(tmp_path / "run"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert load_checkpoint(out).config == TINY
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".kpac-tmp")]


def test_cli_missing_synthetic_source_is_a_usage_error(tmp_path, cli):
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "--synthetic", str(tmp_path / "no-such-folder"), "--run-dir", str(run),
                                 "--levels", "2", "--channels", "8", "--crop", "32", "--iterations", "2", "--workers", "0"])
    assert r.exit_code == 2 and "no such file or directory" in r.output and "no-such-folder" in r.output
    assert "Traceback" not in r.output and not run.exists()


def test_cli_unavailable_device_is_a_usage_error(tmp_path, cli):
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "--procedural", "1", "--device", "cuda:99", "--run-dir", str(run),
                                 "--levels", "2", "--channels", "8", "--crop", "32", "--iterations", "2", "--workers", "0"])
    assert r.exit_code == 2 and "cuda:99" in r.output and not run.exists()


def test_cli_resume_accepts_unchanged_architecture_flags(tmp_path, dpdd, cli):
    run = tmp_path / "run"
    train(tiny_cfg(run, dpdd, iterations=2, val_count=0))  # TINY: 2 levels, 8 channels, the rest as in the paper
    runner = CliRunner()
    r = runner.invoke(cli, ["train", "--resume", str(run), "--levels", "2", "--channels", "8", "--dilations", "1,2,3,4,5",
                            "--iterations", "3", "--quiet"])
    assert r.exit_code == 0, r.output
    assert load_state(run / "last.pt")["step"] == 3
    r = runner.invoke(cli, ["train", "--resume", str(run), "--levels", "3", "--channels", "8", "--iterations", "4"])
    assert r.exit_code == 2 and "--levels cannot change" in r.output and "--channels" not in r.output
    r = runner.invoke(cli, ["train", "--resume", str(run), "--no-shape-attention", "--iterations", "4"])
    assert r.exit_code == 2 and "--no-shape-attention cannot change" in r.output
    assert load_state(run / "last.pt")["step"] == 3


def test_cli_help_has_an_example():
    r = subprocess.run([sys.executable, "-m", "kpac_cli", "train", "--help"], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "COLUMNS": "200"}, timeout=120)
    assert r.returncode == 0 and "kpac train --data DPDD --run-dir runs/l1" in r.stdout and "--crop" in r.stdout


def test_cli_ctrl_c_saves_and_exits_130(tmp_path, dpdd):
    """A real SIGINT to the real command (with a DataLoader worker) saves last.pt and exits 130."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "kpac_cli", "train", "--data", str(dpdd), "--allow-count-mismatch", "--run-dir", str(run),
           "--levels", "2", "--channels", "8", "--batch", "1", "--crop", "32", "--iterations", "1000000", "--val-count", "0",
           "--workers", "1", "--threads", "1", "--log-every", "1", "--no-tensorboard"]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    log = run / "log.jsonl"
    while time.monotonic() < deadline and not (log.exists() and '"train"' in log.read_text()):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    st = load_state(run / "last.pt")
    assert st["step"] >= 1 and f"continue with: kpac train --resume {run}\n" in err  # one line to copy, however long


def test_cli_sigterm_to_the_process_group_saves_and_exits_143(tmp_path, dpdd):
    """timeout(1) and batch schedulers signal the whole process group, DataLoader workers
    included: the run still saves last.pt and stops cleanly instead of dying of a lost worker."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "kpac_cli", "train", "--data", str(dpdd), "--allow-count-mismatch", "--run-dir", str(run),
           "--levels", "2", "--channels", "8", "--batch", "1", "--crop", "32", "--iterations", "1000000", "--val-count", "0",
           "--workers", "2", "--threads", "1", "--log-every", "1", "--no-tensorboard"]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 240  # a loaded machine starts three Python processes slowly
    log = run / "log.jsonl"
    while not (log.exists() and '"train"' in log.read_text()):
        if time.monotonic() > deadline or p.poll() is not None:
            os.killpg(p.pid, signal.SIGKILL)
            pytest.fail(f"the run did not reach its first iteration: {p.communicate()[1][-2000:]}")
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGTERM)  # in the loop, where the handlers are: not during the set-up
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "continue with: kpac train --resume" in err
    assert load_state(run / "last.pt")["step"] >= 1


def test_cli_scene_augmentation_is_stored_and_may_be_switched_when_resuming(tmp_path, cli):
    runner, run = CliRunner(), tmp_path / "run"
    common = ["--levels", "2", "--channels", "8", "--batch", "1", "--crop", "32", "--max-radius", "3", "--val-crop", "32",
              "--val-count", "1", "--workers", "0", "--no-tensorboard"]
    r = runner.invoke(cli, ["train", "--procedural", "3", "--run-dir", str(run), "--iterations", "1", "--rescale", "0.7",
                            "--transpose", "--saturation", "1.5", *common])
    assert r.exit_code == 0, r.output
    stored = load_state(run / "last.pt")["train_config"]
    assert stored["rescale"] == 0.7 and stored["transpose"] is True and stored["saturation"] == 1.5
    r = runner.invoke(cli, ["train", "--resume", str(run), "--iterations", "2", "--rescale", "1"])
    assert r.exit_code == 0, r.output
    stored = load_state(run / "last.pt")["train_config"]
    assert stored["rescale"] == 1.0 and stored["transpose"] is True and load_state(run / "last.pt")["step"] == 2
    r = runner.invoke(cli, ["train", "--resume", str(run), "--iterations", "3", "--rescale", "0"])
    assert r.exit_code == 2 and "rescale" in r.output


def test_export_blends_the_run_with_another_model_of_its_architecture(tmp_path, dpdd, cli):
    a = train(tiny_cfg(tmp_path / "a", dpdd, iterations=2, val_count=0))
    b = train(tiny_cfg(tmp_path / "b", dpdd, iterations=3, val_count=0, seed=1))  # other weights, same architecture
    wa, wb = load_checkpoint(a.model_path).state_dict, load_checkpoint(b.model_path).state_dict
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    out = export_model(tmp_path / "a", tmp_path / "blend.safetensors", blend_with=b.model_path, blend=0.25)
    ck = load_checkpoint(out)
    for k, v in ck.state_dict.items():
        torch.testing.assert_close(v, 0.25 * wa[k] + 0.75 * wb[k], rtol=0, atol=1e-7)
    assert ck.provenance["weight_blend"] == {"fraction_of_run": 0.25, "with": "model.safetensors",
                                             "with_sha256": hashlib.sha256(b.model_path.read_bytes()).hexdigest()}
    assert_same_tensors(load_checkpoint(export_model(tmp_path / "a", tmp_path / "one.safetensors", blend_with=b.model_path,
                                                     blend=1.0)).state_dict, wa)
    other = train(tiny_cfg(tmp_path / "c", dpdd, model=KPACConfig(levels=2, channels=12), iterations=1, val_count=0))
    with pytest.raises(TrainingError, match="architecture"):
        export_model(tmp_path / "a", tmp_path / "x.safetensors", blend_with=other.model_path)
    assert not (tmp_path / "x.safetensors").exists()
    # the CLI: the same file; the blend flags belong to --export-only, the share to [0, 1]
    runner = CliRunner()
    r = runner.invoke(cli, ["train", "--export-only", "--resume", str(tmp_path / "a"), "--blend-with", str(b.model_path),
                            "--blend", "0.25", "-o", str(tmp_path / "cli.safetensors")])
    assert r.exit_code == 0, r.output
    assert_same_tensors(load_checkpoint(tmp_path / "cli.safetensors").state_dict, ck.state_dict)
    assert f"0.25 x its weights + 0.75 x {b.model_path}'s" in r.stderr  # the blend is said, not only stored
    r = runner.invoke(cli, ["train", "--export-only", "--resume", str(tmp_path / "a"), "--blend-with", str(b.model_path),
                            "--blend", "0.25", "-o", str(tmp_path / "cli2.safetensors"), "--json"])
    assert r.exit_code == 0 and {"blend_with": str(b.model_path), "blend": 0.25}.items() <= json.loads(r.stdout).items()
    r = runner.invoke(cli, ["train", "--export-only", "--resume", str(tmp_path / "a"), "--blend-with", str(b.model_path),
                            "--blend", "1.5", "-o", str(tmp_path / "bad.safetensors")])
    assert r.exit_code == 2 and "--blend" in r.output and not (tmp_path / "bad.safetensors").exists()
    r = runner.invoke(cli, ["train", "--resume", str(tmp_path / "a"), "--blend-with", str(b.model_path)])
    assert r.exit_code == 2 and "--export-only" in r.output
    # a share without a model to blend with, and a run folder for the model, are said at once
    r = runner.invoke(cli, ["train", "--export-only", "--resume", str(tmp_path / "a"), "--blend", "0.25",
                            "-o", str(tmp_path / "plain.safetensors")])
    assert r.exit_code == 2 and "--blend applies to --blend-with" in r.stderr and not (tmp_path / "plain.safetensors").exists()
    r = runner.invoke(cli, ["train", "--export-only", "--resume", str(tmp_path / "a"), "--blend-with", str(tmp_path / "b"),
                            "-o", str(tmp_path / "plain.safetensors")])
    assert r.exit_code == 2 and "is a folder" in r.stderr and not (tmp_path / "plain.safetensors").exists()
    # the wrong file to blend with is a usage error, as a wrong --init is
    (tmp_path / "notes.txt").write_text("not a model")
    for wrong, said in [(other.model_path, "another architecture"), (tmp_path / "notes.txt", "not a readable safetensors")]:
        r = runner.invoke(cli, ["train", "--export-only", "--resume", str(tmp_path / "a"), "--blend-with", str(wrong),
                                "-o", str(tmp_path / "plain.safetensors")])
        assert r.exit_code == 2 and r.stderr.startswith("error: --blend-with") and said in r.stderr, r.output
        assert len(r.stderr.splitlines()) == 1 and not (tmp_path / "plain.safetensors").exists()


_TINY_SYNTH = ["--procedural", "1", "--levels", "2", "--channels", "8", "--crop", "32", "--val-crop", "32", "--val-count", "1",
               "--workers", "0", "--no-tensorboard"]


@pytest.mark.parametrize("args, flag", [
    (["--max-radius", "-3"], "--max-radius"),
    (["--max-radius", "nan"], "--max-radius"),
    (["--aperture", "foo"], "--aperture"),
    (["--threads", "0"], "--threads"),
    (["--workers", "-2"], "--workers"),
    (["--iterations", "0"], "--iterations"),
    (["--bit-depth", "12"], "--bit-depth"),
    (["--noise-max", "nan"], "--noise-max"),
])
def test_cli_bad_settings_are_usage_errors_before_the_run_folder(tmp_path, cli, args, flag):
    run = tmp_path / "run"
    photos = tmp_path / "photos"
    photos.mkdir()
    write_png(photos / "a.png", np.full((64, 64, 3), 128, np.uint8))
    r = CliRunner().invoke(cli, ["train", "--synthetic", str(photos), "--run-dir", str(run), "--iterations", "1", "--crop", "64",
                                 "--workers", "0", *args])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith(f"error: {flag} ") and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.output
    assert not run.exists()


def test_cli_crop_and_precision_the_run_cannot_use_are_usage_errors(tmp_path, cli, dpdd):
    runner = CliRunner()
    run = tmp_path / "run"
    # the default architecture (3 levels, stride 8), one from --init (2 levels, stride 4), a resumed run's
    r = runner.invoke(cli, ["train", "--procedural", "1", "--run-dir", str(run), "--crop", "100", "--iterations", "1"])
    assert r.exit_code == 2 and "--crop" in r.stderr and "stride 8" in r.stderr and not run.exists()
    init = train(tiny_cfg(tmp_path / "init", dpdd, iterations=1, val_count=0)).model_path
    r = runner.invoke(cli, ["train", "--procedural", "1", "--init", str(init), "--run-dir", str(run), "--crop", "30", "--iterations", "1"])
    assert r.exit_code == 2 and "stride 4" in r.stderr and not run.exists()
    r = runner.invoke(cli, ["train", "--resume", str(tmp_path / "init"), "--crop", "30", "--iterations", "2"])
    assert r.exit_code == 2 and "stride 4" in r.stderr
    if not torch.cuda.is_available():
        r = runner.invoke(cli, ["train", "--procedural", "1", "--run-dir", str(run), "--precision", "fp16", "--iterations", "1"])
        assert r.exit_code == 2 and "fp16" in r.stderr and not run.exists()


def test_cli_export_only_default_output_is_not_replaced_silently(tmp_path, cli, dpdd):
    run = tmp_path / "run"
    result = train(tiny_cfg(run, dpdd, iterations=2))  # validated: a best.pt too
    own = result.model_path.read_bytes()
    runner = CliRunner()
    r = runner.invoke(cli, ["train", "--export-only", "--resume", str(run)])
    assert r.exit_code == 2 and f"{run / 'model.safetensors'}: exists" in r.stderr and "--overwrite" in r.stderr
    assert result.model_path.read_bytes() == own
    r = runner.invoke(cli, ["train", "--export-only", "--resume", str(run), "--overwrite", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["exported"] == str(run / "model.safetensors")
    r = runner.invoke(cli, ["train", "--export-only", "--resume", str(run), "--from", "best", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["exported"] == str(run / "model-best.safetensors")
    r = runner.invoke(cli, ["train", "--export-only", "--resume", str(run), "-o", str(tmp_path), "--overwrite"])
    assert r.exit_code == 2 and "is a folder" in r.stderr
    for name in ("new-folder/", "model.pt"):  # the slash is lost before kpac sees it: a file 'new-folder' was written
        r = runner.invoke(cli, ["train", "--export-only", "--resume", str(run), "-o", str(tmp_path / name)])
        assert r.exit_code == 2 and "give a name ending in .safetensors" in r.stderr
        assert not (tmp_path / name.rstrip("/")).exists()
    r = runner.invoke(cli, ["train", "--resume", str(run), "--overwrite"])
    assert r.exit_code == 2 and "--export-only" in r.stderr
    help_text = " ".join(runner.invoke(cli, ["train", "--help"], env={"COLUMNS": "200"}).stdout.split())
    assert "default: RUN/model.safetensors" in help_text


def test_cli_export_only_write_failure_names_the_path(tmp_path, cli, dpdd):
    train(tiny_cfg(tmp_path / "run", dpdd, iterations=1, val_count=0))
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "m.safetensors"
    r = CliRunner().invoke(cli, ["train", "--export-only", "--resume", str(tmp_path / "run"), "-o", str(out)])
    assert r.exit_code == 1 and r.stderr.startswith(f"error: cannot write {out}: ") and len(r.stderr.splitlines()) == 1


def test_cli_final_message_keeps_the_model_path_on_one_line(tmp_path, cli):
    run = tmp_path / ("a-rather-long-run-folder-name-" * 2) / "run"
    r = CliRunner().invoke(cli, ["train", "--run-dir", str(run), "--iterations", "1", *_TINY_SYNTH])
    assert r.exit_code == 0, r.output
    assert f"model -> {run / 'model.safetensors'}\n" in r.stderr


@pytest.mark.parametrize("args, flag", [(["--procedural", "-1"], "--procedural"), (["--blur-rank-weight", "-1"], "--blur-rank-weight")])
def test_cli_negative_counts_and_weights_are_one_line_errors(tmp_path, cli, args, flag):
    r = CliRunner().invoke(cli, ["train", "--procedural", "1", "--run-dir", str(tmp_path / "run"), *args])
    assert r.exit_code == 2 and flag in r.stderr and len(r.stderr.splitlines()) == 1, r.output
    assert not (tmp_path / "run").exists()


def test_cli_resume_keeps_the_procedural_scenes(tmp_path, cli):
    """Procedural scenes are drawn for the run's largest crop: a resume that changed it would
    train and validate on other scenes."""
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "--run-dir", str(run), "--iterations", "1", *_TINY_SYNTH])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["train", "--resume", str(run), "--iterations", "2", "--crop", "32:1,600"])
    assert r.exit_code == 2 and "largest crop may not change" in r.output
    assert load_state(run / "last.pt")["step"] == 1
    r = CliRunner().invoke(cli, ["train", "--resume", str(run), "--iterations", "2", "--crop", "32:1,64", "--quiet"])
    assert r.exit_code == 0, r.output  # the scenes are drawn at 512 px or more: a 64 px crop changes nothing


def _log_records(run: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["event"] == event]


def test_cli_resume_with_another_val_crop_starts_the_best_score_afresh(tmp_path, dpdd, cli, monkeypatch):
    """Scores at another validation size compare with nothing before: the first validation after
    the change makes best.pt, even below the earlier best; the log marks where it changed."""
    monkeypatch.setattr(L, "psnr", lambda out, _target: 50.0 if out.shape[0] == 32 else 20.0)  # 32 px scores higher
    run = tmp_path / "run"
    train(tiny_cfg(run, dpdd, iterations=2, val_every=1, val_crop=32))
    assert (load_state(run / "best.pt")["best"]["psnr"], load_state(run / "best.pt")["step"]) == (50.0, 1)
    r = CliRunner().invoke(cli, ["train", "--resume", str(run), "--iterations", "4", "--val-crop", "16", "--quiet"])
    assert r.exit_code == 0, r.output
    state = load_state(run / "last.pt")
    assert (state["best"]["psnr"], state["best"]["step"], state["train_config"]["val_crop"]) == (20.0, 3, 16)
    assert load_state(run / "best.pt")["step"] == 3
    assert [(c["step"], c["previous_val_crop"], c["val_crop"]) for c in _log_records(run, "validation_changed")] == [(2, 32, 16)]
    assert [v["best_psnr"] for v in _log_records(run, "val")] == [50.0, 50.0, 20.0, 20.0]
    # resumed with the crop it now has: nothing changed, and nothing starts afresh
    r = CliRunner().invoke(cli, ["train", "--resume", str(run), "--iterations", "5", "--quiet"])
    assert r.exit_code == 0, r.output
    assert len(_log_records(run, "validation_changed")) == 1 and load_state(run / "best.pt")["step"] == 3


def test_cli_resume_with_another_val_crop_keeps_the_procedural_scenes(tmp_path, cli):
    """Procedural scenes are drawn for the run's --val-crop too: a smaller one on resume leaves them
    as they were (the run trains on them); one larger than they were drawn for is refused."""
    from kpac_cli.train import TrainConfig
    from kpac_cli.train.data import procedural_scene_side

    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "--run-dir", str(run), "--iterations", "1", "--procedural", "1", "--levels", "2",
                                 "--channels", "8", "--crop", "32", "--val-crop", "544", "--val-count", "1", "--workers", "0",
                                 "--no-tensorboard", "--quiet"])
    assert r.exit_code == 0, r.output
    side = procedural_scene_side(TrainConfig.from_dict(load_state(run / "last.pt")["train_config"]))
    r = CliRunner().invoke(cli, ["train", "--resume", str(run), "--iterations", "2", "--val-crop", "32", "--quiet"])
    assert r.exit_code == 0, r.output
    resumed = TrainConfig.from_dict(load_state(run / "last.pt")["train_config"])
    assert (resumed.val_crop, resumed.scenes_val_crop, procedural_scene_side(resumed)) == (32, 544, side)
    r = CliRunner().invoke(cli, ["train", "--resume", str(run), "--iterations", "3", "--val-crop", "576"])
    assert r.exit_code == 2 and "--val-crop 576: this run's procedural scenes are drawn for crops up to 544 px" in r.stderr, r.output
    assert load_state(run / "last.pt")["step"] == 2


def test_a_run_records_the_stage_defaults_it_used(tmp_path, dpdd, monkeypatch):
    """A resume continues with what the run used, even if a later kpac changed the defaults."""
    from kpac_cli.train import config as C

    train(tiny_cfg(tmp_path / "run", dpdd, iterations=1, lr=None, val_count=0))
    saved = load_state(tmp_path / "run/last.pt")["train_config"]
    assert saved["lr"] == C.STAGE_DEFAULTS["l1"]["lr"] == 1e-4 and saved["iterations"] == 1
    monkeypatch.setitem(C.STAGE_DEFAULTS, "l1", {"iterations": 5, "lr": 3e-3})
    assert TrainConfig.from_dict(saved).lr_schedule.at(0) == 1e-4


@pytest.mark.parametrize("args, flag", [
    (["--procedural", "1", "-o", "model.safetensors"], "-o applies to --export-only"),
    (["--procedural", "1", "--from", "best"], "--from applies to --export-only"),
    (["--procedural", "1", "--val-source", ".", "--val-target", "."], "--val-source and --val-target go with --source/--target"),
    (["--procedural", "1", "--bit-depth", "16"], "--bit-depth applies to --data and --source/--target"),
    (["--procedural", "1", "--perceptual-weight", "1e-3"], "--perceptual-weight applies to --stage perceptual"),
    (["--procedural", "1", "--vgg-weights", "vgg.pth"], "--vgg-weights applies to --stage perceptual"),
    (["--source", "blurred", "--target", "sharp", "--max-radius", "5"], "--max-radius applies to synthetic data"),
    (["--source", "blurred", "--target", "sharp", "--aperture", "polygon"], "--aperture applies to synthetic data"),
    (["--source", "blurred", "--target", "sharp", "--allow-count-mismatch"], "--allow-count-mismatch applies to --data"),
    (["--procedural", "1", "--val-count", "0", "--val-crop", "64"], "--val-crop applies to validation, which --val-count 0 turns off"),
    (["--procedural", "1", "--val-count", "0", "--val-every", "10", "--val-crop", "64"],
     "--val-crop, --val-every apply to validation, which --val-count 0 turns off"),
])
def test_cli_options_that_would_do_nothing_are_usage_errors(tmp_path, cli, args, flag):
    """An option of another kind of data, stage or command would be ignored: the run would not be
    what its command line says."""
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "--run-dir", str(run), "--iterations", "1", "--crop", "32", *args])
    assert r.exit_code == 2 and r.stderr.startswith(f"error: {flag}") and len(r.stderr.splitlines()) == 1, r.output
    assert not run.exists()


def test_cli_export_only_takes_no_training_options_and_says_what_it_exported(tmp_path, dpdd, cli):
    run = tmp_path / "run"
    train(tiny_cfg(run, dpdd, iterations=2))  # a best.pt and a last.pt
    runner = CliRunner()
    out = tmp_path / "m.safetensors"
    r = runner.invoke(cli, ["train", "--export-only", "--resume", str(run), "--iterations", "5", "--lr", "1e-3", "-o", str(out)])
    assert r.exit_code == 2 and "--iterations, --lr apply to training, not to --export-only" in r.stderr and not out.exists()
    # the description is what the exported model carries
    r = runner.invoke(cli, ["train", "--export-only", "--resume", str(run), "--description", "my model", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert load_checkpoint(out).provenance["description"] == "my model"
    # a checkpoint file named: --from cannot choose another, and the record names the file exported
    r = runner.invoke(cli, ["train", "--export-only", "--resume", str(run / "last.pt"), "--from", "best", "-o", str(tmp_path / "b.safetensors")])
    assert r.exit_code == 2 and "--from best" in r.stderr and not (tmp_path / "b.safetensors").exists()
    r = runner.invoke(cli, ["train", "--export-only", "--resume", str(run / "best.pt"), "-o", str(tmp_path / "b.safetensors"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["checkpoint"] == "best" and load_checkpoint(tmp_path / "b.safetensors").provenance["exported_from"] == "best.pt"


def test_cli_resume_refuses_fewer_iterations_than_done(tmp_path, dpdd, cli):
    run = tmp_path / "run"
    train(tiny_cfg(run, dpdd, iterations=3, val_count=0))
    before = (run / "last.pt").read_bytes()
    r = CliRunner().invoke(cli, ["train", "--resume", str(run), "--iterations", "2"])
    assert r.exit_code == 2 and "--iterations 2" in r.stderr and "3 iterations" in r.stderr
    assert (run / "last.pt").read_bytes() == before


def test_cli_run_folder_problems_are_one_line_errors(tmp_path, cli, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    r = CliRunner().invoke(cli, ["train", "--run-dir", str(tmp_path / "file"), "--iterations", "1", *_TINY_SYNTH])
    assert r.exit_code == 2 and "is a file" in r.stderr and (tmp_path / "file").read_text() == "not a folder"

    def full(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(S, "_write", full)
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "--run-dir", str(run), "--iterations", "1", *_TINY_SYNTH])
    assert r.exit_code == 1 and r.stderr.endswith(f"error: {run}: No space left on device\n"), r.output
    assert "Traceback" not in r.output


def test_cli_init_takes_a_shipped_models_name(tmp_path, cli):
    from kpac_cli.checkpoints.registry import resolve_model

    try:
        shipped, _ = resolve_model("kpac-2level")
    except FileNotFoundError:
        pytest.skip("shipped model kpac-2level not installed")
    run = tmp_path / "run"
    tiny = [a for a in _TINY_SYNTH if a not in ("--levels", "2", "--channels", "8")]  # the architecture is the model's
    r = CliRunner().invoke(cli, ["train", "--init", "kpac-2level", "--run-dir", str(run), "--iterations", "1", *tiny])
    assert r.exit_code == 0, r.output
    assert load_checkpoint(run / "model.safetensors").config == load_checkpoint(shipped).config  # its architecture
    r = CliRunner().invoke(cli, ["train", "--init", "no-such-model", "--run-dir", str(tmp_path / "r2"), "--iterations", "1", *tiny])
    assert r.exit_code != 0 and "no-such-model" in r.output


# --------------------------------------------------------------------------------------
# --init conflicts, --val-count 0 and the data a resume finds
# --------------------------------------------------------------------------------------

_TINY_SYNTH_DATA = ["--procedural", "1", "--crop", "32", "--val-crop", "32", "--val-count", "1", "--workers", "0",
                    "--no-tensorboard"]


def test_cli_init_weights_that_cannot_carry_over_are_a_one_line_usage_error(tmp_path, dpdd, cli):
    init = train(tiny_cfg(tmp_path / "init", dpdd, iterations=1, val_count=0)).model_path  # TINY: 8 channels
    run = tmp_path / "run"
    for args, expected in [(["--init", str(init), "--channels", "12"], "channels 8 -> 12"),
                           (["--init", "no-such-model"], "unknown model 'no-such-model'"),
                           (["--init", str(tmp_path / "init" / "log.jsonl")], "log.jsonl")]:
        r = CliRunner().invoke(cli, ["train", "--run-dir", str(run), "--iterations", "1", *_TINY_SYNTH_DATA, *args])
        assert r.exit_code == 2 and r.stderr.startswith("error: --init") and len(r.stderr.splitlines()) == 1, r.output
        assert expected in r.stderr and not run.exists()


def test_cli_architecture_flags_change_the_init_models_architecture(tmp_path, dpdd, cli):
    """--init with --levels 3 is its weights on three levels, not the paper's width and ablations
    (which the weights could not carry over to)."""
    init = train(tiny_cfg(tmp_path / "init", dpdd, iterations=1, val_count=0,
                          model=KPACConfig(levels=2, channels=8, scale_attention=False))).model_path
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "--run-dir", str(run), "--iterations", "1", "--init", str(init), "--levels", "3",
                                 *_TINY_SYNTH_DATA])
    assert r.exit_code == 0, r.output
    assert load_checkpoint(run / "model.safetensors").config == KPACConfig(levels=3, channels=8, scale_attention=False)


def test_a_paired_run_without_validation_is_described_as_such(tmp_path, dpdd):
    cfg = tiny_cfg(tmp_path / "run", dpdd)
    assert D.build_data(cfg, 4).description.endswith("; validation: 2 image(s) (centre 32x32)")
    assert D.build_data(cfg.replace(val_count=0), 4).description.endswith("; no validation")


def test_synthetic_training_without_validation_holds_nothing_out(tmp_path):
    cfg = TrainConfig(out=tmp_path, synthetic=(_photos(tmp_path / "photos", 10),), crop="32", max_radius=2, val_crop=32)
    assert D.build_data(cfg.replace(val_count=0), 4).train_items == 10
    assert D.build_data(cfg.replace(val_count=2), 4).train_items == 9  # every 10th held out
    # a run begun before held one out even without validation: resumed, it still does
    legacy = D.build_data(cfg.replace(val_count=0), 4, resumed=D.LEGACY_RECORD)
    assert legacy.train_items == 9 and legacy.record["legacy_holdout"] is True and len(legacy.record["names"]) == 10


def _drop_data_record(checkpoint: Path) -> None:
    """Make a checkpoint look like one written before runs recorded their data."""
    head = torch.load(checkpoint, map_location="cpu", weights_only=True)
    del head["data_record"]
    S.atomic_save(head, checkpoint)


def _photos(folder: Path, count: int, side: int = 40) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        write_png(folder / f"p{i}.png", (rng.random((side, side, 3)) * 255).astype(np.uint8))
    return folder


def test_a_checkpoint_without_a_data_record_resumes_as_before(tmp_path):
    photos = _photos(tmp_path / "photos", 10)

    def cfg(out: Path, **kw) -> TrainConfig:
        base = dict(out=out, synthetic=(photos,), model=TINY, iterations=4, batch=1, crop="32", max_radius=2, val_crop=32,
                    val_count=1, val_every=1000, workers=0, tensorboard=False)
        return TrainConfig(**{**base, **kw})

    straight = train(cfg(tmp_path / "a"))
    train(cfg(tmp_path / "b", iterations=2))
    _drop_data_record(tmp_path / "b/last.pt")
    done = train(cfg(tmp_path / "b", resume=True))
    assert done.losses == straight.losses[2:]
    assert_same_tensors(weights(tmp_path / "a/last.pt"), weights(tmp_path / "b/last.pt"))
    # without validation: the source held out all the same stays held out, now and in later resumes
    train(cfg(tmp_path / "c", iterations=1, val_count=0))
    _drop_data_record(tmp_path / "c/last.pt")
    for total in (2, 3):
        starts = []
        train(cfg(tmp_path / "c", iterations=total, val_count=0, resume=True),
              callback=lambda ev: starts.append(ev.data["description"]) if ev.kind == "start" else None)
        assert "from 9 sharp images" in starts[0] and "1 image(s) held out" in starts[0]
        assert load_state(tmp_path / "c/last.pt")["data_record"]["legacy_holdout"] is True


def test_cli_resume_refuses_training_data_that_changed(tmp_path, cli):
    photos = _photos(tmp_path / "photos", 3)
    run = tmp_path / "run"
    common = ["--levels", "2", "--channels", "8", "--crop", "32", "--max-radius", "2", "--val-crop", "32", "--workers", "0",
              "--no-tensorboard", "--quiet"]
    r = CliRunner().invoke(cli, ["train", "--synthetic", str(photos), "--run-dir", str(run), "--iterations", "1", *common])
    assert r.exit_code == 0, r.output
    before = (run / "last.pt").read_bytes()
    write_png(photos / "p3.png", np.full((40, 40, 3), 90, np.uint8))  # a photo more: another held-out one
    r = CliRunner().invoke(cli, ["train", "--resume", str(run), "--iterations", "2"])
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1, r.output
    assert "3 sharp images then, 4 now: 1 new (p3)" in r.stderr and f"--init {run}" in r.stderr
    assert (run / "last.pt").read_bytes() == before
    (photos / "p3.png").unlink()
    moved = photos.rename(tmp_path / "moved")  # the same photos elsewhere: the same run
    r = CliRunner().invoke(cli, ["train", "--resume", str(run), "--iterations", "2", "--synthetic", str(moved)])
    assert r.exit_code == 0, r.output
    assert load_state(run / "last.pt")["step"] == 2


def test_paired_resume_refuses_a_pair_that_changed(tmp_path, dpdd):
    train(tiny_cfg(tmp_path / "run", dpdd, iterations=1, val_count=0))
    target = sorted((dpdd / "train_c/target").iterdir())[0]
    copy = tmp_path / "dpdd"
    shutil.copytree(dpdd, copy)
    with open(copy / "train_c/target" / target.name, "ab") as f:
        f.write(b"\0")  # trailing bytes: the same image, another file
    with pytest.raises(D.DataError, match=r"1 changed \(IMG0001.png\)"):
        train(tiny_cfg(tmp_path / "run", copy, iterations=2, val_count=0, resume=True))
    assert train(tiny_cfg(tmp_path / "run", dpdd, iterations=2, val_count=0, resume=True)).step == 2


@pytest.mark.slow
@pytest.mark.shared
def test_a_committed_training_state_resumes_with_its_held_out_split(tmp_path, shared_dir, cli):
    """The committed states predate the data record: they resume as they always did (and from
    then on record their data)."""
    state = REPO / "weights/train-state/kpac-2level"
    run = tmp_path / "kpac-2level"
    run.mkdir()
    for f in state.glob("last*.pt"):
        shutil.copy(f, run / f.name)
    saved = load_state(run / "last.pt", optimizer=False)
    assert "data_record" not in saved
    step = saved["step"]
    folders = [a for p in saved["train_config"]["synthetic"] for a in ("--synthetic", str(shared_dir / "train-images" / Path(p).name))]
    r = CliRunner().invoke(cli, ["train", "--resume", str(run), "--iterations", str(step + 1), *folders, "--crop", "64",
                                 "--precision", "fp32", "--workers", "0", "--no-tensorboard", "--json"])
    assert r.exit_code == 0, r.output
    resumed = load_state(run / "last.pt", optimizer=False)
    assert resumed["step"] == step + 1
    assert "from 70 sharp images" in resumed["provenance"]["trained_on"] and "7 held-out" in resumed["provenance"]["trained_on"]
    assert len(resumed["data_record"]["names"]) == 77 and resumed["data_record"]["legacy_holdout"] is True
    assert len(resumed["data_record"]["digests"]) == 77 and None not in resumed["data_record"]["digests"]


def test_cli_a_resume_of_nothing_says_so(tmp_path, cli):
    missing = tmp_path / "no-run"
    for args in (["train", "--resume", str(missing)], ["train", "--export-only", "--resume", str(missing)]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1, r.output
        assert "no such run folder or checkpoint" in r.stderr and "--init" not in r.stderr


@pytest.mark.parametrize("cache, kept", [("no", 0), ("auto", 1), ("yes", 1)])
def test_synthetic_sources_are_kept_in_memory_as_cache_says(tmp_path, cache, kept):
    cfg = TrainConfig(out=tmp_path, synthetic=(_photos(tmp_path / "photos", 1),), crop="32", max_radius=2, val_count=0,
                      cache=cache)
    dataset = D.build_data(cfg, 4).dataset
    dataset[0, 32]
    assert len(dataset._cache) == kept


def test_cli_a_run_that_never_starts_leaves_no_run_folder(tmp_path, cli):
    """Data that cannot be used are found after the run folder is made: it goes again, with the
    parents the run made, but never a folder that was there or holds anything."""
    empty = tmp_path / "no-photos"
    empty.mkdir()
    args = ["train", "--synthetic", str(empty), "--iterations", "1", "--crop", "32"]
    r = CliRunner().invoke(cli, [*args, "--run-dir", str(tmp_path / "runs" / "first")])
    assert r.exit_code == 2 and "no sharp images" in r.stderr, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-photos"]
    kept = tmp_path / "kept"
    (kept / "old").mkdir(parents=True)
    r = CliRunner().invoke(cli, [*args, "--run-dir", str(kept / "old")])
    assert r.exit_code == 2 and (kept / "old").is_dir()  # it was there before


# --------------------------------------------------------------------------------------
# Edited photos and runs that are already complete
# --------------------------------------------------------------------------------------


def _stored_png(path: Path, img: np.ndarray) -> None:
    """An uncompressed PNG: its size depends on the image's dimensions only, not on its content."""
    from PIL import Image

    Image.fromarray(img).save(path, compress_level=0)


def _synth_cfg(out: Path, photos: Path, **kw) -> TrainConfig:
    base = dict(out=out, synthetic=(photos,), model=TINY, iterations=2, batch=1, crop="32", max_radius=2, val_crop=32,
                val_count=1, val_every=1000, workers=0, tensorboard=False)
    return TrainConfig(**{**base, **kw})


def test_resume_refuses_a_photo_edited_to_the_same_size(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        _stored_png(photos / f"p{i}.png", (rng.random((40, 40, 3)) * 255).astype(np.uint8))
    run = tmp_path / "run"
    train(_synth_cfg(run, photos, iterations=1))
    before = (run / "last.pt").read_bytes()
    size = (photos / "p1.png").stat().st_size
    _stored_png(photos / "p1.png", np.full((40, 40, 3), 90, np.uint8))  # retouched: same size, other pixels
    assert (photos / "p1.png").stat().st_size == size
    with pytest.raises(D.DataError, match=r"3 sharp images then, 3 now: 1 changed \(p1\)"):
        train(_synth_cfg(run, photos, resume=True))
    assert (run / "last.pt").read_bytes() == before


def test_a_checkpoint_recording_sizes_only_resumes_as_before(tmp_path):
    """Checkpoints written before runs kept digests compare names and sizes, resume bit for bit
    and record digests from then on."""
    photos = _photos(tmp_path / "photos", 3)
    straight = train(_synth_cfg(tmp_path / "a", photos, iterations=3))
    run = tmp_path / "b"
    train(_synth_cfg(run, photos, iterations=1))
    head = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    del head["data_record"]["digests"]
    S.atomic_save(head, run / "last.pt")
    done = train(_synth_cfg(run, photos, iterations=3, resume=True))
    assert done.losses == straight.losses[1:]
    assert_same_tensors(weights(tmp_path / "a/last.pt"), weights(run / "last.pt"))
    assert len(load_state(run / "last.pt")["data_record"]["digests"]) == 3


def test_data_record_digests_every_file_of_a_pair(tmp_path, dpdd):
    pairs = dpdd_split(dpdd, "train", allow_count_mismatch=True)[:2]
    record = D.data_record(D._pairs_items(pairs), legacy_holdout=False)
    own = hashlib.sha256(b"".join(hashlib.sha256(p.read_bytes()).hexdigest().encode() for p in (pairs[0].source, pairs[0].target)))
    assert record["digests"][0] == own.hexdigest() and record["digests"][0] != record["digests"][1]
    assert record["sizes"][0] == pairs[0].source.stat().st_size + pairs[0].target.stat().st_size
    assert D.data_record([("scene", ["procedural:0"])], legacy_holdout=False)["digests"] == [None]


def test_resuming_a_complete_run_says_so_and_writes_nothing(tmp_path, cli):
    photos = _photos(tmp_path / "photos", 3)
    run = tmp_path / "run"
    train(_synth_cfg(run, photos))
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    r = CliRunner().invoke(cli, ["train", "--resume", str(run)])
    assert r.exit_code == 0 and len(r.stderr.splitlines()) == 1, r.output
    assert "already complete at 2 iterations" in r.stderr and "--iterations M (more than 2)" in r.stderr
    assert "done:" not in r.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files
    r = CliRunner().invoke(cli, ["train", "--resume", str(run), "--iterations", "2", "--json", "--quiet"])
    assert r.exit_code == 0 and r.stderr == "", r.output
    rec = json.loads(r.stdout)
    assert rec["already_complete"] is True and rec["step"] == 2 and rec["model_path"] == str(run / "model.safetensors")
    # a model exported there since, from other weights, stays as it is, and the message says so
    other = train(_synth_cfg(tmp_path / "other", photos, iterations=1)).model_path
    r = CliRunner().invoke(cli, ["train", "--export-only", "--resume", str(run), "--blend-with", str(other), "--overwrite"])
    assert r.exit_code == 0, r.output
    blended = (run / "model.safetensors").read_bytes()
    r = CliRunner().invoke(cli, ["train", "--resume", str(run)])
    assert r.exit_code == 0 and len(r.stderr.splitlines()) == 1, r.output
    assert "holds other weights than its last.pt" in r.stderr and r.stderr.startswith("warning: ")
    assert r.stderr.rstrip().endswith(f"to export last.pt there: kpac train --export-only --resume {run} --overwrite")
    assert (run / "model.safetensors").read_bytes() == blended
    # a run stopped between its last checkpoint and its export: the resume exports it
    (run / "model.safetensors").unlink()
    result = train(_synth_cfg(run, photos, resume=True))
    assert not result.already_complete and result.model_path == run / "model.safetensors"
    assert_same_tensors(load_checkpoint(result.model_path).state_dict, weights(run / "last.pt"))


def test_a_complete_run_stopped_before_its_export_is_finished_by_a_resume(tmp_path, monkeypatch):
    """The model its training exported at fewer iterations is stale, not the user's: the resume
    validates and exports the last iterations."""
    photos = _photos(tmp_path / "photos", 3)
    run = tmp_path / "run"
    train(_synth_cfg(run, photos))
    stale = (run / "model.safetensors").read_bytes()

    def crash(*_args, **_kw):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(L, "save_checkpoint", crash)
        with pytest.raises(OSError):
            train(_synth_cfg(run, photos, iterations=3, resume=True))
    assert load_state(run / "last.pt")["step"] == 3 and (run / "model.safetensors").read_bytes() == stale
    result = train(_synth_cfg(run, photos, iterations=3, resume=True))
    assert not result.already_complete and load_checkpoint(run / "model.safetensors").provenance["iterations"] == 3


def test_a_new_description_for_a_complete_run_says_where_it_goes(tmp_path, cli):
    photos = _photos(tmp_path / "photos", 3)
    run = tmp_path / "run"
    train(_synth_cfg(run, photos))
    model = (run / "model.safetensors").read_bytes()
    r = CliRunner().invoke(cli, ["train", "--resume", str(run), "--description", "sharper"])
    assert r.exit_code == 0 and len(r.stderr.splitlines()) == 1, r.output
    assert f"kpac train --export-only --resume {run} --overwrite --description TEXT" in r.stderr
    assert (run / "model.safetensors").read_bytes() == model


@pytest.mark.parametrize("workers", [0, 1])
def test_a_data_problem_met_mid_run_is_one_line_and_keeps_the_iterations_done(tmp_path, workers):
    """Photos read as training needs them (--cache no) may fail late (a file whose header reads
    but whose pixels do not): the error reads as it was raised, also from a worker process, and
    last.pt keeps what was trained."""
    rng = np.random.default_rng(0)
    names = [f"p{i}" for i in range(4)]
    broken = names[D._EpochOrder(4, 0)(2)]  # the photo the third sample reads
    for folder in ("src", "tgt"):
        (tmp_path / folder).mkdir()
    for name in names:
        img = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
        write_png(tmp_path / "src" / f"{name}.png", img)
        write_png(tmp_path / "tgt" / f"{name}.png", img)
    truncated = tmp_path / "tgt" / f"{broken}.png"
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2] + data[-12:])  # IDAT cut short, IEND kept
    run = tmp_path / "run"
    cfg = TrainConfig(out=run, source=tmp_path / "src", target=tmp_path / "tgt", model=TINY, iterations=6, batch=1,
                      crop="32", val_count=0, cache="no", workers=workers, tensorboard=False)
    with pytest.raises(TrainingError) as caught:  # a failed run (exit 1), not a usage error
        train(cfg)
    message = str(caught.value)
    assert message.startswith(f"{truncated}: PNG file is truncated") and "\n" not in message and "Traceback" not in message
    assert message.endswith(f"(training stopped at iteration 2; {run / 'last.pt'} holds iteration 2)")
    assert load_state(run / "last.pt")["step"] == 2
    # no worker is left behind: one that ignores SIGTERM would hold the process at exit forever
    assert not multiprocessing.active_children()


def test_cli_export_of_best_from_a_run_without_validation_says_why_there_is_none(tmp_path, dpdd, cli):
    run = tmp_path / "run"
    train(tiny_cfg(run, dpdd, iterations=1, val_count=0))
    r = CliRunner().invoke(cli, ["train", "--export-only", "--resume", str(run), "--from", "best"])
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1, r.output
    assert "without validation (--val-count 0)" in r.stderr and "--from last" in r.stderr
    assert "nothing saved yet" not in r.stderr


def test_a_resume_names_what_changes_how_batches_are_drawn():
    from kpac_cli.train.loop import _sampling_changes

    cfg = TrainConfig(data=Path("x"), out=Path("y"), batch=4, seed=0)
    assert _sampling_changes({"seed": 0, "batch": 4, "world_size": 1}, cfg, 1) is None
    assert _sampling_changes({"seed": 0, "batch": 4, "world_size": 1}, cfg, 2) == \
        "processes 1 -> 2, so the global batch (--batch x processes) 4 -> 8"
    # the same global batch from other factors: the order still changes, the batch does not
    assert _sampling_changes({"seed": 0, "batch": 8, "world_size": 1}, cfg, 2) == "--batch 8 -> 4, processes 1 -> 2"
    assert _sampling_changes({"seed": 3}, cfg, 1) == "--seed 3 -> 0"


def test_a_pair_of_different_sizes_fails_before_the_run_also_when_decoded_as_needed(tmp_path):
    """--cache no decodes each sample as training needs it: the headers still show the mismatch first."""
    rng = np.random.default_rng(0)
    for folder in ("src", "tgt"):
        (tmp_path / folder).mkdir()
    for i in range(3):
        img = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
        write_png(tmp_path / "src" / f"p{i}.png", img)
        write_png(tmp_path / "tgt" / f"p{i}.png", img[:36] if i == 2 else img)
    cfg = TrainConfig(out=tmp_path / "run", source=tmp_path / "src", target=tmp_path / "tgt", model=TINY, crop="32",
                      val_count=0, cache="no", workers=0)
    with pytest.raises(DataError) as caught:
        D.build_data(cfg, TINY.stride)
    assert str(caught.value) == (f"pair p2: image sizes differ ({tmp_path / 'src' / 'p2.png'} 40x40, "
                                 f"{tmp_path / 'tgt' / 'p2.png'} 40x36)")


def test_validation_never_scores_an_image_the_run_trains_on(tmp_path):
    photos = _photos(tmp_path / "photos", 10)
    synthetic = dict(out=tmp_path / "run", model=TINY, crop="32", max_radius=2, val_crop=32, val_count=1, workers=0)
    # a folder given twice: every photo twice (p0, p0_2, p1, ...), the held-out one (every 10th: p4_2) too
    with pytest.raises(DataError, match=rf"^{re.escape(str(photos / 'p4.png'))} is both a training and a validation image "
                                        r"\(given twice\)"):
        D.build_data(TrainConfig(synthetic=(photos, photos), **synthetic), TINY.stride)
    assert D.build_data(TrainConfig(synthetic=(photos, photos), **{**synthetic, "val_count": 0}), TINY.stride).val == []
    shutil.copyfile(photos / "p8.png", photos / "copy.png")  # sorted first: the held-out photo is now p8
    with pytest.raises(DataError, match=rf"^validation image {re.escape(str(photos / 'p8.png'))} has the same bytes as "
                                        rf"training image {re.escape(str(photos / 'copy.png'))}:"):
        D.build_data(TrainConfig(synthetic=(photos,), **synthetic), TINY.stride)
    (photos / "copy.png").unlink()
    assert len(D.build_data(TrainConfig(synthetic=(photos,), **synthetic), TINY.stride).val) == 1
    # paired folders: validation folders that are the training folders
    paired = dict(out=tmp_path / "run", source=photos, target=photos, model=TINY, crop="32", val_crop=32, val_count=1,
                  workers=0)
    with pytest.raises(DataError, match=rf"^{re.escape(str(photos / 'p0.png'))} is both a training and a validation pair"):
        D.build_data(TrainConfig(val_source=photos, val_target=photos, **paired), TINY.stride)


@pytest.mark.parametrize("setting, flag", [
    ({"saturation": float("inf"), "synthetic": (Path("photos"),)}, "--saturation"),
    ({"blur_rank_weight": float("nan"), "synthetic": (Path("photos"),)}, "--blur-rank-weight"),
    ({"perceptual_weight": -1.0, "stage": "perceptual"}, "--perceptual-weight"),
    ({"grad_clip": float("nan")}, "--grad-clip"),
])
def test_weights_and_factors_that_are_no_numbers_are_refused(setting, flag):
    """NaN passes every "< 0" test: it would silently switch a term off, poison the loss, or
    (an infinite --saturation) crash the first sample."""
    cfg = TrainConfig(**{"data": Path("dpdd"), "model": TINY, **setting})
    if "synthetic" in setting:
        cfg = cfg.replace(data=None)
    with pytest.raises(ValueError, match=f"^{flag} must be a number "):
        cfg.validate()


def test_the_api_resume_refuses_what_would_change_the_run_as_the_command_does(tmp_path, monkeypatch):
    """train(cfg) with resume=True makes the checks `kpac train --resume` makes, with its messages:
    other procedural scenes, validation renders larger than them, fewer iterations than done."""
    run = tmp_path / "run"
    started = TrainConfig(out=run, procedural=1, model=TINY, iterations=4, crop="32", val_crop=544, val_count=1, workers=0)
    checkpoint = {"step": 3, "train_config": started.to_dict()}
    run.mkdir()
    (run / "last.pt").write_bytes(b"")  # load_state gives the checkpoint: the checks come before any other use
    monkeypatch.setattr(L, "load_state", lambda _path, **_kw: checkpoint)
    for changes, error in [({"crop": "32:1,600"}, "--crop: the largest crop may not change when resuming"),
                           ({"max_radius": 20.0}, "--max-radius: may not change when resuming"),
                           ({"val_crop": 576}, "--val-crop 576: this run's procedural scenes are drawn for crops up to 544 px"),
                           ({"iterations": 2}, "--iterations 2: the run has done 3 iterations already")]:
        with pytest.raises(TrainingError, match=f"^{re.escape(error)}"):
            train(started.replace(resume=True, **changes))
    assert [p.name for p in run.iterdir()] == ["last.pt"]
    # a smaller --val-crop keeps the scenes the run trains on, drawn for its --val-crop
    resumed = L.resumed_config(started.replace(val_crop=32, resume=True), checkpoint)
    assert (resumed.val_crop, resumed.scenes_val_crop) == (32, 544)
    assert D.procedural_scene_side(resumed) == D.procedural_scene_side(started)


def test_a_resume_keeps_the_pairs_a_run_holds_out_for_validation(tmp_path, monkeypatch):
    """A run that holds out every 10th pair trains on the others: validation folders added on
    resume (or dropped) would change what it trains on, and what its best score compares."""
    run = tmp_path / "run"
    started = TrainConfig(out=run, source=tmp_path / "src", target=tmp_path / "tgt", model=TINY, iterations=4, crop="32",
                          val_crop=32, workers=0)
    with_folders = started.replace(val_source=tmp_path / "vs", val_target=tmp_path / "vt")
    record = {"names": [f"p{i}.png" for i in range(12)]}
    run.mkdir()
    (run / "last.pt").write_bytes(b"")
    checkpoint = {"step": 3, "train_config": started.to_dict(), "data_record": record}
    monkeypatch.setattr(L, "load_state", lambda _path, **_kw: checkpoint)
    with pytest.raises(TrainingError, match=r"^--val-source and --val-target cannot be added when resuming: the run holds "
                                            r"out every 10th pair"):
        train(with_folders.replace(resume=True))
    with pytest.raises(ValueError, match=r"cannot be dropped when resuming"):
        L.resumed_config(started, {**checkpoint, "train_config": with_folders.to_dict()})
    # fewer than 10 pairs hold none out: validation folders change nothing the run trains on
    few = {**checkpoint, "data_record": {"names": record["names"][:9]}}
    assert L.resumed_config(with_folders, few) == with_folders
    assert L.resumed_config(with_folders, {**checkpoint, "train_config": with_folders.to_dict()}) == with_folders


def test_a_new_run_through_the_api_never_replaces_a_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"a run's checkpoint")
    with pytest.raises(TrainingError, match=f"^{re.escape(f'{run} already holds a run (last.pt); continue it with --resume')}"):
        train(TrainConfig(out=run, procedural=1, model=TINY, iterations=1, crop="32", workers=0))
    assert [p.name for p in run.iterdir()] == ["last.pt"] and (run / "last.pt").read_bytes() == b"a run's checkpoint"


def test_inputs_that_are_their_targets_are_refused_before_the_run(tmp_path, cli):
    """The same folder as inputs and targets (or a copy of it) would train the model to change nothing."""
    photos = _photos(tmp_path / "photos", 3)
    (tmp_path / "link").symlink_to(photos)
    run = tmp_path / "run"
    tiny = ["--run-dir", str(run), "--levels", "2", "--channels", "8", "--crop", "32", "--iterations", "1", "--workers", "0"]
    for source, target in [(photos, photos), (photos, tmp_path / "link")]:
        r = CliRunner().invoke(cli, ["train", "--source", str(source), "--target", str(target), *tiny])
        assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1, r.output
        assert r.stderr.startswith(f"error: --source and --target are the same folder ({source}): "), r.output
    other = _photos(tmp_path / "other", 3)
    r = CliRunner().invoke(cli, ["train", "--source", str(other), "--target", str(photos), "--val-source", str(photos),
                                 "--val-target", str(tmp_path / "link"), *tiny])
    assert r.exit_code == 2 and "--val-source and --val-target are the same folder" in r.stderr, r.output
    # other folders with the same files: every pair is a photo and itself
    copy = Path(shutil.copytree(photos, tmp_path / "copy"))
    r = CliRunner().invoke(cli, ["train", "--source", str(copy), "--target", str(photos), *tiny])
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1, r.output
    assert "every one of the 3 pairs has an input with the same bytes as its target" in r.stderr, r.output
    assert not run.exists()
    # some such pairs (sharp photos among the inputs) may be meant: said, not refused
    write_png(copy / "p1.png", np.full((40, 40, 3), 128, np.uint8))
    bundle = D.build_data(TrainConfig(source=copy, target=photos, model=TINY, crop="32", val_count=0), TINY.stride)
    assert bundle.train_items == 3 and bundle.notes == [
        "2 of the 3 pairs have an input with the same bytes as its target (p0.png, p2.png): "
        "the model learns to leave those as they are"]
