"""`kpac synth`: write a synthetic defocus dataset (DPDD layout) from sharp images."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import List, Optional

import typer

from rich.markup import escape

from .common import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, emit_json, err_console, given_options,
                     print_error, progress_bar, show_progress, sigterm_raises, usage_error)

_HELP = """Synthesise defocused/sharp training pairs from sharp photos, in the DPDD layout.

The blur is rendered the way a lens makes it: in linear light, with a disc or polygonal aperture whose size follows a random depth map (thin-lens model), occlusion-aware, with blooming highlights and sensor noise. --dual adds the left/right dual-pixel views.

SOURCES are image files or folders (searched recursively for the formats kpac reads: PNG, JPEG, TIFF and camera RAW, skipping the files of datasets kpac synth wrote there). --skimage adds scikit-image's bundled photos (as kpac train --skimage; they are kpac's held-out benchmark photos, so keep them out of training sets you evaluate on them); --procedural N adds N dead-leaves scenes (they depend on --seed).

Writes OUT/{split}_c/source (blurred), OUT/{split}_c/target (sharp), OUT/{split}_c/radius (float32 TIFF: signed blur radius in pixels, positive behind focus), with --dual OUT/{split}_l/source and OUT/{split}_r/source, and the summary OUT/synth_{split}.json (the options, the seed, kpac's version and each source's name, size and SHA-256). The same --seed (with the same sources, in any order, and options) gives byte-identical files on CPUs with the same vector instructions (numpy's vectorised sin, cos and power differ in the last bit between CPU generations, which can change a radius map or a 16-bit level), and in any --split: give a held-out split its own --seed. OUT may hold other splits; a dataset of the same split is replaced only with --overwrite.

Example:

  kpac synth photos/ -o synth/ --count 1000 --crop 512 --dual --procedural 50
"""


def _failure_line(origin: str, error: str) -> str:
    """Why a source could not be used, naming it once: the reader's message ('ImageError: PATH:
    not a recognised image') already starts with the path, after the error's type."""
    at = error.find(f"{origin}: ")
    return error[at:] if at >= 0 else f"{origin}: {error}"


def _check_output_folder(out: Path) -> None:
    """Usage errors for a ``-o`` that cannot be the dataset folder, said before any rendering."""
    from ..engine.batch import not_a_folder

    if str(out) == "-":  # kpac's name for stdout elsewhere: never a folder named '-'
        raise usage_error("-o -: kpac synth writes a dataset folder, not to stdout; give the folder to write")
    if out.exists() and not out.is_dir():
        raise usage_error(f"-o {out}: is a file (give the dataset folder)")
    blocker = not_a_folder(out)
    if blocker is not None:
        raise usage_error(f"-o {out}: cannot create it: {blocker} is not a folder")


def _error_text(exc: Exception) -> str:
    """An error in words: ``PATH: Permission denied``, not ``[Errno 13] Permission denied: 'PATH'``."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename is not None else exc.strerror
    return str(exc)


def _stopped_note(out: Path, split: str) -> str:
    """What a stopped run left, when it left samples without a manifest: the split is incomplete,
    and the same command needs --overwrite to be run again."""
    from ..synth.dataset import left_incomplete

    if not left_incomplete(out, split):
        return ""
    return f": the --split {split} dataset in {out} is incomplete (no synth_{split}.json); rerun with --overwrite to replace it"


def register(app: typer.Typer) -> None:
    """Add the ``synth`` command to ``app``."""
    app.command("synth", help=_HELP, no_args_is_help=True)(synth)


def synth(
    ctx: typer.Context,
    sources: Optional[List[Path]] = typer.Argument(None, help="Sharp image files or folders.", show_default=False),
    # -o/--output as in deblur, blurmap and convert; --out, its first spelling, still works
    out: Path = typer.Option(..., "-o", "--output", "--out", help="Output dataset folder.", show_default=False),
    count: int = typer.Option(100, "--count", "-n", help="Number of samples to write."),
    crop: Optional[int] = typer.Option(None, "--crop", help="Square crop size (default: whole images). A source smaller than it in a side gives a smaller sample (never upscaled)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed: byte-identical files)."),
    max_radius: float = typer.Option(12.0, "--max-radius", help="Largest blur radius in pixels."),
    min_radius: float = typer.Option(0.0, "--min-radius", help="Smallest per-sample blur strength in pixels."),
    aperture: str = typer.Option("disc", "--aperture", help="Aperture shape: disc or polygon."),
    blades: int = typer.Option(6, "--blades", help="Sides of the polygonal aperture (--aperture polygon)."),
    layers: int = typer.Option(8, "--layers", help="Depth layers (more: finer blur steps, slower)."),
    noise: float = typer.Option(0.005, "--noise", help="Sensor noise std at white, linear light."),
    highlight_boost: float = typer.Option(3.0, "--highlight-boost", help="Gain of saturated highlights, >= 1 (1: off)."),
    dual: bool = typer.Option(False, "--dual", help="Also write dual-pixel left/right views."),
    procedural: int = typer.Option(0, "--procedural", help="Add N procedural dead-leaves scenes."),
    procedural_size: int = typer.Option(512, "--procedural-size", help="Side of the --procedural scenes in pixels."),
    skimage: bool = typer.Option(False, "--skimage/--no-skimage", help="Add scikit-image's bundled photos (kpac's held-out benchmark photos)."),
    split: str = typer.Option("train", "--split", help="Split name: train, val, test, ..."),
    bit_depth: int = typer.Option(8, "--bit-depth", help="8- or 16-bit PNG."),
    max_side: Optional[int] = typer.Option(None, "--max-side", help="Downscale sources larger than this first."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a dataset of the same --split in OUT (its files this run does not rewrite are deleted)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON summary object to stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summary on stderr."),
) -> None:
    # Imported here so that `kpac --help` stays fast.
    from ..images import ImageError
    from ..synth import SynthSettings, sharp_sources, write_dataset
    from ..synth.dataset import DatasetExistsError, existing_files, repeated_samples

    if any(str(source) == "-" for source in sources or []):  # kpac's name for stdin elsewhere
        raise usage_error("kpac synth reads image files and folders, not stdin ('-')")
    if count < 1:
        raise usage_error(f"--count must be >= 1, got {count}")
    if crop is not None and crop < 8:
        raise usage_error(f"--crop must be >= 8, got {crop}")
    if bit_depth not in (8, 16):
        raise usage_error(f"--bit-depth must be 8 or 16, got {bit_depth}")
    if seed < 0:
        raise usage_error(f"--seed must be >= 0, got {seed}")
    if procedural < 0 or procedural_size < 8:
        raise usage_error("--procedural must be >= 0 and --procedural-size >= 8")
    if not split or "/" in split or "\\" in split or split.startswith("."):
        raise usage_error(f"--split must be a plain name like train, val or test, got {split!r}")
    if max_side is not None and max_side < 8:
        raise usage_error(f"--max-side must be >= 8, got {max_side}")
    # SynthSettings checks these too, but names its fields (min_radius, noise_sigma ...), not the flags.
    if not (math.isfinite(max_radius) and max_radius >= 0):
        raise usage_error(f"--max-radius must be a number >= 0, got {max_radius:g}")
    if not 0 <= min_radius <= max_radius:
        raise usage_error(f"--min-radius must lie in [0, --max-radius {max_radius:g}], got {min_radius:g}")
    if aperture not in ("disc", "polygon"):
        raise usage_error(f"--aperture must be disc or polygon, got {aperture!r}")
    if blades < 3:
        raise usage_error(f"--blades must be >= 3, got {blades}")
    # options that would change nothing: the output would not be what the command line says
    given = given_options(ctx)
    if "blades" in given and aperture != "polygon":
        raise usage_error("--blades applies to --aperture polygon (a disc has no blades)")
    if "procedural_size" in given and procedural == 0:
        raise usage_error("--procedural-size applies to --procedural N (the number of scenes to add)")
    if layers < 1:
        raise usage_error(f"--layers must be >= 1, got {layers}")
    if not (math.isfinite(noise) and noise >= 0):
        raise usage_error(f"--noise must be >= 0, got {noise:g}")
    if not (math.isfinite(highlight_boost) and highlight_boost >= 1):  # below 1 it would be off, as at 1
        raise usage_error(f"--highlight-boost must be >= 1 (1: off), got {highlight_boost:g}")
    try:
        settings = SynthSettings(max_radius=max_radius, min_radius=min_radius, aperture=aperture, blades=blades,
                                 layers=layers, noise_sigma=noise, highlight_boost=highlight_boost, dual_pixel=dual)
    except ValueError as exc:
        raise usage_error(str(exc))
    _check_output_folder(out)
    # Checked before any rendering: a second dataset written over a first would mix their pairs.
    previous, others = existing_files(out, split)
    if others:
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        raise usage_error(f"{out / others[0]}{more}: not written by kpac synth, but where it writes --split {split}: "
                          "choose another -o or --split (kpac synth deletes only files it wrote)")
    if previous and not overwrite:
        raise usage_error(f"{out} already holds a kpac synth dataset for --split {split} ({len(previous)} files): "
                          "add --overwrite to replace it, or choose another -o or --split")
    try:
        srcs = sharp_sources(list(sources or []), include_skimage=skimage, procedural=procedural,
                             procedural_size=(procedural_size, procedural_size), procedural_seed=seed,
                             skip_datasets=True)
    except FileNotFoundError as exc:
        raise usage_error(str(exc))
    except ImageError as exc:  # a folder that cannot be listed
        raise usage_error(str(exc))
    if not srcs and sources:
        raise usage_error(f"no sharp images in {', '.join(map(str, sources))} (found none of the formats kpac reads, "
                          "or only the files of kpac synth datasets, which are skipped)")
    if not srcs:
        raise usage_error("no sharp sources: give image files/folders, --skimage, or --procedural N")
    # --overwrite replaces or deletes the previous dataset's files: none may be a source
    from ..engine.batch import inputs_written_over, outputs_claimed_twice

    files = [(s.name, Path(s.origin)) for s in srcs if not s.origin.startswith(("skimage:", "procedural:"))]
    # one file listed twice, however spelt (by its path with links resolved, as outputs are told apart)
    twice = outputs_claimed_twice((str(path), path) for _, path in files)
    if twice:  # it would be two sources, drawn twice as often, under two names
        raise usage_error(f"{twice[0][1]} is given twice (as a file and in a folder, or twice over); give each photo once")
    replaced = inputs_written_over([("--overwrite", out / rel) for rel in previous], files)
    if replaced:
        raise usage_error(f"{replaced[0][1]}: a source, but part of the --split {split} dataset that --overwrite "
                          "replaces; copy it elsewhere first, or choose another -o or --split")

    # sample i draws from (--seed, i) in every split: another split's seed repeats its samples
    for other, n in repeated_samples(out, split, srcs, count, seed, crop=crop, max_side=max_side).items():
        err_console.print(f"[yellow]warning:[/] {n} of the {count} samples repeat those of the {escape(repr(other))} split "
                          f"in {escape(str(out))} (same --seed {seed}, same sources): a held-out split needs another --seed",
                          soft_wrap=True)

    t0 = time.perf_counter()
    try:
        with sigterm_raises(), progress_bar(show_progress(quiet)) as bar:
            task = bar.add_task("synth", total=count) if bar is not None else None

            def tick(done: int, total: int) -> None:
                if bar is not None:
                    bar.update(task, completed=done)

            summary = write_dataset(srcs, out, count=count, crop=crop, seed=seed, settings=settings, split=split,
                                    bit_depth=bit_depth, max_side=max_side, overwrite=overwrite, progress=tick)
    except KeyboardInterrupt:  # files are written atomically: nothing half-written is left
        print_error("interrupted" + _stopped_note(out, split))
        raise typer.Exit(EXIT_INTERRUPTED)
    except Terminated:  # as on Ctrl-C: the file being written is removed, not left half-written
        print_error("terminated" + _stopped_note(out, split))
        raise typer.Exit(EXIT_TERMINATED)
    except DatasetExistsError as exc:  # appeared since the check above
        raise usage_error(str(exc))
    except (OSError, ValueError) as exc:
        print_error(f"cannot write the dataset: {_error_text(exc)}{_stopped_note(out, split)}")
        raise typer.Exit(EXIT_FAILED)
    except MemoryError:  # the blur kernel grows with --max-radius squared, the layers with the source
        print_error(f"cannot write the dataset: out of memory (--max-radius {max_radius:g}: a smaller one, "
                    f"--max-side or --crop needs less){_stopped_note(out, split)}")
        raise typer.Exit(EXIT_FAILED)
    elapsed = time.perf_counter() - t0
    summary["elapsed_s"] = round(elapsed, 3)

    for f in summary["failed"]:
        print_error(_failure_line(f["origin"], f["error"]))
    small = sorted({s["source"] for s in summary["samples"] if crop is not None and min(s["crop"][2:]) < crop})
    if small and not quiet:  # a training set of mixed sizes should not be a surprise
        err_console.print(f"note: {len(small)} source(s) smaller than --crop {crop} in a side gave smaller samples "
                          f"(never upscaled): {escape(', '.join(small[:5]))}{', ...' if len(small) > 5 else ''}", soft_wrap=True)
    if not quiet and not summary["count"]:  # nothing written: an earlier dataset was not replaced
        kept = f"; the --split {split} dataset already in {out} is kept as it was" if previous else ""
        err_console.print(f"wrote no samples: every source failed{escape(kept)}", soft_wrap=True)
    elif not quiet:
        per = elapsed / max(summary["count"], 1)
        err_console.print(
            f"wrote {summary['count']}/{count} samples ({len(summary['files'])} files, {len(srcs)} sources) "
            f"to {escape(str(out))} in {elapsed:.1f} s ({per * 1000:.0f} ms/sample)", soft_wrap=True)
    if json_out:
        emit_json(summary)
    if summary["failed"] or summary["count"] < count:
        raise typer.Exit(EXIT_FAILED)
