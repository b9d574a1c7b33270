"""An optional auxiliary loss that keeps the scale attention a blur detector and blur-size gauge.

The paper trains with the image loss alone and reads the first KPAC block's scale attention
(Sec. 4.2, Fig. 6 and 8) two ways, which `kpac blurmap` relies on: the smallest-dilation map
is high where the photo is blurred (the detection map), and the attention-weighted mean
dilation grows with the blur size (the defocus map). Both are properties of the trained
weights, not of the architecture: our kpac-3level run had them at 19,000 iterations (ROC AUC
0.998, Spearman 0.86) and lost the first (AUC 0.69) in a later low-learning-rate cycle while
its PSNR kept improving. With synthetic data the true blur radius of every pixel is known,
so training can ask for both directly.

Each term is a pairwise ranking hinge, a differentiable surrogate of a rank statistic (the
ROC AUC for detection): within each image, every pair of attention cells whose true blur
differs by at least ``min_gap`` costs ``relu(margin - (score_more - score_less))``. Unlike a
per-pixel target (e.g. cross-entropy towards 0/1) it leaves the attention's working point
free, so the image loss is disturbed as little as possible.

Conventions
-----------
* ``radius`` is the synthesiser's signed blur-radius map in pixels on the network's input
  grid, ``(N, 1, H, W)``; a pixel's blur size is ``|radius|``.
* A grid cell of the block (total stride ``s``) is centred on input pixel ``s*i + s - 1``
  (see :mod:`kpac_cli.blurmap.maps`); its blur is the mean over the ``(s+1)^2`` input pixels
  centred there (edges replicated).
* Detection: score = the smallest dilation's attention, label = ``min(|radius|, 1)``, pairs
  at least 0.5 apart. Size: score = the attention-weighted mean dilation scaled to [0, 1],
  label = ``|radius|``, pairs at least 1 px apart.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

DETECTION_GAP = 0.5  # blur amount (0 = sharp, 1 = at least 1 px)
SIZE_GAP = 1.0  # px of blur radius
MARGIN = 0.1

__all__ = ["attention_blur_loss", "cell_blur", "pairwise_ranking_loss"]


def cell_blur(radius: Tensor, stride: int, clip: float | None = None) -> Tensor:
    """Mean blur radius (``|radius|``, clipped to ``clip``) per attention cell: ``(N, 1, H, W)`` -> ``(N, H/s, W/s)``."""
    if radius.ndim != 4 or radius.shape[1] != 1:
        raise ValueError(f"radius must be (N, 1, H, W), got {tuple(radius.shape)}")
    h, w = radius.shape[-2:]
    if h % stride or w % stride:
        raise ValueError(f"radius size {h}x{w} is not a multiple of the stride {stride}")
    size = radius.abs() if clip is None else radius.abs().clamp(max=clip)
    if stride == 1:
        return size[:, 0]
    offset = stride // 2 - 1  # windows [s*i + s/2 - 1, s*i + 3s/2 - 1] are centred on s*i + s - 1
    padded = F.pad(size, (0, stride, 0, stride), mode="replicate")[:, :, offset:, offset:]
    return F.avg_pool2d(padded, stride + 1, stride)[:, 0, : h // stride, : w // stride]


def pairwise_ranking_loss(scores: Tensor, labels: Tensor, min_gap: float, margin: float = MARGIN) -> Tensor:
    """Mean of ``relu(margin - (scores[i] - scores[j]))`` over the pairs with ``labels[i] - labels[j] >= min_gap``.

    Parameters
    ----------
    scores, labels : (N, H, W) tensors
        What the model says and the truth, per cell; pairs are formed within each image.
    min_gap : float
        How much more blurred cell ``i`` must truly be for the pair to count.
    margin : float
        How much higher its score should be.

    Returns
    -------
    A scalar: the mean over the images that hold at least one pair; zero (still attached to
    the graph) when none does.
    """
    if scores.shape != labels.shape or scores.ndim != 3:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} must both be (N, H, W)")
    per_image = []
    for s, t in zip(scores.float().flatten(1), labels.float().flatten(1)):
        pairs = (t[:, None] - t[None, :]) >= min_gap
        if pairs.any():
            per_image.append(F.relu(margin - (s[:, None] - s[None, :]))[pairs].mean())
    if not per_image:
        return scores.float().sum() * 0.0
    return torch.stack(per_image).mean()


def attention_blur_loss(alpha: Tensor, radius: Tensor, dilations: Sequence[int], stride: int) -> tuple[Tensor, Tensor]:
    """The detection and the size ranking terms for one block's scale attention.

    ``alpha`` is ``(N, len(dilations), h, w)`` (sigmoids; map ``i`` weighs ``dilations[i]``),
    ``radius`` the ``(N, 1, h*stride, w*stride)`` true blur radius.
    """
    alpha = alpha.float()
    d = torch.tensor(dilations, dtype=alpha.dtype, device=alpha.device)[None, :, None, None]
    smallest = int(torch.argmin(d.flatten()))
    detection = pairwise_ranking_loss(alpha[:, smallest], cell_blur(radius, stride, clip=1.0), DETECTION_GAP)
    mean_dilation = (alpha * d).sum(1) / alpha.sum(1).clamp(min=1e-6)
    spread = max(float(max(dilations) - min(dilations)), 1.0)
    size = pairwise_ranking_loss((mean_dilation - min(dilations)) / spread, cell_blur(radius, stride), SIZE_GAP)
    return detection, size
