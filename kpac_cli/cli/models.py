"""`kpac models`: the shipped models and what their metadata says about them."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from ..checkpoints.registry import list_models
from ..model import build_model, count_parameters
from .common import emit_json


def models(json_out: bool = typer.Option(False, "--json", help="One JSON record per model on stdout.")) -> None:
    """List the shipped models with their architecture, training data and measured scores.

    Example: kpac models --json | jq .name
    """
    infos = list_models()
    if json_out:
        for m in infos:
            emit_json({"name": m.name, "default": m.default, "path": str(m.path), "config": m.config.to_dict(),
                       "parameters": count_parameters(build_model(m.config)), "provenance": m.provenance})
        return
    table = Table(title="kpac models")
    for col in ("name", "kind", "params", "trained on", "iterations", "scores"):
        table.add_column(col, max_width=48 if col in ("trained on", "scores") else None)
    for m in infos:
        p = m.provenance
        kind = f"{m.config.levels}-level" + (", dual-pixel" if m.config.in_views == 2 else "")
        scores = p.get("scores", {})
        # the headline figures only; `kpac models --json` has everything
        score_s = ", ".join(f"{k} {v}" for k, v in scores.items() if not isinstance(v, (dict, list))) if isinstance(scores, dict) else str(scores)
        # a warm-started model's last run is only part of its training; total_iterations counts all
        iterations = str(p.get("iterations", "?"))
        if "total_iterations" in p and p["total_iterations"] != p.get("iterations"):
            iterations = f"{p['total_iterations']} ({iterations} in its last run)"
        table.add_row(m.name + (" (default)" if m.default else ""), kind, f"{count_parameters(build_model(m.config)) / 1e6:.2f} M",
                      str(p.get("trained_on", "?")).split(";")[0], iterations, score_s or "-")
    Console().print(table)
    if not infos:
        typer.echo("no shipped models found", err=True)


def register(app: typer.Typer) -> None:
    app.command("models")(models)
