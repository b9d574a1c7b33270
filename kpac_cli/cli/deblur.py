"""`kpac deblur`: parse, call the engine, report."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Optional

import torch
import typer

from ..engine import Deblurrer, EngineOptions
from ..engine.batch import (STDIO, JobResult, OutputOptions, PlanError, names_folder, not_a_folder, options_without_effect, plan_dual, plan_single,
                            read_stream, run_batch, stream_limit)
from ..engine.compiled import CompileFailed
from ..images import DEFAULT_MAX_PIXELS, ImageError, RawOptions
from ..images.base import FORMAT_ALIASES, path_ext
from ..distributed import device_for_rank, env_info
from ..distributed import setup as setup_distributed
from ..distributed import teardown as teardown_distributed
from .common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STDOUT_CLOSED,
    EXIT_TERMINATED,
    StdoutFailed,
    Terminated,
    check_ensemble,
    device_option,
    dual_pixel_mode,
    emit_json,
    err_console,
    fp32_option,
    given_options,
    parse_tile,
    precision_option,
    precision_with_fp32,
    print_error,
    print_setup_notes,
    say_images_below,
    say_unread_images,
    print_note,
    progress_bar,
    show_progress,
    sigterm_raises,
    stdout_failed,
    usage_error,
)

EXAMPLES = """
Examples:

  kpac deblur photos/ -o out/                      # every image in photos/, same formats and bit depths

  kpac deblur IMG_0042.CR2 -o sharp.tif            # camera RAW -> 16-bit TIFF

  kpac deblur IMG_0043.HEIC -o out/                # HEIC -> JPEG (heic extra)

  cat a.png | kpac deblur - -o - > b.png           # in a pipeline

  kpac deblur --left L/ --right R/ -o out/         # dual-pixel pairs matched by file name
