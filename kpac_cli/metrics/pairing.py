"""Pairing predictions with ground truth: plain folders, the DPDD layout, split labels.

Names: a pair's ``name`` is the file stem (file name without its image extension).
Images: the files :func:`kpac_cli.images.list_images` lists (the formats the reader reads);
images in other formats (WebP, BMP, ...) are named in pairing errors, and refused when pairing by order.
Sorting: plain folders (:func:`pair_folders`) are in *natural order* (:func:`natural_key`):
by stem before extension, runs of digits by their value (``img2`` before ``img10``), letters
regardless of case, as file browsers list them. The DPDD layout (:func:`pair_dpdd`) is in
plain lexicographic order of the file names (``sorted()`` on the names, as the DPDD/KPAC
evaluation scripts do with their file lists; for DPDD's fixed-width names the two agree).
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import NamedTuple, Sequence

from ..images import is_image_path, list_images
from ..images.io import unread_image_extensions
from .errors import PairingError

__all__ = [
    "DPDD_COUNTS",
    "DPDDPair",
    "Pair",
    "natural_key",
    "pair_dpdd",
    "pair_folders",
    "pair_predictions_dpdd",
    "read_labels",
]

#: Number of image pairs per split of the DPDD data set (Abuolaim & Brown, ECCV 2020).
DPDD_COUNTS = {"train": 350, "val": 74, "test": 76}

_MAX_LISTED = 5  # names quoted in an error message


class Pair(NamedTuple):
    """One prediction/target pair of file paths (unpacks as ``name, pred, target``)."""

    name: str
    pred: Path
    target: Path


class DPDDPair(NamedTuple):
    """One DPDD sample: the centre (combined) view, its target, and the dual-pixel views.

    ``left``/``right`` are ``None`` unless dual-pixel views were asked for. ``name`` is
    the stem of the *source* (input) file, which is what a deblurred output is named after.
    """

    name: str
    source: Path
    target: Path
    left: Path | None = None
    right: Path | None = None


_DIGIT_RUNS = re.compile(r"(\d+)")


def _natural(text: str) -> tuple[str | int, ...]:
    """``text`` cut into letter and digit runs: digit runs as numbers, letters case-folded.

    Runs alternate (text, digits, text, ...), so two keys never compare a number with text."""
    parts = _DIGIT_RUNS.split(text)
    return tuple(int(p) if i % 2 else p.casefold() for i, p in enumerate(parts))


def natural_key(path: Path) -> tuple:
    """Sort key of :func:`pair_folders`: natural order of the stem, then of the extension.

    The stem comes first so that the extension cannot reorder names (``photo.jpg`` before
    ``photo.left.jpg``, as ``photo.png`` before ``photo.left.png``); digit runs compare by
    value (``img2`` before ``img10``) and letters regardless of case, as in file browsers;
    names equal by that (``img01``/``img1``, ``A``/``a``) follow in plain code-point order.
    """
    return _natural(path.stem), _natural(path.suffix), path.stem, path.suffix


def _images_in(folder: str | os.PathLike) -> list[Path]:
    """:func:`kpac_cli.images.list_images` of ``folder``, failing with a :class:`PairingError`."""
    d = Path(folder)
    if not d.is_dir():
        raise PairingError(f"not a folder: {d}")
    try:
        return list_images(d)
    except OSError as e:
        raise PairingError(f"cannot list {d} ({e.strerror or e})") from None


def images_in_sub_folders(folder: str | os.PathLike) -> int:
    """How many images lie in ``folder``'s sub-folders, which pairing does not search (0 when
    it cannot be listed)."""
    d = Path(folder)
    try:
        return len(list_images(d, recursive=True)) - len(list_images(d))
    except OSError:
        return 0


def unread_in(folder: str | os.PathLike) -> dict[str, str]:
    """Stem -> file name of the images in ``folder`` (not its sub-folders) in a format kpac does
    not read (WebP, BMP, GIF, ...: by extension), which pairing passes over; empty when there are
    none or ``folder`` cannot be listed."""
    d = Path(folder)
    unread = unread_image_extensions()
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return {}
    out: dict[str, str] = {}
    for name in names:
        f = d / name
        if not name.startswith(".") and f.suffix[1:].lower() in unread and f.is_file():
            out.setdefault(f.stem, name)
    return out


def _unread_text(folder: Path, names: Sequence[str]) -> str:
    """"N image(s) in ``folder`` in a format kpac does not read (a.webp, ...)" for messages."""
    formats = sorted({unread_image_extensions()[Path(n).suffix[1:].lower()] for n in names})
    return (f"{len(names)} image(s) in {folder} in a format kpac does not read ({', '.join(formats)}: "
            f"{quote_names(list(names))}); convert them to PNG or TIFF")


def _no_images(folder: Path) -> PairingError:
    """"No images in ``folder``", saying where images are when they sit in its sub-folders
    (which are not searched: a ``kpac deblur --recursive`` output keeps its sub-folders), or
    when it holds only images of formats kpac does not read."""
    try:
        nested = list_images(folder, recursive=True)
    except OSError:
        nested = []
    if not nested:
        unread = list(unread_in(folder).values())
        if unread:
            return PairingError(f"no images kpac reads in {folder}: {_unread_text(folder, unread)}")
        return PairingError(f"no images in {folder}")
    subs = sorted({p.relative_to(folder).parts[0] for p in nested})
    return PairingError(
        f"no images in {folder} itself: its {len(nested)} image(s) are in sub-folders ({quote_names(subs)}), "
        "which are not searched; give a sub-folder"
    )


def _case_hint(a: list[str], b: list[str]) -> str:
    """" (...)" naming names that differ from a partner only in letter case, else ""."""
    lower_b = {n.lower(): n for n in b}
    clashes = [f"{n} / {lower_b[n.lower()]}" for n in a if n.lower() in lower_b]
    return f" (names are case-sensitive: {quote_names(clashes)})" if clashes else ""


def quote_names(names: Sequence[str]) -> str:
    """The first few of ``names`` for a message, and how many more there are."""
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def _by_stem(files: list[Path], folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in files:
        if f.stem in out:
            raise PairingError(f"{folder}: two images share the name {f.stem!r} ({out[f.stem].name}, {f.name})")
        out[f.stem] = f
    return out


def pair_folders(
    pred_dir: str | os.PathLike,
    target_dir: str | os.PathLike,
    by: str = "name",
    *,
    roles: tuple[str, str] = ("prediction", "target"),
) -> list[Pair]:
    """Pair the images of two folders.

    Parameters
    ----------
    pred_dir, target_dir : path-like
        Folders of predictions (e.g. deblurred outputs) and of ground-truth images.
    by : {'name', 'order'}
        ``'name'``: files with the same stem pair up (``a.png`` with ``a.tif``); every
        image on either side must have a partner. ``'order'``: the i-th file of each
        folder in natural order (:func:`natural_key`: stem before extension, ``img2``
        before ``img10``, letters regardless of case) pair up; the counts must be equal,
        and no two predictions may share a stem (it names the pair). Use ``'order'`` only
        when names differ systematically (as in DPDD).
    roles : (str, str)
        What the two folders hold, as error messages name them (e.g. ``("source",
        "target")`` for blurry inputs paired with the ground truth).

    Returns
    -------
    list of Pair
        ``(name, pred, target)`` in natural order of the predictions; ``name`` is the
        prediction's stem.

    Raises
    ------
    PairingError
        A folder is missing or empty, counts differ (``'order'``), names are missing on
        one side (``'name'``) or appear twice in one folder (in the predictions with
        ``'order'``), or (``'order'``) a folder holds images in a format kpac does not read
        (WebP, BMP, ...), which would shift the order. The message names them, and says
        when a missing partner is there in such a format.
    """
    pdir, tdir = Path(pred_dir), Path(target_dir)
    preds = sorted(_images_in(pdir), key=natural_key)
    targets = sorted(_images_in(tdir), key=natural_key)
    if not preds:
        raise _no_images(pdir)
    if not targets:
        raise _no_images(tdir)
    if by == "order":
        for d in (pdir, tdir):
            unread = list(unread_in(d).values())
            if unread:  # passed over, they would shift the i-th image of one folder against the other's
                raise PairingError(f"cannot pair by order: {_unread_text(d, unread)}, or move them out: "
                                   "left out, they would shift the order of one folder against the other")
        if len(preds) != len(targets):
            raise PairingError(
                f"cannot pair by order: {len(preds)} images in {pdir} but {len(targets)} in {tdir}"
            )
        _by_stem(preds, pdir)  # the stem names the pair: two pairs of one name would be confused
        return [Pair(p.stem, p, t) for p, t in zip(preds, targets)]
    if by != "name":
        raise ValueError(f"by must be 'name' or 'order', got {by!r}")
    pmap, tmap = _by_stem(preds, pdir), _by_stem(targets, tdir)
    no_target = sorted(set(pmap) - set(tmap))
    no_pred = sorted(set(tmap) - set(pmap))
    if no_target or no_pred:
        pred_role, target_role = roles
        parts = []
        if no_target:
            parts.append(f"{len(no_target)} {pred_role}(s) without a {target_role} in {tdir}: {quote_names(no_target)}")
        if no_pred:
            parts.append(f"{len(no_pred)} {target_role}(s) without a {pred_role} in {pdir}: {quote_names(no_pred)}")
        raise PairingError("cannot pair by name: " + "; ".join(parts) + _case_hint(no_target, no_pred)
                           + _unread_hint(tdir, no_target) + _unread_hint(pdir, no_pred))
    return [Pair(n, pmap[n], tmap[n]) for n in pmap]  # pmap keeps the natural order of preds


def _unread_hint(folder: Path, missing: Sequence[str]) -> str:
    """"; ..." naming the files of ``missing`` names that ``folder`` holds in a format kpac does not
    read (so "without a partner" does not read as "not there"), else ""."""
    unread = unread_in(folder)
    found = [unread[n] for n in missing if n in unread]
    return f"; {_unread_text(folder, found)}" if found else ""


def _split_dir(root: Path, split: str, view: str, kind: str) -> Path:
    return root / f"{split}_{view}" / kind


def pair_dpdd(
    root: str | os.PathLike,
    split: str = "test",
    *,
    dual: bool = False,
    expected_count: int | None | str = "auto",
) -> list[DPDDPair]:
    """Pair inputs and targets of the DPDD data set (Canon dual-pixel defocus pairs).

    Layout under ``root``::

        {split}_c/source/*.png   blurry centre ("combined") views (the single-image input)
        {split}_c/target/*.png   all-in-focus ground truth
        {split}_l/source/*.png   left dual-pixel views   (only read with dual=True)
        {split}_r/source/*.png   right dual-pixel views  (only read with dual=True)

    In DPDD the source and target files of a pair have *different names* (e.g. source
    ``1P0A0917.png`` goes with target ``1P0A0916.png``: separate exposures), so pairing is
    by sorted order within the split; the counts are checked against the published split
    sizes (350 train, 74 val, 76 test). The left/right views share the source names and
    are matched by name.

    Parameters
    ----------
    root : path-like
        The data set folder (holding ``test_c`` etc.).
    split : {'train', 'val', 'test'} or other
        Split prefix of the folders.
    dual : bool
        Also pair the left/right views (for the dual-pixel model).
    expected_count : int, None or 'auto'
        ``'auto'``: the published count of a known split (any count for an unknown
        split name); an int: that count; ``None``: no count check (for subsets).

    Returns
    -------
    list of DPDDPair
        Sorted by source file name.

    Raises
    ------
    PairingError
        Missing folders, differing source/target counts, a count other than expected, two
        sources of one name (``a.png``, ``a.tif``), or missing left/right views.
    """
    root = Path(root)
    src_dir, tgt_dir = _split_dir(root, split, "c", "source"), _split_dir(root, split, "c", "target")
    for d in (src_dir, tgt_dir):
        if not d.is_dir():
            raise PairingError(f"DPDD folder missing: {d} (expected {split}_c/source and {split}_c/target under {root})")
    sources, targets = _images_in(src_dir), _images_in(tgt_dir)
    if len(sources) != len(targets):
        raise PairingError(f"DPDD {split}: {len(sources)} sources in {src_dir} but {len(targets)} targets in {tgt_dir}")
    want = DPDD_COUNTS.get(split) if expected_count == "auto" else expected_count
    if want is not None and len(sources) != want:
        raise PairingError(
            f"DPDD {split}: found {len(sources)} pairs, expected {want} (pass expected_count=None to allow a subset)"
        )
    if not sources:
        raise PairingError(f"DPDD {split}: no images in {src_dir}")
    _by_stem(sources, src_dir)  # a sample is named after its source (and so is its prediction)
    lefts: dict[str, Path] = {}
    rights: dict[str, Path] = {}
    if dual:
        for view, store in (("l", lefts), ("r", rights)):
            d = _split_dir(root, split, view, "source")
            if not d.is_dir():
                raise PairingError(f"DPDD folder missing: {d} (needed for dual-pixel input)")
            store.update(_by_stem(_images_in(d), d))
            missing = sorted({s.stem for s in sources} - set(store))
            if missing:
                raise PairingError(f"DPDD {split}: {len(missing)} source(s) without a view in {d}: {quote_names(missing)}")
    return [
        DPDDPair(s.stem, s, t, lefts.get(s.stem), rights.get(s.stem))
        for s, t in zip(sources, targets)
    ]


def pair_predictions_dpdd(
    pred_dir: str | os.PathLike,
    root: str | os.PathLike,
    split: str = "test",
    *,
    expected_count: int | None | str = "auto",
) -> list[Pair]:
    """Pair deblurred DPDD outputs (named after their *source* files) with the targets.

    Predictions are matched to sources by name, and sources to targets by sorted order
    (:func:`pair_dpdd`). Every source needs a prediction and vice versa.
    """
    samples = pair_dpdd(root, split, expected_count=expected_count)
    pdir = Path(pred_dir)
    preds = _images_in(pdir)
    if not preds:
        raise _no_images(pdir)
    pmap = _by_stem(preds, pdir)
    names = {s.name for s in samples}
    missing = sorted(names - set(pmap))
    extra = sorted(set(pmap) - names)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} DPDD {split} source(s) without a prediction in {pdir}: {quote_names(missing)}")
        if extra:
            parts.append(f"{len(extra)} prediction(s) not named after a DPDD {split} source: {quote_names(extra)}")
        targets = {s.target.stem for s in samples}
        if extra and set(extra) <= targets:  # DPDD's targets have other names than their sources
            tdir = samples[0].target.parent
            parts.append(f"the predictions are named after the targets in {tdir}: pair them with that folder by name")
        raise PairingError("; ".join(parts) + _case_hint(extra, missing) + _unread_hint(pdir, missing))
    return [Pair(s.name, pmap[s.name], s.target) for s in samples]


def _strip_ext(name: str) -> str:
    p = Path(name)
    return p.stem if is_image_path(p) else p.name


def read_labels(path: str | os.PathLike) -> dict[str, str]:
    """Read a split-label file: one ``name,label`` per line (e.g. ``1P0A0917,indoor``).

    Format: CSV (comma; a tab also works); blank lines and lines starting with ``#`` are
    skipped; a first (non-comment) line ``name,label`` is taken as a header. Names may carry an image
    extension (``a.png`` and ``a`` are the same image). Surrounding spaces are trimmed.

    Raises
    ------
    ValueError
        A line without exactly two fields, an empty name/label, or one name with two
        different labels (the message gives the line number).
    """
    out: dict[str, str] = {}
    first = True
    with open(path, newline="", encoding="utf-8-sig") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            delim = "," if "," in line else "\t"
            fields = [f.strip() for f in next(csv.reader([line], delimiter=delim))]
            if len(fields) != 2 or not all(fields):
                raise ValueError(f"{path}:{lineno}: expected 'name,label', got {line!r}")
            is_header = first and [f.lower() for f in fields] == ["name", "label"]
            first = False
            if is_header:
                continue
            name, label = _strip_ext(fields[0]), fields[1]
            if out.get(name, label) != label:
                raise ValueError(f"{path}:{lineno}: {name!r} labelled both {out[name]!r} and {label!r}")
            out[name] = label
    return out
