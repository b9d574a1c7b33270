"""Evaluate prediction/target pairs into a :class:`~kpac_cli.metrics.Report`.

Images given as paths are read with the project's reader, :func:`kpac_cli.images.read_image`
(every sample ``k`` of a ``b``-bit file becomes ``k / (2**b - 1)``; 16-bit PNG and TIFF at
full depth; grey replicated to RGB; alpha dropped).

Two ways in:

* :func:`evaluate` scores a list of ``(name, pred, target)`` pairs in one call;
* :class:`Evaluator` scores one pair at a time (:meth:`Evaluator.score`), for callers that
  produce predictions on the fly (running a model) and must not hold every image in memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, Union

import numpy as np

from ..images import ImageError
from ..images import read_image as _images_read_image
from .core import SSIM_WINDOWS, mae, psnr, quantize, ssim, to_float
from .errors import MetricUnavailable
from .lpips_net import LPIPS, MIN_SIDE, describe, load_lpips, lpips
from .pairing import quote_names
from .report import LPIPS_NOT_REQUESTED, ImageResult, Report

__all__ = ["Evaluator", "conventions", "evaluate", "read_for_metrics"]

ImageLike = Union[str, os.PathLike, np.ndarray]
Progress = Callable[[int, int, str], None]

#: Errors a pair can fail with (unreadable file, different shapes, ...): recorded as a
#: failure with ``on_error='skip'``.
PAIR_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, ImageError)


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
        "images": "RGB (alpha dropped, grey replicated), float in [0, 1]; 8-bit files / 255, 16-bit files / 65535",
        "quantisation": bits,
        "data range": "1",
        "PSNR": "10*log10(1/MSE), MSE over all pixels and channels of an image",
        "SSIM": ssim_text,
        "MAE": "mean absolute difference over all pixels and channels (data range 1)",
        "LPIPS": lpips_text,
    }


def read_for_metrics(path: str | os.PathLike) -> np.ndarray:
    """Read an image file for scoring: :func:`kpac_cli.images.read_image`'s pixels only.

    ``float32 (H, W, 3)`` in [0, 1] at the file's full bit depth.

    Raises
    ------
    kpac_cli.images.ImageError
        The file is missing, unreadable or not an image (the message names it).
    """
    return _images_read_image(path)[0]


def _resolve_lpips(spec: LPIPS | str | os.PathLike | None | bool) -> tuple[LPIPS | None, str | None, str]:
    """(model, unavailable-reason, description) for the ``lpips_model`` argument."""
    if spec is None or spec is False:
        return None, LPIPS_NOT_REQUESTED, "not computed"
    if isinstance(spec, LPIPS):
        return spec, None, describe(spec) + "; inputs mapped to [-1, 1]"
    try:
        model = load_lpips(None if spec in ("auto", True) else spec)
    except MetricUnavailable as e:
        return None, str(e), f"unavailable: {e}"
    return model, None, describe(model) + "; inputs mapped to [-1, 1]"


class Evaluator:
    """Scores pairs one at a time and collects them into a :class:`Report`.

    Parameters are those of :func:`evaluate`. Use :meth:`score` per pair, :meth:`fail`
    for a pair that could not be produced, then :meth:`finish` for the report.

    >>> ev = Evaluator(lpips_model=None)                     # doctest: +SKIP
    >>> row = ev.score("a", "pred/a.png", "gt/a.png")        # doctest: +SKIP
    >>> report = ev.finish()                                 # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        bit_depth: int | None = 8,
        ssim_window: str = "uniform",
        lpips_model: LPIPS | str | os.PathLike | None | bool = "auto",
        labels: Mapping[str, str] | None = None,
        reader: Callable[[Path], np.ndarray] | None = None,
        title: str = "kpac evaluation",
    ) -> None:
        if ssim_window not in SSIM_WINDOWS:
            raise ValueError(f"ssim_window must be one of {SSIM_WINDOWS}, got {ssim_window!r}")
        if bit_depth is not None:
            quantize(np.zeros(1), bit_depth)  # validate early
        self.bit_depth = bit_depth
        self.ssim_window = ssim_window
        self.labels = labels
        self.reader = reader if reader is not None else read_for_metrics
        self.lpips_model, unavailable, lpips_text = _resolve_lpips(lpips_model)
        self.report = Report(
            conventions=conventions(bit_depth, ssim_window, lpips_text),
            lpips_unavailable=unavailable,
            title=title,
        )
        self._unlabelled: list[str] = []
        self._no_lpips: list[str] = []  # scored, but too small for LPIPS (left out of its means only)

    def load(self, x: ImageLike) -> np.ndarray:
        """A path (read with the reader) or an array, as float64 in [0, 1], not quantised.

        Raises
        ------
        ValueError
            An array of a type no score is defined for (signed integers, complex...).
        """
        arr = x if isinstance(x, np.ndarray) else self.reader(Path(x))
        try:
            return to_float(arr)
        except TypeError as e:  # a bad pair, like one of the wrong shape: recorded, not a crash of the run
            raise ValueError(str(e)) from e

    def prepare(self, x: ImageLike) -> np.ndarray:
        """:meth:`load` then quantise to the evaluation bit depth."""
        return quantize(self.load(x), self.bit_depth)

    def _prepared(self, x: ImageLike, what: str) -> np.ndarray:
        """:meth:`prepare`, a refused array's message saying which side of the pair it is."""
        try:
            return self.prepare(x)
        except ValueError as e:
            msg = str(e)  # "image values run from ..." -> "prediction values run from ..."
            raise ValueError(what + msg[len("image"):] if msg.startswith("image ") else f"{what}: {msg}") from e

    def score(self, name: str, pred: ImageLike, target: ImageLike) -> ImageResult:
        """Score one pair and add it to the report.

        Raises
        ------
        ValueError
            Different shapes, an image too small for SSIM (one too small for LPIPS only gets
            no LPIPS: ``ImageResult.lpips_unavailable`` says why), an array of an unsupported
            type or far outside [0, 1] (0-255 floats), or (with ``bit_depth=None``,
            where nothing maps them) NaN or infinite values, which no score can be made of.
        OSError, kpac_cli.images.ImageError
            A file cannot be read.
        """
        p = self._prepared(pred, "prediction")
        t = self._prepared(target, "target")
        if p.shape != t.shape:
            raise ValueError(_shape_mismatch(p.shape, t.shape))
        for what, a in (("prediction", p), ("target", t)):
            if not np.isfinite(a).all():
                raise ValueError(f"{what} has {int(a.size - np.isfinite(a).sum())} non-finite values (NaN or infinity)")
        scores = psnr(p, t), ssim(p, t, self.ssim_window), mae(p, t)  # an image too small for SSIM fails the pair
        lp, lp_missing = self._lpips(p, t)
        split = None
        if self.labels is not None:
            split = self.labels.get(name)
            if split is None:
                self._unlabelled.append(name)
        row = ImageResult(name, *scores, lp, split, lpips_unavailable=lp_missing)
        self.report.rows.append(row)
        if lp_missing is not None:
            self._no_lpips.append(name)
        return row

    def _lpips(self, p: np.ndarray, t: np.ndarray) -> tuple[float | None, str | None]:
        """(LPIPS, None), or (None, why) for an image too small for it: a metric missing for one
        pair, like LPIPS without weights for all, costs that pair none of its other scores."""
        if self.lpips_model is None:
            return None, None
        if min(p.shape[:2]) < MIN_SIDE:
            h, w = p.shape[:2]
            return None, f"image too small for LPIPS (AlexNet needs at least {MIN_SIDE} pixels a side): {w}x{h}"
        return lpips(_rgb(p), _rgb(t), self.lpips_model), None

    def fail(self, name: str, message: str) -> None:
        """Record a pair that could not be scored (left out of every mean)."""
        self.report.failures.append((name, message))

    def finish(self) -> Report:
        """The report, with notes listing images without a split label (when labels were given)
        and images too small for LPIPS (left out of the LPIPS means only)."""
        notes = []
        if self._unlabelled:
            notes.append(f"{len(self._unlabelled)} image(s) have no split label: {quote_names(self._unlabelled)}")
        if self._no_lpips:
            n, scored = len(self._no_lpips), len(self.report.rows) - len(self._no_lpips)
            notes.append(f"LPIPS n/a for {n} image(s) smaller than {MIN_SIDE} pixels a side (too small for AlexNet): "
                         f"{quote_names(self._no_lpips)}; the LPIPS means are over the other {scored} image(s)")
        self.report.notes.extend(note for note in notes if note not in self.report.notes)
        return self.report


