"""`kpac blurmap`: blur-detection and blur-size maps from the model's scale attention."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import typer

from ..images import DEFAULT_MAX_PIXELS
from .common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    StdoutConsole,
    Terminated,
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
    print_note,
    print_setup_notes,
    progress_bar,
    say_images_below,
    say_unread_images,
    show_progress,
    sigterm_raises,
    usage_error,
    writing_stdout,
)

_HELP = """Write the scale-attention maps of a KPAC model as blur-detection / blur-size maps.

Each KPAC block weighs its atrous branches (dilations 1..5) per pixel; the first block's dilation-1 weight marks blurred regions of almost any blur size (the paper's blur detector), dilation 5 only large blur. Maps are resampled to the image size and written per image into OUT:

  NAME_blurmap.png        chosen map (--block, --dilation), 16-bit grey
  NAME_blurmap_bB_dD.png  with --all: every block x dilation (raw attention)
  NAME_defocus.png        --defocus-map: weighted mean dilation / max dilation
  NAME_mask.png           --threshold T: 8-bit, 255 = blurred
  NAME_overlay.png        --overlay: colour map over the photo (keeping its transparency)
  NAME_sheet.png          --sheet: every map of every block on one page

--format tiff writes the maps as float32 TIFF instead (the defocus map then in dilation units) and the mask as 8-bit TIFF. Every file written here says what it is in its metadata: a later run never takes it for a photo found in a folder, nor for a ground-truth mask.

