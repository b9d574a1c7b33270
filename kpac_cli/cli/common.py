"""What every subcommand shares: the stderr console, JSON records, progress, exit codes.

Conventions (all subcommands):

* stdout carries results only (``--json`` records, or image bytes for ``-o -``); messages
  and progress go to stderr, and progress is shown only when stderr is a terminal.
* Exit codes: 0 all succeeded, 1 some item failed (the others were still processed),
  2 usage error, 130/143 interrupted by SIGINT/SIGTERM.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

err_console = Console(stderr=True, highlight=False)


def usage_error(message: str) -> typer.Exit:
    """Print a one-line usage error and return the Exit to raise (code 2)."""
    err_console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(EXIT_USAGE)


def print_error(message: str) -> None:
    err_console.print(f"[red]error:[/] {message}", soft_wrap=True)


def emit_json(record: dict[str, Any]) -> None:
    """One JSON object per line on stdout, flushed so pipelines see it at once."""
    sys.stdout.write(json.dumps(record, default=str) + "\n")
    sys.stdout.flush()


def show_progress(quiet: bool) -> bool:
    return not quiet and err_console.is_terminal


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Progress | None]:
    """A rich progress display on stderr (or None when disabled)."""
    if not enabled:
        yield None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )
    with progress:
        yield progress
