"""The shipped single-image models deblur: photos they never saw, blurred by kpac's synthesis.

A small slice of ``benchmarks/shipped_weights.py``'s held-out benchmark (scikit-image's
photos, which no shipped model was trained on; fixed seeds), so that a regression in the
weights, the engine or the synthesis that makes the shipped models stop deblurring fails the
suite, not only the benchmark. The thresholds sit well below the published scores (model
card: kpac-3level +1.99 dB, kpac-2level +1.84 dB over the blurry input on the full benchmark).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from kpac_cli.engine import Deblurrer, EngineOptions
from kpac_cli.inverse import deblur_disc
from kpac_cli.metrics import psnr, quantize
from kpac_cli.synth import SynthSettings, decode, encode, render_defocus, sharp_sources, synthesize

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "coffee", "motorcycle")
LEVELS = (6.0, 12.0)


def _psnr8(pred: np.ndarray, target: np.ndarray) -> float:
    return psnr(quantize(np.clip(pred, 0, 1), 8), quantize(target, 8))


@pytest.fixture(scope="module")
def held_out_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    """(blurred, sharp) 192x192 centre crops, spatially varying defocus up to each level."""
    sources = [s for s in sharp_sources([], include_skimage=True) if s.origin.split(":", 1)[-1] in PHOTOS]
    assert len(sources) == len(PHOTOS)
    cases = []
    for li, level in enumerate(LEVELS):
        for i, src in enumerate(sources):
            img = src.load()
            y, x = (img.shape[0] - 192) // 2, (img.shape[1] - 192) // 2
            sample = synthesize(img[y : y + 192, x : x + 192], np.random.default_rng([77, li, i]),
                                SynthSettings(max_radius=level, min_radius=level))
            cases.append((sample.blurred, sample.sharp))
    return cases


def _shipped(name: str, **options) -> Deblurrer:
    try:
        return Deblurrer(name, EngineOptions(device="cpu", precision="fp32", **options))
    except FileNotFoundError:
        pytest.skip(f"shipped model {name} not installed")


@pytest.mark.parametrize("name,min_median_gain", [("kpac-3level", 1.0), ("kpac-2level", 0.8)])
def test_shipped_model_raises_psnr_on_photos_it_never_saw(held_out_cases, name, min_median_gain):
    model = _shipped(name)
    gains, over_wiener = [], []
    for blurred, sharp in held_out_cases:
        out = model.deblur(blurred)
        wiener = deblur_disc(blurred, gamma=SynthSettings().gamma).image  # what kpac eval --method wiener runs
        gains.append(_psnr8(out, sharp) - _psnr8(blurred, sharp))
        over_wiener.append(_psnr8(out, sharp) - _psnr8(wiener, sharp))
    # one of the six (KNOWN_FAILURE below) loses about 2 dB: median and count, not the mean
    assert np.median(gains) > min_median_gain, gains
    assert sum(g > 0.5 for g in gains) >= len(gains) - 1, gains
    assert np.median(over_wiener) > 1.0, over_wiener


#: A mostly in-focus crop of scikit-image's coffee (level 12, the 2nd photo): the band of soft
#: shading between the cup's white rim and its red side, rendered nearly in focus (0.2-1.5 px),
#: is read as a blurred hard edge and darkened by 0.1-0.17 (-5.6 dB against the input for
#: an earlier kpac-3level, -3.3 dB for the release before the current one, -2.2 dB for it);
#: the sharp crop itself is darkened there too. The model card describes it.
KNOWN_FAILURE = (1, 1)


@pytest.mark.xfail(strict=True, reason="known failure of the shipped models: soft shading beside a bright edge is made hard "
                   "(strict: a model that fixes it makes this test fail, so the model card is updated)")
def test_soft_shading_beside_a_bright_edge_is_left_alone(held_out_cases):
    blurred, sharp = held_out_cases[KNOWN_FAILURE[0] * len(PHOTOS) + KNOWN_FAILURE[1]]
    out = _shipped("kpac-3level").deblur(blurred)
    assert _psnr8(out, sharp) > _psnr8(blurred, sharp) - 1.0


@pytest.mark.parametrize("white", [0.7, 1.0])
def test_a_clean_edge_is_left_alone_when_sharp_and_sharpened_when_slightly_blurred(white):
    """The known failure above is soft shading, not bright edges as such: a hard edge between
    white and dark red, slightly slanted, passes through a sharp crop almost untouched, and
    1 px of disc defocus on it (rendered in linear light, as the training data is) is undone
    in part."""
    size = 160
    yy, xx = np.mgrid[:size, :size]
    above = (yy > size / 2 + 0.15 * (xx - size / 2))[..., None]
    sharp = np.where(above, np.array([1.0, 0.97, 0.92]) * white, [0.2, 0.06, 0.05]).astype(np.float32)
    blurred = encode(render_defocus(decode(sharp, 2.2), np.full((size, size), 1.0, np.float32))[0], 2.2)
    model = _shipped("kpac-3level")
    assert _psnr8(model.deblur(sharp), sharp) > 45.0  # measured 49.5-50.3
    assert _psnr8(model.deblur(blurred), sharp) > _psnr8(blurred, sharp) + 0.5  # measured +1.0 / +2.3


def test_self_ensemble_of_the_default_model_is_at_least_as_good(held_out_cases):
    plain, ensemble = _shipped("kpac-3level"), _shipped("kpac-3level", ensemble=8)
    diffs = [_psnr8(ensemble.deblur(b), s) - _psnr8(plain.deblur(b), s) for b, s in held_out_cases]
    # full benchmark: +0.10 dB on average; on a single photo it may lose a little
    assert np.mean(diffs) > 0.02 and min(diffs) > -0.2, diffs


@pytest.mark.parametrize("name", ["kpac-3level", "kpac-2level", "kpac-dual"])
def test_committed_training_state_exports_the_shipped_weights(name, tmp_path):
    """`kpac train --resume weights/train-state/NAME` continues the run that made the shipped
    file: its checkpoint exports exactly the shipped tensors (a newer file without its state,
    or a state left behind by a re-release, fails here)."""
    from kpac_cli.checkpoints import load_checkpoint
    from kpac_cli.train import export_model

    state = REPO / "weights" / "train-state" / name
    if not (state / "last.pt").is_file():
        pytest.skip(f"no training state for {name} in this checkout (an installed kpac carries none)")
    shipped_file = load_checkpoint(REPO / "weights" / f"{name}.safetensors")
    blend = shipped_file.provenance.get("weight_blend")  # exported as a blend with a file kept beside the state
    if blend:
        other = state / blend["with"]
        assert hashlib.sha256(other.read_bytes()).hexdigest() == blend["with_sha256"]
        exported_path = export_model(state, tmp_path / f"{name}.safetensors", blend_with=other, blend=blend["fraction_of_run"])
    else:
        exported_path = export_model(state, tmp_path / f"{name}.safetensors")
    exported, shipped = load_checkpoint(exported_path).state_dict, shipped_file.state_dict
    assert exported.keys() == shipped.keys()
    for key in shipped:
        assert torch.equal(exported[key], shipped[key]), key


def test_every_shipped_model_is_listed_in_sha256sums_and_matches_it():
    """Loading a shipped model by name verifies it against SHA256SUMS, but only if listed: a
    model file added without its line would be used unverified, and a line without its file
    means a model is missing."""
    from kpac_cli.checkpoints.registry import survey_models, verify_file

    folder = REPO / "weights"
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        pytest.skip("no shipped weights in this checkout")
    listed = dict(reversed(line.split(maxsplit=1)) for line in (folder / "SHA256SUMS").read_text().splitlines())
    assert sorted(listed) == files
    for name in files:
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == listed[name], name
        verify_file(folder / name)
    models, unusable = survey_models()
    assert unusable == {} and {m.name for m in models} >= {Path(n).stem for n in files}
