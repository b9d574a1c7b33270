"""`kpac eval`: score a model, a baseline or existing results against ground truth; measure speed."""

from __future__ import annotations

import json
import math
import platform
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import typer

from .common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    StdoutConsole,
    StdoutFailed,
    Terminated,
    check_ensemble,
    device_option,
    emit_json,
    err_console,
    fp32_option,
    given_options,
    parse_tile,
    precision_option,
    precision_with_fp32,
    print_error,
    print_note,
    print_setup_notes,
    progress_bar,
    show_progress,
    sigterm_raises,
    usage_error,
    writing_stdout,
)

EXAMPLES = """
Examples:

  kpac eval --data DPDD/ --model kpac-3level --report dpdd.md    # the paper's Table 4 setting

  kpac eval --data DPDD/ --method identity                      # the blurry input as a baseline

  kpac eval --pred results/ --target DPDD/test_c/target --pair-by order

  kpac eval --speed --model kpac-2level --device cuda            # Table 5: params, FLOPs, seconds
"""

METHODS = ("kpac", "identity", "wiener")
REPORT_FORMATS = {".json": "json", ".csv": "csv", ".md": "markdown", ".markdown": "markdown"}
# how folders were paired, as the reports state it (kpac_cli.metrics.pairing.pair_folders)
FOLDER_PAIRING = {"name": "folders by name (file stem)",
                  "order": "folders by order (natural order: stem before extension, img2 before img10, letters regardless of case)"}
PER_IMAGE_TABLE_MAX = 30  # per-image rows are shown on the terminal up to this many images
# Options that only shape a run of the model, with the flag the user typed; given without
# one (a baseline, or --pred) they would be silently ignored.
ENGINE_FLAGS = {"device": "--device", "precision": "--precision", "fp32": "--fp32", "tile": "--tile", "ensemble": "--ensemble",
                "strength": "--strength"}
# Of those, the ones --speed has no use for (it times the network's passes on the whole image),
# with the reason given when one is refused.
SPEED_UNUSED = {"tile": "--speed times the whole image, untiled",
                "strength": "--speed times the network's passes, which --strength does not change"}
WIENER_FLAGS = {"wiener_radius": "--wiener-radius", "wiener_snr": "--wiener-snr"}
SPEED_FLAGS = {"speed_size": "--speed-size", "speed_runs": "--speed-runs", "speed_warmup": "--speed-warmup"}


@dataclass
class Item:
    """One thing to score: a prediction file, or an input that a method turns into one."""

    name: str
    target: Path
    source: Path | None = None  # the blurry input (centre view for dual-pixel data)
    pred: Path | None = None  # an existing result (--pred mode)
    left: Path | None = None
    right: Path | None = None


def _size_option(value: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"expected WIDTHxHEIGHT (e.g. 1280x720), got {value!r}") from None
    if w < 1 or h < 1:
        raise typer.BadParameter(f"size must be positive, got {value!r}")
    return w, h


def _si(n: float) -> str:
    """1.23 G / 45.6 M / 789 k style."""
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:g}"


def _fmt(v: float | None, digits: int) -> str:
    if v is None:
        return "n/a"
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}"


# ---------------------------------------------------------------------------------- planning


def _command_line(ctx: typer.Context, given: set[str]) -> str:
    """``kpac eval`` with the options the user gave, as a shell line (for the report's run record:
    which command made these numbers). Options left to their defaults are not repeated."""
    words = ["kpac", "eval"]
    for param in ctx.command.params:
        if param.name not in given or not param.opts:
            continue
        flag, value = param.opts[0], ctx.params[param.name]
        if getattr(param, "is_flag", False) and isinstance(value, bool):
            words += [flag] if value else (param.secondary_opts[:1] or [])
            continue
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            words += [flag, str(v)]
    return shlex.join(words)


def _versions() -> dict[str, str]:
    """Versions of what computes the scores (SSIM's implementation is scikit-image's, which has
    changed between releases), for the report's run record."""
    import skimage
    import torch

    from .. import __version__

    return {"kpac": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "scikit-image": skimage.__version__, "torch": str(torch.__version__)}


def _run_markdown(run: dict[str, Any]) -> list[str]:
    """The report's "Run" section: one line per recorded value (versions as ``name version, ...``)."""
    lines = ["## Run", ""]
    for k, v in run.items():
        if isinstance(v, dict):
            v = ", ".join(f"{name} {ver}" for name, ver in v.items())
        elif k == "command":
            v = f"`{v}`"
        if v is not None:
            lines.append(f"- **{k}**: {v}")
    return lines + [""]


def _check_dpdd_count(n: int, split: str, root: Path, allow_subset: bool) -> None:
    from ..metrics import DPDD_COUNTS

    want = DPDD_COUNTS.get(split)
    if want is not None and n != want and not allow_subset:
        raise usage_error(
            f"DPDD {split}: found {n} pairs under {root}, the published split has {want}; "
            "pass --allow-subset to evaluate a partial or custom copy"
        )


def _plan(
    data: Path | None, split: str, allow_subset: bool, pred: Path | None, target: Path | None,
    source: Path | None, pair_by: str, dual: bool,
) -> list[Item]:
    """Pair everything up front (so a mismatch is a usage error before any work)."""
    from ..metrics import pair_dpdd, pair_folders, pair_predictions_dpdd

    if pred is not None:
        if data is not None:
            samples = pair_dpdd(data, split, expected_count=None)
            _check_dpdd_count(len(samples), split, data, allow_subset)
            pairs = pair_predictions_dpdd(pred, data, split, expected_count=None)
            src = {s.name: s.source for s in samples}
            return [Item(p.name, p.target, source=src[p.name], pred=p.pred) for p in pairs]
        pairs = pair_folders(pred, target, by=pair_by)
        src = {}
        if source is not None:
            src = {p.name: p.target for p in pair_folders(pred, source, by=pair_by, roles=("prediction", "source"))}
        return [Item(p.name, p.target, source=src.get(p.name), pred=p.pred) for p in pairs]
    if data is not None:
        samples = pair_dpdd(data, split, dual=dual, expected_count=None)
        _check_dpdd_count(len(samples), split, data, allow_subset)
        return [Item(s.name, s.target, source=s.source, left=s.left, right=s.right) for s in samples]
    pairs = pair_folders(source, target, by=pair_by, roles=("source", "target"))
    return [Item(p.name, p.target, source=p.pred) for p in pairs]


