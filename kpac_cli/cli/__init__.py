"""The `kpac` command line: parse, call the core, report. The core never imports this layer."""

from __future__ import annotations

import importlib
import importlib.util
import os

# Transparent huge pages for PyTorch's CPU allocator: 17x fewer page faults, inference ~17%
# faster at the same peak memory (benchmarks/allocator.py: 2.32 against 2.79 s per 1280x720).
# PyTorch reads it once, at its first CPU allocation, so it is set here, before any command
# module imports torch; a user's own setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import sys  # noqa: E402

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

from .. import __version__  # noqa: E402
from ..__main__ import EXIT_INTERRUPTED  # noqa: E402

try:  # newer Typer carries its own copy of click
    from typer._click import exceptions as click_exceptions  # noqa: E402
except ImportError:  # pragma: no cover - Typer that uses the click package
    from click import exceptions as click_exceptions  # type: ignore[no-redef]  # noqa: E402


class _OneLineErrorsGroup(TyperGroup):
    """Typer's group with its own parse errors (an unknown option, a non-number for a number)
    on one line, as kpac's usage errors are, instead of a multi-line box: a script's log or a
    pipeline's stderr reads the same whichever layer refused the command line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            # Not standalone, click returns an explicit exit's code and raises its errors here.
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exceptions.UsageError as error:
            if type(error).__name__ != "NoArgsIsHelpError":  # that one's answer, the help, is printed
                _print_usage_error(error)
            sys.exit(error.exit_code)
        except click_exceptions.ClickException as error:
            error.show()
            sys.exit(error.exit_code)
        except typer.Abort as error:
            if isinstance(error.__cause__, KeyboardInterrupt):  # a Ctrl-C, as Typer before 0.13 hands it on
                sys.exit(EXIT_INTERRUPTED)
            print("Aborted!", file=sys.stderr)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _print_usage_error(error: click_exceptions.UsageError) -> None:
    from .common import err_console, one_line

    hint = f" (see {error.ctx.command_path} -h)" if error.ctx is not None else ""
    err_console.print(f"[bold red]error:[/] {one_line(error.format_message() + hint)}", soft_wrap=True)


app = typer.Typer(
    cls=_OneLineErrorsGroup,
    name="kpac",
    help="Remove defocus blur from photos with KPAC networks.\n\nExample: kpac deblur photos/ -o out/",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)

# Each module defines register(app) and adds its own subcommand(s).
_COMMAND_MODULES = ["deblur", "models", "convert", "train", "eval", "blurmap", "synth", "bench", "export"]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kpac {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Remove defocus blur from photos with KPAC networks."""


for _name in _COMMAND_MODULES:
    if importlib.util.find_spec(f"{__name__}.{_name}") is not None:
        importlib.import_module(f"{__name__}.{_name}").register(app)


def main() -> None:
    app()
