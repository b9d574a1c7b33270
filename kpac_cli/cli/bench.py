"""`kpac bench`: the machine's convolution ceiling, the model's efficiency, throughput, tiles."""

from __future__ import annotations

import inspect
from typing import Optional

import typer

from .common import EXIT_FAILED, StdoutConsole, emit_json, err_console, print_error, stops_on_signals, usage_error, writing_stdout

EXAMPLES = """
Examples:

  kpac bench                                  # 1280x720, CPU or the first GPU

  kpac bench --size 1920x1080 --rounds 9      # more rounds on a busy machine

  kpac bench --json | jq .efficiency          # for scripts

  kpac bench --backends fast,compile --configs single_3level --tiles whole
"""


def _parse_tiles(text: str) -> list[int | None]:
    """``--tiles``: sizes in pixels and 'whole' (also 0/none), each once, in the order given."""
    out: list[int | None] = []
    for part in text.split(","):
        p = part.strip().lower()
        if not p:
            continue
        if p in ("whole", "none", "0"):
            if None not in out:  # 'whole' twice would be one row
                out.append(None)
            continue
        try:
            n = int(p)
        except ValueError:
            raise ValueError(f"tile sizes are integers or 'whole', got {part!r}") from None
        if n <= 0:
            raise ValueError(f"tile sizes must be positive, got {n}")
        if n not in out:
            out.append(n)
    if not out:
        raise ValueError("no tile sizes given")
    return out


def _onnx_backend_missing() -> list[str]:
    """The packages the onnxruntime backend needs that are not installed: onnxruntime runs the
    model, onnx is what PyTorch's exporter writes it with."""
    import importlib

    missing = []
    for package in ("onnx", "onnxruntime"):
        try:
            importlib.import_module(package)
        except ImportError:
            missing.append(package)
    return missing


