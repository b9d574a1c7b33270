"""Sharp source images for synthesis: photo files, scikit-image's bundled photos, procedural scenes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from .render import as_float_rgb
from .scenes import dead_leaves

__all__ = ["Source", "file_sha256", "sharp_sources", "read_rgb", "SKIMAGE_PHOTOS"]

# Natural photographs bundled with scikit-image (no download needed). Grey ones are
# replicated to RGB: they add texture variety (grass, gravel, brick) rather than colour.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle",
                  "camera", "coins", "grass", "gravel", "brick")


def file_sha256(path: str | Path) -> str:
    """The SHA-256 (hex) of a file's bytes, read in 1 MiB blocks: how datasets record their
    sources (``kpac synth``'s manifest, a training run's data record). Raises OSError."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Source:
    """A sharp image to synthesise from, loaded lazily.

    Attributes
    ----------
    name : str
        Unique, file-name-safe name (letters, digits, ``_``, ``-``).
    origin : str
        Where it comes from: a file path, ``skimage:NAME`` or ``procedural:INDEX``.
    sort_key : str
        What ``kpac train`` orders its sources by (and so splits off the held-out ones): the
        name before a clash with an earlier source's was resolved, which earlier kpac versions
        used as the name itself (``a.jpg``, ``a.png``, ``a_2.png`` were named ``a``, ``a_2``,
        ``a_2``; now ``a_2.png`` is ``a_2_2``), so that a run keeps its order. Empty: ``name``.

    Sources are picklable (for data-loader worker processes) and hold no pixels.
    """

    name: str
    origin: str
    _load: Callable[[], tuple[np.ndarray, np.ndarray | None]] = field(repr=False, compare=False)
    sort_key: str = field(default="", repr=False, compare=False)

    def load(self) -> np.ndarray:
        """The image as ``HxWx3`` float32 in [0, 1], encoded like a photo."""
        return self.load_with_depth()[0]

    def load_with_depth(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The image and its depth map (distance, larger = farther) when one is known, else None.

        Procedural scenes know their exact depth; scikit-image's ``motorcycle`` comes with a
        measured stereo disparity (Middlebury), converted to distance with holes filled.
        """
        img, depth = self._load()
        return as_float_rgb(img), (None if depth is None else np.asarray(depth, np.float32))


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as ``HxWx3`` float32 in [0, 1] with the project's reader
    (16-bit PNG/TIFF at full precision, EXIF orientation applied, alpha dropped)."""
    from ..images import read_image

    return read_image(path)[0]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "image"


def _images_below(folder: Path) -> list[Path]:
    """The image files below ``folder``; a folder that cannot be listed (no permission) raises
    an ImageError that names it, as every image problem does."""
    from ..images import ImageError, list_images

    try:
        return list_images(folder, recursive=True)
    except OSError as exc:
        raise ImageError(folder, f"cannot list folder ({exc.strerror or exc})") from None


def _load_file(path: str) -> tuple[np.ndarray, None]:
    return read_rgb(path), None


def _load_skimage(name: str) -> tuple[np.ndarray, np.ndarray | None]:
    import skimage.data

    if name != "motorcycle":
        return getattr(skimage.data, name)(), None
    left, _right, disp = skimage.data.stereo_motorcycle()
    return left, _disparity_to_depth(disp)


def _disparity_to_depth(disp: np.ndarray) -> np.ndarray:
    """Stereo disparity (pixels, inf/nan/<=0 = unknown) to distance (1/disparity), holes filled
    with the nearest known value (occlusion holes sit next to the background they belong to)."""
    from scipy import ndimage

    d = np.asarray(disp, np.float64)
    bad = ~np.isfinite(d) | (d <= 0)
    if bad.all():
        return np.ones(d.shape, np.float32)
    if bad.any():
        idx = ndimage.distance_transform_edt(bad, return_distances=False, return_indices=True)
        d = d[tuple(idx)]
    return (1.0 / d).astype(np.float32)


def _load_procedural(index: int, size: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    # Seeded per scene, so a scene is the same whatever else is in the list.
    return dead_leaves(size, np.random.default_rng([seed, index]), return_depth=True)


def sharp_sources(paths_or_dirs: list[Path] | None, include_skimage: bool = True, procedural: int = 0, *,
                  procedural_size: tuple[int, int] = (512, 512), procedural_seed: int = 0,
                  skip_datasets: bool = False) -> list[Source]:
    """Enumerate sharp images to synthesise from, in a deterministic order.

    Parameters
    ----------
    paths_or_dirs : list of Path, optional
        Image files (loaded whatever their suffix) and directories (searched recursively with
        :func:`kpac_cli.images.list_images`: the formats the reader reads, hidden files and
        folders skipped), in the given order, each directory's files sorted by relative path.
    include_skimage : bool
        Add scikit-image's bundled photos (:data:`SKIMAGE_PHOTOS`), named ``skimage_NAME``.
    procedural : int
        Add this many dead-leaves scenes (:func:`~kpac_cli.synth.scenes.dead_leaves`), named
        ``leaves_NNNN``, each ``procedural_size`` (H, W) and seeded by
        ``(procedural_seed, index)``.
    skip_datasets : bool
        Leave out the files of synthesised datasets found below a given directory (the folders
        :func:`~kpac_cli.synth.dataset.write_dataset` fills, beside their manifest): their
        blurred images and radius maps are no sharp photos. Files given by name, and a given
        directory itself, are always used.

    Returns
    -------
    list of Source
        Names are unique: a file's name is its path relative to the directory it was found in
        (or its stem), made file-name safe; clashes get ``_2``, ``_3``, ... appended.

    Raises
    ------
    FileNotFoundError
        A given path does not exist.
    kpac_cli.images.ImageError
        A given directory cannot be listed.
    """
    out: list[Source] = []
    seen: dict[str, int] = {}
    taken: set[str] = set()

    def add(name: str, origin: str, loader) -> None:
        base = _safe(name)
        n = seen.get(base, 0) + 1
        seen[base] = n
        numbered = base if n == 1 else f"{base}_{n}"
        unique = numbered
        while unique in taken:  # "a_2.png" after "a.png" and "a.jpg": a_2 is taken
            n += 1
            unique = f"{base}_{n}"
        taken.add(unique)
        out.append(Source(unique, origin, loader, sort_key=numbered))

    for entry in paths_or_dirs or []:
        p = Path(entry)
        if p.is_dir():
            skipped: dict[Path, bool] = {}
            for f in _images_below(p):
                if skip_datasets and f.parent != p:
                    if f.parent not in skipped:
                        from .dataset import is_dataset_folder

                        skipped[f.parent] = is_dataset_folder(f.parent)
                    if skipped[f.parent]:
                        continue
                add(f.relative_to(p).with_suffix("").as_posix(), str(f), partial(_load_file, str(f)))
        elif p.is_file():
            add(p.stem, str(p), partial(_load_file, str(p)))
        else:
            raise FileNotFoundError(f"no such file or directory: {p}")
    if include_skimage:
        for name in SKIMAGE_PHOTOS:
            add(f"skimage_{name}", f"skimage:{name}", partial(_load_skimage, name))
    for i in range(int(procedural)):
        add(f"leaves_{i:04d}", f"procedural:{i}", partial(_load_procedural, i, tuple(procedural_size), procedural_seed))
    return out
