"""Metrics (PSNR/SSIM/MAE/LPIPS), pairing, reading for evaluation, reports, crops, speed (kpac_cli.metrics)."""

from __future__ import annotations

import csv
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from kpac_cli import metrics as M
from kpac_cli.images import ImageError
from kpac_cli.metrics import crops as C
from kpac_cli.metrics import lpips_net
from kpac_cli.metrics import speed as S
from kpac_cli.metrics.evaluate import Evaluator, read_for_metrics

RNG = np.random.default_rng(1234)


# ------------------------------------------------------------------------------ helpers


def ssim_uniform_reference(x: np.ndarray, y: np.ndarray, L: float = 1.0, w: int = 7) -> float:
    """SSIM written out window by window (Wang et al. formula, 7x7 uniform, sample covariance)."""
    C1, C2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    n = w * w
    vals = []
    for c in range(x.shape[2]):
        for i in range(x.shape[0] - w + 1):
            for j in range(x.shape[1] - w + 1):
                a = x[i : i + w, j : j + w, c]
                b = y[i : i + w, j : j + w, c]
                ma, mb = a.mean(), b.mean()
                va, vb = a.var(ddof=1), b.var(ddof=1)
                cov = ((a - ma) * (b - mb)).sum() / (n - 1)
                vals.append(((2 * ma * mb + C1) * (2 * cov + C2)) / ((ma**2 + mb**2 + C1) * (va + vb + C2)))
    return float(np.mean(vals))


def png_bytes(a: np.ndarray, depth: int, filters=(0, 1, 2, 3, 4)) -> bytes:
    """A PNG encoder written directly from the spec, cycling through the row filters."""

    def paeth(p_a, p_b, p_c):
        p = p_a + p_b - p_c
        pa, pb, pc = abs(p - p_a), abs(p - p_b), abs(p - p_c)
        return p_a if pa <= pb and pa <= pc else (p_b if pb <= pc else p_c)

    h, w = a.shape[:2]
    ch = 1 if a.ndim == 2 else a.shape[2]
    rows = a.reshape(h, -1).astype(">u2" if depth == 16 else "u1").view(np.uint8).reshape(h, -1).astype(int)
    bpp = ch * depth // 8
    out = []
    for r in range(h):
        t = filters[r % len(filters)]
        cur, prev = rows[r], (rows[r - 1] if r else np.zeros_like(rows[r]))
        line = []
        for i in range(len(cur)):
            A = cur[i - bpp] if i >= bpp else 0
            B = prev[i]
            C = prev[i - bpp] if i >= bpp else 0
            line.append((cur[i] - [0, A, B, (A + B) // 2, paeth(A, B, C)][t]) % 256)
        out.append(bytes([t] + line))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ctype = {1: 0, 2: 4, 3: 2, 4: 6}[ch]
    ihdr = struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(out))) + chunk(b"IEND", b"")


def save_png8(path, a):
    Image.fromarray(np.asarray(a, dtype=np.uint8)).save(path)


# ------------------------------------------------------------------------------ PSNR / MAE / SSIM


def test_psnr_constant_offset_is_20db():
    t = np.full((16, 16, 3), 0.3)
    assert M.psnr(t + 0.1, t) == pytest.approx(20.0, abs=1e-9)
    assert M.psnr(t, t + 0.1) == pytest.approx(20.0, abs=1e-9)
    assert M.psnr(t + 0.01, t) == pytest.approx(40.0, abs=1e-9)


def test_psnr_matches_skimage_and_identical_is_inf():
    for _ in range(3):
        a, b = RNG.random((20, 24, 3)), RNG.random((20, 24, 3))
        assert M.psnr(a, b) == pytest.approx(peak_signal_noise_ratio(b, a, data_range=1.0), abs=1e-10)
    a = RNG.random((8, 8, 3))
    assert M.psnr(a, a) == math.inf
    assert M.psnr(a * 255, (a + 0.1) * 255, data_range=255) == pytest.approx(20.0)


def test_mae_known_values():
    pred = np.zeros((2, 2, 3))
    target = np.zeros((2, 2, 3))
    target[0, 0] = [0.3, 0.6, 0.9]  # |diff| sum 1.8 over 12 values
    assert M.mae(pred, target) == pytest.approx(0.15)
    assert M.mae(target, pred) == pytest.approx(0.15)
    assert M.mae(np.full((3, 3, 3), 0.25), np.full((3, 3, 3), 0.75)) == pytest.approx(0.5)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="different shapes"):
        M.psnr(np.zeros((4, 4, 3)), np.zeros((4, 5, 3)))


@pytest.mark.parametrize("window,side", [("uniform", 7), ("gaussian", 11)])
def test_ssim_of_an_image_smaller_than_its_window_says_so(window, side):
    ok = RNG.random((side, 20, 3))
    assert M.ssim(ok, ok, window) == pytest.approx(1.0)
    small = RNG.random((side - 1, 20, 3))
    with pytest.raises(ValueError, match=f"too small for SSIM .*at least {side} pixels a side\\): 20x{side - 1}$"):
        M.ssim(small, small, window)


def test_uint_inputs_are_scaled():
    a8 = np.full((8, 8, 3), 51, np.uint8)
    assert M.mae(a8, np.zeros((8, 8, 3))) == pytest.approx(0.2)
    a16 = np.full((8, 8, 3), 65535, np.uint16)
    assert M.mae(a16, np.zeros((8, 8, 3))) == pytest.approx(1.0)


@pytest.mark.parametrize("window", ["uniform", "gaussian"])
def test_ssim_identical_is_one(window):
    a = RNG.random((32, 32, 3))
    assert M.ssim(a, a, window=window) == pytest.approx(1.0, abs=1e-12)


def test_ssim_uniform_matches_hand_computation():
    x = RNG.random((12, 14, 3))
    y = np.clip(x + RNG.normal(0, 0.1, x.shape), 0, 1)
    ours = M.ssim(x, y)
    assert ours == pytest.approx(ssim_uniform_reference(x, y), abs=1e-6)
    assert 0 < ours < 1


def test_ssim_windows_differ_and_window_checked():
    # a smooth scene with noise: the windows weigh it differently by ~0.08 whatever the noise
    # draw (on pure noise the difference is 0.00002-0.003 by draw, around the bound)
    yy, xx = np.mgrid[0:64, 0:64] / 64
    x = np.repeat((0.5 + 0.4 * np.sin(6 * xx + 3 * yy))[..., None], 3, axis=2)
    y = np.clip(x + RNG.normal(0, 0.1, x.shape), 0, 1)
    u, g = M.ssim(x, y, "uniform"), M.ssim(x, y, "gaussian")
    assert abs(u - g) > 1e-3
    with pytest.raises(ValueError):
        M.ssim(x, y, "box")


def test_ssim_grey_images():
    x = RNG.random((16, 16))
    assert M.ssim(x, x) == pytest.approx(1.0)


