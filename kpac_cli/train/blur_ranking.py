"""An optional auxiliary loss that keeps the dilation-1 scale attention a blur detector.

The paper trains with the image loss alone and observes (Sec. 4.2, Fig. 6) that the
smallest-dilation attention map of the first KPAC block comes out high where the photo is
blurred, which `kpac blurmap` relies on. That reading is a property of the trained weights,
not of the architecture: our kpac-3level run had it (ROC AUC 0.998 against the true blur
mask) at 19,000 iterations and lost most of it (0.69) in a later low-learning-rate cycle
while its PSNR kept improving. With synthetic data the true blur radius of every pixel is
known, so training can ask for the property directly.

The loss is a pairwise ranking hinge, a differentiable surrogate of the ROC AUC: for each
image, every (blurred cell, sharp cell) pair of the attention grid whose attention is not
higher on the blurred cell by ``margin`` costs the shortfall. Unlike a per-pixel target
(e.g. binary cross-entropy towards 0/1) it leaves the attention's working point free, so
the image loss is disturbed as little as possible.

Conventions
-----------
* ``radius`` is the signed blur-radius map of the synthesiser in pixels, on the network's
  input grid, shaped ``(N, 1, H, W)``; a pixel's blur amount is ``min(|radius|, 1)``.
* A grid cell of the block (total stride ``s``) is centred on input pixel ``s*i + s - 1``
  (see :mod:`kpac_cli.blurmap.maps`); its blur amount is the mean over the ``(s+1)^2``
  input pixels centred there (edges replicated).
* Cells with amount > 0.75 count as blurred, < 0.25 as sharp, the rest are ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BLURRED_ABOVE = 0.75
SHARP_BELOW = 0.25

__all__ = ["blur_amount_grid", "blur_ranking_loss"]


def blur_amount_grid(radius: Tensor, stride: int) -> Tensor:
    """Blur amount in [0, 1] per attention cell: ``(N, 1, H, W)`` radius -> ``(N, H/s, W/s)``."""
    if radius.ndim != 4 or radius.shape[1] != 1:
        raise ValueError(f"radius must be (N, 1, H, W), got {tuple(radius.shape)}")
    h, w = radius.shape[-2:]
    if h % stride or w % stride:
        raise ValueError(f"radius size {h}x{w} is not a multiple of the stride {stride}")
    amount = radius.abs().clamp(max=1.0)
    if stride == 1:
        return amount[:, 0]
    offset = stride // 2 - 1  # windows [s*i + s/2 - 1, s*i + 3s/2 - 1] are centred on s*i + s - 1
    padded = F.pad(amount, (0, stride, 0, stride), mode="replicate")[:, :, offset:, offset:]
    return F.avg_pool2d(padded, stride + 1, stride)[:, 0, : h // stride, : w // stride]


def blur_ranking_loss(attention: Tensor, amount: Tensor, margin: float = 0.1) -> Tensor:
    """Mean hinge ``relu(margin - (a_blurred - a_sharp))`` over blurred x sharp cell pairs.

    Parameters
    ----------
    attention : (N, H, W) tensor
        One scale-attention map per image (sigmoid outputs).
    amount : (N, H, W) tensor
        Blur amount per cell, from :func:`blur_amount_grid`.
    margin : float
        How much higher the attention of a blurred cell should be.

    Returns
    -------
    A scalar: the mean over the images that hold both blurred and sharp cells; zero (still
    attached to the graph) when none does.
    """
    if attention.shape != amount.shape or attention.ndim != 3:
        raise ValueError(f"attention {tuple(attention.shape)} and amount {tuple(amount.shape)} must both be (N, H, W)")
    per_image = []
    for a, m in zip(attention.float().flatten(1), amount.flatten(1)):
        blurred, sharp = a[m > BLURRED_ABOVE], a[m < SHARP_BELOW]
        if blurred.numel() and sharp.numel():
            per_image.append(F.relu(margin - (blurred[:, None] - sharp[None, :])).mean())
    if not per_image:
        return attention.float().sum() * 0.0
    return torch.stack(per_image).mean()
