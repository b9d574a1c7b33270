"""Dual-pixel input: pairing left/right (and optional centre) views, and reading them.

Views are matched by file *stem* after removing a trailing view marker (``_l``, ``_r``,
``_c``, ``_left``, ``_right``, ``_center``, ``_centre``, case-insensitive; also with ``-``),
so ``left/005.png`` pairs with ``right/005.png`` and ``005_left.png`` with ``005_right.png``.
One folder may hold every view (``005_left.png``, ``005_right.png``, ``005_c.png``): given
for several views, it yields to each only the files marked for that view. A left file marked
as a right view whose partner is marked as a left view (the views swapped) is refused, and so
is any pair whose names differ by their view markers unless each is marked as the view it is
given for (``--right`` given a folder of ``_c`` images). One file given as two views, and a
centre image with no views, are refused as well.
The DPDD dataset layout (``<root>/<split>_l/source``, ``_r/source``, ``_c/source``) is
recognised by :func:`dpdd_dual_dirs` and by :func:`pair_dual_pixel` when given the root.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import DEFAULT_MAX_PIXELS, ImageError, ImageInfo
from .io import _probe_depth, list_images, read_image
from .metadata import blurmap_kind
from .raw import RawOptions

_VIEW_SUFFIX = re.compile(r"[_-](l|r|c|left|right|center|centre)$", re.IGNORECASE)
_VIEW_OF_MARKER = {"l": "left", "left": "left", "r": "right", "right": "right", "c": "center", "center": "center", "centre": "center"}
_MARKERS = {"left": "_l or _left", "right": "_r or _right", "center": "_c, _center or _centre"}


@dataclass
class DualPixelTriple:
    """One dual-pixel sample: the two views, an optional centre image, and a name.

    ``name`` is the shared stem without a view marker (e.g. ``'005'``), for naming outputs.
    """

    left: Path
    right: Path
    center: Path | None
    name: str


def _name(path: Path) -> str:
    return _VIEW_SUFFIX.sub("", path.stem) or path.stem


def _key(path: Path) -> str:
    return _name(path).lower()


def _view(path: Path) -> str | None:
    """The view a file's name marks it as ('left', 'right', 'center'), or None."""
    m = _VIEW_SUFFIX.search(path.stem)
    if m is None or m.start() == 0:  # a name that is only a marker is a plain name (see _name)
        return None
    return _VIEW_OF_MARKER[m.group(1).lower()]


def dpdd_dual_dirs(root: str | Path, split: str = "test") -> tuple[Path, Path, Path]:
    """The DPDD folders of ``split``: ``(root/{split}_l/source, root/{split}_r/source,
    root/{split}_c/source)``. Existence is not checked."""
    root = Path(root)
    return (root / f"{split}_l" / "source", root / f"{split}_r" / "source", root / f"{split}_c" / "source")


def _index(folder: Path, view: str | None = None, outputs: tuple[Path, str] | None = None) -> dict[str, Path]:
    """Images of ``folder`` by key; with ``view``, only those whose name marks them as that
    view (for a folder that holds several views); ``outputs``: see :func:`pair_dual_pixel`."""
    out: dict[str, Path] = {}
    try:
        files = list_images(folder)
    except OSError as exc:
        raise ImageError(folder, f"cannot list folder ({exc.strerror or exc})") from None
    files = [p for p in files if blurmap_kind(p) is None]  # maps a run wrote beside the views are no views
    if outputs is not None and outputs[1] and _same_path(folder, outputs[0]):
        files = _without_outputs(files, outputs[1])
    if view is not None:
        files = [p for p in files if _view(p) == view]
        if not files:
            raise ImageError(folder, f"given for several views, but no image in it is marked as a {view} view ({_MARKERS[view]})")
    for p in files:
        k = _key(p)
        if k in out:
            raise ImageError(p, f"ambiguous dual-pixel view: {out[k].name} and {p.name} have the same name")
        out[k] = p
    return out


def _without_outputs(files: list[Path], suffix: str) -> list[Path]:
    """``files`` less those named as a pair's output with ``suffix`` (``005_s.png`` beside
    ``005.png`` or ``005_l.png``): a previous run's outputs, matched by name without extension."""
    keys = {_key(p) for p in files}
    n = len(suffix)
    return [p for p in files if not (p.stem.endswith(suffix) and p.stem[:-n].lower() in keys)]