def test_quantize_rounds_half_up():
    x = np.array([0.0, 0.5 / 255, 1.49 / 255, 1.5 / 255, 254.5 / 255, 1.0, 1.2, -0.1])
    q = M.quantize(x, 8) * 255
    np.testing.assert_allclose(q, [0, 1, 1, 2, 255, 255, 255, 0], atol=1e-9)
    q16 = M.quantize(np.array([0.5 / 65535, 100.5 / 65535]), 16) * 65535
    np.testing.assert_allclose(q16, [1, 101], atol=1e-6)
    y = RNG.random(50)
    assert M.quantize(y, None) is not None and np.array_equal(M.quantize(y, None), y)
    np.testing.assert_array_equal(M.quantize(M.quantize(y, 8), 8), M.quantize(y, 8))  # idempotent
    with pytest.raises(ValueError):
        M.quantize(y, 0)


# ------------------------------------------------------------------------------ LPIPS


@pytest.fixture(scope="module")
def rand_lpips():
    torch.manual_seed(0)
    return M.LPIPS()


def test_lpips_wiring_with_random_weights(rand_lpips):
    base = RNG.random((64, 64, 3)).astype(np.float32)
    assert M.lpips(base, base, rand_lpips) == pytest.approx(0.0, abs=1e-7)
    dists = []
    for sigma in (0.02, 0.1, 0.3):
        noisy = np.clip(base + RNG.normal(0, sigma, base.shape), 0, 1).astype(np.float32)
        d01, d10 = M.lpips(base, noisy, rand_lpips), M.lpips(noisy, base, rand_lpips)
        assert d01 == pytest.approx(d10, rel=1e-5)  # symmetric by construction
        dists.append(d01)
    assert 0 < dists[0] < dists[1] < dists[2]


def test_lpips_rejects_bad_input(rand_lpips):
    with pytest.raises(ValueError):
        M.lpips(np.zeros((16, 16, 3)), np.zeros((16, 16, 3)), rand_lpips)
    with pytest.raises(ValueError):
        M.lpips(np.zeros((64, 64, 3)), np.zeros((64, 64)), rand_lpips)


@pytest.fixture
def no_lpips_weights(tmp_path, monkeypatch):
    """An empty hub cache, no env var, no lpips package: LPIPS must be unavailable."""
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    monkeypatch.delenv(M.LPIPS_ENV, raising=False)
    monkeypatch.setattr(lpips_net, "_lpips_package_weights", lambda: None)
    yield hub / "checkpoints"
    torch.hub.set_dir(old)


def _official_style_files(folder, model: M.LPIPS):
    """Write the two published files' layouts: torchvision AlexNet + lpips linear layers."""
    sd = model.state_dict()
    backbone = {k: v.clone() for k, v in sd.items() if k.startswith("features.")}
    backbone["classifier.1.weight"] = torch.zeros(2, 2)  # the real file has the classifier too; ignored
    lins = {f"lin{i}.model.1.weight": sd[f"lins.{i}.weight"].clone() for i in range(5)}
    torch.save(backbone, folder / lpips_net.BACKBONE_FILE)
    torch.save(lins, folder / lpips_net.LINEAR_FILE)


def test_load_lpips_without_weights_raises(no_lpips_weights):
    with pytest.raises(M.MetricUnavailable) as exc:
        M.load_lpips()
    msg = str(exc.value)
    assert "alex.pth" in msg and "alexnet-owt-7be5be79.pth" in msg and str(no_lpips_weights) in msg
    with pytest.raises(M.MetricUnavailable):
        M.load_lpips(no_lpips_weights / "nope.pth")


def test_load_lpips_from_hub_cache_and_folder(no_lpips_weights, rand_lpips, tmp_path):
    _official_style_files(no_lpips_weights, rand_lpips)
    loaded = M.load_lpips()
    for k, v in rand_lpips.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    a = RNG.random((48, 48, 3)).astype(np.float32)
    b = np.clip(a + 0.1, 0, 1).astype(np.float32)
    assert M.lpips(a, b, loaded) == pytest.approx(M.lpips(a, b, rand_lpips), rel=1e-6)
    assert len(loaded.sources) == 2

    other = tmp_path / "weights"
    other.mkdir()
    _official_style_files(other, rand_lpips)
    assert M.load_lpips(other).sources[0].startswith(str(other.resolve()))


def test_load_lpips_combined_lpips_package_layout(no_lpips_weights, rand_lpips, tmp_path):
    # The lpips.LPIPS module's own state_dict naming: net.sliceK.N.* and linK.model.1.weight.
    sd = rand_lpips.state_dict()
    slice_of = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
    combined = {}
    for k, v in sd.items():
        if k.startswith("features."):
            idx = int(k.split(".")[1])
            combined[f"net.slice{slice_of[idx]}.{idx}.{k.split('.')[2]}"] = v
        else:
            combined[f"lin{k.split('.')[1]}.model.1.weight"] = v
    combined["scaling_layer.shift"] = torch.tensor([-0.030, -0.088, -0.188])
    f = tmp_path / "lpips_full.pth"
    torch.save(combined, f)
    loaded = M.load_lpips(f)
    for k, v in sd.items():
        assert torch.equal(loaded.state_dict()[k], v)
    # our own save() round-trips too
    g = tmp_path / "ours.pth"
    rand_lpips.save(g)
    assert torch.equal(M.load_lpips(g).lins[2].weight, rand_lpips.lins[2].weight)


def test_load_lpips_refuses_partial_mismatched_or_unsafe(no_lpips_weights, rand_lpips, tmp_path):
    only_lin = tmp_path / "alex.pth"
    chans = (64, 192, 384, 256, 256)
    torch.save({f"lin{i}.model.1.weight": torch.ones(1, c, 1, 1) for i, c in enumerate(chans)}, only_lin)
    with pytest.raises(M.MetricUnavailable, match="AlexNet backbone"):
        M.load_lpips(only_lin)
    bad = {k: v for k, v in rand_lpips.state_dict().items()}
    bad["lins.0.weight"] = torch.ones(1, 3, 1, 1)
    f = tmp_path / "bad.pth"
    torch.save(bad, f)
    with pytest.raises(M.MetricUnavailable, match="shape"):
        M.load_lpips(f)
    evil = tmp_path / "evil.pth"
    torch.save({"x": object()}, evil)  # needs a full unpickler: weights_only refuses it
    with pytest.raises(M.MetricUnavailable, match="cannot read"):
        M.load_lpips(evil)


def test_evaluate_reports_lpips_unavailable_not_a_number(no_lpips_weights, tmp_path):
    a = RNG.random((40, 40, 3))
    report = M.evaluate([("a", a, a * 0.9)], lpips_model="auto")
    assert report.rows[0].lpips is None
    assert report.lpips_unavailable and "alex.pth" in report.lpips_unavailable
    assert report.summary()["overall"]["lpips"] is None
    md = report.markdown()
    assert "unavailable: LPIPS weights not available" in md
    d = report.to_dict()
    assert d["summary"]["overall"]["lpips"] is None and d["images"][0]["lpips"] is None