def _first_line(error: BaseException) -> str:
    """The first line of an error's message (PyTorch's compiler errors run to many lines of advice)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def bench(
    size: str = typer.Option("1280x720", "--size", help="Image size WxH for every measurement."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    rounds: int = typer.Option(5, "--rounds", help="Timed rounds of the efficiency, at least 1 (median reported); the throughput and the tile sweep run half as many, at least 2. Each round runs every candidate once, interleaved."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed calls of each candidate first (0 or more)."),
    backends: str = typer.Option("auto", "--backends", help="Model backends for the efficiency (the headline is kpac deblur's path when listed, else the first; the first also runs the throughput): auto (CPU: fast, channels_last and onnxruntime when the onnx extra is installed; GPU: channels_last, eager), or a list of eager, channels_last, fast, onnxruntime, compile."),
    configs: str = typer.Option("all", "--configs", help="Model configs for throughput: all, or a list of single_2level, single_3level, dual."),
    tiles: str = typer.Option("256,512,1024,whole", "--tiles", help="Tile sizes to sweep (the engine path), 'whole' = no tiling. The engine raises tiles under 128 px and runs a tile covering the image as the whole image: rows say the tile that ran, and the recommendation is one of those."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads, at least 1 (default: PyTorch's choice)."),
    retain_memory: bool = typer.Option(True, "--retain-memory/--no-retain-memory", help="Keep freed memory in the process instead of unmapping it (glibc; kpac_cli.model.fast.retain_freed_memory): large CPU activations are then not zero-filled again on every pass."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as one JSON object on stdout (efficiency under 'efficiency')."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress messages on stderr."),
) -> None:
    """Measure how close the model runs to this machine's convolution speed, and pick a tile size.

    The ceiling is a dense 3x3 conv (96 -> 96 channels, 360x640), the best of PyTorch NCHW, channels_last and onnxruntime; efficiency = model GFLOP/s / ceiling GFLOP/s, FLOPs counted analytically (kpac_cli.model.flops). The headline efficiency is that of the path kpac deblur runs on the device (fast on the CPU, channels_last on a GPU); the other backends are listed as comparisons. Candidates run interleaved and every ratio is a median over rounds, so a busy machine slows both sides alike.

    The ceiling is a reference rate, not a hardware bound: efficiency can exceed 1 when the model's layers run faster than the reference conv (5x5 kernels on maps that stay in cache, above all at a small --size), and through round-to-round noise (--json gives efficiency_per_round and efficiency_note). It is reported as measured, never clipped.

    The efficiency and throughput run the whole image untiled: a --size whose run does not fit the free memory is refused. Efficiency rounds that spread by more than 20% of their median end the report with a warning (and --json's warnings): other work was competing for the machine. The tile sweep runs in the precision kpac deblur uses on the device by default (fp16 on CUDA).
    """
    import torch

    from .. import bench as core
    from ..model import PAPER_CONFIGS
    from ..model.fast import retain_freed_memory
    from .export import _parse_size

    # checked here rather than by typer's min=, whose multi-line box breaks the one-line errors
    if rounds < 1:
        raise usage_error(f"--rounds must be at least 1, got {rounds}")
    if warmup < 0:
        raise usage_error(f"--warmup must be at least 0, got {warmup}")
    if threads is not None and threads < 1:
        raise usage_error(f"--threads must be at least 1 (leave it out for PyTorch's choice), got {threads}")
    from ..engine import resolve_device

    try:
        width, height = _parse_size(size)
    except ValueError as e:
        raise usage_error(f"--size: {e}") from None
    try:
        tile_list = _parse_tiles(tiles)
    except ValueError as e:
        raise usage_error(f"--tiles: {e}") from None
    try:
        dev = resolve_device(device)
    except ValueError as e:
        raise usage_error(f"--device: {e}") from None
    if backends == "auto":
        # what kpac deblur runs first (the throughput table uses it): the fused path on the CPU,
        # the channels_last model elsewhere (the fused path is the engine's CPU path only)
        backend_list = ["fast", "channels_last"] if dev.type == "cpu" else ["channels_last", "eager"]
        if dev.type == "cpu" and not _onnx_backend_missing():
            backend_list.append("onnxruntime")
    else:
        backend_list = [b.strip() for b in backends.split(",") if b.strip()]
        bad = [b for b in backend_list if b not in core.MODEL_BACKENDS]
        if bad or not backend_list:
            raise usage_error(f"unknown backend(s) {', '.join(bad) or '(none)'}: use {', '.join(core.MODEL_BACKENDS)}")
        if "onnxruntime" in backend_list and dev.type != "cpu":
            raise usage_error("the onnxruntime backend runs on the CPU only")
        missing = _onnx_backend_missing() if "onnxruntime" in backend_list else []
        if missing:
            raise usage_error(f"--backends onnxruntime: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                              "not installed (pip install 'kpac[onnx]')")
    if configs == "all":
        config_map = dict(PAPER_CONFIGS)
    else:
        names = [c.strip() for c in configs.split(",") if c.strip()]
        bad = [c for c in names if c not in PAPER_CONFIGS]
        if not names:  # an empty list is no request for every config
            raise usage_error(f"--configs: no config given: use all or a list of {', '.join(PAPER_CONFIGS)}")
        if bad:
            raise usage_error(f"unknown config(s) {', '.join(bad)}: use {', '.join(PAPER_CONFIGS)}")
        config_map = {c: PAPER_CONFIGS[c] for c in names}
    # the untiled runs of a size past the free memory get the process killed (or swapping) midway
    problem = core.memory_problem([PAPER_CONFIGS["single_3level"], *config_map.values()], height, width, dev)
    if problem is not None:
        raise usage_error(f"--size: {problem}")
    stage = ["setup"]  # what is being measured, for an error message

    def say(msg: str) -> None:
        stage[0] = msg
        if not quiet:
            err_console.print(f"[dim]measuring {msg}...[/]")

    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    # outside the try: the Exit it raises is a RuntimeError, which is no failed measurement
    with stops_on_signals(lambda: f"interrupted while measuring {stage[0]}"):
        try:
            retained = retain_freed_memory() if (retain_memory and dev.type == "cpu") else False
            report = core.run_benchmark(height, width, str(dev), rounds, warmup, tile_list, config_map, backend_list, say)
        except (RuntimeError, ImportError, MemoryError) as e:  # e.g. torch.compile without a C++ compiler, out of memory
            print_error(f"kpac bench failed while measuring {stage[0]}: {_first_line(e)}")
            raise typer.Exit(EXIT_FAILED) from None
        finally:  # process-wide: leave it as it was for whoever runs next in this process
            if threads is not None:
                torch.set_num_threads(threads_before)
    report["machine"]["retain_freed_memory"] = retained
    report["recommended_tile_option"] = deblur_tile_option(report["recommended_tile"])
    if json_out:
        emit_json(report)
        return
    with writing_stdout():
        _print_report(report)


def _print_report(r: dict) -> None:
    from rich.table import Table

    from .. import bench as core

    con = StdoutConsole()
    m = r["machine"]
    con.print(f"[bold]kpac bench[/] on {m['device']} ({m['cpu'] if m['device'] == 'cpu' else m.get('gpu', '')}), "
              f"{m['threads']} thread{'s' if m['threads'] != 1 else ''}, torch {m['torch']}, image {r['size'][0]}x{r['size'][1]}")
    c = r["ceiling"]
    by = ", ".join(f"{k} {v:.0f}" for k, v in c["by_backend"].items())
    con.print(f"ceiling (dense 3x3 conv 96->96 at 360x640): {c['gflops_per_s']:.0f} GFLOP/s, best {c['backend']}  [{by}]")
    t = Table(title=f"3-level model ({r['model_flops'] / 1e9:.2f} GFLOP per image)")
    for col in ("backend", "seconds", "GFLOP/s", "efficiency"):
        t.add_column(col, justify="right" if col != "backend" else "left")
    for b, e in r["backends"].items():
        t.add_row(b, f"{e['seconds']:.3f}", f"{e['gflops_per_s']:.0f}", f"{e['efficiency']:.2f}")
    con.print(t)
    con.print(f"[bold]efficiency {r['efficiency']:.2f}[/] ({_headline_text(r)})", soft_wrap=True)
    con.print(_rounds_text(r), soft_wrap=True)
    if r["efficiency"] > 1:  # as measured; say what it means rather than clip it
        con.print(f"[dim]note: efficiency above 1: {r['efficiency_note']}[/]", soft_wrap=True)
    backend = r["configs"][0].get("backend") if r["configs"] else None  # the table's rows are of one backend
    t = Table(title=f"throughput (whole image, {backend})" if backend else "throughput (whole image)")
    for col in ("config", "precision", "seconds", "MP/s"):
        t.add_column(col)
    for row in r["configs"]:
        t.add_row(row["config"], row["precision"], f"{row['seconds']:.3f}", f"{row['megapixels_per_s']:.2f}")
    con.print(t)
    t = Table(title=f"tile sweep (engine, 3-level, {r.get('tiles_precision', 'fp32')})")
    for col in ("tile", "seconds", "MP/s"):
        t.add_column(col)
    notes = []
    for row in r["tiles"]:
        label = row["tile"] + (f" (ran as {core.ran_tile(row)})" if "tile_note" in row else "")
        t.add_row(label, f"{row['seconds']:.3f}", f"{row['megapixels_per_s']:.2f}")
        if "tile_note" in row:
            notes.append(f"tile {row['tile']}: {row['tile_note']}")
    con.print(t)
    for note in notes:
        con.print(f"[dim]note: {note}[/]", soft_wrap=True)
    con.print(f"recommended tile: [bold]{r['recommended_tile']}[/] (kpac deblur {r['recommended_tile_option']}): "
              "the smallest that ran within 5% of the fastest")
    for warning in r.get("warnings", []):  # in the report itself: a pasted report carries it
        con.print(f"[yellow]warning: {warning}[/]", soft_wrap=True)


def _headline_text(r: dict) -> str:
    """Whose efficiency the headline is: kpac deblur's path, or (not measured) the first backend's."""
    backend, engine, device = r["efficiency_backend"], r.get("engine_backend"), r["machine"]["device"]
    measured, runs = r.get("efficiency_precision", "fp32"), r.get("engine_precision", "fp32")
    if engine is None or backend == engine:
        if measured != runs:  # a GPU: kpac deblur's default there is half precision
            return f"{backend}: kpac deblur's path on {device}, which it runs in {runs} by default (see the throughput table)"
        return f"{backend}: what kpac deblur runs on {device}"
    return f"{backend}; kpac deblur runs {engine} on {device}, not measured: add it to --backends"


def _rounds_text(r: dict) -> str:
    """The headline's precision and how many rounds its median is of, with their spread."""
    rounds = len(r["efficiency_per_round"])
    spread = r.get("efficiency_spread")
    text = f"  in {r.get('efficiency_precision', 'fp32')}, the median of {rounds} round{'s' if rounds != 1 else ''}"
    if spread is None:
        return text + " (no spread with one round)"
    return text + f", which spread by {spread:.0%} of it"


def deblur_tile_option(tile: str) -> str:
    """The `kpac deblur` option that runs a recommended tile: its --tile takes 0, not 'whole',
    for the whole image."""
    return f"--tile {0 if tile == 'whole' else tile}"


bench.__doc__ = inspect.cleandoc(bench.__doc__ or "") + "\n" + EXAMPLES


def register(app: typer.Typer) -> None:
    app.command("bench", help=bench.__doc__)(bench)
