"""Writing a synthetic training/test set in the DPDD directory layout: :func:`write_dataset`."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .. import __version__
from .render import SynthSettings, synthesize
from .scenes import resize_scene
from .sources import Source, file_sha256

__all__ = ["write_dataset", "dataset_dirs", "draw_order", "existing_files", "left_incomplete", "is_dataset_folder",
           "repeated_samples", "DatasetExistsError"]


class DatasetExistsError(FileExistsError):
    """The destination already holds files where :func:`write_dataset` writes (see ``overwrite``)."""


def dataset_dirs(split: str, dual_pixel: bool) -> dict[str, str]:
    """Relative directories of a DPDD-style split, by role.

    ``blurred``: ``{split}_c/source``, ``sharp``: ``{split}_c/target``, ``radius``:
    ``{split}_c/radius`` and, for dual pixel, ``left``: ``{split}_l/source``, ``right``:
    ``{split}_r/source`` (the layout of the DPDD dataset of Abuolaim & Brown, ECCV 2020).
    """
    dirs = {"blurred": f"{split}_c/source", "sharp": f"{split}_c/target", "radius": f"{split}_c/radius"}
    if dual_pixel:
        dirs.update(left=f"{split}_l/source", right=f"{split}_r/source")
    return dirs


def manifest_name(split: str) -> str:
    return f"synth_{split}.json"


def _in_progress_name(split: str) -> str:
    """Present from the first sample until the manifest is written: a run killed between
    them leaves it, so its samples are still known as kpac's."""
    return f".synth_{split}.incomplete"


# How write_dataset names a sample's files: its index (5 digits or more), "_", the source's name.
_SAMPLE_FILE = re.compile(r"^\d{5,}_.+\.(png|tiff)$")


def is_dataset_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is one of the folders where :func:`write_dataset` put a split's files
    (``{split}_c/source``, ``{split}_c/target``, ``{split}_c/radius``, ``{split}_l/source`` or
    ``{split}_r/source``), beside that split's manifest or in-progress marker."""
    folder = Path(folder)
    parent = folder.parent.name
    if len(parent) < 3 or parent[-2] != "_" or parent[-1] not in "clr":
        return False
    split = parent[:-2]
    if f"{parent}/{folder.name}" not in dataset_dirs(split, True).values():
        return False
    root = folder.parent.parent
    return (root / manifest_name(split)).is_file() or (root / _in_progress_name(split)).is_file()


def left_incomplete(out_dir: str | Path, split: str = "train") -> bool:
    """Whether a run of :func:`write_dataset` for ``split`` stopped in ``out_dir`` after writing
    samples but before its manifest (a rerun needs ``overwrite``)."""
    out_dir = Path(out_dir)
    if not (out_dir / _in_progress_name(split)).is_file() or (out_dir / manifest_name(split)).is_file():
        return False
    return bool(existing_files(out_dir, split)[0])


def existing_files(out_dir: str | Path, split: str = "train") -> tuple[list[str], list[str]]:
    """What already lies where :func:`write_dataset` writes ``split`` in ``out_dir``.

    Returns ``(previous, others)``, paths relative to ``out_dir``: ``previous`` are a synthesised
    dataset's (the manifest ``synth_{split}.json``, the files it lists, and files named as
    write_dataset names samples, e.g. those of an interrupted run); ``others`` are anything else
    in the split's folders (of both the single-view and the dual-pixel layout). Hidden files
    (temporary files of atomic writes among them) are not counted.
    """
    out_dir = Path(out_dir)
    previous: list[str] = []
    listed: set[str] = set()
    manifest = out_dir / manifest_name(split)
    if manifest.is_file():
        previous.append(manifest.name)
        try:
            listed = {str(f) for f in json.loads(manifest.read_text(encoding="utf-8")).get("files", [])}
        except (OSError, ValueError, AttributeError):
            pass  # unreadable: its samples are still known by their names
    known = manifest.is_file() or (out_dir / _in_progress_name(split)).is_file()
    others: list[str] = []
    for d in dataset_dirs(split, True).values():
        folder = out_dir / d
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith("."):
                continue
            rel = f"{d}/{entry.name}"
            # named like a sample: ours only beside our manifest or our in-progress marker (a
            # killed run); without either it may be anybody's file, never to be deleted
            ours = entry.is_file() and (rel in listed or (known and _SAMPLE_FILE.match(entry.name) is not None))
            (previous if ours else others).append(rel)
    return previous, others