def test_evaluate_with_lpips_model(rand_lpips):
    a = RNG.random((40, 40, 3))
    report = M.evaluate([("a", a, np.clip(a + 0.05, 0, 1))], lpips_model=rand_lpips)
    assert report.rows[0].lpips is not None and report.rows[0].lpips > 0
    assert report.lpips_unavailable is None
    assert "random (untrained)" in report.conventions["LPIPS"]


# ------------------------------------------------------------------------------ image reading


@pytest.mark.parametrize("depth", [8, 16])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_evaluation_reads_png_exactly_all_filters(tmp_path, depth, channels):
    # PNGs written straight from the spec (every row filter) are read at full depth by the
    # project's reader (kpac_cli.images.read_image), which evaluation uses.
    dt = np.uint16 if depth == 16 else np.uint8
    shape = (7, 9) if channels == 1 else (7, 9, channels)
    a = RNG.integers(0, np.iinfo(dt).max + 1, shape).astype(dt)
    f = tmp_path / "x.png"
    f.write_bytes(png_bytes(a, depth))
    img = read_for_metrics(f)
    assert img.shape == (7, 9, 3)  # grey replicated, alpha dropped
    expect = np.repeat(a[..., None], 3, axis=2) if channels == 1 else a[..., :3]
    np.testing.assert_allclose(img, expect / np.iinfo(dt).max, rtol=0, atol=1e-7)
    rep = M.evaluate([("x", f, expect / np.iinfo(dt).max)], bit_depth=depth, lpips_model=None)
    assert rep.rows[0].psnr == math.inf  # exact at the file's own bit depth


def test_evaluation_reads_8bit_like_pillow(tmp_path):
    from skimage import data

    a = data.astronaut()[:64, :80]
    save_png8(tmp_path / "a.png", a)
    np.testing.assert_allclose(read_for_metrics(tmp_path / "a.png"), a / 255.0, rtol=0, atol=1e-7)


def test_evaluation_read_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageError, match="broken.png"):
        read_for_metrics(bad)
    with pytest.raises(ImageError, match="broken.png"):
        M.evaluate([("b", bad, np.zeros((8, 8, 3)))], lpips_model=None)
    rep = M.evaluate([("b", bad, np.zeros((8, 8, 3)))], lpips_model=None, on_error="skip")
    assert rep.failures[0][0] == "b" and "broken.png" in rep.failures[0][1]


# ------------------------------------------------------------------------------ pairing


def _touch_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        save_png8(folder / n, np.zeros((2, 2, 3)))


def test_pair_folders_by_name(tmp_path):
    _touch_images(tmp_path / "p", ["b.png", "a.png", "c.jpg"])
    _touch_images(tmp_path / "t", ["a.png", "c.png", "b.tif"])
    (tmp_path / "p" / "notes.txt").write_text("not an image")
    pairs = M.pair_folders(tmp_path / "p", tmp_path / "t")
    assert [p.name for p in pairs] == ["a", "b", "c"]
    name, pred, target = pairs[2]
    assert pred.name == "c.jpg" and target.name == "c.png"


def test_pair_folders_by_name_reports_missing(tmp_path):
    _touch_images(tmp_path / "p", ["a.png", "b.png", "x.png"])
    _touch_images(tmp_path / "t", ["a.png", "b.png", "y.png"])
    with pytest.raises(M.PairingError) as exc:
        M.pair_folders(tmp_path / "p", tmp_path / "t")
    msg = str(exc.value)
    assert "x" in msg and "y" in msg and "without a target" in msg and "without a prediction" in msg


def test_pair_folders_duplicate_stem(tmp_path):
    _touch_images(tmp_path / "p", ["a.png", "a.jpg"])
    _touch_images(tmp_path / "t", ["a.png"])
    with pytest.raises(M.PairingError, match="share the name"):
        M.pair_folders(tmp_path / "p", tmp_path / "t")


def test_pair_folders_by_order(tmp_path):
    _touch_images(tmp_path / "p", ["img_2.png", "img_1.png", "img_3.png"])
    _touch_images(tmp_path / "t", ["gt_b.png", "gt_a.png", "gt_c.png"])
    pairs = M.pair_folders(tmp_path / "p", tmp_path / "t", by="order")
    assert [(p.pred.name, p.target.name) for p in pairs] == [
        ("img_1.png", "gt_a.png"),
        ("img_2.png", "gt_b.png"),
        ("img_3.png", "gt_c.png"),
    ]
    _touch_images(tmp_path / "t", ["gt_d.png"])
    with pytest.raises(M.PairingError, match="3 images .* but 4"):
        M.pair_folders(tmp_path / "p", tmp_path / "t", by="order")


def test_pair_folders_messages_name_the_roles_given(tmp_path):
    # blurry inputs paired with the ground truth are not predictions
    _touch_images(tmp_path / "s", ["a.png", "extra.png"])
    _touch_images(tmp_path / "t", ["a.png", "lone.png"])
    with pytest.raises(M.PairingError) as exc:
        M.pair_folders(tmp_path / "s", tmp_path / "t", roles=("source", "target"))
    msg = str(exc.value)
    assert "1 source(s) without a target" in msg and "1 target(s) without a source" in msg
    assert "prediction" not in msg


def test_pair_folders_by_order_the_extension_cannot_reorder_the_pairs(tmp_path):
    _touch_images(tmp_path / "p", ["photo.jpg", "photo.left.jpg"])
    _touch_images(tmp_path / "t", ["photo.left.png", "photo.png"])
    pairs = M.pair_folders(tmp_path / "p", tmp_path / "t", by="order")
    assert [(p.pred.name, p.target.name) for p in pairs] == [
        ("photo.jpg", "photo.png"),
        ("photo.left.jpg", "photo.left.png"),
    ]


def test_pair_folders_by_order_is_natural_order(tmp_path):
    # numbered without padding on one side, padded on the other: img2 goes with gt_02, not img10
    _touch_images(tmp_path / "p", [f"img{i}.png" for i in (1, 2, 10, 11)] + ["IMG3.png"])
    _touch_images(tmp_path / "t", [f"gt_{i:02d}.png" for i in (1, 2, 3, 10, 11)])
    pairs = M.pair_folders(tmp_path / "p", tmp_path / "t", by="order")
    assert [(p.pred.name, p.target.name) for p in pairs] == [
        ("img1.png", "gt_01.png"),
        ("img2.png", "gt_02.png"),
        ("IMG3.png", "gt_03.png"),
        ("img10.png", "gt_10.png"),
        ("img11.png", "gt_11.png"),
    ]
    # pairing by name lists the pairs in the same order
    _touch_images(tmp_path / "t2", [f"img{i}.tif" for i in (1, 2, 10, 11)] + ["IMG3.tif"])
    assert [p.name for p in M.pair_folders(tmp_path / "p", tmp_path / "t2")] == ["img1", "img2", "IMG3", "img10", "img11"]


