"""How good are the shipped weights? Scores on data never used for training, fixed seeds.

1. Held-out synthetic benchmark: defocus rendered by kpac's synthesis (the same code as
   `kpac synth`) from photos excluded from training - scikit-image's bundled photos and, when
   the reference material is present, the LIVE1 and McMaster photos of ../shared/train-images.
   Four blur levels (largest radius 3, 6, 9, 12 px). Methods: the blurry input (identity), the
   classical baseline (kpac_cli.inverse.deblur_disc: Wiener deconvolution with one disc PSF in
   linear light, mirrored borders, its snr chosen per image by generalised cross-validation;
   radius estimated per image, and an oracle that picks the best radius of a 0.5 px grid per
   image in hindsight), and the model, plain and with
   the self-ensemble of `kpac deblur --ensemble 8` (4 for a dual-pixel model: flips only).
2. Sharp and mildly soft photos: the same held-out photos blurred over the whole image by one
   disc (radius 0, 1, 2, 4, 8 px; linear light, no noise, like an evenly soft JPEG), the
   single-image model at full and at half strength, and the disc-Wiener baseline with the radius
   estimated and with the true radius (where one disc is the right model, the classical
   method's best case). Radius 0 asks what the model (and the baseline, which still estimates
   a radius) does to a photo that needs nothing: its PSNR against the untouched photo.
3. Blur detection (`kpac blurmap`): held-out photos whose left half is sharp and whose right
   half is cut into vertical bands blurred by discs of radius 1..6 px (linear light, no
   noise). The ROC AUC of the block-1 dilation-1 detection map against the true blur mask,
   and the Spearman correlation between the true radius and the block-1 defocus map (mean
   dilation) averaged per band, away from band borders.
4. Real dual-pixel capture with ground truth (../shared/samples/defocused/dp_pixel4): the
   single-image model on the combined view (left + right), at full and at half strength
   (`kpac deblur --strength 0.5`), and the dual model on left/right.

Conventions: PSNR/SSIM on images in [0, 1] quantised to 8 bits (the paper's protocol), SSIM
as scikit-image's (7x7 uniform window). For the Pixel 4 capture (green channel, 14-bit linear,
black level 1024): views are black-level corrected, summed, scaled by the 99.9th percentile,
gamma-encoded (1/2.2) and replicated to RGB for the model; the output's mean channel is
decoded back to linear, cropped to the target's field of view, a least-squares gain is fitted
against the target (the target is on a different intensity scale), and PSNR is computed in
linear light with data range 1 after normalising the target by its maximum.

Usage: python benchmarks/shipped_weights.py [--model kpac-3level] [--dual-model kpac-dual]
       [--per-level 6] [--crop 256] [--ensemble 8] [--json out.json] [--publish]

``--publish`` writes the measured scores (and this command) into the model file's provenance,
where `kpac models` shows them, and refreshes weights/SHA256SUMS.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from scipy.stats import spearmanr

from kpac_cli.blurmap import attention_maps
from kpac_cli.blurmap.scoring import band_means, band_radius_map, roc_auc
from kpac_cli.checkpoints import update_provenance
from kpac_cli.checkpoints.registry import resolve_model
from kpac_cli.metrics.dualpixel_capture import GammaEncoding, psnr_with_gain, read_dual_pixel_capture
from kpac_cli.engine import Deblurrer, EngineOptions
from kpac_cli.inverse import deblur_disc
from kpac_cli.metrics import psnr, quantize, ssim
from kpac_cli.synth import SynthSettings, decode, encode, render_defocus, sharp_sources, synthesize

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LEVELS = (3.0, 6.0, 9.0, 12.0)
UNIFORM_RADII = (0.0, 1.0, 2.0, 4.0, 8.0)
BAND_RADII = (1, 2, 3, 4, 5, 6)
HELD_OUT_SKIMAGE = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle")
GAMMA = SynthSettings().gamma  # the synthesis' tone curve: the baseline deconvolves in linear light


def held_out_sources():
    folders = [SHARED / "train-images" / "live1", SHARED / "train-images" / "mcmaster"]
    folders = [f for f in folders if f.is_dir()]
    sources = sharp_sources(folders, include_skimage=True)
    return [s for s in sources if not s.origin.startswith("skimage:") or s.origin.split(":", 1)[1] in HELD_OUT_SKIMAGE]


def _centre_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    if min(h, w) <= size:
        return img
    y, x = (h - size) // 2, (w - size) // 2
    return img[y : y + size, x : x + size]


def score(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    p, t = quantize(np.clip(pred, 0, 1), 8), quantize(target, 8)
    return psnr(p, t), ssim(p, t)


def wiener_scores(blurred: np.ndarray, sharp: np.ndarray, level: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """The disc-Wiener baseline (kpac_cli.inverse.deblur_disc: linear light, snr by GCV) with the
    radius estimated, and with the best radius of a 0.5 px grid up to ``level`` (an oracle)."""
    est = deblur_disc(blurred, gamma=GAMMA).image
    best = max(
        (score(deblur_disc(blurred, r, gamma=GAMMA).image, sharp) for r in np.arange(0.5, level + 0.01, 0.5)),
        key=lambda s: s[0],
    )
    return score(est, sharp), best


def synthetic_benchmark(deblurrer: Deblurrer, per_level: int, crop: int, seed: int = 2024,
                        ensemble: Deblurrer | None = None) -> list[dict]:
    """Per blur level; a dual-pixel model gets the rendered left/right views and the centre view.
    ``ensemble``: the same model with a self-ensemble, scored as a further method (its size
    recorded in each row)."""
    dual = deblurrer.config.in_views == 2
    sources = held_out_sources()
    rows = []
    for li, level in enumerate(LEVELS):
        settings = SynthSettings(max_radius=level, min_radius=level, dual_pixel=dual)
        acc = {k: [] for k in ("input", "wiener", "wiener_oracle", "model", "ensemble")}
        for i in range(per_level):
            src = sources[(li * per_level + i) % len(sources)]
            rng = np.random.default_rng([seed, li, i])
            sharp = _centre_crop(src.load(), crop)
            sample = synthesize(sharp, rng, settings)
            acc["input"].append(score(sample.blurred, sample.sharp))
            w_est, w_best = wiener_scores(sample.blurred, sample.sharp, level)
            acc["wiener"].append(w_est)
            acc["wiener_oracle"].append(w_best)
            inputs = (np.concatenate([sample.left, sample.right], axis=2), sample.blurred) if dual else (sample.blurred,)
            acc["model"].append(score(deblurrer.deblur(*inputs), sample.sharp))
            if ensemble is not None:
                acc["ensemble"].append(score(ensemble.deblur(*inputs), sample.sharp))
        row = {"max_radius": level, "images": per_level, **_mean_scores(acc)}
        if ensemble is not None:
            row["ensemble"] = ensemble.options.ensemble
        rows.append(row)
        print(
            f"radius {level:4.1f}: input {row['input_psnr']:.2f} dB / {row['input_ssim']:.3f}   "
            f"wiener {row['wiener_psnr']:.2f} / {row['wiener_ssim']:.3f}   "
            f"wiener-oracle {row['wiener_oracle_psnr']:.2f} / {row['wiener_oracle_ssim']:.3f}   "
            f"model {row['model_psnr']:.2f} / {row['model_ssim']:.3f}"
            + (f"   ensemble x{ensemble.options.ensemble} {row['ensemble_psnr']:.2f} / {row['ensemble_ssim']:.3f}"
               if ensemble is not None else ""),
            flush=True,
        )
    return rows


def _mean_scores(acc: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    """``{method: [(psnr, ssim), ...]}`` -> ``{method_psnr: mean, method_ssim: mean}`` (empty lists skipped)."""
    out = {}
    for k, v in acc.items():
        if v:
            out[f"{k}_psnr"] = float(np.mean([a for a, _ in v]))
            out[f"{k}_ssim"] = float(np.mean([b for _, b in v]))
    return out


def uniform_blur_benchmark(single: Deblurrer, single_half: Deblurrer, per_radius: int, crop: int) -> list[dict]:
    """Whole photos blurred by one disc, no noise: does the model help, or hurt, mild blur?"""
    sources = held_out_sources()
    rows = []
    for radius in UNIFORM_RADII:
        acc = {k: [] for k in ("input", "model", "model_half", "wiener", "wiener_known")}
        for i in range(per_radius):
            src = sources[(i * len(sources)) // per_radius]  # spread over LIVE1, McMaster and scikit-image's
            sharp = quantize(_centre_crop(src.load(), crop), 8)
            lin = decode(sharp, 2.2)
            blurred = quantize(np.clip(encode(render_defocus(lin, np.full(lin.shape[:2], radius, np.float32))[0], 2.2), 0, 1), 8)
            if radius > 0:
                acc["input"].append(score(blurred, sharp))
                acc["wiener_known"].append(score(deblur_disc(blurred, radius, gamma=2.2).image, sharp))
            acc["wiener"].append(score(deblur_disc(blurred, gamma=2.2).image, sharp))
            acc["model"].append(score(single.deblur(blurred), sharp))
            acc["model_half"].append(score(single_half.deblur(blurred), sharp))
        row = {"radius": radius, "images": per_radius, **_mean_scores(acc)}
        rows.append(row)
        print(f"uniform disc radius {radius:3.1f}: input {row.get('input_psnr', float('inf')):.2f} dB   "
              f"model {row['model_psnr']:.2f}   half strength {row['model_half_psnr']:.2f}   "
              f"wiener {row['wiener_psnr']:.2f}   wiener (true radius) {row.get('wiener_known_psnr', float('inf')):.2f}",
              flush=True)
    return rows


def banded_blur(sharp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left half sharp, right half in vertical bands of disc blur BAND_RADII; (photo, true radius)."""
    radius = band_radius_map(*sharp.shape[:2], BAND_RADII)
    blurred = encode(render_defocus(decode(sharp, 2.2), radius)[0], 2.2)
    return quantize(np.clip(blurred, 0, 1), 8), radius


