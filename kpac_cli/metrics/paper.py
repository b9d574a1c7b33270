"""Published numbers to compare against.

Source: Son, Lee, Cho, Lee, "Single Image Defocus Deblurring Using Kernel-Sharing Parallel
Atrous Convolutions", ICCV 2021, Table 4: quantitative comparison on the DPDD test set
(Abuolaim & Brown, ECCV 2020; 76 images), evaluated on 8-bit images. Higher PSNR/SSIM and
lower MAE/LPIPS are better. LPIPS is the AlexNet variant.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["PAPER_TABLE4_DPDD", "PAPER_TABLE4_LABEL", "PaperRow"]

PAPER_TABLE4_LABEL = "paper, Table 4 (DPDD, 8-bit)"


class PaperRow(NamedTuple):
    method: str
    psnr: float
    ssim: float
    mae: float
    lpips: float


PAPER_TABLE4_DPDD: tuple[PaperRow, ...] = (
    PaperRow("DPDNet (single)", 24.39, 0.749, 0.041, 0.277),
    PaperRow("KPAC 2-level", 25.21, 0.774, 0.040, 0.227),
    PaperRow("KPAC 3-level", 25.24, 0.774, 0.040, 0.225),
    PaperRow("DPDNet (dual-pixel)", 25.13, 0.786, 0.041, 0.223),
)
