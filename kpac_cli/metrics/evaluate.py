"""Evaluate prediction/target pairs into a :class:`~kpac_cli.metrics.Report`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, Union

import numpy as np

from .core import SSIM_WINDOWS, mae, psnr, quantize, ssim, to_float
from .errors import MetricUnavailable
from .imread import read_image
from .lpips_net import LPIPS, describe, load_lpips, lpips
from .report import ImageResult, Report

__all__ = ["evaluate", "conventions"]

ImageLike = Union[str, os.PathLike, np.ndarray]
Progress = Callable[[int, int, str], None]


def conventions(bit_depth: int | None, ssim_window: str, lpips_text: str) -> dict[str, str]:
    """The human-readable statement of how the numbers were computed."""
    if ssim_window == "uniform":
        ssim_text = (
            "scikit-image structural_similarity, 7x7 uniform window, sample covariance, "
            "data_range=1, channel_axis=-1 (per-channel mean); as IFAN/Restormer/DRBNet/LaKDNet"
        )
    else:
        ssim_text = (
            "scikit-image structural_similarity, Gaussian window sigma=1.5 (11x11), population covariance, "
            "data_range=1, channel_axis=-1 (Wang et al. 2004)"
        )
    bits = (
        f"{bit_depth}-bit: both images rounded half up to integers in 0..{2**bit_depth - 1}, then divided back"
        if bit_depth
        else "none: float images as read (not quantised, not clipped)"
    )
    return {
        "images": "RGB (alpha dropped), float in [0, 1]; 8-bit files / 255, 16-bit files / 65535",
        "quantisation": bits,
        "data range": "1",
        "PSNR": "10*log10(1/MSE), MSE over all pixels and channels of an image",
        "SSIM": ssim_text,
        "MAE": "mean absolute difference over all pixels and channels (data range 1)",
        "LPIPS": lpips_text,
    }


def _resolve_lpips(spec: LPIPS | str | os.PathLike | None | bool) -> tuple[LPIPS | None, str | None, str]:
    """(model, unavailable-reason, description) for the ``lpips`` argument of evaluate."""
    if spec is None or spec is False:
        return None, "not requested", "not computed"
    if isinstance(spec, LPIPS):
        return spec, None, describe(spec) + "; inputs mapped to [-1, 1]"
    try:
        model = load_lpips(None if spec in ("auto", True) else spec)
    except MetricUnavailable as e:
        return None, str(e), f"unavailable: {e}"
    return model, None, describe(model) + "; inputs mapped to [-1, 1]"


def _default_reader() -> tuple[Callable[[Path], np.ndarray], tuple[type[BaseException], ...]]:
    """The project's image reader (:mod:`kpac_cli.images`) if present, else our own.

    Both read 16-bit PNGs at full depth; returns the reader and its error types.
    """
    try:
        from ..images import ImageError
        from ..images import read_image as images_read_image
    except ImportError:
        return read_image, ()

    def read(path: Path) -> np.ndarray:
        return images_read_image(path)[0]

    return read, (ImageError,)


def _load(x: ImageLike, reader: Callable[[Path], np.ndarray]) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return to_float(x)
    return to_float(reader(Path(x)))


def evaluate(
    pairs: Iterable[Sequence],
    *,
    bit_depth: int | None = 8,
    ssim_window: str = "uniform",
    lpips_model: LPIPS | str | os.PathLike | None | bool = "auto",
    labels: Mapping[str, str] | None = None,
    reader: Callable[[Path], np.ndarray] | None = None,
    on_error: str = "raise",
    progress: Progress | None = None,
    title: str = "kpac evaluation",
) -> Report:
    """Compute PSNR, SSIM, MAE and (if its weights exist) LPIPS for every pair.

    Parameters
    ----------
    pairs : iterable of (name, pred, target)
        e.g. from :func:`~kpac_cli.metrics.pair_folders`; ``pred``/``target`` are paths
        or arrays (uint8/uint16, or float in [0, 1]), ``(H, W, 3)``.
    bit_depth : int or None
        Quantise both images to this many bits first (8 = the paper's setting; 16; or
        None to score the float images as they are).
    ssim_window : {'uniform', 'gaussian'}
        See :func:`~kpac_cli.metrics.ssim`.
    lpips_model : LPIPS, 'auto', path, or None
        A loaded model; ``'auto'`` to look for weights (:func:`load_lpips`); a path to
        load from; ``None``/``False`` to skip. When the weights are missing the report
        says ``unavailable: <reason>`` instead of a number.
    labels : mapping name -> split label, optional
        e.g. from :func:`~kpac_cli.metrics.read_labels`; images without a label are
        counted overall only, and listed in the report's notes.
    reader : callable, optional
        ``reader(path) -> ndarray``; default: :func:`kpac_cli.images.read_image` when
        that package is available, else :func:`~kpac_cli.metrics.read_image` (both read
        at full bit depth, 16-bit PNG included).
    on_error : {'raise', 'skip'}
        What a pair that cannot be read or compared does (e.g. shapes differ):
        raise, or be recorded in ``report.failures`` and left out of the means.
    progress : callable, optional
        ``progress(done, total, name)`` after every pair.

    Returns
    -------
    Report
    """
    if ssim_window not in SSIM_WINDOWS:
        raise ValueError(f"ssim_window must be one of {SSIM_WINDOWS}, got {ssim_window!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if bit_depth is not None:
        quantize(np.zeros(1), bit_depth)  # validate early
    read, read_errors = (reader, ()) if reader is not None else _default_reader()
    catch = (OSError, ValueError) + read_errors
    model, unavailable, lpips_text = _resolve_lpips(lpips_model)
    items = list(pairs)
    report = Report(
        conventions=conventions(bit_depth, ssim_window, lpips_text),
        lpips_unavailable=unavailable,
        title=title,
    )
    unlabelled = []
    for i, item in enumerate(items, start=1):
        name, pred, target = item[0], item[1], item[2]
        try:
            p = quantize(_load(pred, read), bit_depth)
            t = quantize(_load(target, read), bit_depth)
            if p.shape != t.shape:
                raise ValueError(f"prediction {p.shape} and target {t.shape} have different shapes")
            lp = lpips(p, t, model) if model is not None else None
            split = None
            if labels is not None:
                split = labels.get(name)
                if split is None:
                    unlabelled.append(name)
            report.rows.append(
                ImageResult(name, psnr(p, t), ssim(p, t, ssim_window), mae(p, t), lp, split)
            )
        except catch as e:
            if on_error == "raise":
                if isinstance(e, ValueError) and type(e) is ValueError:
                    raise ValueError(f"{name}: {e}") from e  # say which pair
                if hasattr(e, "add_note"):  # Python >= 3.11
                    e.add_note(f"while evaluating {name!r}")
                raise
            report.failures.append((name, str(e)))
        if progress is not None:
            progress(i, len(items), name)
    if unlabelled:
        shown = ", ".join(unlabelled[:5]) + (f" (+{len(unlabelled) - 5} more)" if len(unlabelled) > 5 else "")
        report.notes.append(f"{len(unlabelled)} image(s) have no split label: {shown}")
    return report
