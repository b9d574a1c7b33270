"""Deblurring files in batches: planning outputs, never losing data, overlapping I/O with compute.

Guarantees (each is tested):

* An existing output is never overwritten unless ``overwrite``; ``skip_existing`` resumes a
  batch. An output path equal to its input is refused.
* Outputs are written atomically (temp file in the same folder + rename): a killed run leaves
  no truncated image, only at most a hidden temp file that the next run removes.
* One bad file fails alone, with a one-line error naming it; the rest of the batch goes on.
* Reading the next image and writing the previous one run in background threads, so the
  model waits for neither decoding nor encoding.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import numpy as np

from ..images.metadata import blurmap_kind
from ..images import (
    DEFAULT_MAX_PIXELS,
    DualPixelTriple,
    ImageError,
    ImageInfo,
    RawOptions,
    cleanup_stale_temps,
    fill_transparent,
    list_images,
    pair_dual_pixel,
    read_dual_pixel,
    read_image,
    sniff_format,
    srgb_decode,
    srgb_encode,
    unread_images,
    write_image,
    write_output,
)
from ..images.base import FORMAT_ALIASES, HEIF_EXTENSIONS, RAW_EXTENSIONS, path_ext
from ..images.exif import has_tags_beyond_descriptive
from ..images.heif import INSTALL_HINT as HEIC_INSTALL_HINT
from ..images.io import (JPEG_MAX_DPI, JPEG_MAX_EXIF, JPEG_MAX_XMP, color_space_note, default_format, jpeg_segment_names,
                         probe_heif, written_xmp)
from ..images.png import TEXT_CHUNKS, colour_other_than_srgb
from .deblurrer import Deblurrer
from .tiled import ProgressFn

STDIO = "-"
#: Streams are read in pieces of this size: one read of a whole limit would reserve it all at
#: once, which fails (MemoryError) for a large --max-pixels, or under a memory limit.
_STREAM_CHUNK = 1 << 20
_EXT_FOR_FORMAT = {"png": ".png", "tiff": ".tif", "jpeg": ".jpg"}
#: Companion files written beside an output (``--save-blurmap``): kind -> name suffix.
COMPANIONS = {"blurmap": "_blurmap.png"}


class PlanError(ValueError):
    """The command line names inputs/outputs that cannot work (a usage error)."""


@dataclass
class OutputOptions:
    format: str | None = None  # png | tiff | jpeg; default: the input's (RAW -> tiff, HEIC -> jpeg or png: _output_format)
    bit_depth: int | None = None  # 8 | 16 | 32 (float32 TIFF, unclipped); default: the input's
    suffix: str = ""
    overwrite: bool = False
    skip_existing: bool = False
    jpeg_quality: int = 95


@dataclass
class Job:
    name: str
    source: Path | bytes | DualPixelTriple  # a file, bytes (stdin, a pipe), or a dual-pixel triple
    output: Path | None  # None: write to stdout
    input_label: str
    format: str = "png"  # png | tiff | jpeg: what is written, decided when planning
    companions: dict[str, Path] = field(default_factory=dict)  # kind -> path beside the output

    @property
    def destinations(self) -> list[Path]:
        """Every file the job writes: its output (none for stdout) and its companions."""
        return ([self.output] if self.output is not None else []) + list(self.companions.values())


@dataclass
class JobResult:
    input: str
    output: str | None
    status: str  # ok | skipped | failed
    error: str | None = None
    size: tuple[int, int] | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self, deblurrer: Deblurrer | None = None) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "input": self.input,
            "output": self.output,
            "status": self.status,
            "error": self.error,
            "width": self.size[1] if self.size else None,
            "height": self.size[0] if self.size else None,
            "seconds": round(self.seconds, 4),
            # set by an image that ran; the keys are in every record, so that a reader may index them
            "precision": None,
            "tile": None,
        }
        if deblurrer is not None:
            rec.update(model=deblurrer.name, device=str(deblurrer.device))
        rec.update(self.extra)
        return rec


def _input_format(source: Path | bytes) -> str:
    """The input's format from its extension, or from its content when the extension says
    nothing (``.jfif``, no extension, a pipe); unreadable content counts as RAW (it fails
    later, when it is read, with the reader's message)."""
    if isinstance(source, Path):
        ext = path_ext(source)
        if ext in FORMAT_ALIASES:
            return FORMAT_ALIASES[ext]
        if ext in RAW_EXTENSIONS:
            return "raw"
    try:
        return sniff_format(source)
    except ImageError:
        return "raw"


def _output_format(source: Path | bytes, options: OutputOptions) -> str:
    """png | tiff | jpeg: --bit-depth 32 is TIFF, then --format, then the input's own.

    Inputs in a format kpac does not write take the one that keeps what they hold: camera RAW
    16-bit TIFF (its development); HEIC/HEIF an 8-bit photo without alpha (an iPhone's) JPEG at
    --jpeg-quality, as the phone's "Most Compatible" setting would have taken it, and a 10/12-bit
    or transparent one PNG (16-bit for 10/12 bits), which keeps its depth, its alpha and all of
    its EXIF (TIFF outputs keep only the descriptive tags), as is an 8-bit one with
    ``--bit-depth 16``. Told by
    the HEIF's header (:func:`~kpac_cli.images.io.default_format`); a HEIF that cannot be probed
    fails when read.
    """
    if options.bit_depth == 32:
        return "tiff"
    if options.format:
        return options.format
    fmt = _input_format(source)
    if fmt == "heif":
        try:
            head = probe_heif(source)
        except ImageError:  # damaged: the read fails later, with the reader's message
            return "jpeg"
        # --bit-depth 16 asks for a format that holds it: the HEIF's output is kpac's choice
        return default_format(fmt, max(head.bit_depth, options.bit_depth or 8), head.alpha)
    return default_format(fmt, 8, False)


def _file_target_format(output: str, options: OutputOptions) -> str:
    """The format an explicit output file name asks for; names that contradict the options
    or name no format we write are usage errors (so a file's content always matches its name)."""
    ext = path_ext(output)
    fmt = FORMAT_ALIASES.get(ext)
    if fmt is None:
        if ext in HEIF_EXTENSIONS or ext in RAW_EXTENSIONS:  # read, not written: say so, not "no image name"
            kind = "HEIC/HEIF" if ext in HEIF_EXTENSIONS else "camera RAW"
            raise PlanError(f"-o {output}: kpac reads {kind} but does not write it; name a .png, .tif or .jpg output")
        raise PlanError(f"-o {output}: not an image file name (.png, .tif, .tiff, .jpg or .jpeg); end it with / for a folder")
    if options.bit_depth == 32 and fmt != "tiff":
        raise PlanError(f"-o {output}: --bit-depth 32 (float) is written as TIFF only")
    if options.format and options.format != fmt:
        raise PlanError(f"-o {output} contradicts --format {options.format}")
    if fmt == "jpeg" and options.bit_depth == 16:
        raise PlanError(f"-o {output}: JPEG holds 8 bits; write .png or .tif for 16")
    if options.suffix:
        raise PlanError(f"--suffix names outputs in a folder; -o {output} names the file itself")
    return fmt


def _output_name(rel: Path, source: Path | bytes, fmt: str, suffix: str) -> Path:
    """``rel`` with ``suffix`` and ``fmt``'s extension; an input's own spelling of that
    extension (``.jpeg``, ``.tiff``; lowercase) is kept, so ``a.jpg`` and ``a.jpeg`` stay two files."""
    ext = _EXT_FOR_FORMAT[fmt]
    if isinstance(source, Path) and FORMAT_ALIASES.get(path_ext(source)) == fmt:
        ext = source.suffix.lower()
    return rel.parent / f"{rel.stem}{suffix}{ext}"


def _refuse_image_name_for_folder(output: str, several: str | None, source: str) -> None:
    """PlanError when ``-o`` reads as an image file name but the outputs go into a folder:
    ``several`` says how many (``"3 inputs"``), else there is one, from ``source``, a folder.
    A folder named ``out.png`` would be made otherwise, and the user's file never written."""
    if names_folder(output) or path_ext(output) not in FORMAT_ALIASES:
        return
    if several is not None:
        raise PlanError(f"-o {output} looks like a file name, but there are {several}; give a folder")
    raise PlanError(f"-o {output} looks like a file name, but {source} is a folder; end it with / for a folder")


def _check_suffix(suffix: str) -> None:
    if any(sep and sep in suffix for sep in ("/", os.sep, os.altsep)) or "\0" in suffix:
        raise PlanError(f"--suffix {suffix!r}: a suffix is part of a file name; it cannot hold a path separator")


def stream_limit(max_pixels: int) -> int:
    """The most bytes read from a stream (stdin, a pipe named as an input): what an
    uncompressed image within ``max_pixels`` can take (four float32 samples a pixel) plus
    64 MiB of metadata, so that an endless one (``/dev/zero``) is refused, not read until
    memory runs out."""
    return max_pixels * 16 + (64 << 20)


def read_stream(stream: BinaryIO, limit: int) -> bytes:
    """What ``stream`` holds, in pieces, up to ``limit`` + 1 bytes (more than ``limit``: the
    caller refuses it)."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = stream.read(min(_STREAM_CHUNK, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _read_named_stream(path: Path, max_pixels: int) -> bytes:
    """An input that is not a regular file (``<(cmd)``, ``/dev/stdin``, a named pipe), read
    once when planning, since its content decides the output's format; refused, as stdin
    is, when it is a terminal or holds more than any image within ``max_pixels``, and named
    when it cannot be read at all (a socket)."""
    limit = stream_limit(max_pixels)
    try:
        with open(path, "rb") as stream:
            if stream.isatty():
                raise PlanError(f"{path} is a terminal, not an image; name an image file, or pipe one in")
            data = read_stream(stream, limit)
    except OSError as e:
        raise PlanError(f"cannot read {path} ({e.strerror or e})") from None
    if len(data) > limit:
        raise PlanError(f"{path}: more than {limit} bytes, more than any image within --max-pixels {max_pixels} takes; not read")
    return data


def names_folder(output: str) -> bool:
    """Whether ``-o`` names a folder: one that exists, or any name ending with a separator."""
    return output.endswith(("/", os.sep)) or Path(output).is_dir()


def collect_inputs(inputs: list[str], recursive: bool, exclude: Path | None = None) -> list[tuple[Path, Path]]:
    """(file, path relative to the folder it came from) for every image named or found.

    ``exclude``: a folder whose files are never taken from a folder listing (the output
    folder, when it lies inside an input folder). Nor are the maps, masks, overlays and
    sheets ``kpac blurmap`` wrote (their metadata says so): they are not photos. A file named
    in ``inputs`` is always taken.
    """
    found: list[tuple[Path, Path]] = []
    maps = 0
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            photos, folder_maps = _folder_photos(p, recursive, exclude)
            maps += folder_maps
            found += [(f, f.relative_to(p)) for f in photos]
        elif p.exists():
            found.append((p, Path(p.name)))
        else:
            raise PlanError(f"input not found: {item}")
    if not found and maps:
        raise PlanError("no images found in the inputs (only maps that kpac blurmap wrote)")
    if not found:
        _say_unread_images(inputs, recursive)
    return found


def _folder_photos(folder: Path, recursive: bool, exclude: Path | None, below_only: bool = False) -> tuple[list[Path], int]:
    """The photos :func:`collect_inputs` takes from ``folder`` (only those in its sub-folders
    with ``below_only``), and how many of kpac's own maps it left out."""
    try:
        files = list_images(folder, recursive=recursive)
    except OSError as e:
        raise PlanError(f"cannot list {folder} ({e.strerror or e})") from None
    skip = exclude.resolve() if exclude is not None else None
    if skip is not None and skip != folder.resolve() and skip.is_relative_to(folder.resolve()):
        files = [f for f in files if not f.resolve().is_relative_to(skip)]
    if below_only:
        files = [f for f in files if f.parent != folder]
    photos = [f for f in files if blurmap_kind(f) is None]  # reads PNG/TIFF headers: after the cheap filters
    return photos, len(files) - len(photos)


def images_below(inputs: list[str], exclude: Path | None = None) -> int:
    """How many photos lie in sub-folders of the input folders: what ``-r`` would add to a
    run without it (the same photos :func:`collect_inputs` would take from there)."""
    return sum(len(_folder_photos(Path(i), True, exclude, below_only=True)[0]) for i in inputs if i != STDIO and Path(i).is_dir())


def _say_unread_images(inputs: list[str], recursive: bool) -> None:
    """PlanError naming the images of formats kpac does not read (WebP, HEIC without the heic
    extra, ...) when the input folders hold only such, rather than leave "no images found"
    unexplained."""
    said = unread_images_said(inputs, recursive)
    if said:
        raise PlanError(f"no images kpac reads in the inputs, only {said[0]}: not supported; {said[1]}")


def unread_images_said(inputs: list[str], recursive: bool) -> tuple[str, str] | None:
    """The images of formats kpac does not read in the input folders, as "2 HEIC files, 1 WebP
    file", and what to do about them (convert them; for HEIC, or install the heic extra); None
    when there are none."""
    counts = unread_images([i for i in inputs if i != STDIO], recursive=recursive)
    if not counts:
        return None
    what = ", ".join(f"{n} {name} file{'s' if n != 1 else ''}" for name, n in counts.items())
    heic = f" (or, for HEIC, {HEIC_INSTALL_HINT})" if {"HEIC", "HEIF"} & counts.keys() else ""
    return what, f"convert them to JPEG, PNG or TIFF{heic}"


def no_folder_to_recurse(inputs: list[str]) -> str | None:
    """What to say of ``--recursive`` when no input is a folder (files, stdin): it has no
    sub-folders to descend into; None when one is a folder."""
    if any(i != STDIO and Path(i).is_dir() for i in inputs):
        return None
    return "--recursive: no input is a folder, so there are no sub-folders to descend into; it changes nothing here"


def options_without_effect(jobs: list[Job], inputs: list[str], *, recursive: bool, overwrite: bool,
                           raw_options: list[str], jpeg_quality: bool) -> list[str]:
    """What to say of the options given that no job of the plan uses: ``--recursive`` with no
    input folder, ``--overwrite`` with no output file, the ``raw_options`` given (their flags)
    with no camera RAW input, a ``jpeg_quality`` given with no JPEG output. Notes rather than
    usage errors: which inputs are RAW and which outputs JPEG is known only once the folders
    are listed, and the run is the same without them."""
    notes = []
    if recursive and (said := no_folder_to_recurse(inputs)):
        notes.append(said)
    if overwrite and all(job.output is None for job in jobs):
        notes.append("--overwrite: -o - writes to stdout, with no output file to replace; it changes nothing here")
    if raw_options and not any(_input_format(source) == "raw" for job in jobs for source in _sources(job)):
        notes.append(f"{', '.join(raw_options)}: no input is a camera RAW file, and these options develop RAW files "
                     "only; they change nothing here")
    if jpeg_quality and not any(job.format == "jpeg" for job in jobs):
        written = " and ".join(sorted({job.format.upper() for job in jobs}))
        notes.append(f"--jpeg-quality: no output is a JPEG (this run writes {written}); it changes nothing here")
    return notes


def _sources(job: Job) -> list[Path | bytes]:
    """The files (or bytes) a job reads: its image, or the views of a dual-pixel pair."""
    if isinstance(job.source, DualPixelTriple):
        return [view for view in (job.source.left, job.source.right, job.source.center) if view is not None]
    return [job.source]


def _companion(output: Path, kind: str) -> Path:
    """Where the ``kind`` companion of ``output`` is written (``a.png`` -> ``a_blurmap.png``)."""
    return output.with_name(output.stem + COMPANIONS[kind])


def _with_companions(job: Job, companions: tuple[str, ...]) -> Job:
    if job.output is not None:
        job.companions = {k: _companion(job.output, k) for k in companions}
    return job


def _check_claims(jobs: list[Job], options: OutputOptions) -> None:
    """No two jobs write one file (outputs and companions alike)."""
    sources = {job.input_label: job.source for job in jobs}
    outputs = {job.output for job in jobs if job.output is not None}
    for writer, dst, first in outputs_claimed_twice((job.input_label, dst) for job in jobs for dst in job.destinations):
        hint = _forced_format_hint(sources[writer], sources[first], options) if dst in outputs else ""  # not a companion
        raise PlanError(describe_clash(writer, first, dst, sources) + hint)


def _forced_format_hint(a: Any, b: Any, options: OutputOptions) -> str:
    """Advice for two outputs that --format (or --bit-depth 32, TIFF) gave one name, which
    each input's own format would have kept apart; "" when the option is not the cause."""
    flag = "--bit-depth 32" if options.bit_depth == 32 else f"--format {options.format}" if options.format else None
    if flag is None or isinstance(a, DualPixelTriple) or isinstance(b, DualPixelTriple):
        return ""
    own = OutputOptions()
    if _output_format(a, own) == _output_format(b, own):
        return ""
    return f"; or leave out {flag}, so that each keeps its own format"


def describe_clash(writer: str, first: str, output: Path, sources: dict[str, Any]) -> str:
    """What to tell of two inputs (labels, with ``sources`` by label) that claim one ``output``:
    one file named twice, one name in two formats (a camera's RAW+JPEG pair), or two files
    that need separate outputs."""
    a, b = sources.get(writer), sources.get(first)
    if writer == first or (isinstance(a, Path) and isinstance(b, Path) and os.path.realpath(a) == os.path.realpath(b)):
        return f"{writer} is given twice (as {first} too); name each input once"
    if isinstance(a, Path) and isinstance(b, Path) and a.stem == b.stem and a.suffix.lower() != b.suffix.lower():
        # renaming a camera's files is no answer: one run per format, each into its own folder
        return (f"{writer} and {first} would both be written to {output}: one name in two formats (as a camera's "
                f"RAW+JPEG pair) gives one output name; write each format to its own output folder, one run each "
                f"(the *{b.suffix} files, then the *{a.suffix} files)")
    return f"{writer} and {first} would both be written to {output}; give them separate output folders or rename one"


def plan_single(
    inputs: list[str],
    output: str,
    recursive: bool,
    options: OutputOptions,
    stdin: bytes | None = None,
    companions: tuple[str, ...] = (),
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[Job]:
    """Jobs for single-image deblurring, with output paths and formats decided up front.

    ``-o`` names a folder (it exists, ends with ``/``, or there are several inputs) or, for
    one input, a file whose extension must be an image format's. Files of a folder input that
    this command would itself write (a previous run's outputs in the input folder or in an
    output folder inside it) are not taken as inputs, so a rerun never deblurs its own output.
    ``companions``: kinds of :data:`COMPANIONS` written beside each output; their names are
    checked for clashes like the outputs'. An input that is a pipe or a device is read here,
    at most what an image within ``max_pixels`` takes.
    """
    _check_suffix(options.suffix)
    if STDIO in inputs:
        if len(inputs) != 1:
            raise PlanError("'-' (stdin) cannot be mixed with other inputs")
        data = stdin if stdin is not None else b""
        if output == STDIO:
            return [Job("stdin", data, None, "<stdin>", _output_format(data, options))]
        if names_folder(output):
            raise PlanError("with stdin input, -o must be '-' or a file path")
        job = Job("stdin", data, Path(output), "<stdin>", _file_target_format(output, options))
        return [_with_companions(job, companions)]
    out = Path(output)
    files = collect_inputs(inputs, recursive, exclude=None if output == STDIO else out)
    if not files:
        raise PlanError("no images found in the inputs")
    sources: list[Path | bytes] = [src if src.is_file() else _read_named_stream(src, max_pixels) for src, _ in files]  # a pipe is read once
    if output == STDIO:
        if len(files) != 1:
            raise PlanError("-o - (stdout) takes exactly one input image")
        return [Job(files[0][1].stem, sources[0], None, str(files[0][0]), _output_format(sources[0], options))]
    if len(files) == 1 and not Path(inputs[0]).is_dir() and not names_folder(output) and out.suffix != "":
        job = Job(files[0][1].stem, sources[0], out, str(files[0][0]), _file_target_format(output, options))
        return [_with_companions(job, companions)]
    if out.exists() and not out.is_dir():
        what = "an existing file" if out.is_file() else "neither a folder nor a regular file"
        advice = ("an image file name (.png, .tif, .jpg) or a folder" if len(files) == 1
                  else f"a folder for the {len(files)} inputs")
        raise PlanError(f"-o {output} is {what}; give {advice}")
    _refuse_image_name_for_folder(output, f"{len(files)} inputs" if len(files) > 1 else None, "the input")
    jobs = []
    for (src, rel), source in zip(files, sources):
        fmt = _output_format(source, options)
        dst = out / _output_name(rel, src, fmt, options.suffix)
        jobs.append(_with_companions(Job(rel.stem, source, dst, str(src), fmt), companions))
    # A previous run's outputs found in an input folder are not inputs, so a rerun never
    # deblurs its own output: a file there that another job writes as a companion, or as an
    # output with --suffix. Without a suffix an output's name is a photo's plain name
    # (a.tif -> a.jpg with --format jpeg): such a file stays an input, and the clash is
    # refused below rather than guessed. Files named on the command line are always inputs.
    # With a suffix, an earlier run's output in another format counts too (a_s.jpg, then a
    # run with --format png writing a_s.png): outputs are matched by name without extension.
    # Companions count whether this run writes them or not: an earlier run with --save-blurmap
    # left maps that a run without it must not take for photos.
    named = {_entry_key(Path(i)) for i in inputs if not Path(i).is_dir()}
    derived = {_entry_key(p): i for i, j in enumerate(jobs)
               for p in ([j.output.with_suffix("")] if options.suffix else [])
               + [_companion(j.output, kind) for kind in COMPANIONS]}

    def writer_of(src: Path, i: int) -> int:
        key = _entry_key(src)
        return derived.get(key, derived.get(key.with_suffix(""), i) if options.suffix else i)

    keep = [writer_of(src, i) == i or _entry_key(src) in named for i, (src, _) in enumerate(files)]
    jobs = [j for j, k in zip(jobs, keep) if k]
    if not jobs:
        raise PlanError("no images found in the inputs (only outputs of this command)")
    _check_claims(jobs, options)
    _check_inputs_kept(jobs)
    return jobs


def _entry_key(path: Path) -> Path:
    """One key per folder entry, however the folder is spelt: the folder with every link
    resolved (``-o`` may be a link to the input folder), and the entry's own name (a link
    named as an input is not the file it points to)."""
    return Path(os.path.realpath(path.parent)) / path.name


def _check_inputs_kept(jobs: list[Job]) -> None:
    """No job writes over another job's input (its own input is the preflight's to refuse)."""
    inputs = [(job.input_label, job.source) for job in jobs if isinstance(job.source, Path)]
    outputs = [(job.input_label, dst) for job in jobs for dst in job.destinations]
    for writer, _, owner in inputs_written_over(outputs, inputs):
        if owner != writer:
            raise PlanError(f"{writer} would be written over the input {owner}; use --suffix or another output folder")


def file_identity(path: Path) -> object:
    """One key per file, whatever the spelling: an existing file's device and inode (so
    symbolic and hard links match), else its resolved path."""
    try:
        st = path.stat()
        return (st.st_dev, st.st_ino)
    except OSError:
        pass
    try:
        return path.resolve()
    except OSError:
        return Path(os.path.abspath(path))


def inputs_written_over(outputs: Iterable[tuple[str, Path]], inputs: Iterable[tuple[str, Path]]) -> list[tuple[str, Path, str]]:
    """Every output that is the same file as an input, as (writer, output, input's owner).

    ``outputs`` and ``inputs`` are (label, path) pairs; the one check behind every command's
    promise that an input is never replaced, not even with --overwrite."""
    owners = {file_identity(Path(path)): label for label, path in inputs}
    return [(writer, path, owners[key]) for writer, path in outputs if (key := file_identity(Path(path))) in owners]


def outputs_claimed_twice(outputs: Iterable[tuple[str, Path]]) -> list[tuple[str, Path, str]]:
    """Every output that an earlier one already claims, as (writer, output, first claimant).

    ``outputs`` are (label, path) pairs, keyed by their path with every symbolic link resolved,
    so two spellings of one file (``out/a.png``, ``out/./a.png``, a link to ``out/``) clash.
    Not by inode, as inputs are: an output replaces its directory entry by a rename, so two
    hard links to one old file are still two outputs."""
    claimed: dict[str, str] = {}
    clashes = []
    for label, path in outputs:
        key = os.path.realpath(path)
        if key in claimed:
            clashes.append((label, path, claimed[key]))
        else:
            claimed[key] = label
    return clashes


def plan_dual(left: str, right: str | None, center: str | None, output: str, options: OutputOptions, companions: tuple[str, ...] = ()) -> list[Job]:
    try:
        # sizes and bit depths are checked per pair when it is read: a bad pair fails alone
        # a previous run's outputs in a view's folder (-o L/ --suffix _s) are no views
        outputs = (Path(output), options.suffix) if output != STDIO else None
        triples = pair_dual_pixel(Path(left), Path(right) if right else None, Path(center) if center else None, check=False,
                                  outputs=outputs)
    except ImageError as e:
        raise PlanError(str(e)) from None
    if output == STDIO:
        if len(triples) != 1:
            raise PlanError("-o - (stdout) takes exactly one dual-pixel pair")
        return [Job(triples[0].name, triples[0], None, str(triples[0].left), _output_format(triples[0].left, options))]
    _check_suffix(options.suffix)
    out = Path(output)
    if len(triples) == 1 and Path(left).is_file() and not names_folder(output) and out.suffix != "":
        return [_with_companions(Job(triples[0].name, triples[0], out, str(triples[0].left), _file_target_format(output, options)), companions)]
    if out.exists() and not out.is_dir():
        raise PlanError(f"-o {output} is an existing file; give a folder for {len(triples)} pair(s)")
    _refuse_image_name_for_folder(output, f"{len(triples)} pairs" if len(triples) > 1 else None, "--left")
    jobs = []
    for t in triples:
        fmt = _output_format(t.left, options)
        # t.name is the left view's stem without its view marker; dots in it are part of the name
        dst = out / _output_name(Path(t.name + t.left.suffix), t.left, fmt, options.suffix)
        jobs.append(_with_companions(Job(t.name, t, dst, str(t.left), fmt), companions))
    _check_claims(jobs, options)
    return jobs


def preflight(job: Job, options: OutputOptions) -> JobResult | None:
    """Refuse or skip a job before any work: returns a result, or None to go ahead."""
    if job.output is None:
        return None
    sources = [job.source] if isinstance(job.source, Path) else ([job.source.left, job.source.right] + ([job.source.center] if job.source.center else []) if isinstance(job.source, DualPixelTriple) else [])
    inputs = [(job.input_label, src) for src in sources]
    if inputs_written_over([(job.input_label, job.output)], inputs):
        return JobResult(job.input_label, str(job.output), "failed", f"{job.output}: output path is the input file; refusing to overwrite the original")
    if job.output.is_dir():
        return JobResult(job.input_label, str(job.output), "failed", f"{job.output}: output path is an existing directory")
    blocker = not_a_folder(job.output.parent)
    if blocker is not None:  # the write would fail after the work: say it before
        return JobResult(job.input_label, str(job.output), "failed",
                         f"{job.output}: cannot create its folder: {blocker} is not a folder")
    if job.output.exists() and not job.output.is_file():
        # e.g. a device or a FIFO: replacing it by renaming a file over it would destroy it
        return JobResult(job.input_label, str(job.output), "failed", f"{job.output}: output path exists and is not a regular file")
    if job.output.exists():
        if options.skip_existing and all(path.exists() for path in job.companions.values()):
            # the kept companions are named, as the record of a run that wrote them names them
            return JobResult(job.input_label, str(job.output), "skipped",
                             extra={kind: str(path) for kind, path in job.companions.items()})
        # with --skip-existing and a companion missing (an earlier run without --save-blurmap)
        # the job runs for the companion; run_batch keeps the output (_kept_output)
        if not (options.overwrite or options.skip_existing):
            return JobResult(job.input_label, str(job.output), "failed", f"{job.output}: exists (use --overwrite to replace it or --skip-existing to keep it)")
    for path in job.companions.values():
        if inputs_written_over([(job.input_label, path)], inputs):
            return JobResult(job.input_label, str(job.output), "failed", f"{path}: would be written over the input file; refusing")
        if path.exists() and not (options.overwrite or options.skip_existing):
            # checked before any work; with --skip-existing a finished companion is kept
            return JobResult(job.input_label, str(job.output), "failed", f"{path}: exists (use --overwrite to replace it or --skip-existing to keep it)")
    return None


def not_a_folder(folder: Path) -> Path | None:
    """The existing path that keeps ``folder`` from being a folder (itself or the nearest
    ancestor that exists, when that is a file), or None."""
    for path in (folder, *folder.parents):
        if path.exists():
            return None if path.is_dir() else path
    return None


Loaded = tuple[np.ndarray, np.ndarray | None, ImageInfo]


def load_job(job: Job, max_pixels: int, raw_options: RawOptions | None) -> Loaded:
    if isinstance(job.source, DualPixelTriple):
        views, center, info = read_dual_pixel(job.source, max_pixels=max_pixels, raw_options=raw_options)
        return views, center, info
    image, info = read_image(job.source, max_pixels=max_pixels, raw_options=raw_options)
    return image, None, info


def run_batch(
    deblurrer: Deblurrer,
    jobs: list[Job],
    options: OutputOptions,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    raw_options: RawOptions | None = None,
    on_result: Callable[[JobResult], None] | None = None,
    on_start: Callable[[Job], ProgressFn | None] | None = None,
    stdout_sink: Callable[[bytes], None] | None = None,
    after_run: Callable[[Job, Any, ImageInfo], dict[str, Any] | None] | None = None,
) -> list[JobResult]:
    """Deblur every job; returns one result per job: first those settled before any work
    (skipped, refused by :func:`preflight`), then the others in the order of ``jobs``.

    Reading of job i+1 and writing of job i-1 overlap with the model running on job i.
    ``on_start(job)`` may return a per-image progress callback; ``after_run`` may write extra
    outputs from the same inference (e.g. blur maps) and returns extra record fields.
    If an exception (e.g. KeyboardInterrupt) stops the batch, the write in flight is finished and
    reported through ``on_result`` before the exception propagates.
    """
    for folder in {j.output.parent for j in jobs if j.output is not None}:
        if folder.is_dir():
            cleanup_stale_temps(folder)
    results: list[JobResult] = []
    runnable = []
    for job in jobs:
        pre = preflight(job, options)
        if pre is not None:
            results.append(pre)
            if on_result:
                on_result(pre)
        else:
            runnable.append(job)

    reader = ThreadPoolExecutor(1, thread_name_prefix="kpac-read")
    writer = ThreadPoolExecutor(1, thread_name_prefix="kpac-write")
    pending_write: tuple[Job, JobResult, Future, list[Path]] | None = None

    def finish_write() -> None:
        nonlocal pending_write
        if pending_write is None:
            return
        job, res, fut, fresh = pending_write
        pending_write = None
        try:
            data = fut.result()
            if job.output is None and stdout_sink is not None and data is not None:
                stdout_sink(data)
        except OutputAppeared as e:
            # another process (e.g. a second run on the same folder) wrote it meanwhile
            res.status, res.error = ("skipped", None) if options.skip_existing else ("failed", _one_line(e, job.output))
        except (ImageError, OSError) as e:
            res.status, res.error = "failed", _one_line(e, job.output or "<stdout>")
            # the companions this job wrote (its blur map) go with the image that could not be
            # written: no partial result, and a rerun of the same command is not refused for
            # them. (Not when the image appeared meanwhile: its maker may have written them.)
            for path in fresh:
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    pass
        results.append(res)
        if on_result:
            on_result(res)

    try:
        next_read = reader.submit(load_job, runnable[0], max_pixels, raw_options) if runnable else None
        for i, job in enumerate(runnable):
            t0 = time.perf_counter()
            fut, next_read = next_read, None
            if i + 1 < len(runnable):
                next_read = reader.submit(load_job, runnable[i + 1], max_pixels, raw_options)
            try:
                image, center, info = fut.result()
                progress = on_start(job) if on_start else None
                # A RAW developed to linear light (--raw-linear) is shown to the model on the
                # tone curve it was trained on, and its result is written back in linear light.
                linear = info.format == "raw" and raw_options is not None and raw_options.gamma == "linear"
                # colours under alpha 0 are not shown to the model (they would fringe the
                # visible edge) and are written back as they were; the photo is the centre
                # view of a dual-pixel pair
                photo = image if center is None else center
                if center is None:
                    seen, hidden = fill_transparent(image, info.alpha)
                else:  # the views and the centre view in one pass
                    seen, hidden = fill_transparent(np.concatenate([image, center], axis=2), info.alpha)
                    seen, center = seen[..., :-3], seen[..., -3:]
                    center = srgb_encode(center) if linear else center
                result = deblurrer.run(srgb_encode(seen) if linear else seen, center, progress, keep_attention=after_run is not None,
                                       orientation=info.orientation_applied)
                out = (result.output[0].permute(1, 2, 0) + 1) * 0.5
                # float output is the raw network output; integer formats are clipped to [0, 1]
                out = (out if options.bit_depth == 32 else out.clamp_(0, 1)).numpy()
                if linear:
                    out = srgb_decode(out)
                if hidden is not None:
                    out[hidden] = photo[hidden]
                fresh = [p for p in job.companions.values() if not p.exists()]  # what after_run would create
                extra = (after_run(job, result, info) or {}) if after_run else {}
            except (ImageError, ValueError, MemoryError, OSError) as e:
                finish_write()
                res = JobResult(job.input_label, None if job.output is None else str(job.output), "failed", _one_line(e, job.input_label), seconds=time.perf_counter() - t0)
                results.append(res)
                if on_result:
                    on_result(res)
                continue
            stats = deblurrer.last_stats  # this image's run (records are reported later, after its write)
            extra["precision"] = stats.precision
            extra["tile"] = stats.tile  # what ran (None: the whole image), after auto and OOM halving
            kept = bool(fresh) and _kept_output(job, options)
            notes = list(stats.notes) + (_what_is_not_kept(job, info, options) if not kept else
                                         [f"the output exists and was kept (--skip-existing); only {', '.join(p.name for p in fresh)} "
                                          "was written beside it"])
            if notes:
                extra["notes"] = notes
            if deblurrer.options.strength != 1.0:
                extra["strength"] = deblurrer.options.strength
            if deblurrer.options.ensemble != 1:
                extra["ensemble"] = deblurrer.options.ensemble
            if deblurrer.options.compile:
                extra["compile_seconds"] = round(stats.compile_seconds, 3)
            res = JobResult(job.input_label, "-" if job.output is None else str(job.output), "skipped" if kept else "ok",
                            size=tuple(out.shape[:2]), seconds=time.perf_counter() - t0, extra=extra)
            finish_write()  # keep at most one write in flight, and results in order
            if kept:
                results.append(res)
                if on_result:
                    on_result(res)
                continue
            pending_write = (job, res, writer.submit(_write, job, out, info, options), fresh)
        finish_write()
    except BaseException:
        # Interrupted (Ctrl-C, or SIGTERM turned into an exception by the CLI): the image being
        # deblurred is dropped, but the write in flight is finished and reported, so that every
        # file on disk has its record (--json) and the summary counts it.
        try:
            finish_write()
        except BaseException:  # a second interrupt: the first exception is the one to report
            pass
        raise
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)
    return results


def _kept_output(job: Job, options: OutputOptions) -> bool:
    """Whether a job that wrote companions ran for them alone: its output exists, and
    --skip-existing keeps it (an earlier run without --save-blurmap wrote it)."""
    return options.skip_existing and job.output is not None and job.output.exists()


def _what_is_not_kept(job: Job, info: ImageInfo, options: OutputOptions) -> list[str]:
    """What of the input the output cannot carry, said rather than dropped silently."""
    notes = []
    if info.format == "raw" and info.exif is None:  # read from TIFF-based RAW only (images.io._raw_exif)
        notes.append("camera RAW: no EXIF was read from this file (kpac reads it from TIFF-based RAW such as DNG, NEF, "
                     "CR2, ARW): the camera's tags are not copied to the developed image")
    if info.frames > 1 and info.format == "heif":
        notes.append(f"only the primary image of the {info.frames} in the HEIF file (a burst, a collection) was deblurred")
    elif info.frames > 1:
        notes.append(f"only the first of {info.frames} frames (pages) was deblurred")
    if info.hdr_gain_map_dropped:  # the reader counts it as no frame
        kind = "HEIF" if info.format == "heif" else "JPEG"
        notes.append(f"the {kind}'s HDR gain map was dropped: the output is its SDR rendition")
    colour_space = color_space_note(info, job.format)
    if colour_space:
        notes.append(colour_space)
    if info.motion_photo_dropped:
        notes.append("the motion photo's video was dropped: the output is the still picture")
    if info.dropped_extra_samples:  # neither colour nor alpha: no output format would know what they are
        n = info.dropped_extra_samples
        notes.append(f"{n} extra channel{'s' if n != 1 else ''} of the TIFF beyond colour and alpha (a stored selection, "
                     f"depth, a mask) {'were' if n != 1 else 'was'} left out")
    if info.clipped_float_values:  # the model takes [0, 1]: the read clipped them
        n = info.clipped_float_values
        notes.append(f"{n:,} float value{'s' if n != 1 else ''} outside [0, 1] {'were' if n != 1 else 'was'} clipped")
    colour = colour_other_than_srgb(info.png_chunks)
    if job.format != "png" and colour and info.icc_profile is None:
        notes.append(f"{job.format.upper()} cannot hold the PNG's colour space ({', '.join(colour)}, not sRGB): "
                     "written untagged, which readers take for sRGB")
    text = [bytes(data).split(b"\0", 1)[0].decode("latin-1") for ctype, data in info.png_chunks if bytes(ctype) in TEXT_CHUNKS]
    if job.format != "png" and text:
        notes.append(f"{job.format.upper()} cannot hold the PNG's text chunks ({', '.join(text)}): dropped")
    segments = jpeg_segment_names(info.jpeg_segments)
    if job.format != "jpeg" and segments:  # JPEG segments with no place in PNG or TIFF
        notes.append(f"{job.format.upper()} output does not carry the JPEG's {' and '.join(segments)}: dropped "
                     "(--format jpeg keeps them)")
    if job.format == "png" and info.bit_depth == 32 and options.bit_depth is None:
        notes.append("PNG holds at most 16 bits: the float image was written as 16-bit")
    if job.format == "tiff" and has_tags_beyond_descriptive(info.exif):
        notes.append("TIFF output carries only the descriptive EXIF tags (Make, Model, DateTime, Artist, Copyright, "
                     "Software, ImageDescription): the others (exposure, lens, capture time, GPS, ...) were not copied")
    if job.format == "jpeg":
        if info.alpha is not None:
            notes.append("JPEG has no alpha channel: the transparency was dropped")
        if options.bit_depth is None and info.bit_depth > 8:  # not when 8 bits were asked for
            notes.append("JPEG holds 8 bits: written as 8-bit")
        elif options.bit_depth == 16:  # a folder's JPEG photos stay JPEG: the option cannot apply to them
            notes.append("JPEG holds 8 bits: written as 8-bit, not the 16 of --bit-depth (--format png or tiff keeps 16)")
        if info.exif is not None and len(info.exif) > JPEG_MAX_EXIF:
            notes.append(f"the EXIF metadata ({len(info.exif):,} bytes) is too large for a JPEG segment: dropped")
        if info.dpi is not None and any(round(v) > JPEG_MAX_DPI for v in info.dpi):
            notes.append(f"JPEG holds a print resolution of at most {JPEG_MAX_DPI:,} dpi: the input's "
                         f"{round(max(info.dpi)):,} dpi was dropped")
        xmp = written_xmp(info.xmp, height=info.size[0], width=info.size[1])  # as the encoder will write it
        if xmp is not None and len(xmp) > JPEG_MAX_XMP:
            notes.append(f"the XMP metadata ({len(xmp):,} bytes) is too large for a JPEG segment: dropped")
    return notes


class OutputAppeared(ImageError):
    """The output file was created by someone else while its image was being deblurred."""


def _write(job: Job, image: np.ndarray, info: ImageInfo, options: OutputOptions) -> bytes | None:
    data = write_image(None, image, info, format=job.format, bit_depth=options.bit_depth, jpeg_quality=options.jpeg_quality)
    if job.output is None:
        return data
    try:
        write_output(job.output, data, replace=options.overwrite)
    except FileExistsError:  # another process created it since the preflight: never clobber
        raise OutputAppeared(job.output, "appeared while processing; not overwritten (use --overwrite)") from None
    return None


def _one_line(err: BaseException, label: object) -> str:
    msg = " ".join(str(err).split()) or type(err).__name__
    label = str(label)
    return msg if label in msg else f"{label}: {msg}"



def deblur_file(
    deblurrer: Deblurrer,
    source: str | Path,
    output: str | Path,
    options: OutputOptions | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    raw_options: RawOptions | None = None,
) -> JobResult:
    """Deblur one file into ``output`` with the same guarantees as ``kpac deblur``.

    >>> deblur_file(Deblurrer("kpac-3level"), "IMG_0042.CR2", "sharp.tif")   # doctest: +SKIP

    The format is the one ``output``'s extension names (.png, .tif/.tiff, .jpg/.jpeg; any
    other name, or one that contradicts ``options``, raises ValueError); the bit depth follows
    the input (or ``options``). The write is atomic and an existing ``output`` is kept unless
    ``options.overwrite``. Failures of the work itself are returned, not raised: check
    ``result.status`` and ``result.error``.
    """
    source, output, options = Path(source), Path(output), options or OutputOptions()
    job = Job(source.stem, source, output, str(source), _file_target_format(str(output), options))
    return run_batch(deblurrer, [job], options, max_pixels=max_pixels, raw_options=raw_options)[0]