def _remove_stale(out_dir: Path, previous: list[str], written: set[str], dirs: dict[str, str], split: str) -> None:
    """Delete the previous dataset's files that this one did not rewrite, and the folders only it used."""
    for rel in previous:
        if rel not in written:
            (out_dir / rel).unlink(missing_ok=True)
    used = set(dirs.values())
    for d in dataset_dirs(split, True).values():
        if d in used:
            continue
        for folder in (out_dir / d, (out_dir / d).parent):
            try:
                folder.rmdir()  # only if empty: files kpac synth did not write stay
            except OSError:
                break


def _undo_setup(out_dir: Path, split: str, *, remove_marker: bool, remove_out_dir: bool) -> None:
    """Take back what :func:`write_dataset` made before its first sample, when it wrote none:
    its in-progress marker and the folders that are still empty."""
    if remove_marker:
        (out_dir / _in_progress_name(split)).unlink(missing_ok=True)
    _remove_stale(out_dir, [], set(), {}, split)  # rmdir only: a folder that holds anything stays
    if remove_out_dir:
        try:
            out_dir.rmdir()
        except OSError:
            pass


def _write_image(path: Path, image: np.ndarray, bit_depth: int) -> None:
    """8- or 16-bit RGB PNG, written atomically by the project's image writer."""
    from ..images import ImageInfo, write_image

    info = ImageInfo(path=None, format="png", bit_depth=bit_depth, channels=3, alpha=None, icc_profile=None,
                     exif=None, orientation_applied=1, size=image.shape[:2])
    write_image(path, image, info, format="png", bit_depth=bit_depth)


def _write_radius(path: Path, radius: np.ndarray) -> None:
    import io

    import tifffile

    from ..images import atomic_write_bytes

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.ascontiguousarray(radius, np.float32))
    atomic_write_bytes(path, buf.getvalue())


def _fit(image: np.ndarray, depth: np.ndarray | None, max_side: int | None):
    """Downscale so the long side is at most ``max_side`` (anti-aliased; depth by nearest
    neighbour so occlusion edges stay sharp). Large photos are softer per pixel than they are
    at a reduced size, and a smaller image makes a sharper target."""
    h, w = image.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return image, depth
    scale = max_side / max(h, w)
    return resize_scene(image, depth, (max(1, round(h * scale)), max(1, round(w * scale))))


def draw_order(sources: Sequence[Source]) -> list[Source]:
    """``sources`` in the order samples are assigned from them: by name (the name before a clash
    was resolved first, as ``kpac train`` orders its sources), so that the same photos listed in
    another order give the same dataset."""
    return sorted(sources, key=lambda s: (s.sort_key or s.name, s.name))


def _source_record(src: Source, size: tuple[int, ...] | None) -> dict[str, Any]:
    """What the manifest says of a source, so that the dataset can be regenerated and checked:
    its name, ``file`` or where kpac made it (``skimage:NAME``, ``procedural:INDEX``), and for
    a source that was loaded its size before ``max_side`` and, for a file, the SHA-256 of its
    bytes. No path: a rerun elsewhere writes the same manifest."""
    generated = src.origin.startswith(("skimage:", "procedural:"))
    record: dict[str, Any] = {"name": src.name, "origin": src.origin if generated else "file"}
    if size is not None:
        record["size"] = [int(size[0]), int(size[1])]
        if not generated:
            record["sha256"] = file_sha256(src.origin)
    return record