def pair_dual_pixel(
    left: str | Path, right: str | Path | None = None, center: str | Path | None = None, *, check: bool = True,
    outputs: tuple[Path, str] | None = None,
) -> list[DualPixelTriple]:
    """Pair dual-pixel views given as files or folders.

    Parameters
    ----------
    left, right : path
        Two image files, or two folders whose images are matched by name (see the module
        notes). With ``right=None``, ``left`` must be a DPDD root: its ``test_l/source``,
        ``test_r/source`` and (if present) ``test_c/source`` are used.
    center : path, optional
        A file or folder of centre (combined) images matched the same way.
    outputs : (folder, suffix), optional
        Where the outputs of the pairs go, named ``<name><suffix>.<ext>``: when that folder is
        one of the views' folders, the files in it named so (a previous run's outputs) are no
        views, so a rerun into the same folder pairs the views alone. No effect without a suffix.

    Returns
    -------
    list of DualPixelTriple
        Sorted by name. With ``check``, sizes and bit depths are checked from the headers.

    Raises
    ------
    ImageError
        Missing partner (a centre image without views included), size or bit-depth mismatch,
        empty folder, views named the other way round or as other views, one file given as two
        views; the message names the file(s).
    """
    left = Path(left)
    if right is None:
        l_dir, r_dir, c_dir = dpdd_dual_dirs(left)
        if not (l_dir.is_dir() and r_dir.is_dir()):
            raise ImageError(left, "no right view given and not a DPDD folder (expected test_l/source and test_r/source)")
        left, right = l_dir, r_dir
        if center is None and c_dir.is_dir():
            center = c_dir
    right = Path(right)
    center = Path(center) if center is not None else None
    for p in (left, right, center):
        if p is not None and not p.exists():
            raise ImageError(p, "no such file or folder")
    if left.is_dir() != right.is_dir() or (center is not None and center.is_dir() != left.is_dir()):
        raise ImageError(left, f"dual-pixel views must all be files or all be folders ({left}, {right})")

    if not left.is_dir():
        _refuse_one_file_for_two_views(left, right, center)
        triples = [DualPixelTriple(left, right, center, _name(left))]
    else:
        folders = {"left": left, "right": right, "center": center}

        def index(view: str) -> dict[str, Path]:  # a folder given for several views: by marker
            shared = any(_same_path(folders[view], f) for v, f in folders.items() if v != view and f is not None)
            return _index(folders[view], view if shared else None, outputs)

        li, ri = index("left"), index("right")
        ci = index("center") if center is not None else None
        if not li:
            raise ImageError(left, "folder contains no images")
        triples = []
        for k in sorted(set(li) | set(ri)):
            if k not in ri:
                raise ImageError(li[k], f"no right view for it in {right}")
            if k not in li:
                raise ImageError(ri[k], f"no left view for it in {left}")
            c = None
            if ci is not None:
                if k not in ci:
                    raise ImageError(li[k], f"no centre image for it in {center}")
                c = ci[k]
            triples.append(DualPixelTriple(li[k], ri[k], c, _name(li[k])))
        if ci is not None:  # a centre image left out would be a photo silently not deblurred
            unpaired = sorted(set(ci) - set(li))
            if unpaired:
                raise ImageError(ci[unpaired[0]], f"no left and right views for it in {left} and {right}")
    for t in triples:
        _check_markers(t)
    if check:  # with check=False, read_dual_pixel checks each pair, so a bad pair fails alone
        for t in triples:
            _check_partners(t)
    return triples


def _refuse_one_file_for_two_views(left: Path, right: Path, center: Path | None) -> None:
    """One file given as two views would be deblurred without a word as a pair with no disparity."""
    if _same_path(left, right):
        raise ImageError(right, f"the same file as the left view {left}: a dual-pixel pair is two views")
    if center is not None:
        for view, path in (("left", left), ("right", right)):
            if _same_path(center, path):
                raise ImageError(center, f"the same file as the {view} view {path}: the centre image is the combined photo")


