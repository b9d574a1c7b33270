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
from typing import Any, Callable

import numpy as np

from ..images import (
    DEFAULT_MAX_PIXELS,
    DualPixelTriple,
    ImageError,
    ImageInfo,
    RawOptions,
    atomic_write_bytes,
    cleanup_stale_temps,
    list_images,
    pair_dual_pixel,
    read_dual_pixel,
    read_image,
    write_image,
)
from .deblurrer import Deblurrer
from .tiled import ProgressFn

STDIO = "-"
_EXT_FOR_FORMAT = {"png": ".png", "tiff": ".tif", "jpeg": ".jpg"}


class PlanError(ValueError):
    """The command line names inputs/outputs that cannot work (a usage error)."""


@dataclass
class OutputOptions:
    format: str | None = None  # png | tiff | jpeg; default: the input's (RAW -> tiff)
    bit_depth: int | None = None  # 8 | 16 | 32 (float32 TIFF, unclipped); default: the input's
    suffix: str = ""
    overwrite: bool = False
    skip_existing: bool = False
    jpeg_quality: int = 95


@dataclass
class Job:
    name: str
    source: Path | bytes | DualPixelTriple  # a file, stdin bytes, or a dual-pixel triple
    output: Path | None  # None: write to stdout
    input_label: str


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
        }
        if deblurrer is not None:
            rec.update(model=deblurrer.name, device=str(deblurrer.device))
        rec.update(self.extra)
        return rec


def _output_ext(source_path: Path | None, options: OutputOptions) -> str:
    if options.bit_depth == 32:
        return ".tif"
    if options.format:
        return _EXT_FOR_FORMAT[options.format]
    if source_path is None:
        return ".png"
    ext = source_path.suffix.lower()
    return ext if ext in (".png", ".tif", ".tiff", ".jpg", ".jpeg") else ".tif"  # RAW -> 16-bit TIFF


def collect_inputs(inputs: list[str], recursive: bool) -> list[tuple[Path, Path]]:
    """(file, path relative to the folder it came from) for every image named or found."""
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            try:
                files = list_images(p, recursive=recursive)
            except OSError as e:
                raise PlanError(f"cannot list {item} ({e.strerror or e})") from None
            found += [(f, f.relative_to(p)) for f in files]
        elif p.exists():
            found.append((p, Path(p.name)))
        else:
            raise PlanError(f"input not found: {item}")
    return found


def plan_single(inputs: list[str], output: str, recursive: bool, options: OutputOptions, stdin: bytes | None = None) -> list[Job]:
    """Jobs for single-image deblurring, with output paths decided up front."""
    if STDIO in inputs:
        if len(inputs) != 1:
            raise PlanError("'-' (stdin) cannot be mixed with other inputs")
        if output != STDIO and Path(output).is_dir():
            raise PlanError("with stdin input, -o must be '-' or a file path")
        return [Job("stdin", stdin if stdin is not None else b"", None if output == STDIO else Path(output), "<stdin>")]
    files = collect_inputs(inputs, recursive)
    if not files:
        raise PlanError("no images found in the inputs")
    out = Path(output)
    single_file_target = len(files) == 1 and not Path(inputs[0]).is_dir() and output != STDIO and not out.is_dir() and out.suffix != ""
    if output == STDIO:
        if len(files) != 1:
            raise PlanError("-o - (stdout) takes exactly one input image")
        return [Job(files[0][1].stem, files[0][0], None, str(files[0][0]))]
    jobs: list[Job] = []
    claimed: dict[Path, str] = {}
    for src, rel in files:
        if single_file_target:
            dst = out
        else:
            dst = out / rel.parent / f"{rel.stem}{options.suffix}{_output_ext(src, options)}"
        jobs.append(Job(rel.stem, src, dst, str(src)))
        if dst in claimed:
            raise PlanError(f"{src} and {claimed[dst]} would both be written to {dst}; use --suffix or keep their formats")
        claimed[dst] = str(src)
    return jobs


