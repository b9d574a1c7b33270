"""What every subcommand shares: the stderr console, JSON records, progress, exit codes.

Conventions (all subcommands):

* stdout carries results only (``--json`` records, or image bytes for ``-o -``); messages
  and progress go to stderr, and progress is shown only when stderr is a terminal.
* Exit codes: 0 all succeeded, 1 some item failed (the others were still processed),
  2 usage error, 130/143 interrupted by SIGINT/SIGTERM, 141 stopped because stdout's reader
  went away (``| head -1``), as a shell reports a command that SIGPIPE ended. A usage error
  is anything the command line names that keeps the command from starting, found before any
  work: an option's value, and a model (``--model``, ``kpac convert``'s SRC) that is missing,
  damaged or of the wrong kind. 1 is for the work: an image, or an output that cannot be written.
* A stderr that takes no more (``2>&-``, a full disk, its reader gone) loses the messages
  only: the work goes on, and the exit code is still the work's.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..__main__ import EXIT_INTERRUPTED

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_STDOUT_CLOSED = 141  # 128 + SIGPIPE
EXIT_TERMINATED = 143  # 128 + SIGTERM; 128 + SIGINT is EXIT_INTERRUPTED, defined where kpac starts

class _Stderr:
    """The file of :data:`err_console`: ``sys.stderr`` as it is at each write (tests, and rich's
    live display, put their own in its place), with a write that fails dropped.

    Messages are not the work: a stderr that takes no more (closed with ``2>&-``, a full disk,
    a log reader that went away in ``2>&1 | head``) loses them, while the batch goes on and its
    exit status stays what its images make it. rich would otherwise end the process (status 1,
    stdout sent to /dev/null) or raise out of the batch at the first message that failed.
    """

    _sys = sys  # the interpreter's module, bound once: stdout may be swapped through this module's name

    def _stream(self) -> Any:
        stream = self._sys.stderr
        return getattr(stream, "rich_proxied_file", stream)  # under rich's live display, the real one

    def write(self, text: str) -> int:
        try:
            self._stream().write(text)
        except (AttributeError, OSError, ValueError):  # no stderr, one that fails, or a closed one
            pass
        return len(text)

    def flush(self) -> None:
        try:
            self._stream().flush()
        except (AttributeError, OSError, ValueError):
            pass

    def isatty(self) -> bool:
        try:
            return bool(self._stream().isatty())
        except (AttributeError, OSError, ValueError):
            return False

    def fileno(self) -> int:
        return self._stream().fileno()

    @property
    def encoding(self) -> str:
        return getattr(self._stream(), "encoding", None) or "utf-8"


err_console = Console(file=_Stderr(), highlight=False)  # type: ignore[arg-type]  # a file, as rich uses one


# tifffile logs its own complaints about a damaged file (without naming it); kpac reports the
# outcome as one error line per file, so these would only be stray lines on stderr.
logging.getLogger("tifffile").setLevel(logging.CRITICAL)


def one_line(message: object) -> str:
    """``message`` on one line, with rich markup escaped (file names may contain '[...]')."""
    return escape(" ".join(str(message).split()))


def usage_error(message: str) -> typer.Exit:
    """Print a one-line usage error and return the Exit to raise (code 2)."""
    err_console.print(f"[bold red]error:[/] {one_line(message)}", soft_wrap=True)
    return typer.Exit(EXIT_USAGE)


def check_ensemble(ensemble: int) -> None:
    """``--ensemble`` of the commands that run the model: a size the engine takes, or a usage error."""
    from ..engine.deblurrer import ENSEMBLE_SIZES

    if ensemble not in ENSEMBLE_SIZES:
        raise usage_error(f"--ensemble must be {', '.join(map(str, ENSEMBLE_SIZES[:-1]))} or {ENSEMBLE_SIZES[-1]}, got {ensemble}")


def device_option(**kwargs: Any) -> Any:
    """The ``--device`` option of every command that runs a model."""
    return typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps.", **kwargs)


def precision_option() -> Any:
    """The ``--precision`` option of the inference commands (``kpac train`` has its own auto)."""
    return typer.Option("auto", "--precision", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16.")


def given_options(ctx: typer.Context) -> set[str]:
    """The parameters the user typed (a default typed out counts), not those left to default."""
    return {name for name in ctx.params if ctx.get_parameter_source(name) is not None
            and ctx.get_parameter_source(name).name not in ("DEFAULT", "DEFAULT_MAP")}


def fp32_option() -> Any:
    """``--fp32``, Real-ESRGAN's shorthand, beside :func:`precision_option`."""
    return typer.Option(False, "--fp32", help="Shorthand for --precision fp32.")