def test_pair_folders_by_order_pairs_as_before_where_both_sides_sort_alike(tmp_path):
    # one naming scheme on both sides, one extension: the pairs the plain sorted order made
    stems = ["a", "a-1", "a.b", "a_1", "A2", "b10", "b9", "x.left", "x", "x 2", "2024-01-05", "2024-01-5b", "Z"]
    _touch_images(tmp_path / "p", [f"{s}.png" for s in stems])
    _touch_images(tmp_path / "t", [f"gt_{s}.png" for s in stems])
    old = list(zip(sorted(f"{s}.png" for s in stems), sorted(f"gt_{s}.png" for s in stems)))
    assert all(t == f"gt_{p}" for p, t in old)  # the old order was consistent here
    pairs = M.pair_folders(tmp_path / "p", tmp_path / "t", by="order")
    assert sorted((p.pred.name, p.target.name) for p in pairs) == sorted(old)


def test_natural_key_is_a_total_order_whatever_the_listing_order():
    # names equal in natural order still sort one way: by stem and extension as written
    from kpac_cli.metrics.pairing import natural_key

    names = ["img1.png", "img01.png", "IMG1.png", "img1.jpg", "img1.PNG"]
    for listing in (names, names[::-1], names[2:] + names[:2]):
        ordered = [p.name for p in sorted((Path(n) for n in listing), key=natural_key)]
        assert ordered == ["img1.jpg", "IMG1.png", "img01.png", "img1.PNG", "img1.png"]


def test_pair_folders_empty_or_missing(tmp_path):
    (tmp_path / "p").mkdir()
    _touch_images(tmp_path / "t", ["a.png"])
    with pytest.raises(M.PairingError, match="no images"):
        M.pair_folders(tmp_path / "p", tmp_path / "t")
    with pytest.raises(M.PairingError, match="not a folder"):
        M.pair_folders(tmp_path / "missing", tmp_path / "t")
    with pytest.raises(ValueError):
        M.pair_folders(tmp_path / "t", tmp_path / "t", by="size")