# ---------------------------------------------------------------------------------- methods


class _Runner:
    """Turns an :class:`Item` into (input for display, output, extra record fields).

    Existing predictions come without their input: it is only shown in --save-crops, so it is read
    there (an unreadable one costs the crops, not the score)."""

    def __init__(self, method: str | None, deblurrer: Any, wiener_radius: float | None, wiener_snr: float | None) -> None:
        self.method = method
        self.deblurrer = deblurrer
        self.wiener_radius = wiener_radius
        self.wiener_snr = wiener_snr

    def __call__(self, item: Item, read: Callable[[Path], np.ndarray]) -> tuple[np.ndarray | None, np.ndarray, dict[str, Any]]:
        extra: dict[str, Any] = {}
        if self.method is None:  # existing predictions
            return None, read(item.pred), extra
        if self.method == "kpac" and item.left is not None:
            from ..images import DualPixelTriple, read_dual_pixel

            views, centre, info = read_dual_pixel(DualPixelTriple(item.left, item.right, item.source, item.name))
            t0 = time.perf_counter()
            out = self.deblurrer.deblur(views, centre, orientation=info.orientation_applied)
            extra["seconds"] = time.perf_counter() - t0
            extra.update(self._engine_notes())
            return centre, out, extra
        inp, alpha = self._source(item.source, read)
        t0 = time.perf_counter()
        if self.method == "kpac":
            # as kpac deblur runs it: colours under alpha 0 are not shown to the model (they would
            # fringe the visible edge) and come back as they were
            from ..images import fill_transparent

            seen, hidden = fill_transparent(inp, alpha)
            out = self.deblurrer.deblur(seen)
            if hidden is not None:
                out[hidden] = inp[hidden]
        elif self.method == "identity":
            out = inp
        else:
            from ..inverse import deblur_disc

            result = deblur_disc(inp, self.wiener_radius, self.wiener_snr)
            out = result.image.astype(np.float32)
            extra["wiener_radius"], extra["wiener_snr"] = result.radius, result.snr
            if result.limit_note is not None:  # said in the image's record and in the report's notes
                extra["notes"] = [result.limit_note]
        extra["seconds"] = time.perf_counter() - t0
        if self.method == "kpac":
            extra.update(self._engine_notes())
        return inp, out, extra

    def _source(self, path: Path, read: Callable[[Path], np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """The input's pixels (as the scores read them) and, for the model, its alpha."""
        from ..images import read_image
        from ..metrics.evaluate import read_for_metrics

        if self.method != "kpac" or read is not read_for_metrics:
            return read(path), None
        image, info = read_image(path)  # read_for_metrics's pixels, and the alpha it drops
        return image, info.alpha

    def _engine_notes(self) -> dict[str, Any]:
        stats = self.deblurrer.last_stats
        out: dict[str, Any] = {"precision": stats.precision, "tile": stats.tile}
        if self.deblurrer.options.strength != 1.0:  # as in kpac deblur's --json records
            out["strength"] = self.deblurrer.options.strength
        if stats.notes:
            out["engine_notes"] = list(stats.notes)
        return out


def _precision_name(deblurrer: Any) -> str:
    import torch

    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(deblurrer.dtype, str(deblurrer.dtype))


def _method_text(method: str | None, deblurrer: Any, wiener_radius: float | None, wiener_snr: float | None, dual: bool) -> str:
    if method is None:
        return "existing predictions read from files"
    if method == "identity":
        return "identity: the blurry input itself" + (" (DPDD centre view)" if dual else "")
    if method == "wiener":
        r = f"radius {wiener_radius:g} px" if wiener_radius is not None else "radius estimated per image (estimate_disc_radius)"
        snr = (f"snr {wiener_snr:g}" if wiener_snr is not None else "snr chosen per image by generalised cross-validation, "
               "lowered where that result rings out of [0, 1]")
        return (f"Wiener deconvolution with a uniform disc PSF in linear light (inputs decoded with gamma 2.2, "
                f"kpac_cli.inverse.deblur_disc), {r}, {snr}, gradient prior")
    kind = "dual-pixel (left+right views, centre view as reference)" if deblurrer.config.in_views == 2 else "single image"
    strength = deblurrer.options.strength
    scaled = f", strength {strength:g} (the model's correction scaled by {strength:g})" if strength != 1.0 else ""
    n = deblurrer.options.ensemble
    # as strength: the output scored is not the model's single pass
    passes = f", self-ensemble of {n} passes (flips/transposes, mapped back and averaged)" if n > 1 else ""
    return (
        f"KPAC model {deblurrer.name} ({deblurrer.config.levels}-level, {kind}) on {deblurrer.device}, "
        f"{_precision_name(deblurrer)}, tile {deblurrer.options.tile}{passes}{scaled}; output scored in memory (float, clipped to [0, 1]) "
        "and quantised as stated, i.e. as if written to a file of that bit depth"
    )


# ---------------------------------------------------------------------------------- output


def _crop_info(shape: tuple[int, ...]):
    from ..images import ImageInfo

    return ImageInfo(path=None, format="png", bit_depth=8, channels=3, alpha=None, icc_profile=None,
                     exif=None, orientation_applied=1, size=(int(shape[0]), int(shape[1])))


def _summary_record(report, run: dict[str, Any], speed: Any) -> dict[str, Any]:
    from ..metrics.report import json_number

    summ = report.summary()

    def conv(m: dict[str, Any]) -> dict[str, Any]:
        return {k: (json_number(v) if isinstance(v, float) else v) for k, v in m.items()}

    rec: dict[str, Any] = {"summary": True, **run}
    rec.update(conv(summ["overall"]))
    rec["failed"] = len(report.failures)
    rec["failures"] = [{"name": n, "error": e} for n, e in report.failures]
    rec["lpips_unavailable"] = report.lpips_unavailable
    rec["notes"] = list(report.notes)  # as in the JSON report: images left unscored or unlabelled, crops not written
    rec["splits"] = {k: conv(v) for k, v in summ["splits"].items()}
    rec["conventions"] = dict(report.conventions)
    if speed is not None:
        rec["speed"] = speed.to_dict()
    return rec


def _speed_markdown(speed: Any) -> str:
    d = speed.to_dict()
    flops = f"{d['flops'] / 1e9:.1f}" if d["flops"] is not None else d["flops_note"]
    gfs = f"{d['gflops_per_s']:.1f}" if d["gflops_per_s"] is not None else "n/a"
    from ..metrics.speed import describe_method

    return "\n".join([
        "## Speed", "",
        "| model | device | precision | ensemble | input | params (M) | GFLOPs per image | seconds per image (mean) "
        "| seconds per image (median) | seconds per pass | GFLOP/s |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
        f"| {d['model']} | {d['device']} ({d['device_name']}) | {d['precision']} | {d['ensemble']} | {d['width']}x{d['height']} "
        f"| {d['params'] / 1e6:.3f} | {flops} | {d['seconds']:.4f} | {d['seconds_median']:.4f} | {d['seconds_per_pass']:.4f} | {gfs} |",
        "",
        f"Measured: {describe_method(d['ensemble'])}; {d['warmup']} warm-up and {d['runs']} timed runs. FLOPs: {d['flops_note']}.",
        "",
    ])


def _write_reports(paths: list[Path], report, run: dict[str, Any], speed: Any, show_paper: bool) -> tuple[list[Path], list[str]]:
    """Write every --report file; returns the files written and error messages (empty when all were written)."""
    from ..images import atomic_write_bytes

    written: list[Path] = []
    errors = []
    for path in paths:
        kind = REPORT_FORMATS[path.suffix.lower()]
        if kind == "json":
            d = report.to_dict(paper=show_paper)
            d["run"] = run
            if speed is not None:
                d["speed"] = speed.to_dict()
            text = json.dumps(d, indent=2, allow_nan=False, default=str) + "\n"
        elif kind == "csv":
            text = report.csv_text()
        else:
            run_md = _run_markdown(run)
            text = report.markdown(paper=show_paper) + "\n" + "\n".join(run_md) + ("\n" + _speed_markdown(speed) if speed is not None else "")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, text.encode("utf-8"))
        except OSError as e:
            errors.append(f"cannot write report {path}: {e.strerror or e}")
        else:
            written.append(path)
    return written, errors


def _print_tables(report, run: dict[str, Any], speed: Any, show_paper: bool, per_image: bool) -> None:
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from ..metrics import PAPER_TABLE4_DPDD, PAPER_TABLE4_LABEL
    from ..metrics.report import LPIPS_NOT_REQUESTED, PAPER_IMAGES, paper_note

    console = StdoutConsole(highlight=False)
    lp_missing = report.lpips_unavailable
    lp_short = "not computed" if lp_missing == LPIPS_NOT_REQUESTED else "unavailable"
    if report.rows and per_image:
        t = Table(title="per image", title_justify="left")
        for col, j in (("name", "left"), ("split", "left"), ("PSNR (dB)", "right"), ("SSIM", "right"), ("MAE", "right"), ("LPIPS", "right")):
            t.add_column(col, justify=j)
        for r in report.rows:
            # as the summary and the Markdown say it; one image without LPIPS among others with it: n/a
            t.add_row(Text(r.name), Text(r.split or ""), _fmt(r.psnr, 2), _fmt(r.ssim, 4), _fmt(r.mae, 4),
                      _fmt(r.lpips, 4) if r.lpips is not None else (lp_short if lp_missing else "n/a"))
        console.print(t)
    if report.rows or report.failures:
        summ = report.summary()
        t = Table(title=escape(f"summary: {run.get('method_label', '')}"), title_justify="left")
        t.add_column("", no_wrap=True)
        for col in ("images", "PSNR (dB) ↑", "SSIM ↑", "MAE ↓", "LPIPS ↓"):
            t.add_column(col, justify="right", no_wrap=True)

        def row(label: str, m: dict[str, Any]) -> None:
            lp = _fmt(m["lpips"], 3) if m["lpips"] is not None else (lp_short if lp_missing else "n/a")
            t.add_row(Text(label), str(m["count"]), _fmt(m["psnr"], 2), _fmt(m["ssim"], 3), _fmt(m["mae"], 3), lp)

        row("all", summ["overall"])
        for lab, m in summ["splits"].items():
            row(lab, m)
        if show_paper:
            t.add_section()
            for p in PAPER_TABLE4_DPDD:
                t.add_row(f"[dim]{p.method}[/]", f"[dim]{PAPER_IMAGES}[/]", f"[dim]{p.psnr:.2f}[/]", f"[dim]{p.ssim:.3f}[/]",
                          f"[dim]{p.mae:.3f}[/]", f"[dim]{p.lpips:.3f}[/]")
        console.print(t)
        c = report.conventions
        q = c.get("quantisation", "").split(":")[0]
        # "8-bit" / "16-bit", or "none" when the float images are scored as read
        quant = f"{q} quantisation (round half up)" if q[:1].isdigit() else "no quantisation (float images as read)"
        ssim_w = "7x7 uniform window" if "uniform" in c.get("SSIM", "") else "11x11 Gaussian window (sigma 1.5)"
        footer = (
            f"Conventions: {quant}, data range 1; PSNR/MAE over all pixels and channels; "
            f"SSIM: scikit-image, {ssim_w}, per channel; means of per-image values"
        )
        if lp_missing == LPIPS_NOT_REQUESTED:
            footer += "; LPIPS: not computed (--no-lpips)"
        else:
            footer += f"; LPIPS: {report.lpips_status}" if lp_missing else f"; LPIPS: {c.get('LPIPS', '')}"
        if show_paper:
            footer += f". Rows below the line: {PAPER_TABLE4_LABEL}. {paper_note(len(report.rows))}"
        console.print(footer, style="dim", soft_wrap=True, markup=False)
        if report.failures:
            names = escape(", ".join(n for n, _ in report.failures[:10])) + (" ..." if len(report.failures) > 10 else "")
            console.print(f"[red]{len(report.failures)} failed (not in any mean):[/] {names}", soft_wrap=True)
        for note in report.notes:
            console.print(f"note: {note}", soft_wrap=True, markup=False)
        if report.rows and not per_image:  # left out for length: say so, and where to find them
            console.print(f"per-image scores of the {len(report.rows)} images are not listed here (more than "
                          f"{PER_IMAGE_TABLE_MAX}): --report FILE.csv or --json gives every one", soft_wrap=True, markup=False)
    if speed is not None:
        from ..metrics.speed import PAPER_SIZE, describe_method

        d = speed.to_dict()
        n = d["ensemble"]
        paper_setting = (d["width"], d["height"]) == PAPER_SIZE and n == 1
        title = "speed (the paper's Table 5 setting)" if paper_setting else ("speed" if n == 1 else f"speed (self-ensemble of {n} passes)")
        t = Table(title=title, title_justify="left", show_header=False)
        t.add_column("quantity", no_wrap=True)
        t.add_column("value")
        flops = f"{_si(d['flops'])} ({_si(d['flops'] / 2)} multiply-adds)" if d["flops"] is not None else d["flops_note"]
        for k, v in (
            ("model", d["model"]),
            ("device", f"{d['device']} ({d['device_name']}), {d['precision']}"),
            ("input", f"{d['width']}x{d['height']}"),
            ("parameters", f"{d['params']:,} ({d['params'] / 1e6:.3f} M)"),
            ("FLOPs per image", flops + (f", {n} passes" if n > 1 and d["flops"] is not None else "")),
            ("seconds per image", f"{d['seconds']:.4f} mean, {d['seconds_median']:.4f} median, {d['seconds_min']:.4f} min"
             + (f" ({n} passes; {d['seconds_per_pass']:.4f} per pass)" if n > 1 else "")),
            ("throughput", f"{d['gflops_per_s']:.1f} GFLOP/s" if d["gflops_per_s"] is not None else "n/a"),
        ):
            t.add_row(k, v)
        console.print(t)
        threads = f", {d['threads']} torch threads" if d["threads"] else ""
        console.print(f"Measured: {describe_method(n)}; {d['warmup']} warm-up + {d['runs']} timed runs{threads}. "
                      f"FLOPs: {d['flops_note']}.", style="dim", soft_wrap=True, markup=False)


# ---------------------------------------------------------------------------------- command


def eval_command(
    ctx: typer.Context,
    data: Optional[Path] = typer.Option(None, "--data", help="DPDD data set folder (holding test_c/, test_l/, test_r/ ...)."),
    split: str = typer.Option("test", "--split", help="DPDD split: test (76 pairs), val (74) or train (350)."),
    allow_subset: bool = typer.Option(False, "--allow-subset", help="Accept a DPDD split with another number of pairs than published."),
    pred: Optional[Path] = typer.Option(None, "--pred", help="Folder of existing results (of any method) to score."),
    target: Optional[Path] = typer.Option(None, "--target", help="Folder of ground-truth images (with --pred or --source)."),
    source: Optional[Path] = typer.Option(None, "--source", help="Folder of blurry inputs (paired with --target); with --pred: inputs shown in --save-crops."),
    pair_by: str = typer.Option("name", "--pair-by", help="Pair folders by file name (stem: a.png with a.tif) or by order: the i-th image of each folder in natural order (stem before extension, img2 before img10, letters regardless of case)."),
    method: Optional[str] = typer.Option(None, "--method", help="kpac (the model, default), identity (the input itself) or wiener."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Shipped model name (see `kpac models`), a .safetensors file, or a training run folder (its model.safetensors)."),
    dual: bool = typer.Option(False, "--dual", help="Dual-pixel input (DPDD test_l/test_r, test_c as centre); default: from the model."),
    wiener_radius: Optional[float] = typer.Option(None, "--wiener-radius", help="Disc PSF radius in pixels for --method wiener (default: estimated per image)."),
    wiener_snr: Optional[float] = typer.Option(None, "--wiener-snr", help="Signal-to-noise power ratio of the Wiener filter, with its gradient prior (default: chosen per image by generalised cross-validation, lowered where that result rings out of range, which a note says).", show_default=False),
    bit_depth: int = typer.Option(8, "--bit-depth", help="Quantise both images to 8 bits (the paper) or 16 before scoring; 0 = no quantisation."),
    ssim_window: str = typer.Option("uniform", "--ssim", help="SSIM window: uniform (7x7, the DPDD literature) or gaussian (Wang et al.)."),
    lpips_weights: Optional[Path] = typer.Option(None, "--lpips-weights", help="LPIPS weights (file or folder); default: $KPAC_LPIPS_WEIGHTS or the torch hub cache, else unavailable."),
    no_lpips: bool = typer.Option(False, "--no-lpips", help="Do not compute LPIPS."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="CSV of name,label (e.g. indoor/outdoor) for per-split averages."),
    report: Optional[list[Path]] = typer.Option(None, "--report", help="Write a report: .json, .csv or .md (repeatable)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Score only the first N pairs (quick looks)."),
    device: str = device_option(),
    precision: str = precision_option(),
    fp32: bool = fp32_option(),
    tile: str = typer.Option("auto", "--tile", help="Tile size in pixels (at least 128; smaller sizes are raised to it), 'auto' or 0 / whole (whole image). Tiling is exact."),
    strength: float = typer.Option(1.0, "--strength", help="With --method kpac: how much of the model's correction to apply, 0 to 1 (as kpac deblur --strength): 1 = full (default), 0 = the input unchanged; stated in the report."),
    ensemble: int = typer.Option(1, "--ensemble", help="With --method kpac or --speed: self-ensemble over 1, 2, 4 or 8 flips/transposes (as kpac deblur --ensemble); stated in the report, and --speed times all N passes."),
    speed: bool = typer.Option(False, "--speed", help="Measure parameters, FLOPs and seconds per 1280x720 image (paper Table 5; with --ensemble N, all N passes per image)."),
    speed_size: str = typer.Option("1280x720", "--speed-size", help="Input size for --speed, WIDTHxHEIGHT."),
    speed_runs: int = typer.Option(10, "--speed-runs", help="Timed runs for --speed (after the warm-up runs)."),
    speed_warmup: int = typer.Option(3, "--speed-warmup", help="Untimed warm-up runs for --speed."),
    save_crops: Optional[Path] = typer.Option(None, "--save-crops", help="Folder for one PNG per image: input | output | target plus zoomed crops."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing --report files and --save-crops images (otherwise an existing one is refused before any work)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON record per image on stdout, then a summary record."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or messages on stderr (errors are still printed)."),
) -> None:
    """Score deblurring results (PSNR, SSIM, MAE, LPIPS) against ground truth, and measure speed.

    Results to score come from running a model on the DPDD test set (--data --model), from a baseline (--method identity|wiener with --data or --source/--target), or from files (--pred with --target or --data). Exit codes: 0 ok, 1 some pair failed (the others are still scored and the failures listed) or a --report, --save-crops image or --speed measurement failed, 2 usage error, 130/143 interrupted, 141 stopped because the reader of stdout went away (--json | head -1).
    """
    reports = list(report or [])
    # ---- options that do not depend on the file system
    if pair_by not in ("name", "order"):
        raise usage_error(f"--pair-by must be name or order, got {pair_by!r}")
    if method is not None and method not in METHODS:
        raise usage_error(f"unknown --method {method!r} (kpac, identity or wiener)")
    if ssim_window not in ("uniform", "gaussian"):
        raise usage_error(f"--ssim must be uniform or gaussian, got {ssim_window!r}")
    if bit_depth not in (0, 8, 16):
        raise usage_error("--bit-depth must be 8 (the paper), 16, or 0 (no quantisation)")
    if limit is not None and limit < 1:
        raise usage_error("--limit must be at least 1")
    if wiener_radius is not None and not (math.isfinite(wiener_radius) and wiener_radius > 0):
        raise usage_error("--wiener-radius must be positive")  # inf too: else every image failed on its own
    if wiener_snr is not None and not (math.isfinite(wiener_snr) and wiener_snr > 0):
        raise usage_error("--wiener-snr must be positive")
    if speed_runs < 1:
        raise usage_error(f"--speed-runs must be at least 1, got {speed_runs}")
    if speed_warmup < 0:
        raise usage_error(f"--speed-warmup must be at least 0, got {speed_warmup}")
    for path in reports:
        if path.suffix.lower() not in REPORT_FORMATS:
            raise usage_error(f"--report {path}: use a .json, .csv or .md file name")
    if no_lpips and lpips_weights is not None:
        raise usage_error("--no-lpips and --lpips-weights contradict each other")
    from ..engine.device import PRECISIONS

    # checked here, whatever the mode, so a wrong value never passes unnoticed
    check_ensemble(ensemble)
    if precision.lower() not in PRECISIONS:
        raise usage_error(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not (math.isfinite(strength) and 0.0 <= strength <= 1.0):
        raise usage_error(f"--strength must be in [0, 1], got {strength:g}")
    try:
        tile_value = parse_tile(tile)
    except ValueError as e:
        raise usage_error(f"--tile: {e}") from None  # deblur's wording
    try:
        speed_wh = _size_option(speed_size)
    except typer.BadParameter as e:
        raise usage_error(f"--speed-size: {e}") from None
    _check_report_paths(reports, overwrite)
    if save_crops is not None and save_crops.exists() and not save_crops.is_dir():
        raise usage_error(f"--save-crops {save_crops} is a file; give a folder")
    blocker = _file_above(save_crops) if save_crops is not None else None
    if blocker is not None:  # the folder could not be made: say so before any work
        raise usage_error(f"--save-crops {save_crops}: cannot create the folder: {blocker} is not a folder")
    given = given_options(ctx)
    precision = precision_with_fp32(precision, fp32)

    # ---- which mode
    if pred is not None:
        if method is not None:
            raise usage_error("--method computes results; --pred scores existing ones: give one of them")
        if model is not None and not speed:
            raise usage_error("--model runs a model; with --pred the results already exist (use --speed to time the model)")
        if (data is None) == (target is None):
            raise usage_error("--pred needs the ground truth: give --target DIR or --data DPDD_ROOT (one of them)")
        if data is not None and source is not None:
            raise usage_error("--source is not needed with --data (the DPDD inputs are used)")
        if dual:
            raise usage_error("--dual applies to running a model, not to --pred")
    elif data is not None or source is not None or target is not None:
        if data is not None and (source is not None or target is not None):
            raise usage_error("give either --data DPDD_ROOT or --source/--target folders, not both")
        if data is None and (source is None or target is None):
            raise usage_error("paired folders need both --source DIR and --target DIR")
        method = method or "kpac"
        if method != "kpac" and model is not None and not speed:
            raise usage_error(f"--model is not used by --method {method} (add --speed to time the model)")
        if method != "kpac" and dual:
            raise usage_error(f"--dual applies to --method kpac; {method} uses the centre (combined) view")
    elif not speed:
        raise usage_error("nothing to evaluate: give --data DPDD_ROOT, --source/--target, --pred with --target, or --speed")
    elif method is not None:
        raise usage_error("--method needs data (--data or --source/--target)")
    has_data = pred is not None or data is not None or source is not None
    # pairing options of the other kind of data would be silently ignored
    if data is not None and "pair_by" in given:
        raise usage_error("--pair-by applies to folders (--source/--target, --pred --target): with --data, DPDD sources "
                          "pair with targets by sorted order and --pred results with sources by name")
    unused = [flag for name, flag in (("split", "--split"), ("allow_subset", "--allow-subset")) if name in given]
    if unused and data is None:
        raise usage_error(f"{', '.join(unused)} {'applies' if len(unused) == 1 else 'apply'} to a DPDD data set (--data) only")
    if not has_data and (reports or save_crops is not None or labels is not None or limit is not None):
        raise usage_error("--report/--save-crops/--labels/--limit need data to evaluate")
    # --speed runs the model too, but on the whole image and without scoring: --tile and
    # --strength are for --method kpac only
    unused = [flag for name, flag in ENGINE_FLAGS.items()
              if name in given and method != "kpac" and not (speed and name not in SPEED_UNUSED)]
    if unused:
        if method not in (None, "kpac"):
            what = f"--method {method}"
        else:
            what = "--pred (the results already exist)" if pred is not None else "--speed"
        reasons = [why for name, why in SPEED_UNUSED.items() if speed and ENGINE_FLAGS[name] in unused]
        if reasons:
            hint = f" ({'; '.join(reasons)})"
        else:  # "and --speed" only where it is true of every flag named
            hint = "" if all(flag in (ENGINE_FLAGS[n] for n in SPEED_UNUSED) for flag in unused) else " and --speed"
        raise usage_error(f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used by {what}: "
                          f"engine options apply to --method kpac{hint}")
    unused = [flag for name, flag in WIENER_FLAGS.items() if name in given]
    if unused and method != "wiener":
        raise usage_error(f"{', '.join(unused)} {'applies' if len(unused) == 1 else 'apply'} to --method wiener only")
    unused = [flag for name, flag in SPEED_FLAGS.items() if name in given]
    if unused and not speed:
        raise usage_error(f"{', '.join(unused)} {'applies' if len(unused) == 1 else 'apply'} to --speed only")

    from ..metrics import MetricUnavailable, PairingError, load_lpips, read_labels

    label_map = None
    if labels is not None:
        try:
            label_map = read_labels(labels)
        except (OSError, ValueError) as e:
            raise usage_error(f"--labels: {e}") from None

    # ---- the model (for --method kpac and --speed)
    deblurrer = None
    need_model = method == "kpac" or speed
    if need_model:
        from ..checkpoints.registry import resolve_model
        from ..engine import Deblurrer, EngineOptions, resolve_device

        try:
            resolve_device(device)
        except ValueError as e:
            raise usage_error(f"--device: {e}") from None
        try:
            model_path, _ = resolve_model(model or "default", dual=dual)
            deblurrer = Deblurrer(model_path, EngineOptions(device=device, precision=precision, tile=tile_value, ensemble=ensemble,
                                                            strength=strength))
        except (ValueError, FileNotFoundError, OSError) as e:
            raise usage_error(str(e)) from None
        print_setup_notes(deblurrer, quiet)
        model_dual = deblurrer.config.in_views == 2
        if method == "kpac":
            if dual and not model_dual:
                raise usage_error(f"--dual given but model {deblurrer.name} is a single-image model")
            dual = model_dual
            if dual and data is None:
                raise usage_error(f"model {deblurrer.name} is a dual-pixel model: it needs --data (DPDD layout with {split}_l/{split}_r)")

    # ---- pairs
    items: list[Item] = []
    unscored: list[str] = []
    if has_data:
        try:
            items = _plan(data, split, allow_subset, pred, target, source, pair_by, dual and method == "kpac")
        except PairingError as e:
            raise usage_error(str(e)) from None
        if data is None:  # folders are paired by their own images: what lies below is said, not silently left out
            from ..metrics.pairing import images_in_sub_folders

            for flag, folder in (("--pred", pred), ("--target", target), ("--source", source)):
                n = images_in_sub_folders(folder) if folder is not None else 0
                if n:
                    unscored.append(f"{flag} {folder}: {n} image(s) in its sub-folders are not scored "
                                    "(only the folder's own images are paired; give a sub-folder to score those)")
        unscored += _unread_notes((("--pred", pred), ("--target", target), ("--source", source)))
        if limit is not None:
            items = items[:limit]
        if save_crops is not None:
            _check_crop_paths(save_crops, items, overwrite)
        _check_outputs_are_not_inputs(items, reports, save_crops, [("--labels", labels)] if labels is not None else [])

    # ---- LPIPS
    lpips_spec: Any = "auto"
    if no_lpips:
        lpips_spec = None
    elif lpips_weights is not None:
        try:
            lpips_spec = load_lpips(lpips_weights)
        except MetricUnavailable as e:
            raise usage_error(f"--lpips-weights: {e}") from None

    mode_label = (
        f"{deblurrer.name}" if method == "kpac" else (method or f"predictions in {pred}")
    ) if has_data else (deblurrer.name if deblurrer else "")
    if data is not None:
        where = f"DPDD {split} ({data})"
    elif target is not None:  # both folders: scores depend on what was paired with what
        where = f"source {source}, target {target}" if source is not None else f"target {target}"
    else:
        where = ""
    run: dict[str, Any] = {
        # what reproduces these numbers: the command and the versions of what computed them
        "command": _command_line(ctx, given),
        "versions": _versions(),
        "method": (method or "predictions") if has_data else "kpac",  # --speed alone: the model, timed
        "method_label": mode_label,
        "model": deblurrer.name if deblurrer is not None else None,
        "device": str(deblurrer.device) if deblurrer is not None else None,
        "precision": _precision_name(deblurrer) if deblurrer is not None else None,
        "ensemble": ensemble if deblurrer is not None and ensemble != 1 else None,
        # as --ensemble: stated when the scores are not those of the model's full output
        "strength": strength if method == "kpac" and strength != 1.0 else None,
    }
    if has_data:  # how images were scored; nothing is scored by --speed alone
        run.update({
            "data": where or None,
            "pairing": "DPDD: sources and targets by sorted order" if data is not None else FOLDER_PAIRING[pair_by],
            "images": len(items),
            "limit": limit,
            "bit_depth": bit_depth or None,
            "ssim_window": ssim_window,
        })
    exit_code = EXIT_OK
    report_obj = None
    crop_errors: list[str] = []
    speed_result = None
    try:
        with sigterm_raises():
            if has_data:
                report_obj, crop_errors = _evaluate_items(
                    items, method, deblurrer, wiener_radius, wiener_snr, dual, bit_depth or None, ssim_window,
                    lpips_spec, label_map, save_crops, json_out, quiet, title=f"kpac eval: {mode_label}" + (f" on {where}" if where else ""),
                )
                report_obj.conventions["method"] = _method_text(method, deblurrer, wiener_radius, wiener_snr, dual)
                report_obj.notes.extend(unscored)
            if speed:
                from ..metrics.speed import measure_speed

                if not quiet:
                    passes = f", {ensemble}-pass self-ensemble" if ensemble > 1 else ""
                    err_console.print(f"measuring speed of {deblurrer.name} on {deblurrer.device} at {speed_wh[0]}x{speed_wh[1]}{passes} ...",
                                      soft_wrap=True, markup=False)
                try:
                    speed_result = measure_speed(deblurrer, width=speed_wh[0], height=speed_wh[1], warmup=speed_warmup, runs=speed_runs)
                except (RuntimeError, MemoryError) as e:
                    print_error(f"speed measurement failed: {' '.join(str(e).split())}")
                    exit_code = EXIT_FAILED
    except KeyboardInterrupt:
        err_console.print("interrupted" + ("; no report written" if reports else ""), soft_wrap=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Terminated:
        err_console.print("terminated" + ("; no report written" if reports else ""), soft_wrap=True)
        raise typer.Exit(EXIT_TERMINATED) from None
    except StdoutFailed as e:  # the --json records cannot be delivered: stop as on SIGPIPE
        if not quiet:
            why = "stdout was closed by its reader" if e.closed else "stdout failed"
            err_console.print(f"stopped ({why})" + ("; no report written" if reports else ""), soft_wrap=True)
        raise

    # the paper's Table 4 compares only on the DPDD test set at 8 bits with the uniform SSIM
    # window it was scored with: the terminal and the reports show it by the same rule
    show_paper = data is not None and split == "test" and bit_depth == 8 and ssim_window == "uniform"
    written: list[Path] = []
    if report_obj is not None:
        if report_obj.failures or crop_errors:
            exit_code = EXIT_FAILED
        written, errors = _write_reports(reports, report_obj, {k: v for k, v in run.items() if k != "method_label"}, speed_result, show_paper)
        for msg in errors:
            print_error(msg)
            exit_code = EXIT_FAILED
    record_run = {k: v for k, v in run.items() if k != "method_label"}
    if json_out:
        if report_obj is not None:
            emit_json(_summary_record(report_obj, record_run, speed_result))
            if not quiet:  # the tables, which carry the notes, are not printed: say them here
                for note in report_obj.notes:
                    if note not in crop_errors:  # each was printed as an error when it happened
                        print_note(note)
        else:
            emit_json({"summary": True, **record_run, "speed": speed_result.to_dict() if speed_result else None})
    else:
        with writing_stdout():
            if report_obj is not None:
                _print_tables(report_obj, run, speed_result, show_paper, len(report_obj.rows) <= PER_IMAGE_TABLE_MAX)
            elif speed_result is not None:
                from ..metrics import Report

                _print_tables(Report(), run, speed_result, False, False)
    if not quiet and written:  # only the files that were written
        err_console.print("reports: " + ", ".join(str(p) for p in written), soft_wrap=True, markup=False)
    raise typer.Exit(exit_code)


def _unread_notes(folders: tuple[tuple[str, Path | None], ...]) -> list[str]:
    """One note per folder holding images in a format kpac does not read (WebP, BMP, ...): pairing
    passes over them, so without a word the scored set would be smaller than the folder."""
    from ..metrics.pairing import quote_names, unread_in

    notes = []
    for flag, folder in folders:
        unread = list(unread_in(folder).values()) if folder is not None else []
        if unread:
            notes.append(f"{flag} {folder}: {len(unread)} image(s) in a format kpac does not read are not scored "
                         f"({quote_names(unread)}); convert them to PNG or TIFF to score them")
    return notes


def _check_report_paths(reports: list[Path], overwrite: bool) -> None:
    """Usage errors for --report files that cannot or may not be written (before any work)."""
    seen: set[Path] = set()
    for path in reports:
        key = path.resolve()
        if key in seen:
            raise usage_error(f"--report {path} is given twice")
        seen.add(key)
        if path.is_dir():
            raise usage_error(f"--report {path} is a folder; give a file name")
        if path.exists() and not overwrite:
            raise usage_error(f"--report {path} exists; add --overwrite to replace it")
        blocker = _file_above(path.parent)
        if blocker is not None:  # found before the work, not after
            raise usage_error(f"--report {path}: cannot create its folder: {blocker} is not a folder")


def _file_above(folder: Path) -> Path | None:
    """The nearest existing one of ``folder`` and its ancestors when it is not a folder (so
    ``folder`` cannot be created, or is a file), else None."""
    for above in (folder, *folder.parents):
        if above.exists():
            return None if above.is_dir() else above
    return None


def _check_crop_paths(folder: Path, items: list[Item], overwrite: bool) -> None:
    existing = [p for p in (folder / f"{it.name}.png" for it in items) if p.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise usage_error(f"--save-crops: {existing[0]} exists{more}; add --overwrite to replace")


def _check_outputs_are_not_inputs(items: list[Item], reports: list[Path], save_crops: Path | None,
                                  other_inputs: list[tuple[str, Path]] = ()) -> None:
    """A file this run reads (prediction, input, target, the --labels file) is never replaced, not even
    with --overwrite: the run would destroy the data it scores."""
    from ..engine.batch import inputs_written_over

    inputs = [(it.name, p) for it in items for p in (it.target, it.source, it.pred, it.left, it.right) if p is not None]
    inputs += list(other_inputs)
    outputs = [("--report", p) for p in reports]
    if save_crops is not None:
        outputs += [("--save-crops", save_crops / f"{it.name}.png") for it in items]
    written_over = inputs_written_over(outputs, inputs)
    if written_over:
        flag, path, _ = written_over[0]
        raise usage_error(f"{flag}: {path} is an input of this evaluation; write it elsewhere")


def _evaluate_items(
    items: list[Item], method: str | None, deblurrer: Any, wiener_radius: float | None, wiener_snr: float | None, dual: bool,
    bit_depth: int | None, ssim_window: str, lpips_spec: Any, label_map: dict[str, str] | None,
    save_crops: Path | None, json_out: bool, quiet: bool, title: str,
):
    from ..images import ImageError
    from ..metrics.evaluate import Evaluator
    from ..metrics.report import json_number

    ev = Evaluator(bit_depth=bit_depth, ssim_window=ssim_window, lpips_model=lpips_spec, labels=label_map, title=title)
    runner = _Runner(method, deblurrer, wiener_radius, wiener_snr)
    if save_crops is not None:
        try:
            save_crops.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # e.g. no permission: nothing was done yet
            raise usage_error(f"--save-crops {save_crops}: cannot create the folder ({e.strerror or e})") from None
    errors = (ImageError, OSError, ValueError, RuntimeError, MemoryError)
    crop_errors: list[str] = []
    off_limits: list[str] = []  # Wiener estimates at the end of their range
    with progress_bar(show_progress(quiet)) as progress:
        task = progress.add_task("evaluating", total=len(items)) if progress else None
        for item in items:
            rec: dict[str, Any] = {
                "name": item.name,
                "input": str(item.source) if item.source is not None else None,
                "prediction": str(item.pred) if item.pred is not None else None,
                "target": str(item.target),
                # status, error and the scores in every record, as in kpac deblur's: None where there is no value
                "status": None, "error": None, "split": None, "psnr": None, "ssim": None, "mae": None, "lpips": None,
                "lpips_unavailable": None,  # why a scored image has no LPIPS: its own reason, or the run's
            }
            try:
                inp, out, extra = runner(item, ev.reader)
                target_img = ev.load(item.target)
                row = ev.score(item.name, out, target_img)
            except errors as e:
                msg = _one_line(e, item)
                ev.fail(item.name, msg)
                rec.update(status="failed", error=msg)
                print_error(msg)
            else:
                rec.update(status="ok", split=row.split, psnr=json_number(row.psnr), ssim=json_number(row.ssim), mae=json_number(row.mae),
                           lpips=json_number(row.lpips), **{k: (json_number(v) if isinstance(v, float) else v) for k, v in extra.items()})
                if row.lpips is None:
                    rec["lpips_unavailable"] = row.lpips_unavailable or ev.report.lpips_unavailable
                if method == "wiener" and extra.get("notes"):
                    off_limits.append(item.name)
                if save_crops is not None:
                    try:
                        if inp is None and item.source is not None:
                            inp = ev.reader(item.source)
                        crop_path, box = _save_crops(save_crops, item.name, inp, out, target_img, row.psnr, method, ev)
                        rec.update(crops=str(crop_path), crop_box=list(box))
                    except errors as e:
                        msg = f"crops not written: {_one_line(e, item, save_crops / f'{item.name}.png')}"
                        crop_errors.append(msg)
                        rec["crops_error"] = msg
                        print_error(msg)
            if json_out:
                emit_json(rec)
            if progress is not None:
                progress.advance(task)
    report = ev.finish()
    if off_limits:
        report.notes.append(_wiener_note(off_limits, len(report.rows)))
    report.notes.extend(crop_errors)
    return report, crop_errors


def _wiener_note(names: list[str], scored: int) -> str:
    """The report's one line on the images where the Wiener baseline's disc estimate hit the end
    of its range (each image's record says which estimate)."""
    from ..metrics.pairing import quote_names

    return (f"wiener: on {len(names)} of {scored} image(s) the disc radius or snr estimate is at the end of its range "
            f"({quote_names(names)}): the disc model does not fit them (e.g. blur varying with depth), so the baseline's scores "
            "there are no fair comparison")


def _one_line(err: BaseException, item: Item, *also: Path) -> str:
    """The error on one line, naming the pair: messages that quote one of its files (the
    image reader's and writer's, ``also`` for files written) already do; a bare one
    (different shapes) gets the pair's name in front."""
    msg = " ".join(str(err).split()) or type(err).__name__
    files = (item.pred, item.source, item.target, item.left, item.right, *also)
    names_a_file = any(str(f) in msg for f in files if f is not None)
    return msg if names_a_file or msg.startswith(f"{item.name}: ") else f"{item.name}: {msg}"


def _save_crops(folder: Path, name: str, inp, out, target_img, out_psnr: float, method: str | None, ev) -> tuple[Path, tuple[int, int, int]]:
    """Write ``folder/name.png``: input | output | target with zoomed crops (see kpac_cli.metrics.crops)."""
    from ..images import write_image
    from ..metrics import psnr
    from ..metrics.crops import compose_comparison

    t_q = ev.prepare(target_img)
    labels = [f"{'output' if method is not None else 'prediction'} {_fmt(out_psnr, 2)} dB", "target"]
    if inp is not None:
        labels.insert(0, f"input {_fmt(psnr(ev.prepare(inp), t_q), 2)} dB")
    f32 = lambda a: None if a is None else np.asarray(a, dtype=np.float32)  # noqa: E731
    comp = compose_comparison(f32(out), f32(target_img), f32(inp), labels=labels)
    path = folder / f"{name}.png"
    write_image(path, comp.image, _crop_info(comp.image.shape), format="png", bit_depth=8)
    return path, comp.box


eval_command.__doc__ = (eval_command.__doc__ or "") + "\n" + EXAMPLES


def register(app: typer.Typer) -> None:
    app.command("eval", help=eval_command.__doc__)(eval_command)