def precision_with_fp32(precision: str, fp32: bool) -> str:
    """``--precision`` completed by ``--fp32``. A contradiction (``--precision bf16 --fp32``) is
    refused rather than resolved: which one was meant is unknown; ``auto`` states no preference."""
    if not fp32:
        return precision
    if precision.lower() not in ("auto", "fp32"):
        raise usage_error(f"--precision {precision} and --fp32 contradict each other (--fp32 is --precision fp32)")
    return "fp32"


def parse_tile(value: str) -> int | str | None:
    """``--tile``: ``'auto'``, None for whole images (``0``/``none``/``off``/``whole``), or a size in pixels.

    Raises ValueError with a message for the user (without the option's name).
    """
    v = value.strip().lower()
    if v == "auto":
        return "auto"
    if v in ("0", "none", "off", "whole"):  # "whole", as kpac bench names it
        return None
    try:
        n = int(v)
    except ValueError:
        raise ValueError("use auto, 0 (no tiling) or a tile size in pixels") from None
    if n < 0:
        raise ValueError(f"use auto, 0 (no tiling) or a tile size in pixels; got {n}")
    return n or None  # "00" is 0 as well


def dual_pixel_mode(inputs: list[str], left: str | None, right: str | None, center: str | None, no_inputs: str) -> bool:
    """Whether INPUTS or ``--left``/``--right`` were given (True: dual-pixel); usage errors otherwise.

    ``no_inputs`` is the message when neither was given; ``center`` (``--center``), a view of
    a dual-pixel pair, is refused without ``--left`` rather than ignored.
    """
    dual = left is not None or right is not None
    if right is not None and left is None:  # --left alone may name a DPDD root (test_l/, test_r/, test_c/)
        raise usage_error("dual-pixel input needs --left as well as --right")
    if center is not None and left is None:
        raise usage_error("--center is the centre view of dual-pixel pairs: give it with --left/--right, not with INPUTS")
    if dual and inputs:
        raise usage_error("give either INPUTS or --left/--right, not both")
    if not dual and not inputs:
        raise usage_error(no_inputs)
    return dual