"""

#: The options that develop camera RAW files, by parameter name: said when no input is one.
RAW_FLAGS = {"raw_wb": "--raw-wb", "raw_demosaic": "--raw-demosaic", "raw_half_size": "--raw-half-size",
             "raw_exposure": "--raw-exposure", "raw_linear": "--raw-linear"}


def deblur(
    ctx: typer.Context,
    inputs: list[str] = typer.Argument(None, help="Image files or folders, or '-' for stdin.", show_default=False),
    output: str = typer.Option(..., "-o", "--output", help="Output folder, file (for one input), or '-' for stdout."),
    model: str = typer.Option("default", "--model", "-m", help="Shipped model name (see `kpac models`), a .safetensors file, or a training run folder (its exported model.safetensors)."),
    left: Optional[str] = typer.Option(None, "--left", help="Dual-pixel left view(s): a file or a folder (or, alone, a DPDD root: its test_l, test_r and test_c sources)."),
    right: Optional[str] = typer.Option(None, "--right", help="Dual-pixel right view(s)."),
    center: Optional[str] = typer.Option(None, "--center", help="Dual-pixel centre view(s); default: mean of left and right."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Descend into sub-folders (their structure is kept)."),
    device: str = device_option(),
    precision: str = precision_option(),
    fp32: bool = fp32_option(),
    tile: str = typer.Option("auto", "--tile", help="Tile size in pixels (at least 128; smaller sizes are raised to it), 'auto' (from free memory) or 0 / whole (whole image). Tiling is exact; --json records the tile used."),
    strength: float = typer.Option(1.0, "--strength", help="How much of the model's correction to apply: 1 = full (default), 0 = the input unchanged; lower tempers over-sharpening."),
    ensemble: int = typer.Option(1, "--ensemble", help="Self-ensemble: average the model over 1, 2, 4 or 8 flips/transposes of each photo; N times slower, slightly better on average (see the model card). Dual-pixel models: at most 4 (flips)."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the network, all tiles one shape; pays on GPUs over many same-sized photos (on the CPU the default path is faster). Compile time is reported."),
    fmt: Optional[str] = typer.Option(None, "--format", "--ext", help="Output format: png, tiff or jpeg (default: the input's; RAW -> 16-bit tiff; HEIC -> jpeg, or png for a transparent one, 16-bit for 10/12 bits)."),
    bit_depth: Optional[int] = typer.Option(None, "--bit-depth", help="8 or 16 (default: the input's; JPEG is always 8); 32 = float32 TIFF of the unclipped network output."),
    suffix: str = typer.Option("", "--suffix", help="Added to output file names, e.g. _sharp."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    skip_existing: bool = typer.Option(False, "--skip-existing", help="Leave existing outputs alone (resume a batch)."),
    jpeg_quality: int = typer.Option(95, "--jpeg-quality", help="JPEG quality, 1-100."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", help="Refuse images larger than this (decompression-bomb guard)."),
    raw_wb: str = typer.Option("camera", "--raw-wb", help="RAW white balance: camera, auto or daylight."),
    raw_demosaic: str = typer.Option("ahd", "--raw-demosaic", help="RAW demosaic: ahd, linear, vng, ppg, dht or aahd."),
    raw_half_size: bool = typer.Option(False, "--raw-half-size", help="Develop RAW at half size (fast previews)."),
    raw_exposure: float = typer.Option(0.0, "--raw-exposure", help="RAW exposure shift in EV, -2 to 3."),
    raw_linear: bool = typer.Option(False, "--raw-linear", help="Write RAW results in linear light instead of on the sRGB curve (the model still sees the sRGB curve it was trained on)."),
    save_blurmap: bool = typer.Option(False, "--save-blurmap", help="Also write the blur-detection map (block 1, dilation 1) beside each output."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON record per image to stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summary on stderr."),
) -> None:
    """Remove defocus blur from photos (PNG/TIFF 8/16-bit, JPEG, camera RAW, HEIC, dual-pixel pairs)."""
    inputs = inputs or []
    dual = dual_pixel_mode(inputs, left, right, center, "no inputs given (files, folders, or '-' for stdin)")
    if overwrite and skip_existing:
        raise usage_error("--overwrite and --skip-existing contradict each other")
    check_ensemble(ensemble)
    # ranges checked here rather than by typer's min=/max=, whose multi-line box breaks the one-line errors
    if not (math.isfinite(strength) and 0.0 <= strength <= 1.0):
        raise usage_error(f"--strength must be in [0, 1], got {strength:g}")
    if not 1 <= jpeg_quality <= 100:
        raise usage_error(f"--jpeg-quality must be 1-100, got {jpeg_quality}")
    if max_pixels < 1:
        raise usage_error(f"--max-pixels must be at least 1, got {max_pixels}")
    if dual and recursive:  # views pair by name within the folders given, not in sub-folders
        raise usage_error("--recursive applies to INPUTS folders; dual-pixel views are paired within the --left/--right folders")
    if inputs == [STDIO] and sys.stdin is not None and sys.stdin.isatty():
        raise usage_error("'-' reads the image from stdin, which is a terminal; redirect it (< photo.png) or pipe an image in")
    if json_out and output == STDIO:
        raise usage_error("--json cannot be combined with -o - (stdout carries the image)")
    if output == STDIO and sys.stdout is None:  # started with stdout closed (>&-): the image has nowhere to go
        raise stdout_failed(None)
    if output == STDIO and sys.stdout.isatty():
        raise usage_error("-o - writes the image's bytes to stdout, which is a terminal; redirect it (> out.png) or pipe it")
    if fmt is not None:  # "png", "PNG" or ".png" (an extension, as --ext suggests), "jpg", "tif"
        name = fmt.lower().removeprefix(".")
        fmt = FORMAT_ALIASES.get(name, name)
        if fmt not in ("png", "tiff", "jpeg"):
            raise usage_error(f"unknown --format {fmt!r} (png, tiff or jpeg)")
    # options that would be ignored where they cannot apply are refused, as elsewhere
    if suffix and output == STDIO:
        raise usage_error("--suffix names outputs in a folder; -o - writes to stdout")
    if skip_existing and output == STDIO:  # nothing to keep: a shell's "> FILE" has emptied FILE before kpac starts
        raise usage_error("--skip-existing keeps existing output files; -o - writes to stdout, where there is none to keep")
    if bit_depth not in (None, 8, 16, 32):
        raise usage_error("--bit-depth must be 8, 16 or 32 (float TIFF)")
    if bit_depth == 32 and fmt not in (None, "tiff"):
        raise usage_error("--bit-depth 32 (float) is written as TIFF only")
    if bit_depth == 16 and fmt == "jpeg":
        raise usage_error("--bit-depth 16 with --format jpeg: JPEG holds 8 bits (use png or tiff)")
    # an output folder named like an image (shots.tif/) says nothing of the format of what goes in it
    named_format = None if output == STDIO or names_folder(output) else FORMAT_ALIASES.get(path_ext(output))
    target = "tiff" if bit_depth == 32 else fmt or named_format
    if "jpeg_quality" in given_options(ctx) and target in ("png", "tiff"):
        raise usage_error(f"--jpeg-quality applies to JPEG outputs; this run writes {target.upper()}")
    if save_blurmap and output == STDIO:
        raise usage_error("--save-blurmap needs an output file or folder to write the map beside, not -o -")
    if output != STDIO and (blocker := not_a_folder(Path(output).parent)) is not None:  # every write would fail
        raise usage_error(f"-o {output}: cannot create it: {blocker} is not a folder")
    try:
        tile_value = parse_tile(tile)
    except ValueError as e:
        raise usage_error(f"--tile: {e}") from None
    out_opts = OutputOptions(fmt, bit_depth, suffix, overwrite, skip_existing, jpeg_quality)
    try:
        raw_opts = RawOptions(white_balance=raw_wb, half_size=raw_half_size, demosaic=raw_demosaic, gamma="linear" if raw_linear else "srgb", exposure=raw_exposure)
    except ValueError as e:  # the message names the field; the user typed the flag
        message = str(e)
        for field, flag in (("white_balance", "--raw-wb"), ("demosaic", "--raw-demosaic"), ("exposure", "--raw-exposure")):
            message = message.replace(f"RawOptions.{field}", flag)
        raise usage_error(message) from None

    # what is said of the plan, the same on every rank under torchrun, is said once, by rank 0
    says_plan = not quiet and env_info().is_main
    try:
        if dual:
            jobs = plan_dual(left, right, center, output, out_opts, companions=("blurmap",) if save_blurmap else ())
        else:
            stdin = _read_stdin(max_pixels) if inputs == [STDIO] else None
            jobs = plan_single(inputs, output, recursive, out_opts, stdin, companions=("blurmap",) if save_blurmap else (),
                               max_pixels=max_pixels)
            if says_plan:
                say_unread_images(inputs, recursive)
                if not recursive:
                    say_images_below(inputs, None if output == STDIO else Path(output))
        if says_plan:
            given = given_options(ctx)
            for note in options_without_effect(jobs, inputs, recursive=recursive, overwrite=overwrite,
                                               jpeg_quality="jpeg_quality" in given,
                                               raw_options=[flag for name, flag in RAW_FLAGS.items() if name in given]):
                print_note(note)
        dist_info = env_info()
        device = device_for_rank(device, dist_info)  # under torchrun each rank takes its own GPU
        engine_opts = EngineOptions(device=device, precision=precision_with_fp32(precision, fp32), tile=tile_value, compile=compile_, strength=strength,
                                    ensemble=ensemble)
        from ..checkpoints.registry import resolve_model

        model_path, _ = resolve_model(model, dual=dual)
        deblurrer = Deblurrer(model_path, engine_opts)
        dist_info = setup_distributed(deblurrer.device)
        jobs = jobs[dist_info.rank :: dist_info.world_size]  # each rank its share of the files
    except (PlanError, ValueError, FileNotFoundError) as e:
        raise usage_error(str(e)) from None
    if (deblurrer.config.in_views == 2) != dual:
        kind = "dual-pixel (use --left/--right)" if deblurrer.config.in_views == 2 else "single-image (use INPUTS, not --left/--right)"
        raise usage_error(f"model {deblurrer.name} is a {kind} model")
    if save_blurmap and not deblurrer.config.scale_attention:  # every image would fail alike, after its work
        raise usage_error(f"--save-blurmap: model {deblurrer.name} has no scale attention (built with scale_attention=False), "
                          "which the blur map is made of")
    print_setup_notes(deblurrer, quiet)

    after_run = None
    if save_blurmap:
        from ..blurmap import model_polarity, save_blurmaps

        polarity = model_polarity(deblurrer)  # what the checkpoint declares, as `kpac blurmap` reads it

        def after_run(job, result, info):  # same inference pass
            path = job.companions.get("blurmap")
            if path is None:
                return None
            if not (skip_existing and path.exists()):  # a resumed batch keeps a finished map
                save_blurmaps(path, result, deblurrer.config, info.size, overwrite=overwrite, polarity=polarity)
            return {"blurmap": str(path)}

    interactive = show_progress(quiet) and output != STDIO and dist_info.is_main
    counts = {"ok": 0, "skipped": 0, "failed": 0}
    exit_code = EXIT_OK
    stopped: str | None = None  # why the batch ended early, for its summary
    compile_failed = False
    with progress_bar(interactive) as progress:
        overall = progress.add_task("images", total=len(jobs)) if progress else None
        tile_task = None

        def on_start(job):
            nonlocal tile_task
            if progress is None:
                return None
            if tile_task is not None:
                progress.remove_task(tile_task)
            tile_task = progress.add_task(f"  {job.name[:30]}", total=None)

            def cb(stage: str, done: int, total: int) -> None:
                progress.update(tile_task, description=f"  {job.name[:24]} {stage}", completed=done, total=total)

            return cb

        def on_result(res: JobResult) -> None:
            counts[res.status] += 1
            if res.status == "failed":
                print_error(res.error or "failed")
            elif not quiet:
                for note in res.extra.get("notes", []):
                    print_note(f"{res.input}: {note}")
            if json_out:
                emit_json(res.record(deblurrer))
            if progress is not None:
                progress.advance(overall)

        def sink(data: bytes) -> None:
            # os.write reports every short write; a reader that went away is an error, not exit 0
            sys.stdout.flush()
            try:
                fd, view = sys.stdout.fileno(), memoryview(data)
            except (AttributeError, OSError):  # not a real file (e.g. captured in a test)
                sys.stdout.buffer.write(data)
                return
            try:
                while view:
                    view = view[os.write(fd, view):]
            except BrokenPipeError:
                os.dup2(os.open(os.devnull, os.O_WRONLY), fd)  # no second complaint at exit
                raise ImageError("<stdout>", "closed by the reader before the whole image was written") from None
            except OSError as e:  # a full disk: in words, as for the --json records, not as "[Errno 28] ..."
                raise ImageError("<stdout>", f"cannot write: {e.strerror or e}") from None

        try:
            with sigterm_raises():
                run_batch(
                    deblurrer, jobs, out_opts, max_pixels=max_pixels, raw_options=raw_opts,
                    on_result=on_result, on_start=on_start, stdout_sink=sink, after_run=after_run,
                )
        except KeyboardInterrupt:
            exit_code, stopped = EXIT_INTERRUPTED, "interrupted"
        except Terminated:
            exit_code, stopped = EXIT_TERMINATED, "interrupted"
        except StdoutFailed as e:  # the --json records cannot be delivered: stop as on SIGPIPE
            why = "stdout was closed by its reader" if e.closed else "stdout failed"
            exit_code, stopped = e.exit_code, f"stopped ({why})"
        except CompileFailed as e:  # every photo would fail alike: said once, and the batch stops
            print_error(str(e))
            exit_code, stopped, compile_failed = EXIT_FAILED, "stopped (torch.compile failed)", True
    if dist_info.enabled:  # totals over all ranks; the worst exit code wins
        totals = torch.tensor([counts["ok"], counts["skipped"], counts["failed"], len(jobs)], dtype=torch.int64)
        torch.distributed.all_reduce(totals)
        counts = dict(zip(("ok", "skipped", "failed"), totals[:3].tolist()))
        worst = torch.tensor([exit_code])
        torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
        exit_code, total_jobs = int(worst.item()), int(totals[3].item())
        teardown_distributed(dist_info)
        quiet = quiet or not dist_info.is_main
    else:
        total_jobs = len(jobs)
    if exit_code == EXIT_OK and counts["failed"]:
        exit_code = EXIT_FAILED
    if not quiet:
        done = f"{counts['ok']} deblurred, {counts['skipped']} skipped, {counts['failed']} failed"
        if stopped is None:  # another rank was the one stopped
            stopped = {130: "interrupted", 143: "interrupted", EXIT_STDOUT_CLOSED: "stopped"}.get(exit_code)
        if stopped is not None:
            not_finished = total_jobs - sum(counts.values())
            left_over = f"{stopped}: {done}, {not_finished} not finished"
            if compile_failed:
                advice = "; rerun without --compile" + (" and with --skip-existing to finish" if counts["ok"] and output != STDIO else "")
            elif output == STDIO or not not_finished:  # nothing on disk to resume from, or nothing to resume
                advice = ""
            elif overwrite:  # the outputs not reached are an earlier run's: --skip-existing would keep them
                advice = "; rerun to finish (--skip-existing instead of --overwrite would keep the outputs older than this run)"
            else:
                advice = "; rerun with --skip-existing to finish"
            err_console.print(left_over + advice, soft_wrap=True)
        elif output != STDIO or counts["failed"]:
            err_console.print(done, soft_wrap=True)
        if compile_ and not compile_failed:
            err_console.print(f"torch.compile: {deblurrer.network.compile_seconds:.1f} s compiling new shapes "
                              "(and their first runs)", soft_wrap=True)
    raise typer.Exit(exit_code)


def _read_stdin(max_pixels: int) -> bytes:
    """All of stdin, for the input '-'; a closed stdin (``<&-``) reads as empty, which fails as such.

    At most what an image within ``max_pixels`` can take (:func:`stream_limit`): an endless
    stream (``cat /dev/zero |``) is refused, not read until memory runs out.
    """
    if sys.stdin is None:
        return b""
    limit = stream_limit(max_pixels)
    try:
        data = read_stream(sys.stdin.buffer, limit)
    except OSError as e:
        print_error(f"<stdin>: cannot read: {e.strerror or e}")
        raise typer.Exit(EXIT_FAILED) from None
    if len(data) > limit:
        print_error(f"<stdin>: more than {limit} bytes, more than any image within --max-pixels {max_pixels} takes; not read")
        raise typer.Exit(EXIT_FAILED)
    return data


deblur.__doc__ = (deblur.__doc__ or "") + "\n" + EXAMPLES


def register(app: typer.Typer) -> None:
    app.command("deblur", help=deblur.__doc__)(deblur)
