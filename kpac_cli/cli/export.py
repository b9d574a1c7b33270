"""`kpac export`: write a model as ONNX, optionally checked against PyTorch."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import typer

from .common import EXIT_FAILED, emit_json, err_console, given_options, print_error, stops_on_signals, usage_error

EXAMPLES = """
Examples:

  kpac export --onnx kpac-3level.onnx                     # default model, dynamic size

  kpac export --onnx dual.onnx -m kpac-dual --check       # + diff and speed vs PyTorch

  kpac export --onnx net.onnx --config single_2level      # random weights (tests)
"""


def _load_model(model: str, config: Optional[str]):
    """(network, name, whether its checkpoint asks for balanced dual-pixel views)."""
    from ..model import PAPER_CONFIGS, build_model

    if config is not None:
        if config not in PAPER_CONFIGS:
            raise ValueError(f"unknown --config {config!r} (one of {', '.join(PAPER_CONFIGS)})")
        import torch

        torch.manual_seed(0)
        return build_model(PAPER_CONFIGS[config]).eval(), f"random {config}", False
    from ..checkpoints import load_checkpoint
    from ..checkpoints.registry import resolve_model

    path, name = resolve_model(model)
    ckpt = load_checkpoint(path)
    # recorded in the file so that a runtime pre-processes as the engine does (Deblurrer.balance_views)
    return ckpt.build().eval(), name, bool(ckpt.provenance.get("balance_views"))


def _is_the_model(onnx_path: Path, model: str) -> bool:
    """Whether the existing ``onnx_path`` is ``model``'s file (by any name, a hard link too)."""
    from ..checkpoints.registry import resolve_model
    from ..engine.batch import inputs_written_over

    try:
        path, _ = resolve_model(model)
    except (ValueError, FileNotFoundError, OSError):
        return False  # the model's own error comes when it is loaded
    return bool(inputs_written_over([("--onnx", onnx_path)], [("--model", path)]))