def _assign(n_sources: int, count: int, seed: int) -> list[int]:
    """Source index of each sample: every source is used once per round, rounds shuffled."""
    order: list[int] = []
    rnd = 0
    while len(order) < count:
        order.extend(int(i) for i in np.random.default_rng([seed, 1, rnd]).permutation(n_sources))
        rnd += 1
    return order[:count]


def repeated_samples(out_dir: str | Path, split: str, sources: Sequence[Source], count: int, seed: int, *,
                     crop: int | None = None, max_side: int | None = None) -> dict[str, int]:
    """How many of the samples :func:`write_dataset` would write repeat those of another split in ``out_dir``.

    Sample ``i`` draws from ``(seed, i)`` whatever the split, so a split written with the seed,
    ``crop`` and ``max_side`` of another, from the same sources, takes the same crops (and, with
    the same settings, renders the same pairs): a validation split that repeats the training
    split. Returns ``{other split: number of indices whose source (by name) is the same}``, for
    the splits whose manifest records the same seed, crop and max_side; others are left out.
    """
    sources = draw_order(sources)
    planned = {i: sources[s].name for i, s in enumerate(_assign(len(sources), count, seed))} if sources else {}
    repeats: dict[str, int] = {}
    for manifest in sorted(Path(out_dir).glob(manifest_name("*"))):
        other = manifest.name[len("synth_"):-len(".json")]  # the split in manifest_name(split)
        if other == split:
            continue
        try:
            summary = json.loads(manifest.read_text(encoding="utf-8"))
            if (summary.get("seed"), summary.get("crop"), summary.get("max_side")) != (seed, crop, max_side):
                continue
            done = {int(str(r["name"]).split("_", 1)[0]): str(r["source"]) for r in summary.get("samples", [])}
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            continue  # not a manifest kpac can read: nothing known to repeat
        same = sum(1 for i, name in planned.items() if done.get(i) == name)
        if same:
            repeats[other] = same
    return repeats