def blur_detection_benchmark(single: Deblurrer, images: int, crop: int) -> dict:
    sources = held_out_sources()
    aucs, rhos, sizes = [], [], []
    for i in range(images):
        sharp = quantize(_centre_crop(sources[(i * len(sources)) // images].load(), crop), 8)
        photo, radius = banded_blur(sharp)
        maps = attention_maps(single, photo)
        aucs.append(roc_auc(maps.detection(1, 1), radius > 0))
        size = band_means(maps.defocus(1), radius, margin=8)
        rhos.append(spearmanr(list(size), list(size.values())).statistic)
        sizes.append(list(size.values()))
    row = {"images": images, "auc": float(np.mean(aucs)), "auc_min": float(np.min(aucs)),
           "size_spearman": float(np.mean(rhos)), "mean_dilation_by_radius": [round(float(v), 3) for v in np.mean(sizes, 0)]}
    print(f"blur detection: AUC {row['auc']:.3f} (min {row['auc_min']:.3f})   blur size vs radius 0-{BAND_RADII[-1]}: "
          f"Spearman {row['size_spearman']:.2f}, mean dilation {row['mean_dilation_by_radius']}", flush=True)
    return row


def _pixel4_views():
    root = SHARED / "samples" / "defocused" / "dp_pixel4"
    return read_dual_pixel_capture(root) if root.is_dir() else None


def pixel4_benchmark(single: Deblurrer | None, dual: Deblurrer | None, single_half: Deblurrer | None = None) -> dict:
    views = _pixel4_views()
    if views is None:
        return {"skipped": "dp_pixel4 capture not found"}
    left, right, target = views
    combined = left + right
    gamma = GammaEncoding.for_combined(combined)
    out = {"input_psnr": psnr_with_gain(combined, target)}
    if single is not None:
        t0 = time.perf_counter()
        out["single_psnr"] = psnr_with_gain(gamma.decode(single.deblur(gamma.encode(combined))), target)
        out["single_seconds"] = time.perf_counter() - t0
    if single_half is not None:
        out["single_half_strength_psnr"] = psnr_with_gain(gamma.decode(single_half.deblur(gamma.encode(combined))), target)
    if dual is not None:
        views6 = np.concatenate([gamma.encode(2 * left), gamma.encode(2 * right)], axis=2)
        out["dual_psnr"] = psnr_with_gain(gamma.decode(dual.deblur(views6, gamma.encode(combined))), target)
    print("pixel4 dual-pixel capture (linear PSNR after gain fit):", {k: round(v, 2) for k, v in out.items()}, flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="kpac-3level")
    ap.add_argument("--dual-model", default=None)
    ap.add_argument("--per-level", type=int, default=6)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-pixel4", action="store_true")
    ap.add_argument("--ensemble", type=int, default=8, help="also score the single-image model with this self-ensemble (1: not)")
    ap.add_argument("--publish", action="store_true", help="store the scores in the model file and refresh SHA256SUMS")
    args = ap.parse_args(argv)
    opts = EngineOptions(device="cpu", precision="fp32")
    single = Deblurrer(args.model, opts)
    dual = Deblurrer(args.dual_model, opts) if args.dual_model else None
    ensemble = Deblurrer(args.model, dataclasses.replace(opts, ensemble=args.ensemble)) if args.ensemble > 1 else None
    result = {"model": single.name, "provenance": single.provenance,
              "synthetic": synthetic_benchmark(single, args.per_level, args.crop, ensemble=ensemble)}
    if dual is not None:
        print("dual-pixel model on held-out synthetic dual-pixel views:", flush=True)
        dual_ensemble = min(args.ensemble, dual.max_ensemble)
        result["synthetic_dual"] = synthetic_benchmark(
            dual, args.per_level, args.crop,
            ensemble=Deblurrer(args.dual_model, dataclasses.replace(opts, ensemble=dual_ensemble)) if dual_ensemble > 1 else None)
    half = Deblurrer(args.model, dataclasses.replace(opts, strength=0.5))
    print("single-image model on whole photos blurred by one disc (no noise):", flush=True)
    result["uniform"] = uniform_blur_benchmark(single, half, args.per_level, args.crop)
    result["blur_detection"] = blur_detection_benchmark(single, args.per_level, args.crop)
    if not args.no_pixel4:
        result["pixel4"] = pixel4_benchmark(single, dual, half)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    if args.publish:
        publish(args, result)
    return 0


def _scores(rows: list[dict]) -> dict:
    scores = {
        "heldout_synthetic_psnr_gain_db": round(float(np.mean([r["model_psnr"] - r["input_psnr"] for r in rows])), 2),
        "heldout_synthetic": _rounded(rows),
    }
    if all("ensemble_psnr" in r for r in rows):
        scores["heldout_synthetic_ensemble_psnr_gain_db"] = round(float(np.mean([r["ensemble_psnr"] - r["input_psnr"] for r in rows])), 2)
        scores["heldout_synthetic_ensemble_size"] = rows[0]["ensemble"]
    return scores


def _rounded(rows: list[dict]) -> list[dict]:
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]


def publish(args, result: dict) -> None:
    """Scores into each model's provenance (shown by `kpac models`), then SHA256SUMS."""
    per_model = {args.model: _scores(result["synthetic"])}
    per_model[args.model]["uniform_blur"] = _rounded(result["uniform"])
    per_model[args.model]["blur_detection"] = _rounded([result["blur_detection"]])[0]
    if args.dual_model:
        per_model[args.dual_model] = _scores(result["synthetic_dual"])
    if "pixel4" in result and "skipped" not in result["pixel4"]:
        p4 = {k: round(v, 2) for k, v in result["pixel4"].items() if not k.endswith("seconds")}
        for scores in per_model.values():
            scores["pixel4_dual_pixel_capture"] = p4
    command = "python benchmarks/shipped_weights.py " + " ".join(
        a for a in (f"--model {args.model}", f"--dual-model {args.dual_model}" if args.dual_model else "",
                    f"--per-level {args.per_level}", f"--crop {args.crop}", f"--ensemble {args.ensemble}") if a
    )
    for spec, scores in per_model.items():
        path, _ = resolve_model(spec)
        update_provenance(path, scores=scores, scores_command=command)
        write_checksums(path.parent)
        print(f"published scores into {path}", flush=True)


def write_checksums(folder: Path) -> None:
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}" for p in sorted(folder.glob("*.safetensors"))]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