def export(
    ctx: typer.Context,
    onnx_path: Path = typer.Option(..., "--onnx", help="Destination .onnx file (its folder is created if needed)."),
    model: str = typer.Option("default", "--model", "-m", help="Shipped model name (see `kpac models`), a .safetensors file, or a training run folder (its model.safetensors)."),
    config: Optional[str] = typer.Option(None, "--config", help="Export random weights of a paper config instead (single_2level, single_3level, dual)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset version: 13 up to the newest this PyTorch's exporter writes."),
    static: Optional[str] = typer.Option(None, "--static", help="Fix the input size to WxH and the batch to 1 instead of dynamic batch, height and width (multiples of the model's stride: 8 for 3-level models, 4 for 2-level)."),
    check: bool = typer.Option(False, "--check", help="Run onnxruntime and PyTorch on a random image: max abs diff and times."),
    check_size: str = typer.Option("1280x720", "--check-size", help="WxH of the --check image."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON record on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary or --check figures on stderr (errors and warnings are still printed)."),
) -> None:
    """Export a model to ONNX (inputs 'input' and 'reference', output 'output'; NCHW float32 in [-1, 1]).

    Height and width of the dynamic graph must be multiples of the model's stride (8 for 3-level models, 4 for 2-level); pad first, as kpac's engine does. A dual-pixel model whose checkpoint asks for balanced views records that in the file's metadata (kpac_balance_views); balance the views before the graph, as kpac's engine does. The file's metadata states the rest for a runtime that has only the file: kpac_stride, and kpac_input, kpac_reference and kpac_output (RGB, display-encoded, not linear; x = 2 v - 1; padding; clip the output to [0, 1] after (output + 1) / 2).
    """
    from ..export import (MIN_OPSET, check_export, check_static_size, export_onnx, is_allocation_failure, max_opset,
                          require_onnxruntime)

    if config is not None and "model" in given_options(ctx):
        # which of the two was meant is unknown: refused rather than one silently ignored
        raise usage_error("give either --model or --config (random weights), not both")
    newest = max_opset()
    if opset < MIN_OPSET or (newest is not None and opset > newest):
        span = f"between {MIN_OPSET} and {newest} (what this PyTorch's ONNX exporter writes)" if newest else f">= {MIN_OPSET}"
        raise usage_error(f"--opset must be {span}, got {opset}")
    if str(onnx_path) == "-":  # kpac's name for stdout elsewhere: never a file named '-'
        raise usage_error("--onnx -: the graph is written to a file, not to stdout; give the .onnx file to write")
    if onnx_path.is_dir():
        raise usage_error(f"--onnx {onnx_path}: is a folder (give the .onnx file to write)")
    exists = onnx_path.exists() or onnx_path.is_symlink()
    if exists and config is None and _is_the_model(onnx_path, model):  # only an existing file can be the model's
        raise usage_error(f"--onnx {onnx_path}: is the model file, which is never replaced (not even with --overwrite)")
    if onnx_path.suffix.lower() != ".onnx":  # 'out/' reaches here as 'out': a folder was meant, or a typo
        raise usage_error(f"--onnx {onnx_path}: give a file name ending in .onnx")
    if exists and not overwrite:
        raise usage_error(f"{onnx_path}: exists (use --overwrite)")
    # A missing destination folder is created when the file is written, as by kpac convert.
    sizes = {}
    for flag, text in (("--static", static), ("--check-size", check_size)):
        try:
            sizes[flag] = _parse_size(text) if text is not None else None
        except ValueError as e:  # named: both options take WxH
            raise usage_error(f"{flag}: {e}") from None
    if static and "check_size" in given_options(ctx):  # it would be ignored: the graph takes one size
        raise usage_error("--check-size with --static: a static graph is checked at its own size (--static WxH)")
    if not check and "check_size" in given_options(ctx):  # nothing is checked: it would be ignored
        raise usage_error("--check-size applies to --check (the size of its test image); add --check or leave it out")
    sample = sizes["--static"] or (96, 64)
    cw, ch = sizes["--check-size"]
    if check:  # before anything is written: a file left by a command that then fails would look like a result
        try:
            require_onnxruntime()
        except ImportError as e:
            print_error(f"{e} (--check runs the graph with it)")
            raise typer.Exit(EXIT_FAILED) from None
    written = False

    def interrupted() -> str:  # the file is written before --check runs: said, as it is left in place
        if not written:
            return f"interrupted: {onnx_path} not written"
        return f"interrupted: {onnx_path} was written" + (", its --check did not finish" if check else "")

    with stops_on_signals(interrupted):
        try:
            net, name, balance = _load_model(model, config)
            if static:
                check_static_size((sample[1], sample[0]), net.config.stride)
        except (ValueError, FileNotFoundError) as e:
            raise usage_error(str(e)) from None
        try:
            data = export_onnx(net, onnx_path, opset=opset, dynamic=static is None, sample_hw=(sample[1], sample[0]),
                               balance_views=balance, replace=overwrite)
        except ImportError as e:  # the message names the extra to install
            print_error(str(e))
            raise typer.Exit(EXIT_FAILED) from None
        except ValueError as e:  # an opset this PyTorch's exporter refuses though max_opset() allowed it
            raise usage_error(str(e)) from None
        except OSError as e:  # e.g. no permission to write there
            if isinstance(e, FileExistsError) and (onnx_path.exists() or onnx_path.is_symlink()):
                # created by someone else while the graph was traced: left as it is
                raise usage_error(f"{onnx_path}: exists (created while exporting; use --overwrite)") from None
            print_error(f"cannot write {onnx_path}: {e.strerror or e}")
            raise typer.Exit(EXIT_FAILED) from None
        except (RuntimeError, MemoryError) as e:  # the graph is traced on an image of the --static size
            if not is_allocation_failure(e):
                raise
            print_error(f"out of memory tracing the graph at {sample[0]}x{sample[1]}; {onnx_path} not written"
                        + (" (give a smaller --static size)" if static else ""))
            raise typer.Exit(EXIT_FAILED) from None
        written = True
        record: dict = {"model": name, "onnx": str(onnx_path), "bytes": len(data), "opset": opset,
                        "dynamic": static is None, "balance_views": balance and net.config.in_views == 2,
                        "config": net.config.to_dict()}
        if check:
            if static:
                cw, ch = sample
            from ..model.fast import retain_freed_memory

            retain_freed_memory()  # as for `kpac bench`: PyTorch is timed without per-pass page faults
            try:
                record["check"] = check_export(net, data, ch, cw)
            except ImportError as e:
                print_error(str(e))
                raise typer.Exit(EXIT_FAILED) from None
            except Exception as e:  # noqa: BLE001 - only running out of memory is a user's size to say
                if not is_allocation_failure(e):
                    raise
                smaller = "--static size" if static else "--check-size"
                print_error(f"--check at {cw}x{ch}: out of memory; {onnx_path} was written (give a smaller {smaller})")
                raise typer.Exit(EXIT_FAILED) from None
    too_far = check and record["check"]["max_abs_diff"] > 1e-4
    if json_out:
        emit_json(record)
        if too_far:  # a warning, on stderr with --json and --quiet too
            _warn_diff(record["check"]["max_abs_diff"])
        return

    def say(text: str) -> None:  # messages go to stderr, as every command's (stdout: --json)
        if not quiet:
            err_console.print(text, markup=False, soft_wrap=True)

    say(f"wrote {onnx_path} ({len(data) / 1e6:.1f} MB, opset {opset}, {'dynamic' if static is None else 'static'} size) from {name}")
    if check:
        c = record["check"]
        say(f"check at {c['width']}x{c['height']}: max abs diff {c['max_abs_diff']:.2e} (onnxruntime vs PyTorch, fp32)")
        say(f"  PyTorch channels_last {c['torch_seconds']:.3f} s, PyTorch fast path {c['torch_fast_seconds']:.3f} s, "
            f"onnxruntime {c['onnxruntime_seconds']:.3f} s (median of 3, same threads)")
        if too_far:
            # shown under --quiet too, so it states the figure the suppressed lines would have
            _warn_diff(c["max_abs_diff"])


def _warn_diff(diff: float) -> None:
    err_console.print(f"[yellow]warning:[/] max abs diff {diff:.2e} between onnxruntime and PyTorch is above 1e-4",
                      soft_wrap=True)


def _parse_size(text: str) -> tuple[int, int]:
    """'1280x720' -> (1280, 720) = (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must be WxH, e.g. 1280x720, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return w, h


export.__doc__ = inspect.cleandoc(export.__doc__ or "") + "\n" + EXAMPLES


def register(app: typer.Typer) -> None:
    app.command("export", help=export.__doc__)(export)