--json prints a record per image with its outputs, size and numbers for sorting shots: mean_detection (the detection map's mean, 0..1: how much of the photo reads as blurred, the lower the sharper; it tells blurred from sharp, not large blur from moderate), with --defocus-map mean_defocus (the blur-size estimate's mean, in dilation units: it grows with the blur), with --threshold blurred_fraction (the mask's share of blurred pixels), with --eval-masks the scores; then, with --eval-masks, a summary record.

--eval-masks DIR scores the detection map against ground-truth masks with the same file stem, or the stem and _gt or _mask (CUHK convention: white = blurred), and prints them beside the paper's CUHK figures. With --recursive the files of a DIR inside an input folder are masks, not photos, and a photo in a sub-folder (a/x.jpg) takes its mask from the same sub-folder of DIR (DIR/a/x.png), else from the top of DIR unless another photo of the run claims that mask too (it is then ambiguous and the photo fails). Photos of one name from two input folders (A/x.jpg, B/x.jpg) would share one mask: that is refused; score each folder in its own run.

Examples:

  kpac blurmap photos/ -o maps/ --overlay --threshold 0.5

  kpac blurmap cuhk/image/ --eval-masks cuhk/gt/ --upsample 2 -o maps/
"""


@dataclass
class _Item:
    name: str  # output stem
    label: str  # shown in messages and records
    source: Any  # Path or DualPixelTriple
    out_dir: Path | None
    rel: Path = Path(".")  # where it lies below its input folder (sub-folders with --recursive)
    mask: Path | None = None
    no_mask: str = ""  # why it has no mask, when one was looked for and none is usable
    outputs: dict[str, Path] = field(default_factory=dict)


#: Ground-truth names tried for an image NAME besides NAME itself (any image extension).
MASK_NAMES = ("{}_gt", "{}_mask", "{}-gt", "gt_{}")


def _index_masks(folder: Path) -> dict[str, list[Path]]:
    from ..images import list_images

    index: dict[str, list[Path]] = {}
    for p in list_images(folder):
        index.setdefault(p.stem, []).append(p)
    return index


class _MaskFolder:
    """The files of --eval-masks by stem, listed one sub-folder at a time as photos ask."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._indexes: dict[Path, dict[str, list[Path]]] = {}

    def index(self, sub: Path) -> dict[str, list[Path]]:
        if sub not in self._indexes:
            folder = self.root / sub
            self._indexes[sub] = _index_masks(folder) if sub == Path(".") or folder.is_dir() else {}
        return self._indexes[sub]


def _find_mask(index: dict[str, list[Path]], stem: str, source: Path, inputs: set[Path]) -> tuple[Path | None, list[Path], list[Path]]:
    """The ground truth of the input ``source`` (resolved) named ``stem``, never an input
    itself nor a mask this command predicted; the predicted masks passed over; and, when two
    files of one name (``x.png``, ``x.jpg``) could both be it, both (the mask is then None).

    A file named NAME that is an input is another photo, not a mask (masks kept beside the
    photos are told apart by the names of :data:`MASK_NAMES`); a NAME_gt that is an input is
    the mask, and the caller takes it out of the inputs. A NAME_mask that an earlier run wrote
    says so in its metadata (:func:`~kpac_cli.blurmap.blurmap_kind`). Names are tried in that
    order, the first with a ground-truth file wins.
    """
    from ..blurmap import blurmap_kind

    tiers = [[c for c in index.get(stem, []) if c.resolve() not in inputs]]
    tiers += [[c for c in index.get(name.format(stem), []) if c.resolve() != source] for name in MASK_NAMES]
    predicted: list[Path] = []
    for tier in tiers:
        truth = [c for c in tier if blurmap_kind(c) is None]
        predicted += [c for c in tier if c not in truth]
        if len(truth) > 1:
            return None, predicted, truth
        if truth:
            return truth[0], predicted, []
    return None, predicted, []


def _no_mask_message(it: _Item, folders: list[Path], predicted: list[Path]) -> str:
    names = ", ".join(f"{n.format(it.name)}.*" for n in MASK_NAMES)
    where = " or ".join(str(f) for f in folders)
    msg = f"{it.label}: no ground-truth mask named {it.name}.* (other than an input) or {names} in {where}"
    if predicted:
        msg += f"; {predicted[0]} is a mask kpac blurmap predicted (its metadata says so), not ground truth"
    return msg


class MaskClaimedTwice(ValueError):
    """Two photos of one name (from two input folders, or one file named twice) would be
    scored against one mask: a usage error, as masks are paired by name alone."""


def _same_mask_message(owners: list[_Item], mask: Path) -> str:
    first, second = owners[0].label, owners[1].label
    if os.path.realpath(first) == os.path.realpath(second):
        return f"{second} is given twice (as {first} too); name each input once"
    return (f"{first} and {second} would both be scored against the mask {mask} (masks are paired by file name); "
            "score them in separate runs, one --eval-masks folder each, or rename one")


def _pair_masks(items: list[_Item], folder: Path, named: set[Path]) -> list[_Item]:
    """Give every item its ground-truth mask; return the items that are not themselves masks.

    A photo in a sub-folder looks in the same sub-folder of ``folder`` first, then at its
    top; a top-level mask that another photo claims too is ambiguous, and a photo that found
    it only there gets none. Two photos that find one mask in their own place (same-named
    photos of two input folders) raise :class:`MaskClaimedTwice`: nothing tells which of
    them the mask was drawn for. When the masks lie among the inputs (``--eval-masks`` naming
    an input folder), a file found in a folder listing that is another input's mask is ground
    truth, not a photo to map; files named on the command line stay inputs.
    """
    masks = _MaskFolder(folder)
    sources = {Path(it.label).resolve() for it in items}  # (a dual-pixel item's label is its left view)
    claims: dict[Path, list[tuple[_Item, bool]]] = {}  # mask -> (item, found at the top only after its own sub-folder)
    for it in items:
        source, sub = Path(it.label).resolve(), it.rel.parent
        it.mask, predicted, rivals = _find_mask(masks.index(sub), it.name, source, sources)
        looked = [folder / sub]
        fallback = it.mask is None and not rivals and sub != Path(".")
        if fallback:
            it.mask, more, rivals = _find_mask(masks.index(Path(".")), it.name, source, sources)
            predicted += more
            looked.append(folder)
        if rivals:  # nothing tells which of them was drawn for this photo
            it.no_mask = f"{it.label}: {len(rivals)} ground-truth masks of one name: {', '.join(map(str, rivals))}; keep one"
        elif it.mask is None:
            it.no_mask = _no_mask_message(it, looked, predicted)
        else:
            claims.setdefault(it.mask.resolve(), []).append((it, fallback))
    for mask, owners in claims.items():
        direct = [it for it, fallback in owners if not fallback]
        if len(direct) > 1:
            raise MaskClaimedTwice(_same_mask_message(direct, direct[0].mask or mask))
        if len(owners) < 2:
            continue
        for it, fallback in owners:
            if fallback:
                others = ", ".join(o.label for o, _ in owners if o is not it)
                it.no_mask = (f"{it.label}: no ground-truth mask in {folder / it.rel.parent}, and {it.mask} is ambiguous "
                              f"(also the mask of {others}); put its mask at {folder / it.rel.parent / it.mask.name}")
                it.mask = None
    return [it for it in items if Path(it.label).resolve() not in claims or Path(os.path.abspath(it.label)) in named]


def _not_below_masks(items: list[_Item], folder: Path, inputs: list[str], named: set[Path]) -> list[_Item]:
    """The items but the files that a recursive listing of an input folder found in the
    ``--eval-masks`` folder below it (``kpac blurmap cuhk/ -r --eval-masks cuhk/gt/``): those
    are the masks, not photos. Files of an input folder that is the masks folder or lies in it
    stay (photos and masks side by side, which :func:`_pair_masks` tells apart), and so do
    files named on the command line.
    """
    masks = folder.resolve()
    inner = [d for d in (Path(i).resolve() for i in inputs if Path(i).is_dir()) if d.is_relative_to(masks)]

    def listed_mask(it: _Item) -> bool:
        if not isinstance(it.source, Path) or Path(os.path.abspath(it.source)) in named:
            return False  # (a dual-pixel item's views come from --left/--right, not from a listing)
        source = it.source.resolve()
        return source.is_relative_to(masks) and not any(source.is_relative_to(d) for d in inner)

    return [it for it in items if not listed_mask(it)]


def _source_files(it: _Item) -> list[Path]:
    """The files an item is read from: its photo, or every view of a dual-pixel pair (a view
    folder may be the output folder, and a view may bear another pair's map name)."""
    if isinstance(it.source, Path):
        return [it.source]
    return [Path(p) for p in (it.source.left, it.source.right, it.source.center) if p is not None]


def _unused_with_all(given: set[str], *, threshold: bool, overlay: bool, evaluate: bool, defocus: bool) -> list[str]:
    """What to say of --invert, --block and --dilation given with --all, when no output uses
    the one detection map they choose: the --all maps are every block's raw attention."""
    if threshold or overlay or evaluate:
        return []
    unused = [f"--{name}" for name in ("invert", "block", "dilation") if name in given and not (name == "block" and defocus)]
    if not unused:
        return []
    subject, verbs = ("they", "neither choose nor flip; they shape") if len(unused) > 1 else ("it", "neither chooses nor flips; it shapes")
    return [f"{', '.join(unused)}: --all writes every block's raw attention maps, which {subject} {verbs} the "
            "detection map of --threshold, --overlay or --eval-masks, none given here"]


def blurmap(
    ctx: typer.Context,
    inputs: Optional[List[str]] = typer.Argument(None, help="Image files or folders.", show_default=False),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output folder (created). Optional with --eval-masks.", show_default=False),
    model: str = typer.Option("default", "--model", "-m", help="Shipped model name (see `kpac models`), a .safetensors file, or a training run folder (its model.safetensors)."),
    block: int = typer.Option(1, "--block", help="KPAC block of the chosen map (1 = first)."),
    dilation: int = typer.Option(1, "--dilation", help="Dilation rate of the chosen map (1 = the blur detector)."),
    all_maps: bool = typer.Option(False, "--all", help="Write every block x dilation map instead of the chosen one."),
    fmt: str = typer.Option("png", "--format", help="png (16-bit grey) or tiff (float32) for the maps and the defocus map; masks are 8-bit either way."),
    overlay: bool = typer.Option(False, "--overlay", help="Also write the detection map colour-mapped over the photo (8-bit PNG)."),
    sheet: bool = typer.Option(False, "--sheet", help="Also write a contact sheet of all maps (8-bit PNG)."),
    defocus: bool = typer.Option(False, "--defocus-map", help="Also write the blur-size estimate (attention-weighted mean dilation of --block)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Also write a binary mask: detection map >= T is blurred (255). With --eval-masks, also the threshold of the scores (default 0.5)."),
    invert: bool = typer.Option(False, "--invert", help="Flip the detection map (1 - map), for a model whose attention is high on sharp regions but whose checkpoint does not declare it."),
    upsample: int = typer.Option(1, "--upsample", help="Enlarge the input N times before inference (the paper's Appendix F trick for small photos)."),
    eval_masks: Optional[Path] = typer.Option(None, "--eval-masks", help="Score the detection map against masks in this folder, paired by file stem: NAME.*, NAME_gt.*, NAME_mask.*, NAME-gt.* or gt_NAME.* for an image NAME (with --recursive, in the photo's sub-folder first). Masks with only the values 0 and 1 are label images (1 = blurred; 1 = sharp with --masks-sharp-white).", show_default=False),
    masks_sharp_white: bool = typer.Option(False, "--masks-sharp-white", help="Ground-truth masks are white (or 1, in 0/1 label images) where sharp (default: white = blurred, as CUHK)."),
    left: Optional[str] = typer.Option(None, "--left", help="Dual-pixel left view(s): a file or a folder (or, alone, a DPDD root)."),
    right: Optional[str] = typer.Option(None, "--right", help="Dual-pixel right view(s)."),
    center: Optional[str] = typer.Option(None, "--center", help="Dual-pixel centre view(s); default: mean of left and right."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Descend into sub-folders (their structure is kept)."),
    device: str = device_option(),
    precision: str = precision_option(),
    fp32: bool = fp32_option(),
    tile: str = typer.Option("auto", "--tile", help="Tile size in pixels, 'auto' or 0 / whole (whole image). Maps do not depend on it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    skip_existing: bool = typer.Option(False, "--skip-existing", help="Leave existing outputs alone (resume a batch)."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", help="Refuse images larger than this (decompression-bomb guard)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON record per image (and a summary with --eval-masks) to stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summary on stderr."),
) -> None:
    # Imported here so that `kpac --help` stays fast.
    from ..blurmap import PAPER_CUHK, attention_maps, model_polarity
    from ..engine import Deblurrer, EngineOptions
    from ..engine.batch import (PlanError, collect_inputs, describe_clash, inputs_written_over, no_folder_to_recurse, not_a_folder,
                                outputs_claimed_twice)
    from ..images import ImageError, pair_dual_pixel

    inputs = inputs or []
    dual = dual_pixel_mode(inputs, left, right, center, "no inputs given (image files or folders)")
    if "-" in inputs:
        raise usage_error("blurmap reads files, not stdin")
    if dual and recursive:  # views pair by name within the folders given, not in sub-folders (as kpac deblur)
        raise usage_error("--recursive applies to INPUTS folders; dual-pixel views are paired within the --left/--right folders")
    if overwrite and skip_existing:
        raise usage_error("--overwrite and --skip-existing contradict each other")
    fmt = {"tif": "tiff"}.get(fmt.lower(), fmt.lower())
    if fmt not in ("png", "tiff"):
        raise usage_error(f"unknown --format {fmt!r} (png or tiff)")
    if upsample < 1 or upsample > 8:
        raise usage_error(f"--upsample must be 1..8, got {upsample}")
    if threshold is not None and not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise usage_error(f"--threshold must be in [0, 1], got {threshold}")
    # 0 would pass here and then refuse every image, one error per file (kpac deblur refuses it too)
    if max_pixels < 1:
        raise usage_error(f"--max-pixels must be at least 1, got {max_pixels}")
    precision = precision_with_fp32(precision, fp32)
    if output is None and eval_masks is None:
        raise usage_error("-o OUT is required (it may be left out only with --eval-masks)")
    if masks_sharp_white and eval_masks is None:  # it says how the ground-truth masks are drawn
        raise usage_error("--masks-sharp-white describes the masks of --eval-masks; give it with --eval-masks DIR")
    if output is None:  # --eval-masks alone scores and writes nothing: options that only shape files would be ignored
        writers = {"--all": all_maps, "--overlay": overlay, "--sheet": sheet, "--defocus-map": defocus, "--format tiff": fmt == "tiff"}
        given = [name for name, on in writers.items() if on]
        if given:
            raise usage_error(f"{given[0]} writes files: give -o OUT (without it, --eval-masks only scores)")
        for flag, on in (("--overwrite", overwrite), ("--skip-existing", skip_existing)):
            if on:
                raise usage_error(f"{flag} is about the map files in -o OUT; without -o, --eval-masks only scores and writes none")
    if output is not None and str(output) == "-":  # kpac's name for stdout elsewhere: never a folder named '-'
        raise usage_error("-o -: kpac blurmap writes its maps as files in a folder, not to stdout; give the output folder")
    if output is not None and output.exists() and not output.is_dir():
        raise usage_error(f"-o {output}: not a folder")
    if output is not None and (blocker := not_a_folder(output)) is not None:  # every map would fail at its write
        raise usage_error(f"-o {output}: cannot create it: {blocker} is not a folder")
    if eval_masks is not None and not eval_masks.is_dir():
        raise usage_error(f"--eval-masks {eval_masks}: not a folder")
    try:
        tile_value = parse_tile(tile)
    except ValueError as e:
        raise usage_error(f"--tile: {e}") from None
    if all_maps and not quiet:
        for note in _unused_with_all(given_options(ctx), threshold=threshold is not None, overlay=overlay,
                                     evaluate=eval_masks is not None, defocus=defocus):
            print_note(note)

    # -- plan ------------------------------------------------------------------------------
    items: list[_Item] = []
    try:
        if dual:
            triples = pair_dual_pixel(Path(left), Path(right) if right else None, Path(center) if center else None)
            for t in triples:
                stem = Path(t.name).stem
                items.append(_Item(stem, str(t.left), t, output, rel=Path(t.name)))
        else:
            if not recursive and not quiet:
                say_images_below(inputs, output)
            for src, rel in collect_inputs(inputs, recursive, exclude=output):
                items.append(_Item(rel.stem, str(src), src, None if output is None else output / rel.parent, rel=rel))
            if not quiet:
                say_unread_images(inputs, recursive)
                if recursive and (said := no_folder_to_recurse(inputs)):
                    print_note(said)
    except (PlanError, ImageError) as e:
        raise usage_error(str(e)) from None
    if not items:
        raise usage_error("no images found in the inputs")
    named = {Path(os.path.abspath(i)) for i in inputs if not Path(i).is_dir()}
    if eval_masks is not None:
        try:
            items = _pair_masks(_not_below_masks(items, eval_masks, inputs, named), eval_masks, named)
        except OSError as e:
            raise usage_error(f"--eval-masks {eval_masks}: cannot list it ({e.strerror or e})") from None
        except MaskClaimedTwice as e:
            raise usage_error(str(e)) from None
        if not items:
            raise usage_error("no images found in the inputs (only the ground-truth masks of --eval-masks)")

    try:
        from ..checkpoints.registry import resolve_model

        model_path, _ = resolve_model(model, dual=dual)
        deblurrer = Deblurrer(model_path, EngineOptions(device=device, precision=precision, tile=tile_value))
    except (ValueError, FileNotFoundError, OSError) as e:
        raise usage_error(" ".join(str(e).split())) from None
    cfg = deblurrer.config
    if (cfg.in_views == 2) != dual:
        kind = "dual-pixel (use --left/--right)" if cfg.in_views == 2 else "single-image (use INPUTS, not --left/--right)"
        raise usage_error(f"model {deblurrer.name} is a {kind} model")
    if not cfg.scale_attention:
        raise usage_error(f"model {deblurrer.name} has no scale attention (built with scale_attention=False)")
    print_setup_notes(deblurrer, quiet)
    if not 1 <= block <= cfg.blocks:
        raise usage_error(f"--block must be 1..{cfg.blocks} for model {deblurrer.name}")
    if dilation not in cfg.dilations:
        raise usage_error(f"--dilation must be one of {list(cfg.dilations)} for model {deblurrer.name}")
    polarity = model_polarity(deblurrer)  # what a high attention weight means, as the checkpoint declares

    ext = ".png" if fmt == "png" else ".tif"
    for it in items:
        if it.out_dir is None:
            continue
        base = it.out_dir / it.name
        if all_maps:
            for b in range(1, cfg.blocks + 1):
                for d in cfg.dilations:
                    it.outputs[f"b{b}_d{d}"] = Path(f"{base}_blurmap_b{b}_d{d}{ext}")
        else:
            it.outputs["blurmap"] = Path(f"{base}_blurmap{ext}")
        if defocus:
            it.outputs["defocus"] = Path(f"{base}_defocus{ext}")
        if threshold is not None:
            it.outputs["mask"] = Path(f"{base}_mask{ext}")
        if overlay:
            it.outputs["overlay"] = Path(f"{base}_overlay.png")
        if sheet:
            it.outputs["sheet"] = Path(f"{base}_sheet.png")
    # A previous run's maps found in an input folder are no inputs: their metadata says what
    # they are (collect_inputs leaves them out). A file that merely bears a map's name is a
    # photo, and the check below keeps it from being written over.
    outputs = [(it.label, p) for it in items for p in it.outputs.values()]
    for writer, p, first in outputs_claimed_twice(outputs):
        raise usage_error(describe_clash(writer, first, p, {it.label: Path(it.source) for it in items if not dual}))
    inputs = [(str(p), p) for it in items for p in _source_files(it)]
    written_over = inputs_written_over(outputs, inputs)
    if written_over:  # even with --overwrite: an input is never replaced
        writer, _, owner = written_over[0]
        raise usage_error(f"{writer}'s map would be written over the input {owner}; choose another output folder")
    masks_written_over = inputs_written_over(outputs, [(str(it.mask), it.mask) for it in items if it.mask is not None])
    if masks_written_over:  # it would be scored against its own output
        writer, _, mask = masks_written_over[0]
        raise usage_error(f"{writer}'s map would be written over the ground-truth mask {mask}; choose another output folder")

    # -- run -------------------------------------------------------------------------------
    counts = {"ok": 0, "skipped": 0, "failed": 0}
    all_scores: list[tuple[str, Any]] = []
    exit_code = EXIT_OK
    try:
        with sigterm_raises(), progress_bar(show_progress(quiet)) as progress:
            overall = progress.add_task("images", total=len(items)) if progress else None
            for it in items:
                rec = _process(
                    it, deblurrer, attention_maps, max_pixels, block=block, dilation=dilation, all_maps=all_maps, fmt=fmt,
                    defocus=defocus, threshold=threshold, invert=invert, upsample=upsample, overwrite=overwrite,
                    skip_existing=skip_existing, evaluate=eval_masks is not None, blurred_value=0 if masks_sharp_white else 255,
                    progress=progress,
                )
                counts[rec["status"]] += 1
                if rec["status"] == "failed":
                    print_error(rec["error"])
                if rec.get("scores") is not None:  # shown by the path below its input folder: names repeat with -r
                    all_scores.append((it.rel.as_posix(), rec.pop("_scores")))
                rec.pop("_scores", None)
                if json_out:
                    emit_json(rec)
                if progress is not None:
                    progress.advance(overall)
    except KeyboardInterrupt:
        exit_code = EXIT_INTERRUPTED
    except Terminated:
        exit_code = EXIT_TERMINATED

    if eval_masks is not None and exit_code == EXIT_OK:
        from ..blurmap import F_BETA2, summarize

        summary = summarize(s for _, s in all_scores)
        table = (all_scores, summary, PAPER_CUHK, F_BETA2, block, dilation, invert, polarity,
                 0.5 if threshold is None else threshold, masks_sharp_white)
        if json_out:
            emit_json({"summary": summary, "paper_cuhk": PAPER_CUHK, "f_beta2": F_BETA2, "block": block, "dilation": dilation,
                       "invert": invert, "polarity": polarity, "upsample": upsample, "threshold": 0.5 if threshold is None else threshold, "model": deblurrer.name})
            if not quiet:  # for whoever watches: stdout holds the records
                _print_table(*table, console=err_console)
        else:  # the scores are the run's result: on stdout, as kpac eval's tables, -q or not
            with writing_stdout():
                _print_table(*table, console=StdoutConsole(highlight=False))
    if exit_code == EXIT_OK and counts["failed"]:
        exit_code = EXIT_FAILED
    if not quiet:
        done = f"{counts['ok']} done, {counts['skipped']} skipped, {counts['failed']} failed"
        if exit_code in (130, 143) and overwrite:  # the maps not reached are an earlier run's: --skip-existing would keep them
            err_console.print(f"interrupted: {done}; rerun to finish (--skip-existing instead of --overwrite would keep "
                              "the maps older than this run)", soft_wrap=True)
        elif exit_code in (130, 143):
            err_console.print(f"interrupted: {done}; rerun with --skip-existing to finish")
        else:
            err_console.print(done)
    raise typer.Exit(exit_code)


def _process(it: _Item, deblurrer, attention_maps, max_pixels: int, *, block: int, dilation: int, all_maps: bool, fmt: str,
             defocus: bool, threshold: float | None, invert: bool, upsample: int, overwrite: bool, skip_existing: bool,
             evaluate: bool, blurred_value: int, progress) -> dict[str, Any]:
    """Maps, files and scores of one image; never raises for a per-image problem."""
    import numpy as np

    from ..blurmap import blur_mask, contact_sheet, encode_map, encode_mask, encode_rgb, mask_from_image, score_detection, write_file
    from ..blurmap import overlay as make_overlay
    from ..images import DualPixelTriple, ImageError, fill_transparent, read_dual_pixel, read_image, read_image_codes

    t0 = time.perf_counter()
    rec: dict[str, Any] = {
        "input": it.label, "status": "ok", "error": None, "outputs": {k: str(p) for k, p in it.outputs.items()},
        "model": deblurrer.name, "device": str(deblurrer.device), "block": block, "dilation": dilation, "upsample": upsample,
        "invert": invert, "polarity": None,
    }
    existing = {k for k, p in it.outputs.items() if p.exists()}
    if existing and not overwrite and not skip_existing:
        first = it.outputs[sorted(existing)[0]]
        rec.update(status="failed", error=f"{first}: exists (use --overwrite to replace it or --skip-existing to keep it)")
        return rec
    todo = {k: p for k, p in it.outputs.items() if overwrite or k not in existing}
    if evaluate and it.mask is None:
        # a failure of this image, but its maps are still written
        rec.update(status="failed", error=it.no_mask)
        evaluate = False
        if not todo:
            return rec
    if not todo and not evaluate:
        rec["status"] = "skipped"
        return rec
    # shown as it is (the bar's text column reads no markup): a name with "[...]" stays whole
    task = progress.add_task(f"  {it.name[:30]}", total=None) if progress is not None else None
    try:
        if isinstance(it.source, DualPixelTriple):
            views, center, info = read_dual_pixel(it.source, max_pixels=max_pixels)
            # as kpac deblur shows them to the model: the views and the centre view in one pass
            seen = fill_transparent(np.concatenate([views, center], axis=2), info.alpha)[0]
            image, center = seen[..., :-3], seen[..., -3:]
            photo = center
        else:
            photo, info = read_image(it.source, max_pixels=max_pixels)
            # as kpac deblur shows it to the model: colours under alpha 0 are not part of the photo
            photo = fill_transparent(photo, info.alpha)[0]
            image, center = photo, None
        rec["height"], rec["width"] = h, w = image.shape[:2]
        if h * w * upsample**2 > max_pixels:  # the network sees the enlarged image
            rec.update(status="failed", error=f"{it.label}: {w}x{h} enlarged {upsample} times is {h * w * upsample**2} pixels, "
                       f"over --max-pixels {max_pixels}; use a smaller --upsample")
            return rec
        maps = attention_maps(deblurrer, image, center, upsample=upsample, orientation=info.orientation_applied)
        rec["polarity"] = maps.polarity
        detect = maps.detection(block, dilation, invert=invert)
        rec["mean_detection"] = round(float(detect.mean()), 6)
        # the record's numbers whether or not their file is written this time (--skip-existing, no -o)
        blur_size = maps.defocus(block) if defocus else None
        if blur_size is not None:
            rec["mean_defocus"] = round(float(blur_size.mean()), 6)
        predicted = None if threshold is None else blur_mask(detect, threshold)
        if predicted is not None:
            rec["blurred_fraction"] = round(float(predicted.mean()), 6)
        written: dict[str, str] = {}
        for key, path in todo.items():
            if key == "blurmap":
                data = encode_map(detect, fmt)
            elif key.startswith("b") and "_d" in key:
                b, d = (int(v) for v in key[1:].split("_d"))
                data = encode_map(maps.map(b, d), fmt, kind="attention")
            elif key == "defocus":
                data = encode_map(blur_size, fmt, scale=max(maps.dilations), kind="defocus")
            elif key == "mask":
                data = encode_mask(predicted, fmt)
            elif key == "overlay":  # keeps the photo's alpha: what was transparent stays so
                data = encode_rgb(make_overlay(photo, detect), info.icc_profile, kind="overlay", alpha=info.alpha)
            elif key == "sheet":
                data = encode_rgb(contact_sheet(photo, maps, alpha=info.alpha), info.icc_profile, kind="sheet")
            else:  # pragma: no cover - the planner only makes the keys above
                raise AssertionError(key)
            write_file(path, data, overwrite=overwrite)
            written[key] = str(path)
        rec["written"] = written
        if evaluate and it.mask is not None:
            gt_codes, _ = read_image_codes(it.mask, max_pixels=max_pixels)  # codes: a 0/1 label mask stays one
            gt = mask_from_image(gt_codes, blurred_value)
            if gt.shape != detect.shape:
                raise ValueError(f"{it.mask}: mask is {gt.shape[1]}x{gt.shape[0]} but the image is {detect.shape[1]}x{detect.shape[0]}")
            scores = score_detection(detect, gt, 0.5 if threshold is None else threshold)
            rec["mask"] = str(it.mask)
            rec["scores"] = scores.to_dict()
            rec["_scores"] = scores
    except (ImageError, ValueError, MemoryError, OSError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        rec.update(status="failed", error=msg if it.label in msg or (it.mask and str(it.mask) in msg) else f"{it.label}: {msg}")
    finally:
        if task is not None:
            progress.remove_task(task)
    rec["seconds"] = round(time.perf_counter() - t0, 4)
    return rec


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


def _reversed_hint(polarity: str, invert: bool, masks_sharp_white: bool) -> str:
    """What an AUC below 0.5 says about how the map was read, and what to change.

    ``polarity`` is the model's (declared or default), ``invert`` whether --invert was given:
    together they say which regions a high attention weight was taken to mark.
    """
    read_as = "blurred" if (polarity == "sharp") == invert else "sharp"
    found = "sharp" if read_as == "blurred" else "blurred"
    if invert:
        why, fix = "as --invert has it", "drop --invert"
    elif polarity == "sharp":
        why, fix = "as its checkpoint declares (blurmap_polarity: sharp)", "try --invert"
    else:
        why, fix = "as is assumed for a model that declares nothing", "try --invert"
    masks = ("drop --masks-sharp-white if the masks are white where blurred" if masks_sharp_white
             else "give --masks-sharp-white if the masks are white where sharp")
    return (f" AUC below 0.5: the map ranks sharp pixels above blurred ones, so this model's attention is high on "
            f"{found} regions, not on {read_as} ones {why}; {fix} (or {masks}).")


def _print_table(rows, summary, paper, beta2, block, dilation, invert, polarity, threshold, masks_sharp_white, console) -> None:
    from rich.markup import escape  # file names may hold '[...]'
    from rich.table import Table

    title = f"Blur detection: block {block}, dilation {dilation}{' (inverted)' if invert else ''}, threshold {threshold:g}"
    table = Table(title=title, title_justify="left")
    for col in ("image", "F-measure", "accuracy", "precision", "recall", "AUC"):
        table.add_column(col, justify="left" if col == "image" else "right")
    if len(rows) <= 50:
        for label, s in rows:
            table.add_row(escape(label), _fmt(s.f_measure), _fmt(s.accuracy, True), _fmt(s.precision), _fmt(s.recall), _fmt(s.auc))
        table.add_section()
    table.add_row(f"mean of {summary['images']} images", _fmt(summary["f_measure"]), _fmt(summary["accuracy"], True),
                  _fmt(summary["precision"]), _fmt(summary["recall"]), _fmt(summary["auc"]), style="bold")
    table.add_row("paper, CUHK", _fmt(paper["f_measure"]), _fmt(paper["accuracy"], True), "-", "-", "-", style="dim")
    console.print(table)
    auc = summary.get("auc")
    note = (f"F-measure with beta^2 = {beta2}; means over images; the paper's figures use block 1, dilation 1. "
            "Masks: white = blurred unless --masks-sharp-white.")
    note += _auc_count_note(summary)
    if auc is not None and auc < 0.5:
        note += _reversed_hint(polarity, invert, masks_sharp_white)
    console.print(note, soft_wrap=True)


def _auc_count_note(summary: dict[str, Any]) -> str:
    """What the mean AUC is over when some masks hold one class only (no AUC there), else ""."""
    n, k = summary["images"], summary["auc_images"]
    if k == n:
        return ""
    return (f" AUC: mean of the {k} of {n} images whose mask holds both blurred and sharp pixels "
            "(a mask of one class has no AUC).")


def register(app: typer.Typer) -> None:
    """Add the ``blurmap`` command to ``app``."""
    app.command("blurmap", help=_HELP, no_args_is_help=True)(blurmap)