def write_dataset(sources: Sequence[Source], out_dir: Path, *, count: int, crop: int | None, seed: int,
                  settings: SynthSettings, split: str = "train", bit_depth: int = 8,
                  max_side: int | None = None, overwrite: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Synthesise ``count`` pairs from ``sources`` and write them in the DPDD layout.

    Files (``NAME = {index:05d}_{source name}``, the same in every directory):

    * ``{split}_c/source/NAME.png``: the defocused input (centre view for dual pixel)
    * ``{split}_c/target/NAME.png``: the sharp target
    * ``{split}_c/radius/NAME.tiff``: float32 signed blur radius in pixels (positive behind focus)
    * dual pixel only: ``{split}_l/source/NAME.png`` and ``{split}_r/source/NAME.png``
    * ``synth_{split}.json``: the summary (settings, seed, files, per-sample draws)

    Images are 8-bit PNG (as the paper's DPDD conversion) or, with ``bit_depth=16``, 16-bit
    RGB PNG (as DPDD itself is distributed).

    Parameters
    ----------
    sources : sequence of Source
        Sharp images (:func:`~kpac_cli.synth.sources.sharp_sources`). Each is used once per
        round of ``len(sources)`` samples, in a shuffled order, and loaded once. Their order
        does not matter (they are taken in :func:`draw_order`).
    out_dir : Path
        Root of the dataset (created if needed). It may hold other splits, but no files where
        this split is written (see :func:`existing_files`), unless ``overwrite``.
    count : int
        Number of samples to write.
    crop : int, optional
        Size of the square crop taken at a random position of each (downscaled) source; a
        source smaller than ``crop`` gives a smaller crop (never upscaled). The blur is
        computed on the crop plus a margin of ``ceil(max_radius) + 1`` pixels where the
        source has it, so the crop's borders see the out-of-crop content like a real lens.
        None: whole images.
    seed : int
        Non-negative. Sample ``i`` draws everything from ``numpy.random.default_rng([seed, i])``:
        the same seed, sources and settings give byte-identical files, whatever the ``split``
        (so a held-out split needs a seed of its own, see :func:`repeated_samples`).
    settings : SynthSettings
        Optics (``settings.dual_pixel`` selects the dual-pixel views).
    split : str
        Directory prefix, e.g. ``train``, ``val``, ``test``.
    bit_depth : {8, 16}
        Bit depth of the image files.
    max_side : int, optional
        Downscale sources whose long side is larger than this first.
    overwrite : bool
        Replace a synthesised dataset of the same split already in ``out_dir``: its files that
        this one does not rewrite are deleted once this one is written, so the folder holds one
        dataset. Without it such a dataset raises :class:`DatasetExistsError`; so do other files
        where the split is written, even with it (they are not kpac's to delete).
    progress : callable, optional
        Called as ``progress(done, count)`` after each sample.

    Returns
    -------
    dict
        ``count`` (written), ``requested``, ``seed``, ``split``, ``crop``, ``bit_depth``,
        ``max_side``, ``settings`` (dict), ``kpac_version``, ``sources`` (in :func:`draw_order`: each
        one's ``name``, ``origin`` (``file``, ``skimage:NAME`` or ``procedural:INDEX``) and, for
        those loaded, their ``size`` before ``max_side`` and a file's ``sha256``), ``dirs``,
        ``files`` (paths relative to ``out_dir``),
        ``samples`` (name, source, crop box ``[y, x, h, w]`` in the source's pixels after the
        ``max_side`` downscale, focus, strength, rotation),
        ``failed`` (sources that could not be loaded: their samples are skipped) and
        ``out_dir``. When every source failed, no sample is written, nor a manifest: the
        folders made for them are removed again, and a dataset already there (``overwrite``)
        is kept as it was. Once a sample is written, the manifest of a dataset being replaced is
        removed, so a run stopped before its end leaves no manifest that describes other files
        (the in-progress marker keeps the samples known as kpac's, for ``overwrite``).
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if crop is not None and crop < 1:
        raise ValueError(f"crop must be >= 1, got {crop}")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    if not sources:
        raise ValueError("no sources to synthesise from")
    if not split or "/" in split or "\\" in split or split.startswith("."):
        raise ValueError(f"split must be a plain name, got {split!r}")

    out_dir = Path(out_dir)
    sources = draw_order(sources)
    previous, others = existing_files(out_dir, split)
    if others:
        raise DatasetExistsError(f"{out_dir} holds files that write_dataset did not write where it writes the "
                                 f"{split!r} split (e.g. {others[0]})")
    if previous and not overwrite:
        raise DatasetExistsError(f"{out_dir} already holds a synthesised {split!r} dataset ({len(previous)} files); "
                                 "overwrite=True replaces it")
    dirs = dataset_dirs(split, settings.dual_pixel)
    if previous:
        from ..images.atomic import cleanup_stale_temps

        for d in dataset_dirs(split, True).values():
            if (out_dir / d).is_dir():
                cleanup_stale_temps(out_dir / d)  # left by a killed run
    made_out_dir = not out_dir.exists()
    marker = out_dir / _in_progress_name(split)
    marker_was_there = marker.exists()  # a killed run's: its samples stay known as kpac's
    for d in dirs.values():
        (out_dir / d).mkdir(parents=True, exist_ok=True)
    marker.touch()
    ext = ".png"
    width = max(5, len(str(max(count - 1, 0))))
    margin = int(math.ceil(settings.max_radius)) + 1

    assignment = _assign(len(sources), count, seed)
    by_source: dict[int, list[int]] = {}
    for i, s in enumerate(assignment):
        by_source.setdefault(s, []).append(i)

    records: dict[int, dict[str, Any]] = {}
    source_records = [_source_record(src, None) for src in sources]
    old_manifest = out_dir / manifest_name(split) if previous else None
    files: dict[int, list[str]] = {}
    failed: list[dict[str, str]] = []
    done = 0
    for s_idx in sorted(by_source, key=lambda k: by_source[k][0]):
        src = sources[s_idx]
        indices = by_source[s_idx]
        try:
            image, depth = src.load_with_depth()
            if depth is not None and depth.shape != image.shape[:2]:
                raise ValueError(f"depth map {depth.shape} does not match image {image.shape[:2]}")
            source_records[s_idx] = _source_record(src, image.shape[:2])
            image, depth = _fit(image, depth, max_side)
        except Exception as exc:  # one unreadable source must not stop the set
            failed.append({"source": src.name, "origin": src.origin, "error": f"{type(exc).__name__}: {exc}"})
            done += len(indices)
            if progress is not None:
                progress(done, count)
            continue
        h, w = image.shape[:2]
        for i in indices:
            rng = np.random.default_rng([seed, i])
            ch, cw = (h, w) if crop is None else (min(crop, h), min(crop, w))
            y0 = int(rng.integers(0, h - ch + 1))
            x0 = int(rng.integers(0, w - cw + 1))
            # Window = crop + margin (where the source has it); blur it, keep the crop.
            wy0, wx0 = max(y0 - margin, 0), max(x0 - margin, 0)
            wy1, wx1 = min(y0 + ch + margin, h), min(x0 + cw + margin, w)
            win = (slice(wy0, wy1), slice(wx0, wx1))
            sample = synthesize(image[win], rng, settings, None if depth is None else depth[win])
            keep = (slice(y0 - wy0, y0 - wy0 + ch), slice(x0 - wx0, x0 - wx0 + cw))
            if old_manifest is not None:  # from this sample on, the folder no longer holds what it describes
                old_manifest.unlink(missing_ok=True)
                old_manifest = None
            name = f"{i:0{width}d}_{src.name}"
            rel = {
                "blurred": f"{dirs['blurred']}/{name}{ext}",
                "sharp": f"{dirs['sharp']}/{name}{ext}",
                "radius": f"{dirs['radius']}/{name}.tiff",
            }
            _write_image(out_dir / rel["blurred"], sample.blurred[keep], bit_depth)
            _write_image(out_dir / rel["sharp"], sample.sharp[keep], bit_depth)
            _write_radius(out_dir / rel["radius"], sample.radius[keep])
            if settings.dual_pixel:
                rel["left"] = f"{dirs['left']}/{name}{ext}"
                rel["right"] = f"{dirs['right']}/{name}{ext}"
                _write_image(out_dir / rel["left"], sample.left[keep], bit_depth)
                _write_image(out_dir / rel["right"], sample.right[keep], bit_depth)
            files[i] = list(rel.values())
            records[i] = {
                "name": name, "source": src.name, "crop": [y0, x0, ch, cw],
                "focus": sample.info.get("focus"), "strength": sample.info.get("strength"),
                "rotation": sample.info.get("rotation"),
            }
            done += 1
            if progress is not None:
                progress(done, count)

    order = sorted(records)
    summary: dict[str, Any] = {
        "count": len(order),
        "requested": count,
        "seed": seed,
        "split": split,
        "crop": crop,
        "bit_depth": bit_depth,
        "max_side": max_side,
        "settings": asdict(settings),
        "kpac_version": __version__,
        "sources": source_records,
        "dirs": dirs,
        "files": [f for i in order for f in files[i]],
        "samples": [records[i] for i in order],
        "failed": failed,
    }
    if count and not order:  # every source failed: nothing to replace an earlier dataset with, which stays whole
        _undo_setup(out_dir, split, remove_marker=not marker_was_there, remove_out_dir=made_out_dir)
        summary["out_dir"] = str(out_dir)
        return summary
    # The manifest carries no time or absolute path, so reruns are byte-identical.
    text = json.dumps(summary, indent=1, sort_keys=True) + "\n"
    from ..images import atomic_write_bytes

    atomic_write_bytes(out_dir / manifest_name(split), text.encode("utf-8"))
    (out_dir / _in_progress_name(split)).unlink(missing_ok=True)
    if previous:  # only now: until the new dataset is complete, the old one stays whole where not rewritten
        _remove_stale(out_dir, previous, {*summary["files"], manifest_name(split)}, dirs, split)
    summary["out_dir"] = str(out_dir)
    return summary
