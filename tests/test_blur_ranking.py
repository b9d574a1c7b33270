"""The ranking losses that keep the scale attention a blur detector and blur-size gauge in training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kpac_cli.blurmap.scoring import roc_auc
from kpac_cli.checkpoints import load_checkpoint
from kpac_cli.model import KPACConfig
from kpac_cli.train import TrainConfig, TrainingError, train
from kpac_cli.train import data as D
from kpac_cli.train.blur_ranking import attention_blur_loss, cell_blur, pairwise_ranking_loss

TINY = KPACConfig(levels=2, channels=8)


def _grid_by_hand(radius: np.ndarray, s: int, clip: float | None) -> np.ndarray:
    """Mean of min(|r|, clip) over the (s+1)^2 pixels centred on s*i + s - 1 (edges replicated)."""
    amount = np.abs(radius) if clip is None else np.minimum(np.abs(radius), clip)
    h, w = amount.shape
    if s == 1:
        return amount
    padded = np.pad(amount, s, mode="edge")
    out = np.empty((h // s, w // s))
    for i in range(h // s):
        for j in range(w // s):
            cy, cx = s * i + s - 1 + s, s * j + s - 1 + s
            out[i, j] = padded[cy - s // 2 : cy + s // 2 + 1, cx - s // 2 : cx + s // 2 + 1].mean()
    return out


@pytest.mark.parametrize("stride", [1, 2, 4, 8])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_cells_average_the_blur_centred_like_the_attention_grid(stride, clip):
    rng = np.random.default_rng(stride)
    radius = rng.uniform(-3, 3, (48, 40)) * (rng.random((48, 40)) < 0.5)
    got = cell_blur(torch.from_numpy(radius)[None, None].float(), stride, clip)[0].numpy()
    np.testing.assert_allclose(got, _grid_by_hand(radius, stride, clip), atol=1e-5)


def test_a_cell_on_a_sharp_blurred_edge_is_partly_blurred():
    radius = torch.zeros(1, 1, 32, 32)
    radius[..., 16:] = -3.0  # sign (in front of / behind focus) does not matter
    cells = cell_blur(radius, 8, clip=1.0)[0, 0]
    # cell 1 covers columns 11..19: four of its nine columns are blurred
    np.testing.assert_allclose(cells.numpy(), [0, 4 / 9, 1, 1], atol=1e-6)
    np.testing.assert_allclose(cell_blur(radius, 8)[0, 0].numpy(), [0, 12 / 9, 3, 3], atol=1e-6)
    with pytest.raises(ValueError, match="multiple of the stride"):
        cell_blur(torch.zeros(1, 1, 30, 32), 8)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        cell_blur(torch.zeros(1, 32, 32), 8)


def test_loss_is_the_shortfall_from_the_margin():
    amount = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
    ranked = torch.tensor([[[0.40, 0.45, 0.60, 0.70]]])
    assert pairwise_ranking_loss(ranked, amount, 0.5, margin=0.1).item() == 0.0
    flat = torch.full_like(amount, 0.5)
    assert pairwise_ranking_loss(flat, amount, 0.5, margin=0.1).item() == pytest.approx(0.1)
    reversed_ = torch.tensor([[[0.7, 0.7, 0.4, 0.4]]])
    assert pairwise_ranking_loss(reversed_, amount, 0.5, margin=0.1).item() == pytest.approx(0.4)
    close = torch.tensor([[[0.0, 0.3]]])  # truly closer than min_gap: no pair, whatever the scores
    assert pairwise_ranking_loss(torch.tensor([[[0.9, 0.1]]]), close, 0.5).item() == 0.0


def test_images_without_both_kinds_of_cell_do_not_count():
    amount = torch.tensor([[[1.0, 1.0]], [[0.0, 1.0]]])
    att = torch.tensor([[[0.1, 0.1]], [[0.5, 0.5]]], requires_grad=True)
    loss = pairwise_ranking_loss(att, amount, 0.5, margin=0.2)
    assert loss.item() == pytest.approx(0.2)  # the first image (all blurred) is left out
    loss.backward()
    assert att.grad[0].abs().sum() == 0 and att.grad[1, 0, 0] > 0 > att.grad[1, 0, 1]
    none = torch.zeros(1, 1, 3, requires_grad=True)
    zero = pairwise_ranking_loss(none, torch.ones(1, 1, 3), 0.5)
    assert zero.item() == 0.0 and zero.requires_grad


def test_descending_the_loss_makes_the_map_a_detector():
    rng = np.random.default_rng(0)
    amount = torch.from_numpy((rng.random((2, 12, 12)) < 0.4).astype(np.float32))
    logits = torch.randn(2, 12, 12, generator=torch.Generator().manual_seed(0), requires_grad=True)
    labels = amount.numpy() > 0.5
    before = roc_auc(torch.sigmoid(logits).detach().numpy(), labels)
    opt = torch.optim.SGD([logits], lr=50.0)
    for _ in range(200):
        opt.zero_grad()
        pairwise_ranking_loss(torch.sigmoid(logits), amount, 0.5).backward()
        opt.step()
    after = roc_auc(torch.sigmoid(logits).detach().numpy(), labels)
    assert 0.3 < before < 0.7 and after == 1.0


def test_descending_both_terms_orders_detection_and_blur_size():
    """Free attention logits: the terms alone make dilation 1 a detector and the mean dilation grow with blur."""
    rng = np.random.default_rng(1)
    levels = rng.integers(0, 5, (2, 1, 10, 10)).astype(np.float32) * 1.5  # radius 0, 1.5, ... 6 px
    radius = torch.from_numpy(np.kron(levels, np.ones((1, 1, 4, 4), np.float32)))  # stride 4 cells
    logits = torch.zeros(2, 5, 10, 10, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        detection, size = attention_blur_loss(torch.sigmoid(logits), radius, (1, 2, 3, 4, 5), 4)
        (detection + size).backward()
        opt.step()
    assert detection.item() < 0.01 and size.item() < 0.02
    alpha = torch.sigmoid(logits).detach().numpy()
    amount, size = cell_blur(radius, 4, clip=1.0).numpy(), cell_blur(radius, 4).numpy()
    both = (amount == 0) | (amount == 1)  # cells wholly sharp or wholly blurred
    assert roc_auc(alpha[:, 0][both], amount[both] == 1) == 1.0
    mean_dilation = ((alpha * np.arange(1, 6)[None, :, None, None]).sum(1) / alpha.sum(1)).reshape(2, -1)
    size = size.reshape(2, -1)
    for md, sz in zip(mean_dilation, size):
        pairs = (sz[:, None] - sz[None, :]) >= 1.0
        assert ((md[:, None] - md[None, :])[pairs] > 0).mean() > 0.99


def test_synthetic_samples_carry_the_true_radius_and_nothing_else_changes():
    from kpac_cli.synth import SynthSettings, sharp_sources

    srcs = sharp_sources([], include_skimage=False, procedural=3, procedural_size=(96, 96))
    settings = SynthSettings(max_radius=6, layers=4)
    plain = D.SyntheticDataset(srcs, settings, seed=3, noise_max=0.0)
    with_r = D.SyntheticDataset(srcs, settings, seed=3, noise_max=0.0, with_radius=True)
    sharp_err, blurred_err = [], []
    for key in range(6):
        a, b = plain[(key, 48)], with_r[(key, 48)]
        assert set(b) == set(a) | {"radius"} and b["radius"].shape == (1, 48, 48)
        for k in a:  # the same draws: an exact resume may switch the loss on
            np.testing.assert_array_equal(a[k], b[k])
        r = np.abs(b["radius"][0])
        err = np.abs(b["input"] - b["target"]).mean(axis=0)
        sharp_err.append(err[r < 0.3])
        blurred_err.append(err[r > 3])
    # the radius is where the blur is: blurred pixels differ from the target far more
    assert np.concatenate(blurred_err).mean() > 3 * np.concatenate(sharp_err).mean()


def test_training_with_the_loss_logs_it_and_records_it(tmp_path):
    res = train(TrainConfig(out=tmp_path / "s", procedural=3, model=TINY, iterations=4, batch=2, crop="32", max_radius=4,
                            val_count=1, val_crop=32, workers=0, tensorboard=False, blur_rank_weight=0.5, log_every=2))
    assert res.step == 4 and all(np.isfinite(res.losses))
    rows = [json.loads(line) for line in (tmp_path / "s" / "log.jsonl").read_text().splitlines()]
    ranks = [r["blur_rank"] for r in rows if r["event"] == "train"]
    sizes = [r["blur_size_rank"] for r in rows if r["event"] == "train"]
    assert len(ranks) == len(sizes) == 2 and all(0 < v < 1.1 for v in ranks + sizes)  # hinges of margin 0.1 on [0, 1] scores
    assert "ranking of the block-1 scale attention" in load_checkpoint(res.model_path).provenance["loss"]


def test_the_loss_needs_synthetic_data_and_scale_attention(tmp_path):
    with pytest.raises((TrainingError, ValueError), match="needs synthetic data"):
        train(TrainConfig(out=tmp_path / "a", data=tmp_path, model=TINY, blur_rank_weight=0.1))
    no_attention = KPACConfig(levels=2, channels=8, scale_attention=False)
    with pytest.raises((TrainingError, ValueError), match="needs a model with scale attention"):
        train(TrainConfig(out=tmp_path / "b", procedural=2, model=no_attention, blur_rank_weight=0.1))
    with pytest.raises((TrainingError, ValueError), match=">= 0"):
        train(TrainConfig(out=tmp_path / "c", procedural=2, model=TINY, blur_rank_weight=-1.0))
