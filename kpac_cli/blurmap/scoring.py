"""Scoring blur-detection maps against binary ground-truth masks.

Conventions
-----------
* Masks follow the CUHK blur-detection dataset (Shi et al., CVPR 2014) as distributed:
  255 (white) = blurred, 0 = sharp. Grey values are split at half the range. An integer
  mask whose values are only 0 and 1 is a label image (1 = blurred), not a nearly black
  one. Pass ``blurred_value=0`` for masks drawn the other way round.
* Scores are detection maps where higher means "more likely blurred", values in [0, 1].
* F-measure is F_beta with **beta^2 = 0.3**, the weighting of the blur-detection (and
  salient-object) literature that the paper's Appendix F compares with:
  ``F = (1 + b2) * P * R / (b2 * P + R)``. Precision, recall, F and accuracy are taken at one
  threshold (``score >= threshold`` is called blurred; default 0.5, the sigmoid's midpoint).
  Precision with no pixel called blurred is 0 (as scikit-learn's ``zero_division=0``).
* AUC is the area under the ROC curve, threshold-free, computed exactly by the rank
  statistic (Mann-Whitney U): ``(sum of ranks of blurred pixels - n1(n1+1)/2) / (n1*n0)``
  with tied scores given their average rank. It is NaN when the mask has only one class.
* Over a data set, :func:`summarize` averages the per-image numbers (each image counts once,
  whatever its size); the AUC over the images where it is defined, which it counts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np
from scipy.stats import rankdata

#: The paper's blur-detection figures on CUHK with the first block's dilation-1 map
#: (Son et al., ICCV 2021, Appendix F).
PAPER_CUHK = {"f_measure": 0.832, "accuracy": 0.784}

#: beta^2 of the F-measure.
F_BETA2 = 0.3

__all__ = ["DetectionScores", "F_BETA2", "PAPER_CUHK", "band_means", "band_radius_map", "mask_from_image", "roc_auc", "f_measure", "score_detection",
           "summarize"]


def band_radius_map(h: int, w: int, radii: Sequence[float], dtype=np.float32) -> np.ndarray:
    """True blur radius of a banded test image: left half 0 (sharp), the right half in
    ``len(radii)`` vertical bands of about equal width holding ``radii`` from left to right."""
    radius = np.zeros((h, w), dtype)
    edges = np.linspace(w // 2, w, len(radii) + 1).round().astype(int)
    for r, x0, x1 in zip(radii, edges[:-1], edges[1:]):
        radius[:, x0:x1] = r
    return radius


def band_means(values: np.ndarray, labels: np.ndarray, margin: int = 6) -> dict[Any, float]:
    """Mean of ``values`` per label of a test image made of vertical bands (e.g. blur radii).

    Pixels within ``margin`` of the image border or of a band border (a change of label
    between horizontal neighbours) are left out, so that maps resampled from a coarse grid
    are read where they are settled. Keys are the labels as Python scalars.
    """
    from scipy import ndimage as ndi

    h, w = values.shape
    keep = np.ones(labels.shape, dtype=bool)
    if margin:  # (margin 0: every pixel counts)
        keep[:] = False
        keep[margin : h - margin, margin : w - margin] = True
        border = np.zeros_like(keep)
        border[:, 1:] = labels[:, 1:] != labels[:, :-1]
        keep &= ~ndi.binary_dilation(border, iterations=margin)
    return {r.item(): float(values[keep & (labels == r)].mean()) for r in np.unique(labels)}


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (True = positive).

    The probability that a random positive scores above a random negative, ties counting
    one half: exactly the trapezoidal ROC area. NaN when either class is empty.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.size} vs {y.size}")
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(s, method="average")
    u = ranks[y].sum() - n1 * (n1 + 1) / 2.0
    return float(u / (n1 * n0))


def f_measure(precision: float, recall: float, beta2: float = F_BETA2) -> float:
    """F_beta = (1 + beta2) P R / (beta2 P + R); 0 when P = R = 0."""
    den = beta2 * precision + recall
    return 0.0 if den <= 0 else (1 + beta2) * precision * recall / den


def mask_from_image(mask: np.ndarray, blurred_value: int = 255) -> np.ndarray:
    """A ground-truth mask image (``H x W`` or ``H x W x C``, integer codes or floats in
    [0, 1]) -> bool ``H x W``, True = blurred.

    Integer codes are read on their type's full range, except in a label image: a mask of 0
    and one other code (0/1, or 0/255 saved as 16 bits) has that code as its "high" class,
    where split at half of the type's range it would be all sharp. A mask of 1s only is one
    too (all high).
    """
    raw = np.asarray(mask)
    m = raw
    if m.ndim == 3:
        m = m[..., :3].mean(axis=2) if m.shape[2] >= 3 else m[..., 0]
    m = m.astype(np.float64)
    if np.issubdtype(raw.dtype, np.integer):
        lo, hi = (float(m.min()), float(m.max())) if m.size else (0.0, 0.0)
        if lo == 0 and hi > 0 and bool(np.all((m == 0) | (m == hi))):
            top = hi
        else:
            top = 1.0 if hi == 1 and lo >= 0 else float(np.iinfo(raw.dtype).max)
        m = m / top
    high = m >= 0.5
    return high if blurred_value else ~high


@dataclass
class DetectionScores:
    """How well one detection map separates blurred (mask True) from sharp pixels."""

    precision: float
    recall: float
    f_measure: float
    accuracy: float
    auc: float
    threshold: float
    blurred_fraction: float
    pixels: int

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def score_detection(scores: np.ndarray, blurred: np.ndarray, threshold: float = 0.5, beta2: float = F_BETA2) -> DetectionScores:
    """Score a detection map (higher = blurred) against a bool mask of the same shape."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(blurred, dtype=bool)
    if s.shape != y.shape:
        raise ValueError(f"map is {s.shape[1]}x{s.shape[0]} but the mask is {y.shape[1]}x{y.shape[0]}")
    pred = s >= threshold
    tp = int(np.count_nonzero(pred & y))
    fp = int(np.count_nonzero(pred & ~y))
    fn = int(np.count_nonzero(~pred & y))
    n = y.size
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    correct = n - fp - fn
    return DetectionScores(
        precision=precision,
        recall=recall,
        f_measure=f_measure(precision, recall, beta2),
        accuracy=correct / n if n else float("nan"),
        auc=roc_auc(s, y),
        threshold=float(threshold),
        blurred_fraction=(tp + fn) / n if n else float("nan"),
        pixels=n,
    )


def summarize(scores: Iterable[DetectionScores]) -> dict[str, Any]:
    """Mean of each number over images (AUC over the images where it is defined, which
    ``auc_images`` counts: a mask of one class has none)."""
    items = list(scores)
    out: dict[str, Any] = {"images": len(items)}
    for key in ("precision", "recall", "f_measure", "accuracy", "auc"):
        vals = [getattr(s, key) for s in items if not math.isnan(getattr(s, key))]
        out[key] = float(np.mean(vals)) if vals else None
    out["auc_images"] = sum(1 for s in items if not math.isnan(s.auc))
    return out