def _check_markers(t: DualPixelTriple) -> None:
    """Refuse a pair whose names differ by their view markers unless each file is marked as the
    view it is given for (names that carry the same marker are plain names: ``car_r.png``)."""
    given = {"left": t.left, "right": t.right, "center": t.center}
    marked = {slot: _view(path) for slot, path in given.items() if path is not None}
    if len({m for m in marked.values() if m is not None}) < 2:
        return
    if marked["left"] == "right" and marked["right"] == "left":
        raise ImageError(t.left, f"named as a right view, given as the left one (its partner {t.right} is named as a left view): the views are swapped")
    said = {"left": "left", "right": "right", "center": "centre"}
    for slot, mark in marked.items():
        if mark is not None and mark != slot:
            others = ", ".join(f"{given[s]} as the {said[s]} view" for s in marked if s != slot)
            raise ImageError(given[slot], f"named as a {said[mark]} view, given as the {said[slot]} one (with {others})")


def _same_path(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file or folder (a link, another spelling)."""
    try:
        return a.samefile(b)
    except OSError:
        return False


def _check_partners(t: DualPixelTriple) -> None:
    (ls, ld) = _probe_depth(t.left)
    (rs, rd) = _probe_depth(t.right)
    _same(t.left, t.right, ls, rs, ld, rd)
    if t.center is not None:
        (cs, cd) = _probe_depth(t.center)
        _same(t.left, t.center, ls, cs, ld, cd)


def _same(a: Path, b: Path, sa, sb, da: int, db: int, ga: bool | None = None, gb: bool | None = None) -> None:
    if sa != sb:
        raise ImageError(a, f"size {sa[1]}x{sa[0]} differs from its partner {b} ({sb[1]}x{sb[0]})")
    if da != db:
        raise ImageError(a, f"bit depth {da} differs from its partner {b} ({db}-bit)")
    if ga is not None and gb is not None and ga != gb:
        raise ImageError(a, f"{'grey' if ga else 'in colour'}, but its partner {b} is {'grey' if gb else 'in colour'}")


def _grey(info: ImageInfo) -> bool:
    return info.channels in (1, 2)  # what the writer writes grey


def _same_orientation(a: Path, b: Path, ia: ImageInfo, ib: ImageInfo) -> None:
    # the views are deblurred in the sensor's frame, undoing the left view's orientation
    if ia.orientation_applied != ib.orientation_applied:
        raise ImageError(a, f"EXIF orientation {ia.orientation_applied} differs from its partner {b} "
                            f"({ib.orientation_applied}): the views of one capture are stored alike")


def read_dual_pixel(
    triple: DualPixelTriple, max_pixels: int | None = DEFAULT_MAX_PIXELS, raw_options: RawOptions | None = None
) -> tuple[np.ndarray, np.ndarray, ImageInfo]:
    """Read a dual-pixel sample.

    ``raw_options`` develops camera RAW views (as for :func:`read_image`).

    Returns
    -------
    views : ndarray
        ``float32`` ``(H, W, 6)``: left RGB then right RGB, each in ``[0, 1]`` (the
        :func:`read_image` conventions).
    center : ndarray
        ``float32`` ``(H, W, 3)``: the centre image, or ``(left + right) / 2`` without one.
    info : ImageInfo
        The left view's record (use it to write outputs). The views are turned upright by
        their EXIF orientation as :func:`read_image` does; pass ``info.orientation_applied``
        to the engine, which deblurs them in the sensor's frame.

    Raises
    ------
    ImageError
        A view cannot be read, or sizes / bit depths differ, or one is grey and another in
        colour (the output is written as the left view is: grey would drop the colour; names
        both files), or their EXIF orientations differ.
    """
    left, info = read_image(triple.left, max_pixels=max_pixels, raw_options=raw_options)
    right, rinfo = read_image(triple.right, max_pixels=max_pixels, raw_options=raw_options)
    _same_orientation(triple.left, triple.right, info, rinfo)
    _same(triple.left, triple.right, info.size, rinfo.size, info.bit_depth, rinfo.bit_depth, _grey(info), _grey(rinfo))
    if triple.center is not None:
        center, cinfo = read_image(triple.center, max_pixels=max_pixels, raw_options=raw_options)
        _same_orientation(triple.left, triple.center, info, cinfo)
        _same(triple.left, triple.center, info.size, cinfo.size, info.bit_depth, cinfo.bit_depth, _grey(info), _grey(cinfo))
    else:
        center = (left + right) * np.float32(0.5)
    views = np.concatenate([left, right], axis=2)
    return views, center, info
