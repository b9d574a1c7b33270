"""Image-quality metrics with stated conventions, pairing, and evaluation reports.

* :func:`psnr`, :func:`ssim`, :func:`mae`, :func:`quantize` - float images in [0, 1],
  ``(H, W, 3)``, data range 1; SSIM is scikit-image's (7x7 uniform window by default,
  the DPDD literature's convention; ``window='gaussian'`` for Wang et al.'s). The paper
  evaluates 8-bit images: quantise first (:func:`quantize`, round half up).
* :func:`load_lpips` / :func:`lpips` - LPIPS v0.1 (AlexNet) from local weight files only;
  without them :class:`MetricUnavailable` is raised and reports say
  ``unavailable: <reason>``.
* :func:`pair_folders`, :func:`pair_dpdd`, :func:`pair_predictions_dpdd`,
  :func:`read_labels` - which prediction goes with which target (:class:`PairingError`).
* :func:`evaluate` -> :class:`Report` with JSON/CSV/Markdown writers that place our means
  next to the paper's Table 4 (:data:`PAPER_TABLE4_DPDD`).

This package does not import Typer or rich.
"""

from .core import SSIM_WINDOWS, mae, psnr, quantize, ssim, to_float
from .errors import MetricUnavailable, PairingError
from .evaluate import Evaluator, conventions, evaluate, read_for_metrics
from .lpips_net import LPIPS, LPIPS_ENV, load_lpips, lpips
from .pairing import (
    DPDD_COUNTS,
    DPDDPair,
    Pair,
    pair_dpdd,
    pair_folders,
    pair_predictions_dpdd,
    read_labels,
)
from .paper import PAPER_TABLE4_DPDD, PAPER_TABLE4_LABEL, PaperRow
from .report import METRIC_NAMES, ImageResult, Report

__all__ = [
    "Evaluator",
    "read_for_metrics",
    "DPDD_COUNTS",
    "DPDDPair",
    "ImageResult",
    "LPIPS",
    "LPIPS_ENV",
    "METRIC_NAMES",
    "MetricUnavailable",
    "PAPER_TABLE4_DPDD",
    "PAPER_TABLE4_LABEL",
    "Pair",
    "PairingError",
    "PaperRow",
    "Report",
    "SSIM_WINDOWS",
    "conventions",
    "evaluate",
    "load_lpips",
    "lpips",
    "mae",
    "pair_dpdd",
    "pair_folders",
    "pair_predictions_dpdd",
    "psnr",
    "quantize",
    "read_labels",
    "ssim",
    "to_float",
]