def _rgb(image: np.ndarray) -> np.ndarray:
    """A grey ``(H, W)`` or ``(H, W, 1)`` image replicated to RGB, as the reader does with grey
    files (PSNR, SSIM and MAE are the same either way; LPIPS takes RGB only); others as they are."""
    if image.ndim == 2:
        image = image[..., None]
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def _shape_mismatch(pred: tuple[int, ...], target: tuple[int, ...]) -> str:
    """The message for a pair of different shapes, with the likely cause when the prediction is
    the target turned by 90 degrees (an EXIF orientation applied on one side only)."""
    msg = f"prediction {pred} and target {target} have different shapes"
    if pred[:2] == target[1::-1] and pred[2:] == target[2:]:
        msg += ": the prediction is the target's size turned by 90 degrees: an EXIF orientation applied to one of them only?"
    return msg


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
        or arrays (uint8/uint16, or float in [0, 1]), ``(H, W, 3)``. A sized collection
        gives ``progress`` its total; a generator is consumed one pair at a time (the
        total passed to ``progress`` is then 0).
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
        ``reader(path) -> ndarray`` for paths; default :func:`read_for_metrics`
        (:func:`kpac_cli.images.read_image`, full bit depth, 16-bit PNG included).
    on_error : {'raise', 'skip'}
        What a pair that cannot be read or compared does (e.g. shapes differ):
        raise, or be recorded in ``report.failures`` and left out of the means.
    progress : callable, optional
        ``progress(done, total, name)`` after every pair.

    Returns
    -------
    Report
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    ev = Evaluator(
        bit_depth=bit_depth, ssim_window=ssim_window, lpips_model=lpips_model,
        labels=labels, reader=reader, title=title,
    )
    total = len(pairs) if hasattr(pairs, "__len__") else 0  # type: ignore[arg-type]
    for i, item in enumerate(pairs, start=1):
        name, pred, target = item[0], item[1], item[2]
        try:
            ev.score(name, pred, target)
        except PAIR_ERRORS as e:
            if on_error == "raise":
                if type(e) is ValueError:
                    raise ValueError(f"{name}: {e}") from e  # say which pair
                if hasattr(e, "add_note"):  # Python >= 3.11
                    e.add_note(f"while evaluating {name!r}")
                raise
            ev.fail(name, str(e))
        if progress is not None:
            progress(i, total, name)
    return ev.finish()