class Terminated(Exception):
    """SIGTERM arrived: the command stops as on Ctrl-C, with exit code 143."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated`, so cleanup runs as on Ctrl-C."""

    def on_sigterm(signum, frame):  # noqa: ARG001
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def stops_on_signals(interrupted: Callable[[], str] = lambda: "interrupted") -> Iterator[None]:
    """Within the block Ctrl-C and SIGTERM end the command with one line on stderr (what
    ``interrupted()`` says of the work left) and exit code 130 or 143, after the cleanup that an
    exception runs (an atomic write in flight leaves no temporary file), for a command with no
    batch summary of its own to print."""
    try:
        with sigterm_raises():
            yield
    except KeyboardInterrupt:
        err_console.print(one_line(interrupted()), soft_wrap=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Terminated:
        err_console.print(one_line(interrupted()), soft_wrap=True)
        raise typer.Exit(EXIT_TERMINATED) from None


def print_error(message: str) -> None:
    err_console.print(f"[red]error:[/] {one_line(message)}", soft_wrap=True)


def say_images_below(inputs: list[str], output: Path | None) -> None:
    """A note when input folders hold images in sub-folders, which only ``-r`` takes (the
    output folder, when it lies inside an input folder, is not counted)."""
    from ..engine.batch import images_below

    below = images_below(inputs, exclude=output)
    if below:
        print_note(f"{below} image(s) in sub-folders of the input folders are left out (-r takes them, keeping the sub-folders)")


def say_unread_images(inputs: list[str], recursive: bool) -> None:
    """A note naming the images of formats kpac does not read (an iPhone's HEIC photos, WebP,
    ...) that lie beside the photos a run takes: left out, but not in silence."""
    from ..engine.batch import unread_images_said

    said = unread_images_said(inputs, recursive)
    if said:
        print_note(f"{said[0]} in the input folders left out: formats kpac does not read ({said[1]})")


def print_setup_notes(deblurrer: Any, quiet: bool) -> None:
    """What a loaded model's engine has to say once per command (e.g. an emulated precision)."""
    if not quiet:
        for note in getattr(deblurrer, "setup_notes", ()):
            print_note(note)


def print_note(message: str) -> None:
    """Something the user should know about a result that is not an error."""
    err_console.print(f"[yellow]note:[/] {one_line(message)}", soft_wrap=True)


class StdoutFailed(typer.Exit):
    """stdout takes no more output: its reader went away (``| head -1``, exit 141) or a write
    failed (a full disk, a closed descriptor: exit 1). The command stops, as a pipeline's writer
    does on SIGPIPE, rather than go on with work whose results nobody can receive; outputs
    already written are complete. ``closed``: the reader went away (not an error)."""

    def __init__(self, closed: bool) -> None:
        super().__init__(EXIT_STDOUT_CLOSED if closed else EXIT_FAILED)
        self.closed = closed


def stdout_failed(error: OSError | None) -> StdoutFailed:
    """The :class:`StdoutFailed` to raise for ``error`` (None: there is no stdout at all).

    A failed write is said on stderr at once (a closed pipe is not an error); stdout is then
    pointed at /dev/null, so that later writes and Python's flush at exit neither fail again
    nor print a traceback.
    """
    closed = error is not None and error.errno == errno.EPIPE
    if not closed:
        reason = (error.strerror or str(error)) if error is not None else "it is closed"
        print_error(f"cannot write to stdout: {reason}")
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (stdout, for the rest of the process)
        return StdoutFailed(closed)
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # no descriptor (captured in a test)
        return StdoutFailed(closed)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
    return StdoutFailed(closed)


@contextmanager
def writing_stdout() -> Iterator[None]:
    """Within the block (writes to stdout only) a failed write raises :class:`StdoutFailed`, as
    does a process started without a stdout (``>&-``: rich would drop the table silently)."""
    if sys.stdout is None:
        raise stdout_failed(None)
    try:
        yield
    except OSError as e:
        raise stdout_failed(e) from None


class StdoutConsole(Console):
    """rich's console for tables of results on stdout, printed to within :func:`writing_stdout`.

    Its reader going away is an OSError, as for any write to stdout: rich itself would exit
    with status 1 and nothing said, not 141 as :func:`writing_stdout` ends.
    """

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def emit_json(record: dict[str, Any]) -> None:
    """One JSON object per line on stdout, flushed so pipelines see it at once.

    Raises :class:`StdoutFailed` when stdout takes no more.
    """
    line = json.dumps(record, default=str) + "\n"
    with writing_stdout():
        sys.stdout.write(line)
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
        TextColumn("{task.description}", style="bold", markup=False),  # file names may hold "[...]"
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
        # rich would route stdout through the stderr console, above the bar: the --json records
        # of `kpac deblur ... --json > records.jsonl` run at a terminal would land on the
        # terminal, wrapped, and none in the file. Only a terminal's stdout is shown that way.
        redirect_stdout=_stdout_is_a_terminal(),
    )
    with progress:
        yield progress


def _stdout_is_a_terminal() -> bool:
    try:
        return sys.stdout is not None and sys.stdout.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stdout is no terminal
        return False
