"""Evaluation reports: per-image rows, means overall and per split, JSON/CSV/Markdown.

Means are plain averages of the per-image values (the DPDD convention), overall and for
every split label (e.g. indoor/outdoor read by :func:`~kpac_cli.metrics.read_labels`).
LPIPS absent for all images carries the reason (``lpips_unavailable``) and prints
``unavailable: <reason>``, or ``not computed`` when LPIPS was switched off (reason
:data:`LPIPS_NOT_REQUESTED`); no number is ever substituted. An image without LPIPS where the
others have it (too small for AlexNet) carries its own reason (``ImageResult.lpips_unavailable``),
and the LPIPS means are over the images that have a value (the report's notes say which not).

File formats:

* JSON: ``{"title", "conventions", "lpips_unavailable", "summary", "images", "failures",
  "notes", "paper"}``; ``summary`` is ``{"overall": {...}, "splits": {label: {...}}}`` with
  ``count, psnr, ssim, mae, lpips`` each (``lpips`` over the images that have one); an infinite
  PSNR (identical images) is written as the string ``"inf"``, and a missing value (no LPIPS; a mean over no image, when every one
  failed) as ``null``. ``paper`` holds the paper's Table 4 rows and the note on what they
  compare with, or ``null`` with ``paper=False``.
* CSV: header ``name,split,psnr,ssim,mae,lpips,error`` and one row per image (empty field for
  no split / no LPIPS / any missing value; ``inf`` parses with ``float()``), then one row per
  failed image with only its name and ``error`` (empty for the scored images).
* Markdown: summary table (with the paper's Table 4 rows beside ours unless
  ``paper=False``: they compare only on the full DPDD test set, which the note under the
  table says), per-split and per-image tables, and the conventions used.

Every format says a missing value one way: ``n/a`` in text, ``null`` in JSON, an empty CSV
field; never ``nan``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from ..images import atomic_write_bytes
from .paper import PAPER_TABLE4_DPDD, PAPER_TABLE4_LABEL

__all__ = ["ImageResult", "Report", "METRIC_NAMES", "LPIPS_NOT_REQUESTED", "PAPER_IMAGES", "json_number", "paper_note"]

METRIC_NAMES = ("psnr", "ssim", "mae", "lpips")
_CSV_FIELDS = ("name", "split", "psnr", "ssim", "mae", "lpips", "error")
#: ``Report.lpips_unavailable`` when LPIPS was switched off rather than impossible to compute.
LPIPS_NOT_REQUESTED = "not requested"
#: Images in the DPDD test set, on which the paper's Table 4 was computed.
PAPER_IMAGES = 76


def paper_note(count: int) -> str:
    """What the paper's Table 4 rows compare with, for ``count`` images of ours (every report
    that shows those rows carries it)."""
    note = (f"The paper's rows are the published numbers on the full DPDD test set ({PAPER_IMAGES} images); ours are "
            f"comparable only when computed on those same {PAPER_IMAGES} images with the same conventions")
    if count != PAPER_IMAGES:
        note += f"; ours are on {count} image{'s' if count != 1 else ''}, so they do not compare"
    return note + "."


@dataclass(frozen=True)
class ImageResult:
    """Metrics of one image (see :mod:`kpac_cli.metrics.core` for the conventions).

    ``lpips_unavailable`` says why this image has no LPIPS where the report's others may (e.g.
    too small for AlexNet); None otherwise, and when LPIPS is missing for every image (the
    report's ``lpips_unavailable`` says why)."""

    name: str
    psnr: float
    ssim: float
    mae: float
    lpips: float | None = None
    split: str | None = None
    lpips_unavailable: str | None = None


def json_number(v: float | None) -> float | str | None:
    """A number for JSON (the report files and ``kpac eval --json``): a Python float,
    infinities as strings, NaN (no value) as null like other missing values."""
    if v is None:
        return None
    v = float(v)
    if math.isnan(v):
        return None
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def _csv_num(v: float | None) -> str:
    """A number for CSV: exact (repr), ``inf`` as float() reads it, empty when there is no value."""
    if v is None or math.isnan(v):
        return ""
    return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def _mean(values: Iterable[float]) -> float:
    vals = list(values)
    return math.fsum(vals) / len(vals) if vals else math.nan


def _fmt(v: float | None, digits: int) -> str:
    if v is None or math.isnan(v):  # as the terminal's tables say it
        return "n/a"
    if not math.isfinite(v):
        return "inf" if v > 0 else str(v)
    return f"{v:.{digits}f}"


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


@dataclass
class Report:
    """Per-image results plus what is needed to read them.

    Attributes
    ----------
    rows : list of ImageResult
    conventions : dict of str to str
        How the numbers were computed (data range, bit depth, SSIM window, LPIPS
        variant and weights...); written into every output.
    lpips_unavailable : str or None
        Why there is no LPIPS (None when LPIPS was computed).
    title : str
    failures : list of (name, message)
        Images that could not be evaluated (not part of any mean).
    notes : list of str
        Anything else worth reading next to the numbers (e.g. unlabelled images).
    """

    rows: list[ImageResult] = field(default_factory=list)
    conventions: dict[str, str] = field(default_factory=dict)
    lpips_unavailable: str | None = None
    title: str = "kpac evaluation"
    failures: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ summary

    @property
    def lpips_status(self) -> str | None:
        """Why there is no LPIPS, as shown to readers: ``not computed`` (switched off) or
        ``unavailable: <reason>``; None when LPIPS was computed."""
        if self.lpips_unavailable is None:
            return None
        if self.lpips_unavailable == LPIPS_NOT_REQUESTED:
            return "not computed"
        return f"unavailable: {self.lpips_unavailable}"

    @property
    def has_lpips(self) -> bool:
        return bool(self.rows) and all(r.lpips is not None for r in self.rows)

    def _means(self, rows: list[ImageResult]) -> dict[str, Any]:
        out: dict[str, Any] = {"count": len(rows)}
        for m in ("psnr", "ssim", "mae"):
            out[m] = _mean(getattr(r, m) for r in rows)
        # over the images that have LPIPS (the others are named in the notes); None when none has
        lp = [r.lpips for r in rows if r.lpips is not None]
        out["lpips"] = _mean(lp) if lp else None
        return out

    def summary(self) -> dict[str, Any]:
        """``{"overall": means, "splits": {label: means}}``; means hold ``count`` too."""
        labels = sorted({r.split for r in self.rows if r.split is not None})
        return {
            "overall": self._means(self.rows),
            "splits": {lab: self._means([r for r in self.rows if r.split == lab]) for lab in labels},
        }

    # ------------------------------------------------------------------ writers

    def to_dict(self, paper: bool = True) -> dict[str, Any]:
        """JSON-ready dictionary (infinities as strings, missing values as None, see the module doc).

        ``paper=False`` leaves out the paper's Table 4 rows (``"paper": None``), as :meth:`markdown`.
        """
        summ = self.summary()

        def conv(d: dict[str, Any]) -> dict[str, Any]:
            return {k: (json_number(v) if isinstance(v, float) else v) for k, v in d.items()}

        return {
            "title": self.title,
            "conventions": dict(self.conventions),
            "lpips_unavailable": self.lpips_unavailable,
            "summary": {"overall": conv(summ["overall"]), "splits": {k: conv(v) for k, v in summ["splits"].items()}},
            "images": [
                {k: (json_number(v) if isinstance(v, float) else v) for k, v in asdict(r).items()} for r in self.rows
            ],
            "failures": [{"name": n, "error": e} for n, e in self.failures],
            "notes": list(self.notes),
            "paper": {
                "source": PAPER_TABLE4_LABEL,
                "rows": [row._asdict() for row in PAPER_TABLE4_DPDD],
                "note": paper_note(len(self.rows)),
            } if paper else None,
        }

    def to_json(self, path: str | os.PathLike, paper: bool = True) -> None:
        _write_text(path, json.dumps(self.to_dict(paper), indent=2, allow_nan=False) + "\n")

    def csv_text(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(_CSV_FIELDS)
        for r in self.rows:
            w.writerow(
                [
                    r.name,
                    r.split or "",
                    _csv_num(r.psnr),
                    _csv_num(r.ssim),
                    _csv_num(r.mae),
                    _csv_num(r.lpips),
                    "",
                ]
            )
        for name, error in self.failures:  # listed, so that a mean taken from the file is not taken for all of them
            w.writerow([name, "", "", "", "", "", error])
        return buf.getvalue()

    def to_csv(self, path: str | os.PathLike) -> None:
        _write_text(path, self.csv_text())

    def markdown(self, paper: bool = True) -> str:
        """The Markdown report as a string (see :meth:`to_markdown`).

        ``paper=False`` leaves out the paper's Table 4 rows (for data other than the full
        DPDD test set, where they do not compare).
        """
        summ = self.summary()
        lp_note = self.lpips_status
        lines = [f"# {_md_escape(self.title)}", ""]

        lines += ["## Summary", ""]
        lines += [
            "| method | source | images | PSNR (dB) ↑ | SSIM ↑ | MAE ↓ | LPIPS ↓ |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]

        def our_row(label: str, m: dict[str, Any]) -> str:
            lp = _fmt(m["lpips"], 3) if m["lpips"] is not None else (lp_note or "n/a")
            return (
                f"| {_md_escape(label)} | measured | {m['count']} | {_fmt(m['psnr'], 2)} | {_fmt(m['ssim'], 3)}"
                f" | {_fmt(m['mae'], 3)} | {_md_escape(lp)} |"
            )

        lines.append(our_row("ours (all images)", summ["overall"]))
        for lab, m in summ["splits"].items():
            lines.append(our_row(f"ours ({lab})", m))
        for p in PAPER_TABLE4_DPDD if paper else ():
            lines.append(
                f"| {p.method} | {PAPER_TABLE4_LABEL} | {PAPER_IMAGES} | {p.psnr:.2f} | {p.ssim:.3f} | {p.mae:.3f} | {p.lpips:.3f} |"
            )
        lines.append("")
        if lp_note:
            lines += [f"LPIPS: {_md_escape(lp_note)}", ""]
        if paper:
            lines += [_md_escape(paper_note(len(self.rows))) + " The conventions are listed below.", ""]

        lines += ["## Conventions", ""]
        for k, v in self.conventions.items():
            lines.append(f"- **{k}**: {v}")
        lines.append("- **means**: average of the per-image values (PSNR averaged in dB)")
        lines.append("")

        if self.failures:
            lines += ["## Failures (not in any mean)", "", "| name | error |", "|---|---|"]
            lines += [f"| {_md_escape(n)} | {_md_escape(e)} |" for n, e in self.failures]
            lines.append("")
        if self.notes:
            lines += ["## Notes", ""] + [f"- {_md_escape(n)}" for n in self.notes] + [""]

        lp_short = "not computed" if self.lpips_unavailable == LPIPS_NOT_REQUESTED else ("unavailable" if lp_note else None)
        lines += ["## Per image", ""]
        lines += ["| name | split | PSNR (dB) | SSIM | MAE | LPIPS |", "|---|---|---:|---:|---:|---:|"]
        for r in self.rows:
            lp = _fmt(r.lpips, 4) if r.lpips is not None else (lp_short or "n/a")
            lines.append(
                f"| {_md_escape(r.name)} | {_md_escape(r.split or '')} | {_fmt(r.psnr, 2)} | {_fmt(r.ssim, 4)}"
                f" | {_fmt(r.mae, 4)} | {lp} |"
            )
        return "\n".join(lines) + "\n"

    def to_markdown(self, path: str | os.PathLike, paper: bool = True) -> None:
        """Write the Markdown report: ours next to the paper's Table 4, conventions, per image."""
        _write_text(path, self.markdown(paper))


def _write_text(path: str | os.PathLike, text: str) -> None:
    # Atomic, so an interrupted run never leaves half a report.
    atomic_write_bytes(path, text.encode("utf-8"))