def plan_dual(left: str, right: str, center: str | None, output: str, options: OutputOptions) -> list[Job]:
    try:
        # sizes and bit depths are checked per pair when it is read: a bad pair fails alone
        triples = pair_dual_pixel(Path(left), Path(right), Path(center) if center else None, check=False)
    except ImageError as e:
        raise PlanError(str(e)) from None
    if output == STDIO:
        if len(triples) != 1:
            raise PlanError("-o - (stdout) takes exactly one dual-pixel pair")
        return [Job(triples[0].name, triples[0], None, str(triples[0].left))]
    out = Path(output)
    single = len(triples) == 1 and Path(left).is_file() and not out.is_dir() and out.suffix != ""
    jobs = []
    for t in triples:
        dst = out if single else out / f"{Path(t.name).stem}{options.suffix}{_output_ext(t.left, options)}"
        jobs.append(Job(Path(t.name).stem, t, dst, str(t.left)))
    return jobs


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def preflight(job: Job, options: OutputOptions) -> JobResult | None:
    """Refuse or skip a job before any work: returns a result, or None to go ahead."""
    if job.output is None:
        return None
    sources = [job.source] if isinstance(job.source, Path) else ([job.source.left, job.source.right] + ([job.source.center] if job.source.center else []) if isinstance(job.source, DualPixelTriple) else [])
    for src in sources:
        if _same_file(src, job.output):
            return JobResult(job.input_label, str(job.output), "failed", f"{job.output}: output path is the input file; refusing to overwrite the original")
    if job.output.is_dir():
        return JobResult(job.input_label, str(job.output), "failed", f"{job.output}: output path is an existing directory")
    if job.output.exists() and not job.output.is_file():
        # e.g. a device or a FIFO: replacing it by renaming a file over it would destroy it
        return JobResult(job.input_label, str(job.output), "failed", f"{job.output}: output path exists and is not a regular file")
    if job.output.exists():
        if options.skip_existing:
            return JobResult(job.input_label, str(job.output), "skipped")
        if not options.overwrite:
            return JobResult(job.input_label, str(job.output), "failed", f"{job.output}: exists (use --overwrite to replace it or --skip-existing to keep it)")
    return None


Loaded = tuple[np.ndarray, np.ndarray | None, ImageInfo]


def load_job(job: Job, max_pixels: int, raw_options: RawOptions | None) -> Loaded:
    if isinstance(job.source, DualPixelTriple):
        views, center, info = read_dual_pixel(job.source, max_pixels=max_pixels)
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
    """Deblur every job; returns one result per job, in order.

    Reading of job i+1 and writing of job i-1 overlap with the model running on job i.
    ``on_start(job)`` may return a per-image progress callback; ``after_run`` may write extra
    outputs from the same inference (e.g. blur maps) and returns extra record fields.
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
    pending_write: tuple[Job, JobResult, Future] | None = None

    def finish_write() -> None:
        nonlocal pending_write
        if pending_write is None:
            return
        job, res, fut = pending_write
        pending_write = None
        try:
            data = fut.result()
            if job.output is None and stdout_sink is not None and data is not None:
                stdout_sink(data)
        except (ImageError, OSError) as e:
            res.status, res.error = "failed", _one_line(e, job.output)
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
                result = deblurrer.run(image, center, progress, keep_attention=after_run is not None)
                out = (result.output[0].permute(1, 2, 0) + 1) * 0.5
                # float output is the raw network output; integer formats are clipped to [0, 1]
                out = (out if options.bit_depth == 32 else out.clamp_(0, 1)).numpy()
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
            if stats.notes:
                extra["notes"] = list(stats.notes)
            if deblurrer.options.strength != 1.0:
                extra["strength"] = deblurrer.options.strength
            if deblurrer.options.compile:
                extra["compile_seconds"] = round(stats.compile_seconds, 3)
            res = JobResult(job.input_label, "-" if job.output is None else str(job.output), "ok", size=tuple(out.shape[:2]), seconds=time.perf_counter() - t0, extra=extra)
            finish_write()  # keep at most one write in flight, and results in order
            pending_write = (job, res, writer.submit(_write, job, out, info, options))
        finish_write()
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)
    return results


def _write(job: Job, image: np.ndarray, info: ImageInfo, options: OutputOptions) -> bytes | None:
    if job.output is not None:
        job.output.parent.mkdir(parents=True, exist_ok=True)
        if job.output.exists() and not options.overwrite:
            # another process created it since the preflight: never clobber
            raise ImageError(f"{job.output}: appeared while processing; not overwritten (use --overwrite)")
    if options.bit_depth == 32:
        return _write_float_tiff(job.output, image)
    fmt = options.format
    if fmt is None and job.output is not None:
        suffix = job.output.suffix.lower()
        fmt = {".png": "png", ".tif": "tiff", ".tiff": "tiff", ".jpg": "jpeg", ".jpeg": "jpeg"}.get(suffix)
    if fmt is None and info.format == "raw":
        fmt = "tiff"
    return write_image(job.output, image, info, format=fmt, bit_depth=options.bit_depth, jpeg_quality=options.jpeg_quality)


def _write_float_tiff(path: Path | None, image: np.ndarray) -> bytes | None:
    """float32 RGB TIFF of the unclipped output (values in [0, 1] units, may exceed them)."""
    import io

    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.ascontiguousarray(image, dtype=np.float32), photometric="rgb", compression="zlib")
    if path is None:
        return buf.getvalue()
    atomic_write_bytes(path, buf.getvalue())
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

    Format and bit depth follow the input (or ``options``); the write is atomic and an
    existing ``output`` is kept unless ``options.overwrite``. Failures are returned, not
    raised: check ``result.status`` and ``result.error``.
    """
    source, output = Path(source), Path(output)
    job = Job(source.stem, source, output, str(source))
    return run_batch(deblurrer, [job], options or OutputOptions(), max_pixels=max_pixels, raw_options=raw_options)[0]