def _write_bmp(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(path)  # a format kpac does not read
    return path


def test_pair_folders_of_unread_formats_says_so_not_no_images(tmp_path):
    for n in ("a", "b"):
        _write_bmp(tmp_path / "p" / f"{n}.bmp")
    _touch_images(tmp_path / "t", ["a.png", "b.png"])
    with pytest.raises(M.PairingError) as exc:
        M.pair_folders(tmp_path / "p", tmp_path / "t")
    msg = str(exc.value)
    assert "format kpac does not read" in msg and "BMP" in msg and "a.bmp" in msg


def test_pair_folders_by_name_says_a_missing_partner_is_there_unread(tmp_path):
    _touch_images(tmp_path / "p", ["a.png"])
    _write_bmp(tmp_path / "p" / "b.bmp")
    _touch_images(tmp_path / "t", ["a.png", "b.png"])
    with pytest.raises(M.PairingError) as exc:
        M.pair_folders(tmp_path / "p", tmp_path / "t")
    msg = str(exc.value)
    assert "1 target(s) without a prediction" in msg and "b.bmp" in msg and "does not read" in msg


def test_pair_folders_by_order_refuses_folders_with_unread_images(tmp_path):
    # equal counts of readable images, but the BMP on each side sits at a different place:
    # the images passed over would pair 3 with gt_2 and 4 with gt_3 without a word
    _touch_images(tmp_path / "p", ["1.png", "3.png", "4.png"])
    _write_bmp(tmp_path / "p" / "2.bmp")
    _touch_images(tmp_path / "t", ["gt_1.png", "gt_2.png", "gt_3.png"])
    _write_bmp(tmp_path / "t" / "gt_4.bmp")
    with pytest.raises(M.PairingError, match="cannot pair by order: .*2.bmp"):
        M.pair_folders(tmp_path / "p", tmp_path / "t", by="order")


def test_pair_predictions_dpdd_says_a_missing_prediction_is_there_unread(tmp_path):
    names, _ = _dpdd_tree(tmp_path / "dpdd", "test", 2)
    (tmp_path / "pred").mkdir()
    save_png8(tmp_path / "pred" / f"{Path(names[0]).stem}.png", np.zeros((2, 2, 3)))
    _write_bmp(tmp_path / "pred" / f"{Path(names[1]).stem}.bmp")
    with pytest.raises(M.PairingError, match=f"{Path(names[1]).stem}.bmp"):
        M.pair_predictions_dpdd(tmp_path / "pred", tmp_path / "dpdd", "test", expected_count=None)


def _dpdd_tree(root, split, n, dual=False):
    # DPDD-like names: the target of source N is N-1 (a separate exposure)
    src = [f"1P0A{917 + 2 * i:04d}.png" for i in range(n)]
    tgt = [f"1P0A{916 + 2 * i:04d}.png" for i in range(n)]
    _touch_images(root / f"{split}_c" / "source", src)
    _touch_images(root / f"{split}_c" / "target", tgt)
    if dual:
        _touch_images(root / f"{split}_l" / "source", src)
        _touch_images(root / f"{split}_r" / "source", src)
    return src, tgt


def test_pair_dpdd_by_sorted_order_with_counts(tmp_path):
    src, tgt = _dpdd_tree(tmp_path, "test", 76, dual=True)
    pairs = M.pair_dpdd(tmp_path, "test")
    assert len(pairs) == 76
    assert pairs[0].name == "1P0A0917" and pairs[0].source.name == "1P0A0917.png"
    assert pairs[0].target.name == "1P0A0916.png" and pairs[0].left is None
    assert all(p.source.name == s and p.target.name == t for p, s, t in zip(pairs, src, tgt))
    dual = M.pair_dpdd(tmp_path, "test", dual=True)
    assert dual[5].left.parent.parent.name == "test_l" and dual[5].right.name == src[5]


def test_pair_dpdd_count_checks(tmp_path):
    _dpdd_tree(tmp_path, "val", 10)
    with pytest.raises(M.PairingError, match="expected 74"):
        M.pair_dpdd(tmp_path, "val")
    assert len(M.pair_dpdd(tmp_path, "val", expected_count=None)) == 10
    (tmp_path / "val_c" / "target" / "1P0A0916.png").unlink()
    with pytest.raises(M.PairingError, match="10 sources .* but 9 targets"):
        M.pair_dpdd(tmp_path, "val", expected_count=None)
    with pytest.raises(M.PairingError, match="folder missing"):
        M.pair_dpdd(tmp_path, "train")
    with pytest.raises(M.PairingError, match="val_c/source and val_c/target"):
        M.pair_dpdd(tmp_path / "nowhere", "val")


def test_pair_dpdd_dual_views_missing(tmp_path):
    src, _ = _dpdd_tree(tmp_path, "test", 3, dual=True)
    (tmp_path / "test_r" / "source" / src[1]).unlink()
    with pytest.raises(M.PairingError, match="without a view"):
        M.pair_dpdd(tmp_path, "test", dual=True, expected_count=None)


def test_pair_predictions_dpdd(tmp_path):
    src, tgt = _dpdd_tree(tmp_path / "dpdd", "test", 4)
    _touch_images(tmp_path / "out", src)
    pairs = M.pair_predictions_dpdd(tmp_path / "out", tmp_path / "dpdd", expected_count=None)
    assert [(p.pred.name, p.target.name) for p in pairs] == list(zip(src, tgt))
    (tmp_path / "out" / src[0]).unlink()
    with pytest.raises(M.PairingError, match="without a prediction"):
        M.pair_predictions_dpdd(tmp_path / "out", tmp_path / "dpdd", expected_count=None)


def test_read_labels(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("# DPDD scene types\nname,label\n1P0A0917.png, indoor\n1P0A0919,outdoor\n\nx\toutdoor\n")
    assert M.read_labels(f) == {"1P0A0917": "indoor", "1P0A0919": "outdoor", "x": "outdoor"}
    f.write_text("a,indoor\na,outdoor\n")
    with pytest.raises(ValueError, match=":2:"):
        M.read_labels(f)
    f.write_text("a,indoor,extra\n")
    with pytest.raises(ValueError, match="expected 'name,label'"):
        M.read_labels(f)


# ------------------------------------------------------------------------------ reports


@pytest.fixture
def folder_report(tmp_path):
    names = ["im1", "im2", "im3", "im4"]
    for n in names:
        t = RNG.integers(0, 256, (24, 32, 3))
        p = np.clip(t + RNG.integers(-20, 21, t.shape), 0, 255)
        _touch = tmp_path / "pred"
        _touch.mkdir(exist_ok=True)
        (tmp_path / "gt").mkdir(exist_ok=True)
        save_png8(tmp_path / "pred" / f"{n}.png", p)
        save_png8(tmp_path / "gt" / f"{n}.png", t)
    save_png8(tmp_path / "gt" / "same.png", np.full((24, 32, 3), 7))
    save_png8(tmp_path / "pred" / "same.png", np.full((24, 32, 3), 7))
    labels = {"im1": "indoor", "im2": "indoor", "im3": "outdoor", "same": "outdoor"}
    pairs = M.pair_folders(tmp_path / "pred", tmp_path / "gt")
    calls = []
    report = M.evaluate(pairs, labels=labels, lpips_model=None, progress=lambda i, n, name: calls.append((i, n)))
    assert calls[-1] == (5, 5)
    return report, tmp_path


def test_report_values_and_splits(folder_report):
    report, root = folder_report
    assert [r.name for r in report.rows] == ["im1", "im2", "im3", "im4", "same"]
    same = report.rows[-1]
    assert same.psnr == math.inf and same.ssim == pytest.approx(1.0) and same.mae == 0.0
    im1 = report.rows[0]
    p = np.asarray(Image.open(root / "pred" / "im1.png")) / 255.0
    t = np.asarray(Image.open(root / "gt" / "im1.png")) / 255.0
    assert im1.psnr == pytest.approx(M.psnr(p, t)) and im1.mae == pytest.approx(M.mae(p, t))
    s = report.summary()
    assert s["overall"]["count"] == 5
    assert s["splits"]["indoor"]["count"] == 2
    assert s["splits"]["indoor"]["psnr"] == pytest.approx((report.rows[0].psnr + report.rows[1].psnr) / 2)
    assert s["splits"]["outdoor"]["psnr"] == math.inf
    assert any("im4" in n for n in report.notes)  # unlabelled image reported


def test_report_files_parse_and_hold_every_image(folder_report):
    report, root = folder_report
    names = {r.name for r in report.rows}
    report.to_json(root / "r.json")
    report.to_csv(root / "r.csv")
    report.to_markdown(root / "r.md")

    d = json.loads((root / "r.json").read_text())  # strict JSON: no NaN/Infinity literals
    assert {im["name"] for im in d["images"]} == names
    assert d["images"][-1]["psnr"] == "inf"
    assert d["summary"]["splits"]["indoor"]["count"] == 2
    assert d["conventions"]["SSIM"].startswith("scikit-image")
    assert d["paper"]["source"] == "paper, Table 4 (DPDD, 8-bit)"

    with open(root / "r.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == [r.name for r in report.rows]
    assert float(rows[-1]["psnr"]) == math.inf and rows[3]["split"] == "" and rows[0]["lpips"] == ""
    assert float(rows[0]["ssim"]) == pytest.approx(report.rows[0].ssim, rel=1e-15)
    assert all(r["error"] == "" for r in rows)
    # a failed image is in the file too, with its error and no numbers
    report.failures.append(("broken", "broken.png: cannot decode PNG"))
    report.to_csv(root / "r2.csv")
    with open(root / "r2.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(report.rows) + 1
    assert rows[-1] == {"name": "broken", "split": "", "psnr": "", "ssim": "", "mae": "", "lpips": "", "error": "broken.png: cannot decode PNG"}

    md = (root / "r.md").read_text()
    table_rows = [ln for ln in md.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in table_rows]
    assert all(len(c) == len(cells[0]) or len(c) == 6 for c in cells)
    per_image = {c[0] for c in cells if len(c) == 6}
    assert names <= per_image
    assert "paper, Table 4 (DPDD, 8-bit)" in md
    kpac3 = next(c for c in cells if c[0] == "KPAC 3-level")
    assert kpac3[3:] == ["25.24", "0.774", "0.040", "0.225"]
    assert "ours (indoor)" in md and "7x7 uniform window" in md and "8-bit" in md


def test_markdown_paper_rows_are_optional_and_lpips_off_is_not_computed(folder_report):
    report, _ = folder_report  # scored with lpips_model=None: switched off, not impossible
    assert report.lpips_status == "not computed"
    md = report.markdown(paper=False)
    assert "Table 4" not in md and "KPAC 3-level" not in md and "76 images" not in md
    assert "LPIPS: not computed" in md and "unavailable" not in md
    assert "| im1 |" in md and "ours (indoor)" in md
    assert "KPAC 3-level" in report.markdown()  # the default keeps them
    failed = M.Report(lpips_unavailable="LPIPS weights not available")
    assert failed.lpips_status == "unavailable: LPIPS weights not available"


def test_missing_values_are_said_one_way_in_every_format(tmp_path):
    """A mean over no image (every one failed) and a metric without a value: n/a in Markdown as on
    the terminal, null in JSON, an empty CSV field; never nan."""
    from kpac_cli.metrics.report import LPIPS_NOT_REQUESTED, ImageResult

    failed = M.Report(lpips_unavailable=LPIPS_NOT_REQUESTED, failures=[("a", "a.png: cannot decode PNG")])
    md = failed.markdown(paper=False)
    (ours,) = [ln for ln in md.splitlines() if ln.startswith("| ours (all images)")]
    assert ours == "| ours (all images) | measured | 0 | n/a | n/a | n/a | not computed |"
    failed.to_json(tmp_path / "f.json", paper=False)
    overall = json.loads((tmp_path / "f.json").read_text())["summary"]["overall"]
    assert overall == {"count": 0, "psnr": None, "ssim": None, "mae": None, "lpips": None}

    no_ssim = M.Report(rows=[ImageResult("b", 30.0, math.nan, 0.1)], lpips_unavailable=LPIPS_NOT_REQUESTED)
    assert "nan" not in no_ssim.markdown().lower()
    assert "| b |  | 30.00 | n/a | 0.1000 | not computed |" in no_ssim.markdown()
    assert no_ssim.csv_text().splitlines()[1] == "b,,30.0,,0.1,,"
    d = no_ssim.to_dict()
    assert d["images"][0]["ssim"] is None and d["summary"]["overall"]["ssim"] is None
    json.dumps(d, allow_nan=False)


def test_every_format_with_the_paper_rows_says_what_they_compare_with(folder_report, tmp_path):
    report, _ = folder_report  # 5 images: not the 76 of the paper's test set
    note = "ours are on 5 images, so they do not compare"
    assert note in report.markdown()
    d = report.to_dict()
    assert d["paper"]["rows"] and note in d["paper"]["note"] and "76 images" in d["paper"]["note"]
    assert report.to_dict(paper=False)["paper"] is None  # left out, as in the Markdown
    full = M.Report(rows=[report.rows[0]] * 76)
    assert "76 images" in full.markdown() and "do not compare" not in full.markdown()


def test_paper_constants():
    rows = {r.method: r for r in M.PAPER_TABLE4_DPDD}
    assert rows["DPDNet (single)"] == ("DPDNet (single)", 24.39, 0.749, 0.041, 0.277)
    assert rows["KPAC 2-level"][1:] == (25.21, 0.774, 0.040, 0.227)
    assert rows["KPAC 3-level"][1:] == (25.24, 0.774, 0.040, 0.225)
    assert rows["DPDNet (dual-pixel)"][1:] == (25.13, 0.786, 0.041, 0.223)


def test_evaluate_bit_depth_and_failures(tmp_path):
    t = RNG.integers(0, 255, (16, 16, 3)) / 255.0  # on the 8-bit grid
    p = t + 0.3 / 255  # below half a level: vanishes at 8 bits, not in float
    r8 = M.evaluate([("a", p, t)], lpips_model=None)
    rf = M.evaluate([("a", p, t)], bit_depth=None, lpips_model=None)
    assert rf.rows[0].psnr == pytest.approx(20 * math.log10(255 / 0.3))
    assert r8.rows[0].psnr == math.inf
    assert "8-bit" in r8.conventions["quantisation"] and "none" in rf.conventions["quantisation"]
    bad = [("ok", t, t * 0.5), ("bad", t, t[:8])]
    with pytest.raises(ValueError, match="bad"):
        M.evaluate(bad, lpips_model=None)
    rep = M.evaluate(bad, lpips_model=None, on_error="skip")
    assert [r.name for r in rep.rows] == ["ok"] and rep.failures[0][0] == "bad"
    assert "Failures" in rep.markdown()


def test_core_does_not_import_cli_libraries():
    import subprocess
    import sys

    code = (
        "import sys, kpac_cli.metrics, kpac_cli.metrics.crops, kpac_cli.metrics.speed, kpac_cli.inverse; "
        "print('typer' in sys.modules or 'rich' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_evaluate_reads_16bit_png_at_full_depth(tmp_path):
    target16 = RNG.integers(0, 65536, (20, 24, 3)).astype(np.uint16)
    pred8 = RNG.integers(0, 256, (20, 24, 3)).astype(np.uint8)
    (tmp_path / "t").mkdir()
    (tmp_path / "p").mkdir()
    (tmp_path / "t" / "a.png").write_bytes(png_bytes(target16, 16))
    save_png8(tmp_path / "p" / "a.png", pred8)
    pairs = M.pair_folders(tmp_path / "p", tmp_path / "t")
    rep = M.evaluate(pairs, bit_depth=None, lpips_model=None)
    expect = M.psnr(pred8 / 255.0, target16 / 65535.0)
    assert rep.rows[0].psnr == pytest.approx(expect, abs=1e-4)  # the reader gives float32
    # a custom reader returning integers is scaled by its dtype's range, exactly

    def reader(path):
        return target16 if path.parent.name == "t" else pred8

    rep2 = M.evaluate(pairs, bit_depth=None, lpips_model=None, reader=reader)
    assert rep2.rows[0].psnr == pytest.approx(expect, abs=1e-9)


# ------------------------------------------------------------------------------ streaming evaluation


def test_evaluator_scores_one_pair_at_a_time():
    pairs = [(f"im{i}", RNG.random((24, 24, 3)), RNG.random((24, 24, 3))) for i in range(3)]
    ev = Evaluator(lpips_model=None, labels={"im0": "indoor"})
    for name, p, t in pairs[:2]:
        row = ev.score(name, p, t)
        assert row.psnr == pytest.approx(M.psnr(M.quantize(p), M.quantize(t)), abs=1e-12)
    ev.fail("im2", "could not run")
    rep = ev.finish()
    assert [r.name for r in rep.rows] == ["im0", "im1"] and rep.failures == [("im2", "could not run")]
    assert rep.summary()["splits"]["indoor"]["count"] == 1 and any("im1" in n for n in rep.notes)
    with pytest.raises(ValueError, match="different shapes"):
        ev.score("x", np.zeros((8, 8, 3)), np.zeros((8, 9, 3)))
    # evaluate() consumes generators lazily and gives the same numbers as lists
    seen = []
    gen = ((n, p, t) for n, p, t in pairs)
    a = M.evaluate(gen, lpips_model=None, progress=lambda i, n, name: seen.append((i, n)))
    b = M.evaluate(pairs, lpips_model=None)
    assert [r.psnr for r in a.rows] == [r.psnr for r in b.rows] and seen[-1] == (3, 0)
    with pytest.raises(ValueError):
        Evaluator(ssim_window="box")


# ------------------------------------------------------------------------------ comparison crops


def test_best_window_finds_the_planted_region():
    score = RNG.normal(0, 0.01, (40, 60))
    score[22:30, 35:43] += 1.0
    assert C.best_window(score, 8) == (22, 35)
    with pytest.raises(ValueError):
        C.best_window(score, 41)


def test_compose_comparison_layout_and_crop_choice():
    h, w = 40, 64
    target = RNG.random((h, w, 3)).astype(np.float32)
    inp = np.full_like(target, 0.5)
    out = inp.copy()
    out[4:20, 30:46] = target[4:20, 30:46]  # the output fixes only this region
    comp = C.compose_comparison(out, target, inp, crop=16)
    assert comp.box == (4, 30, 16) and comp.zoom == 2 and comp.score > 0
    assert comp.image.shape == (h + C.PANEL_GAP + 32, 3 * w + 2 * C.PANEL_GAP, 3)
    assert comp.image.dtype == np.float32 and 0 <= comp.image.min() and comp.image.max() <= 1
    # the zoomed target crop is the target's window enlarged by nearest neighbour
    x0 = 2 * (w + C.PANEL_GAP) + (w - 32) // 2
    zoomed = comp.image[h + C.PANEL_GAP :, x0 : x0 + 32]
    np.testing.assert_array_equal(zoomed[::2, ::2], target[4:20, 30:46])
    labelled = C.compose_comparison(out, target, inp, labels=["in", "out", "gt"])
    assert labelled.image.shape[1] == 3 * w + 2 * C.PANEL_GAP and labelled.image.shape[0] > h + C.PANEL_GAP
    two = C.compose_comparison(out, target)  # no input: output | target, crop where the error is largest
    assert two.image.shape[1] == 2 * w + C.PANEL_GAP
    with pytest.raises(ValueError, match="different shapes"):
        C.compose_comparison(out, target[:20])
    with pytest.raises(ValueError, match="labels"):
        C.compose_comparison(out, target, inp, labels=["a", "b"])


# ------------------------------------------------------------------------------ speed


@pytest.fixture(scope="module")
def tiny_deblurrer():
    from kpac_cli.engine import Deblurrer, EngineOptions
    from kpac_cli.model import KPACConfig, build_model

    torch.manual_seed(0)
    return Deblurrer(build_model(KPACConfig(levels=2, channels=8)), EngineOptions(device="cpu"))


def test_measure_speed_counts_and_times(tiny_deblurrer):
    from kpac_cli.model import count_parameters
    from kpac_cli.model.flops import count_flops

    ticks = iter(range(100))
    res = S.measure_speed(tiny_deblurrer, width=36, height=20, warmup=1, runs=3, clock=lambda: 0.5 * next(ticks))
    assert res.times == [0.5, 0.5, 0.5] and res.seconds == 0.5 and res.seconds_median == 0.5
    assert res.params == count_parameters(tiny_deblurrer.model)
    assert res.flops == count_flops(tiny_deblurrer.config, 20, 36)["total"]  # size padded to the stride inside
    assert res.device == "cpu" and res.precision == "fp32" and res.threads >= 1
    d = res.to_dict()
    assert d["gflops_per_s"] == pytest.approx(res.flops / 0.5 / 1e9) and json.dumps(d)
    with pytest.raises(ValueError):
        S.measure_speed(tiny_deblurrer, runs=0)


def test_measure_speed_times_every_pass_of_the_self_ensemble(tiny_deblurrer):
    from kpac_cli.engine import Deblurrer, EngineOptions
    from kpac_cli.engine.device import cpu_name
    from kpac_cli.model.flops import count_flops

    d = Deblurrer(tiny_deblurrer.model, EngineOptions(device="cpu", ensemble=8))
    encodes = []
    network_encode = d.network.encode
    d.network.encode = lambda x, *a: encodes.append(tuple(x.shape)) or network_encode(x, *a)
    ticks = iter(range(100))
    res = S.measure_speed(d, width=36, height=20, warmup=1, runs=2, clock=lambda: 2.0 * next(ticks))
    assert len(encodes) == (1 + 2) * 8  # every run is the 8 passes the engine makes per image
    assert encodes[:8].count((1, 3, 20, 36)) == 4 and encodes[:8].count((1, 3, 36, 20)) == 4  # 4 transposed
    assert res.ensemble == 8 and res.seconds == 2.0 and res.to_dict()["seconds_per_pass"] == 0.25
    cfg = tiny_deblurrer.config
    assert res.flops == 4 * count_flops(cfg, 20, 36)["total"] + 4 * count_flops(cfg, 36, 20)["total"]
    assert "8 forward passes" in S.describe_method(8) and "passes" not in S.describe_method()
    assert res.device_name == cpu_name()  # the CPU's model name, as kpac bench reports it


def test_flops_unavailable_is_reported_not_invented(tiny_deblurrer, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "kpac_cli.model.flops", None)  # as if the module were absent
    flops, note = S.count_model_flops(tiny_deblurrer.config, 720, 1280)
    assert flops is None and note.startswith("unavailable")
    res = S.measure_speed(tiny_deblurrer, width=16, height=16, warmup=0, runs=1)
    assert res.flops is None and res.gflops_per_s is None


def test_psnr_with_gain_scores_the_centre_crop_whatever_the_brightness():
    from kpac_cli.metrics import psnr
    from kpac_cli.metrics.dualpixel_capture import psnr_with_gain

    rng = np.random.default_rng(3)
    frame = rng.random((60, 80)) * 0.5
    target = np.clip(frame[10:50, 20:60] * 1.7 + rng.normal(0, 0.01, (40, 40)), 0, 1)
    expected = psnr(np.clip(frame[10:50, 20:60] * 1.7, 0, 1), target)
    assert abs(psnr_with_gain(frame, target) - expected) < 0.05  # the fitted gain is ~1.7
    assert abs(psnr_with_gain(frame * 3, target) - psnr_with_gain(frame, target)) < 1e-9
    assert psnr_with_gain(np.roll(frame, 5, axis=1), target) < expected - 3  # the crop must be the centre


# ------------------------------------------------------------------------------ names, non-finite values


def test_pair_folders_by_order_refuses_two_predictions_of_one_name(tmp_path):
    _touch_images(tmp_path / "p", ["a.png", "a.tif", "c.png"])
    _touch_images(tmp_path / "t", ["t1.png", "t2.png", "t3.png"])
    with pytest.raises(M.PairingError, match="share the name 'a'"):
        M.pair_folders(tmp_path / "p", tmp_path / "t", by="order")


def test_pair_dpdd_refuses_two_sources_of_one_name(tmp_path):
    src, _ = _dpdd_tree(tmp_path / "dpdd", "test", 3)
    (tmp_path / "dpdd" / "test_c" / "source" / src[2]).rename(tmp_path / "dpdd" / "test_c" / "source" / "1P0A0917.tif")
    # otherwise one prediction, 1P0A0917.png, would be scored against two targets
    _touch_images(tmp_path / "out", ["1P0A0917.png", "1P0A0919.png"])
    with pytest.raises(M.PairingError, match="share the name '1P0A0917'"):
        M.pair_predictions_dpdd(tmp_path / "out", tmp_path / "dpdd", expected_count=None)
    with pytest.raises(M.PairingError, match="share the name"):
        M.pair_dpdd(tmp_path / "dpdd", expected_count=None)


def test_quantize_maps_nan_as_writing_a_file_does(tmp_path):
    from kpac_cli.images import ImageInfo, read_image, write_image

    x = np.full((4, 4, 3), 0.5)
    x[0, 0, 0], x[1, 1, 1], x[2, 2, 2] = np.nan, np.inf, -np.inf
    info = ImageInfo(path=None, format="png", bit_depth=8, channels=3, alpha=None, icc_profile=None, exif=None,
                     orientation_applied=1, size=(4, 4))
    write_image(tmp_path / "x.png", x.astype(np.float32), info)
    written = read_image(tmp_path / "x.png")[0]
    np.testing.assert_array_equal(M.quantize(x, 8), M.quantize(written, 8))  # NaN -> 0, +inf -> 1, -inf -> 0
    assert np.isfinite(M.quantize(x, 16)).all() and M.quantize(x, 16)[0, 0, 0] == 0.0


def test_non_finite_prediction_fails_unquantised_scoring():
    t = RNG.random((16, 16, 3))
    p = t.copy()
    p[3, 4, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        Evaluator(bit_depth=None, lpips_model=None).score("a", p, t)
    rep = M.evaluate([("a", p, t), ("b", t, t * 0.9)], bit_depth=None, lpips_model=None, on_error="skip")
    assert [r.name for r in rep.rows] == ["b"] and rep.failures[0][0] == "a"
    assert math.isfinite(rep.summary()["overall"]["psnr"])
    # quantised, the NaN is 0 as in a written file: a finite score
    assert math.isfinite(Evaluator(lpips_model=None).score("a", p, t).psnr)


# ------------------------------------------------------------------------------ LPIPS: the standard network, loading


def _seeded_lpips_state() -> dict[str, torch.Tensor]:
    """Weights drawn with numpy (stable across PyTorch releases) for every tensor of the network."""
    rng = np.random.default_rng(2018)
    out = {}
    for k, v in M.LPIPS().state_dict().items():
        shape = tuple(v.shape)
        if k.startswith("lins."):
            a = rng.uniform(0, 2 / shape[1], shape)
        elif k.endswith(".weight"):
            a = rng.normal(0, (2 / int(np.prod(shape[1:]))) ** 0.5, shape)
        else:
            a = rng.normal(0, 0.05, shape)
        out[k] = torch.from_numpy(a.astype(np.float32))
    return out


def test_lpips_matches_the_lpips_package():
    # The value the `lpips` package (0.1.4, LPIPS(net='alex', pnet_rand=True), forward with
    # normalize=True) gives with these weights loaded under its own names on these images:
    # the same AlexNet taps, scaling layer, unit normalisation, 1x1 linear layers and spatial mean.
    model = M.LPIPS()
    model.load_state_dict(_seeded_lpips_state())
    rng = np.random.default_rng(7)
    a = rng.random((48, 64, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float32)
    assert M.lpips(a, b, model) == pytest.approx(0.001637064735405147, rel=1e-4)


def test_lpips_takes_the_smallest_side_alexnet_takes(rand_lpips):
    # conv1 (11x11, stride 4, pad 2) and two 3x3/2 max-pools leave a 1x1 map at 31 pixels
    a = RNG.random((31, 40, 3)).astype(np.float32)
    assert M.lpips(a, np.clip(a + 0.1, 0, 1), rand_lpips) > 0
    with pytest.raises(ValueError, match="at least 31 pixels"):
        M.lpips(a[:30], a[:30], rand_lpips)


def test_lpips_env_naming_a_missing_path_is_said(no_lpips_weights, tmp_path, monkeypatch):
    monkeypatch.setenv(M.LPIPS_ENV, str(tmp_path / "gone"))
    with pytest.raises(M.MetricUnavailable) as e:
        M.load_lpips()
    assert f"${M.LPIPS_ENV} names {tmp_path / 'gone'}, which does not exist" in str(e.value)


def test_lpips_unreadable_file_is_one_short_line(no_lpips_weights, tmp_path, recwarn):
    junk = tmp_path / "alex.pth"
    junk.write_text("not weights\n")
    with pytest.raises(M.MetricUnavailable) as e:
        M.load_lpips(junk)
    msg = str(e.value)
    assert msg.startswith(f"cannot read LPIPS weights from {junk}: not a PyTorch weights file")
    # PyTorch's advice to load with weights_only=False is not for this loader's users
    assert "weights_only` set to `False" not in msg and "\n" not in msg and len(msg) < 300


def test_lpips_file_without_its_tensors_is_named(no_lpips_weights, tmp_path):
    other = tmp_path / "model.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, other)
    with pytest.raises(M.MetricUnavailable) as e:
        M.load_lpips(other)
    msg = str(e.value)
    assert f"{other} holds no LPIPS or AlexNet weights" in msg
    assert f"put the files in {tmp_path} or {no_lpips_weights}" in msg  # a folder, not the file


# ------------------------------------------------------------------------------ pairing: where the images are


def _touch(folder, *names):
    for n in names:
        p = folder / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_pairing_says_images_are_in_sub_folders(tmp_path):
    # a `kpac deblur --recursive` output keeps its sub-folders, which pairing does not search
    _touch(tmp_path / "p", "day/a.png", "night/b.png")
    _touch(tmp_path / "t", "a.png", "b.png")
    with pytest.raises(M.PairingError, match=r"its 2 image\(s\) are in sub-folders \(day, night\), which are not searched"):
        M.pair_folders(tmp_path / "p", tmp_path / "t")
    _touch(tmp_path / "e", "notes.txt")
    with pytest.raises(M.PairingError, match=r"^no images in .*e$"):
        M.pair_folders(tmp_path / "e", tmp_path / "t")


def test_pairing_by_name_points_at_case_differences(tmp_path):
    _touch(tmp_path / "p", "IMG_1.png", "b.png")
    _touch(tmp_path / "t", "img_1.tif", "b.tif")
    with pytest.raises(M.PairingError, match="names are case-sensitive: IMG_1 / img_1"):
        M.pair_folders(tmp_path / "p", tmp_path / "t")
    # several dots and other extensions pair by the stem
    _touch(tmp_path / "q", "a.b.c.png", "a.png")
    _touch(tmp_path / "u", "a.b.c.tiff", "a.JPG")
    assert [(p.name, p.pred.name, p.target.name) for p in M.pair_folders(tmp_path / "q", tmp_path / "u")] == [
        ("a", "a.png", "a.JPG"), ("a.b.c", "a.b.c.png", "a.b.c.tiff")]


def test_pair_predictions_dpdd_named_after_the_targets_says_so(tmp_path):
    _, targets = _dpdd_tree(tmp_path / "dpdd", "test", 2)
    _touch_images(tmp_path / "pred", targets)
    with pytest.raises(M.PairingError, match="predictions are named after the targets in .*test_c.target"):
        M.pair_predictions_dpdd(tmp_path / "pred", tmp_path / "dpdd", "test", expected_count=None)
    assert len(M.pair_folders(tmp_path / "pred", tmp_path / "dpdd" / "test_c" / "target")) == 2
