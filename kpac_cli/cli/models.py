"""`kpac models`: the shipped models and what their metadata says about them."""

from __future__ import annotations

import typer
from rich.table import Table
from rich.text import Text

from ..checkpoints.registry import survey_models, unsearched_weights_dir
from ..model import build_model, count_parameters
from .common import EXIT_FAILED, emit_json, print_error, print_note, writing_stdout
from .common import StdoutConsole as Console  # rich's, with `| head -1` ending as any write to stdout does


def _is_number(value: object) -> bool:
    """A figure that can be formatted as one (a file's metadata may hold anything)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def headline_scores(scores: object, dual: bool = False) -> str:
    """The few figures a user compares models by, one per line; '-' when none were measured.

    ``scores`` is a model file's ``provenance["scores"]`` as written by
    ``benchmarks/shipped_weights.py --publish``; keys it does not know are left to ``--json``.
    """
    if not isinstance(scores, dict) or not scores:
        return "-" if not scores else str(scores)
    lines = []
    gain = scores.get("heldout_synthetic_psnr_gain_db")
    if isinstance(gain, (int, float)):
        ensemble = scores.get("heldout_synthetic_ensemble_psnr_gain_db")
        size = scores.get("heldout_synthetic_ensemble_size", 8)
        lines.append(f"held-out synthetic {gain:+.2f} dB"
                     + (f" ({ensemble:+.2f} with --ensemble {size})" if isinstance(ensemble, (int, float)) else ""))
    capture = scores.get("pixel4_dual_pixel_capture")
    if isinstance(capture, dict):
        out = capture.get("dual_psnr" if dual else "single_psnr")
        if _is_number(out) and _is_number(capture.get("input_psnr")):
            lines.append(f"Pixel 4 capture {capture['input_psnr']:.2f} -> {out:.2f} dB")
    detection = scores.get("blur_detection")
    if isinstance(detection, dict) and _is_number(detection.get("auc")):
        lines.append(f"blur detection AUC {detection['auc']:.3f}")
    # figures of other shapes (a model imported with its own scalar scores, say)
    lines += [f"{k} {v}" for k, v in scores.items()
              if not isinstance(v, (dict, list)) and not k.startswith("heldout_synthetic_")]
    return "\n".join(lines) or "-"


def models(
    json_out: bool = typer.Option(False, "--json", help="One JSON record per model on stdout, one per line (JSON Lines: jq reads them; python -m json.tool needs --json-lines)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No message on stderr when no model is found (the list on stdout is unchanged)."),
) -> None:
    """List the shipped models with their architecture, training iterations and measured scores.

    The default single-image model and the default dual-pixel model (used with --left/--right) are marked; --json adds each model's training data and every score. A shipped file that cannot be used (damaged, a Git LFS pointer, or listed in SHA256SUMS but missing) is named on stderr and the exit code is 1. A folder named by $KPAC_WEIGHTS_DIR is searched first (a model there takes the place of a shipped one of the same name).

    Example: kpac models --json | jq .name
    """
    infos, unusable = survey_models()
    for name, error in unusable.items():  # an error, so said even with --quiet
        print_error(error)
    unsearched = unsearched_weights_dir()
    if unsearched:  # the list lacks what the user pointed kpac at: said even with --quiet
        print_note(f"{unsearched}: its models are not listed")
    if json_out:
        for m in infos:
            # which input the default is for: a script picking `.default` alone would get two models
            default_for = ("dual-pixel" if m.config.in_views == 2 else "single-image") if m.default else None
            emit_json({"name": m.name, "default": m.default, "default_for": default_for, "path": str(m.path), "config": m.config.to_dict(),
                       "parameters": count_parameters(build_model(m.config)), "provenance": m.provenance})
    else:
        with writing_stdout():
            _print_table(infos)
        # the table is the data asked for (stdout), so --quiet leaves it; only this note is a message
        if not infos and not unusable and not quiet:
            typer.echo("no shipped models found", err=True)
    if unusable:
        raise typer.Exit(EXIT_FAILED)


def _print_table(infos: list) -> None:
    table = Table(title="kpac models", caption="kpac models --json and weights/README.md have every score and how it was measured")
    for col in ("name", "kind", "params", "iterations", "scores"):
        table.add_column(col)
    for m in infos:
        p = m.provenance
        kind = f"{m.config.levels}-level" + (", dual-pixel" if m.config.in_views == 2 else "")
        # a warm-started model's last run is only part of its training; total_iterations counts all
        iterations = str(p.get("iterations", "?"))
        if "total_iterations" in p and p["total_iterations"] != p.get("iterations"):
            iterations = f"{p['total_iterations']} ({iterations} in its last run)"
        default = (" (default, dual-pixel)" if m.config.in_views == 2 else " (default)") if m.default else ""
        # a file's name and metadata, verbatim: '[' in them is text, not rich markup
        table.add_row(Text(m.name + default), kind,
                      f"{count_parameters(build_model(m.config)) / 1e6:.2f} M",
                      Text(iterations), Text(headline_scores(p.get("scores"), dual=m.config.in_views == 2)))
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("models")(models)
