"""Training data: DPDD, paired folders, on-the-fly synthetic pairs; crops, flips, noise.

Conventions
-----------
* A sample is a dict of float32 ``(C, H, W)`` arrays in [0, 1]: ``input`` (3 channels, or 6
  = ``cat([left, right])`` for dual-pixel), ``target`` (3) and, for dual-pixel only,
  ``reference`` (the centre view the network adds its residual to). The training loop maps
  them to the network's [-1, 1].
* Every training sample is a pure function of ``(seed, key, crop)``: ``key`` is the global
  sample index ``(step * world_size + rank) * batch + slot``. Which image, where to crop,
  the flips and the noise all come from ``numpy.random.default_rng([seed, stream, key])``
  (image order: a fresh permutation per epoch, seeded by the epoch). Nothing depends on
  how many DataLoader workers there are or on what was drawn before, so resuming at step
  ``s`` reproduces the very batches an uninterrupted run would have seen, and the ranks of
  a multi-process run draw disjoint samples.
* DPDD pairs source and target by sorted order within a split (their file names differ by
  design: the sharp target of ``1P0A0917.png`` is ``1P0A0916.png``) and insists on the
  published counts unless told otherwise; other folders pair by file name.
"""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..images import list_images, probe_size, read_image_codes
from ..images.base import to_float as _codes_to_float
from ..metrics.pairing import DPDD_COUNTS

STREAM_TRAIN, STREAM_VAL, STREAM_EPOCH = 0, 1, 2

Log = Callable[[str], None]


class DataError(Exception):
    """Training data that cannot be used as given; the message says what and where.

    An image file that cannot be read raises :class:`kpac_cli.images.ImageError` instead
    (``path: problem``).
    """


def _silent(_msg: str) -> None:
    pass


# --------------------------------------------------------------------------------------
# Pairing
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairFiles:
    """The files of one training pair (``left``/``right`` only for dual-pixel)."""

    source: Path
    target: Path
    left: Path | None = None
    right: Path | None = None

    @property
    def name(self) -> str:
        return self.source.stem

    def roles(self) -> dict[str, Path]:
        d = {"source": self.source, "target": self.target}
        if self.left is not None and self.right is not None:
            d["left"], d["right"] = self.left, self.right
        return d


def dpdd_split(root: str | Path, split: str, dual: bool = False, allow_count_mismatch: bool = False) -> list[PairFiles]:
    """Pairs of one DPDD split (``train``, ``val`` or ``test``), checked against the published counts.

    Layout: ``{split}_c/source`` (blurred centre view), ``{split}_c/target`` (sharp),
    and for dual-pixel ``{split}_l/source``, ``{split}_r/source``.
    """
    root = Path(root)
    folders = {"source": root / f"{split}_c" / "source", "target": root / f"{split}_c" / "target"}
    if dual:
        folders["left"] = root / f"{split}_l" / "source"
        folders["right"] = root / f"{split}_r" / "source"
    for role, folder in folders.items():
        if not folder.is_dir():
            raise DataError(
                f"{root} is not a DPDD folder: {folder.relative_to(root)} is missing "
                f"(expected {split}_c/source and {split}_c/target" + (f", {split}_l/source, {split}_r/source" if dual else "") + ")"
            )
    files = {role: list_images(folder) for role, folder in folders.items()}
    counts = {str(folders[r].relative_to(root)): len(v) for r, v in files.items()}
    expected = DPDD_COUNTS.get(split)
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{k} has {n}" for k, n in counts.items())
        raise DataError(
            f"DPDD {split} split in {root}: image counts differ ({listing}"
            + (f"; expected {expected} each" if expected else "")
            + "), so the pairs cannot be matched; restore the missing files"
        )
    n = len(files["source"])
    if n == 0:
        raise DataError(f"DPDD {split} split in {root}: no images in {split}_c/source")
    if expected is not None and n != expected and not allow_count_mismatch:
        raise DataError(
            f"DPDD {split} split in {root}: {n} image pairs, but the published dataset has {expected}; "
            "pairs are matched by sorted order, so a missing or extra file would silently shift every pair. "
            "Pass --allow-count-mismatch (allow_count_mismatch=True) to train on a modified copy anyway"
        )
    return [
        PairFiles(files["source"][i], files["target"][i], files["left"][i] if dual else None, files["right"][i] if dual else None)
        for i in range(n)
    ]


def folder_pairs(source: str | Path, target: str | Path, log: Log = _silent) -> list[PairFiles]:
    """Pair the images of two folders by file name (extension ignored).

    When no name matches at all and the counts agree, pairs by sorted order instead (and
    says so through ``log``); partial overlaps and count mismatches are errors that name
    the first unmatched files.
    """
    source, target = Path(source), Path(target)
    for folder in (source, target):
        if not folder.is_dir():
            raise DataError(f"not a folder: {folder}")
    s, t = list_images(source), list_images(target)
    if not s:
        raise DataError(f"no images in {source}")
    if not t:
        raise DataError(f"no images in {target}")
    for folder, files in ((source, s), (target, t)):
        stems = [p.stem for p in files]
        dup = sorted({x for x in stems if stems.count(x) > 1})
        if dup:
            raise DataError(f"{folder}: several files share the name {dup[0]!r} (different extensions); keep one")
    ss, ts = {p.stem: p for p in s}, {p.stem: p for p in t}
    common = ss.keys() & ts.keys()
    if common and common == ss.keys() == ts.keys():
        return [PairFiles(ss[k], ts[k]) for k in sorted(common)]
    if not common:
        if len(s) != len(t):
            raise DataError(
                f"cannot pair {source} ({len(s)} images) with {target} ({len(t)} images): "
                "no file names match and the counts differ"
            )
        log(f"no file names match between {source} and {target}; pairing by sorted order ({s[0].name} <-> {t[0].name}, ...)")
        return [PairFiles(a, b) for a, b in zip(s, t)]
    only_s = sorted(ss.keys() - common)
    only_t = sorted(ts.keys() - common)
    parts = []
    if only_s:
        parts.append(f"{len(only_s)} image(s) in {source} have no target of the same name (e.g. {ss[only_s[0]].name})")
    if only_t:
        parts.append(f"{len(only_t)} image(s) in {target} have no source of the same name (e.g. {ts[only_t[0]].name})")
    raise DataError("; ".join(parts))


# --------------------------------------------------------------------------------------
# Decoded images, optionally cached
# --------------------------------------------------------------------------------------


def _as_float(a: np.ndarray) -> np.ndarray:
    """Cached codes -> float32 in [0, 1], exactly as :func:`kpac_cli.images.read_image` reads them."""
    return _codes_to_float(a, np.iinfo(a.dtype).max)


def _check_pair_sizes(pair: PairFiles, sizes: dict[str, tuple[int, ...]]) -> None:
    """Raise DataError when the images of a pair (``(height, width)`` per role) differ in size."""
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{pair.roles()[r]} {s[1]}x{s[0]}" for r, s in sizes.items())  # paths: the names may be alike
        raise DataError(f"pair {pair.name}: image sizes differ ({listing})")


class PairStore:
    """Decoded image pairs at the training bit depth, in memory or read on demand.

    Images are held as integer codes (:func:`kpac_cli.images.read_image_codes`): 8-bit
    training rounds 16-bit sources to 8 bits, 16-bit training keeps 8-bit sources at 8 bits.
    Cached arrays are loaded before the DataLoader workers start, so forked workers share
    them (copy-on-write; the pixel buffers are never written) instead of each decoding its
    own copy.
    """

    def __init__(self, pairs: Sequence[PairFiles], bit_depth: int = 8) -> None:
        self.pairs = list(pairs)
        self.bit_depth = bit_depth
        self._cache: list[dict[str, np.ndarray]] | None = None
        self._header_sizes: list[dict[str, tuple[int, int]]] | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def header_sizes(self) -> list[dict[str, tuple[int, int]]]:
        """Each pair's ``(height, width)`` per role, from the file headers (read once)."""
        if self._header_sizes is None:
            self._header_sizes = [{role: probe_size(p) for role, p in pair.roles().items()} for pair in self.pairs]
        return self._header_sizes

    def check_sizes(self) -> None:
        """Raise DataError for the first pair whose images differ in size, from the headers: a
        run that decodes each sample as it needs it would otherwise meet it mid-run."""
        for pair, sizes in zip(self.pairs, self.header_sizes()):
            _check_pair_sizes(pair, sizes)

    def estimate_bytes(self) -> int:
        """Memory the decoded pairs take (from the headers; 16-bit data counted at 2 bytes)."""
        per = 1 if self.bit_depth == 8 else 2
        return sum(h * w * 3 * per for sizes in self.header_sizes() for h, w in sizes.values())

    def decide_cache(self, mode: str, share: int = 1, log: Log = _silent) -> bool:
        """``yes``/``no``, or ``auto``: cache when it takes under half the available memory."""
        if mode == "no":
            return False
        if mode == "yes":
            return True
        from ..engine.device import available_ram

        need = self.estimate_bytes()
        budget = available_ram() // (2 * max(1, share))
        if need <= budget:
            return True
        log(f"not caching the training images ({need / 2**30:.1f} GiB decoded, {budget / 2**30:.1f} GiB budget); decoding each sample")
        return False

    def load(self, i: int) -> dict[str, np.ndarray]:
        if self._cache is not None:
            return self._cache[i]
        pair = self.pairs[i]
        depth = 8 if self.bit_depth == 8 else None
        arrays = {role: read_image_codes(p, bit_depth=depth)[0] for role, p in pair.roles().items()}
        _check_pair_sizes(pair, {role: a.shape[:2] for role, a in arrays.items()})
        return arrays

    def preload(self, threads: int = 0, progress: Callable[[int, int], None] | None = None) -> None:
        """Decode every pair now (decoding is mostly C code, so threads help)."""
        n = len(self.pairs)
        threads = threads or min(8, os.cpu_count() or 1)
        out: list[dict[str, np.ndarray] | None] = [None] * n
        with ThreadPoolExecutor(max_workers=threads) as ex:
            for done, (i, arrays) in enumerate(ex.map(lambda j: (j, self.load(j)), range(n)), 1):
                out[i] = arrays
                if progress is not None:
                    progress(done, n)
        self._cache = out  # type: ignore[assignment]


# --------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------


def _fit(a: np.ndarray, size: int) -> np.ndarray:
    """Mirror-pad an image smaller than the crop (mirrored content stays sharp, unlike resizing)."""
    h, w = a.shape[:2]
    if h >= size and w >= size:
        return a
    ph, pw = max(0, size - h), max(0, size - w)
    return np.pad(a, ((0, ph), (0, pw), (0, 0)), mode="symmetric")


def random_window(shape: tuple[int, ...], size: int, rng: np.random.Generator) -> tuple[int, int]:
    h, w = shape[:2]
    return int(rng.integers(0, max(1, h - size + 1))), int(rng.integers(0, max(1, w - size + 1)))


def _chw(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def make_sample(views: dict[str, np.ndarray], rng: np.random.Generator, noise_max: float, dual: bool) -> dict[str, np.ndarray]:
    """Float HWC crops -> a sample dict, with the paper's noise augmentation on the input(s).

    ``views`` holds ``source`` and ``target``, plus ``left``/``right`` for dual-pixel. The
    noise std is drawn uniformly from [0, noise_max] per sample and added (unclipped) to
    every input view independently.
    """
    sigma = float(rng.uniform(0.0, noise_max)) if noise_max > 0 else 0.0

    def noisy(a: np.ndarray) -> np.ndarray:
        if sigma == 0.0:
            return a
        return a + rng.standard_normal(a.shape, dtype=np.float32) * np.float32(sigma)

    if dual:
        left, right, centre = noisy(views["left"]), noisy(views["right"]), noisy(views["source"])
        return {"input": _chw(np.concatenate([left, right], axis=2)), "reference": _chw(centre), "target": _chw(views["target"])}
    return {"input": _chw(noisy(views["source"])), "target": _chw(views["target"])}


def flip_views(views: dict[str, np.ndarray], hflip: bool, vflip: bool) -> dict[str, np.ndarray]:
    """Flip every view; a horizontal flip also swaps the dual-pixel left and right views.

    Mirroring a dual-pixel pair left-right reverses the direction of its defocus disparity
    and mirrors the half-aperture blur shapes, so the mirrored left view is what the right
    sub-pixels of the mirrored scene would have seen.
    """
    out = {}
    for role, a in views.items():
        if hflip:
            a = a[:, ::-1]
        if vflip:
            a = a[::-1]
        out[role] = a
    if hflip and "left" in out and "right" in out:
        out["left"], out["right"] = out["right"], out["left"]
    return out


class _EpochOrder:
    """Sample key -> item index: a fresh seeded permutation of the items each epoch."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, np.arange(0)

    def __call__(self, key: int) -> int:
        epoch, pos = divmod(key, self.n)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, STREAM_EPOCH, epoch]).permutation(self.n)
        return int(self._perm[pos])


class PairedDataset:
    """Random crops of stored pairs (DPDD or paired folders); indexed by ``(key, crop)``."""

    def __init__(self, store: PairStore, seed: int = 0, noise_max: float = 0.03, flips: bool = True, dual: bool = False) -> None:
        self.store, self.seed, self.noise_max, self.flips, self.dual = store, seed, noise_max, flips, dual
        self.order = _EpochOrder(len(store), seed)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: tuple[int, int]) -> dict[str, np.ndarray]:
        key, crop = index
        item = self.order(key)
        rng = np.random.default_rng([self.seed, STREAM_TRAIN, key])
        arrays = self.store.load(item)
        arrays = {r: _fit(a, crop) for r, a in arrays.items()}
        y, x = random_window(arrays["source"].shape, crop, rng)
        hflip, vflip = (bool(rng.random() < 0.5), bool(rng.random() < 0.5)) if self.flips else (False, False)
        views = {r: a[y : y + crop, x : x + crop] for r, a in arrays.items()}
        views = {r: _as_float(a) for r, a in flip_views(views, hflip, vflip).items()}
        return make_sample(views, rng, self.noise_max, self.dual)


class SyntheticDataset:
    """Pairs rendered on the fly by :mod:`kpac_cli.synth` from sharp sources; indexed by ``(key, crop)``.

    Each sample renders a crop plus a margin of the largest blur radius (so the blur near the
    crop's edges sees real content, not padding) and trims the margin afterwards. Sources are
    decoded lazily in each worker process and kept up to ``cache_bytes``.
    """

    def __init__(self, sources: Sequence[Any], settings: Any, seed: int = 0, noise_max: float = 0.03, flips: bool = True,
                 dual: bool = False, cache_bytes: int = 1 << 30, with_radius: bool = False, rescale: float = 1.0,
                 transpose: bool = False, saturation: float = 1.0) -> None:
        self.sources, self.settings, self.seed = list(sources), settings, seed
        self.noise_max, self.flips, self.dual, self.cache_bytes = noise_max, flips, dual, cache_bytes
        self.rescale, self.transpose, self.saturation = rescale, transpose, saturation  # see TrainConfig
        self.with_radius = with_radius  # samples also carry the true blur radius, (1, H, W)
        self.order = _EpochOrder(len(self.sources), seed)
        self._cache: dict[int, np.ndarray] = {}
        self._cached = 0

    def __len__(self) -> int:
        return len(self.sources)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"], state["_cached"] = {}, 0  # workers decode their own
        return state

    def source(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Source ``i`` as float HWC, with its depth map when the source knows it (else None)."""
        hit = self._cache.get(i)
        if hit is not None:
            return hit
        src = self.sources[i]
        if hasattr(src, "load_with_depth"):
            img, depth = src.load_with_depth()
        else:
            img, depth = src.load(), None
        hit = (np.asarray(img, dtype=np.float32), None if depth is None else np.asarray(depth, dtype=np.float32))
        size = hit[0].nbytes + (0 if hit[1] is None else hit[1].nbytes)
        if self._cached + size <= self.cache_bytes:
            self._cache[i] = hit
            self._cached += size
        return hit

    def render(self, source: tuple[np.ndarray, np.ndarray | None], crop: int, rng: np.random.Generator,
               flips: bool) -> dict[str, np.ndarray]:
        """Crop ``crop``+margin from a source, flip, synthesise, trim: float HWC views."""
        from ..synth import synthesize
        from ..synth.scenes import resize_scene, scale_saturation

        sharp, depth = source
        margin = int(math.ceil(self.settings.max_radius)) + 2
        size = crop + 2 * margin
        # Changes of the sharp scene all come before rendering, so the blur (and the dual-pixel
        # views) are rendered on what the model sees: a rescaled, transposed or more colourful
        # scene is just another scene. Each draws from rng only when switched on (exact resumes).
        window = size
        if self.rescale < 1:  # as if the source were downscaled by a factor in [rescale, 1]
            smallest = max(self.rescale, size / min(sharp.shape[:2]))
            if smallest < 1:
                window = int(round(size / rng.uniform(smallest, 1.0)))
        views = {"s": _fit(sharp, window)}
        if depth is not None:
            views["d"] = _fit(depth[:, :, None], window)
        y, x = random_window(views["s"].shape, window, rng)
        views = {k: v[y : y + window, x : x + window] for k, v in views.items()}
        if window != size:
            views["s"], depth_view = resize_scene(views["s"], views.get("d"), (size, size))
            if depth_view is not None:
                views["d"] = depth_view
        if flips:
            hflip, vflip = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
            views = flip_views(views, hflip, vflip)
        if self.transpose and rng.random() < 0.5:
            views = {k: v.transpose(1, 0, 2) for k, v in views.items()}
        if self.saturation > 1:
            views["s"] = scale_saturation(views["s"], rng.uniform(1.0, self.saturation))
        region = np.ascontiguousarray(views["s"])
        d = np.ascontiguousarray(views["d"][:, :, 0]) if "d" in views else None
        s = synthesize(region, rng, self.settings, d)
        trim = (slice(margin, margin + crop), slice(margin, margin + crop))
        out = {"source": s.blurred[trim], "target": s.sharp[trim], "radius": s.radius[trim][:, :, None]}
        if self.dual:
            if s.left is None or s.right is None:
                raise DataError("the synthesiser returned no dual-pixel views; dual_pixel must be set in its settings")
            out["left"], out["right"] = s.left[trim], s.right[trim]
        return {r: np.ascontiguousarray(a, dtype=np.float32) for r, a in out.items()}

    def __getitem__(self, index: tuple[int, int]) -> dict[str, np.ndarray]:
        key, crop = index
        rng = np.random.default_rng([self.seed, STREAM_TRAIN, key])
        views = self.render(self.source(self.order(key)), crop, rng, self.flips)
        radius = views.pop("radius")
        sample = make_sample(views, rng, self.noise_max, self.dual)
        if self.with_radius:
            sample["radius"] = _chw(radius)
        return sample


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------


class StepBatchSampler:
    """Yields, for each step in ``[start, end)``, this rank's batch of ``(key, crop)`` indices."""

    def __init__(self, start: int, end: int, batch: int, crop_at: Callable[[int], int], rank: int = 0, world: int = 1) -> None:
        self.start, self.end, self.batch, self.crop_at, self.rank, self.world = start, end, batch, crop_at, rank, world

    def keys(self, step: int) -> list[int]:
        base = (step * self.world + self.rank) * self.batch
        return list(range(base, base + self.batch))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.end):
            crop = self.crop_at(step)
            yield [(k, crop) for k in self.keys(step)]

    def __len__(self) -> int:
        return max(0, self.end - self.start)


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    import torch

    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}


def worker_init(_worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C and SIGTERM to the main process, which saves and stops
    cleanly. A signal sent to the whole process group (``timeout``, a batch scheduler,
    ``kill -TERM -PGID``) would otherwise kill a worker first, and the main process would die
    of the lost worker without saving; the workers end with the main process's loader."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# --------------------------------------------------------------------------------------
# Validation sets and the whole bundle
# --------------------------------------------------------------------------------------


def _centre(a: np.ndarray, size: int) -> np.ndarray:
    if not size:
        return a
    a = _fit(a, size)
    h, w = a.shape[:2]
    y, x = (h - size) // 2, (w - size) // 2
    return a[y : y + size, x : x + size]


def evenly_spaced(n: int, k: int) -> list[int]:
    if k <= 0 or n <= 0:
        return []
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, min(k, n))})


def paired_validation(store: PairStore, indices: Sequence[int], crop: int, dual: bool) -> list[dict[str, np.ndarray]]:
    out = []
    for i in indices:
        views = {r: _as_float(_centre(a, crop)) for r, a in store.load(i).items()}
        out.append(make_sample(views, np.random.default_rng(0), 0.0, dual))
    return out


@dataclass
class DataBundle:
    """What the training loop needs from the data side."""

    dataset: Any  # PairedDataset | SyntheticDataset
    val: list[dict[str, np.ndarray]]
    description: str
    train_items: int
    notes: list[str] = field(default_factory=list)
    cached: bool = False
    record: dict[str, Any] = field(default_factory=dict)  # what a checkpoint stores: see data_record


# A checkpoint written before runs recorded their data: nothing to compare a resume with, and
# synthetic sources held out for validation even with val_count 0, as those runs did.
LEGACY_RECORD: dict[str, Any] = {"names": None, "sizes": None, "legacy_holdout": True}


def _file_size(origin: str) -> int | None:
    """A source file's size in bytes; None for what is no file (scikit-image's photos, procedural scenes)."""
    try:
        return os.stat(origin).st_size if os.path.isfile(origin) else None
    except OSError:
        return None


def _file_digest(origin: str) -> str | None:
    """The SHA-256 of a source file's bytes (hex); None for what is no file or cannot be read
    (reading it for training then says why)."""
    from ..synth.sources import file_sha256

    if not os.path.isfile(origin):
        return None
    try:
        return file_sha256(origin)
    except OSError:
        return None


def _file_digests(origins: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """The digest of each file of each item (a pair's source, target, ...), in order. Threads:
    hashlib releases the GIL on large buffers (100 photos, 78 MB: 0.2 s on 2 cores, read from
    the page cache)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
        flat = iter(list(ex.map(_file_digest, [f for files in origins for f in files])))
    return [[next(flat) for _ in files] for files in origins]


def _item_digest(parts: Sequence[str | None]) -> str | None:
    """One digest of all of an item's file digests; None when one of them is no file."""
    known = [d for d in parts if d is not None]
    if len(known) != len(parts):
        return None
    return known[0] if len(known) == 1 else hashlib.sha256("".join(known).encode()).hexdigest()


def data_record(items: Sequence[tuple[str, Sequence[str]]], legacy_holdout: bool,
                file_digests: Sequence[Sequence[str | None]] | None = None) -> dict[str, Any]:
    """What a checkpoint keeps of the data it was trained on: each training item's name (in the
    run's order, which sets its held-out split), size in bytes and the SHA-256 of its bytes, so
    that a resume notices a folder that changed, an edited photo of the same size included;
    ``items`` are names with the files each item reads; ``legacy_holdout`` as in :data:`LEGACY_RECORD`;
    ``file_digests``: :func:`_file_digests` of the items' files, when the caller has them already."""
    sizes = [_sizes_sum(files) for _, files in items]
    if file_digests is None:
        file_digests = _file_digests([files for _, files in items])
    return {"names": [n for n, _ in items], "sizes": sizes, "digests": [_item_digest(d) for d in file_digests],
            "legacy_holdout": legacy_holdout}


def _sizes_sum(files: Sequence[str]) -> int | None:
    """The bytes of all of an item's files; None when one of them is no file."""
    sizes = [_file_size(f) for f in files]
    known = [n for n in sizes if n is not None]
    return sum(known) if known and len(known) == len(sizes) else None


def _pairs_items(pairs: Sequence[PairFiles]) -> list[tuple[str, list[str]]]:
    """Each pair's name and all its files."""
    return [(pair.source.name, [str(p) for p in pair.roles().values()]) for pair in pairs]


def _named_digests(pairs: Sequence[PairFiles], digests: Sequence[str | None]) -> list[tuple[str, str | None]]:
    """Each pair, named by its source file, with its digest (see :func:`data_record`)."""
    return [(str(pair.source), d) for pair, d in zip(pairs, digests)]


def _list_some(names: Sequence[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def check_pairs_differ(pairs: Sequence[PairFiles], file_digests: Sequence[Sequence[str | None]], what: str,
                       log: Log = _silent) -> None:
    """Pairs whose input has the very bytes of its target teach the model to change nothing:
    raise DataError when every pair is one (the same files given as inputs and targets), say so
    through ``log`` when some are (sharp photos among the inputs may be meant). ``file_digests``:
    each pair's (source, target, ...) digests, as :func:`_file_digests` gives them."""
    same = [pair.source.name for pair, (source, target, *_) in zip(pairs, file_digests)
            if source is not None and source == target]
    if not same:
        return
    if len(same) == len(pairs):
        raise DataError(f"every one of the {len(pairs)} {what} has an input with the same bytes as its target "
                        f"(e.g. {pairs[0].source} and {pairs[0].target}): the model would learn to change nothing; "
                        "give the defocused photos as inputs and their sharp counterparts as targets")
    log(f"{len(same)} of the {len(pairs)} {what} have an input with the same bytes as its target ({_list_some(same)}): "
        "the model learns to leave those as they are")


def check_same_data(saved: dict[str, Any], now: dict[str, Any], noun: str = "images", run: Path | str = "RUN") -> None:
    """Raise DataError naming what differs when a resumed run's training items are not those it
    was trained on (other folders, or photos added, removed or changed): its order and held-out
    split would silently change. A record without names (:data:`LEGACY_RECORD`) matches anything;
    one without digests (written before runs kept them) is compared by names and sizes only."""
    if saved.get("names") is None:
        return
    by_content = saved.get("digests") is not None

    def fingerprints(record: dict[str, Any]) -> list[tuple[Any, ...]]:
        digests = record["digests"] if by_content else [None] * len(record["names"])
        return list(zip(record["sizes"], digests))

    if saved["names"] == now["names"] and fingerprints(saved) == fingerprints(now):
        return
    before = dict(zip(saved["names"], fingerprints(saved)))
    after = dict(zip(now["names"], fingerprints(now)))
    missing = [n for n in saved["names"] if n not in after]
    new = [n for n in now["names"] if n not in before]
    changed = [n for n in saved["names"] if n in after and after[n] != before[n]]
    parts = [f"{len(missing)} missing ({_list_some(missing)})" if missing else "",
             f"{len(new)} new ({_list_some(new)})" if new else "",
             f"{len(changed)} changed ({_list_some(changed)})" if changed else ""]
    what = ", ".join(p for p in parts if p) or "in another order"
    raise DataError(f"the training data are not the run's ({len(before)} {noun} then, {len(after)} now: {what}); "
                    "resuming would change what it trains and validates on: give the run's own data (its folders may "
                    f"have moved), or start a new run from its weights with --init {run}")


def check_held_out(train: Sequence[tuple[str, str | None]], val: Sequence[tuple[str, str | None]], noun: str) -> None:
    """Raise DataError when a validation item has the same bytes as a training item (a folder
    given twice, a copy of a photo, validation folders that are the training folders): validation
    would score what the model trained on. Items are ``(name, digest)``; a None digest (no file)
    is never a match."""
    trained = {digest: name for name, digest in train if digest is not None}
    for name, digest in val:
        if digest is None or digest not in trained:
            continue
        if trained[digest] == name:
            raise DataError(f"{name} is both a training and a validation {noun} (given twice): validation would score "
                            "what the model trained on; give it once")
        raise DataError(f"validation {noun} {name} has the same bytes as training {noun} {trained[digest]}: validation "
                        "would score what the model trained on; remove one of them")


def _check_split(items: Sequence[tuple[str, str | None]], held: Sequence[int], noun: str) -> None:
    """:func:`check_held_out` for items split by index: ``held`` validate, the others train."""
    kept = set(held)
    check_held_out([x for i, x in enumerate(items) if i not in kept], [items[i] for i in held], noun)


# The size of a synthetic run's validation renders when --val-crop is 0 (whole images are for photo pairs).
SYNTHETIC_VAL_SIZE = 256


def validation_crop(cfg: Any) -> int:
    """The size a run validates at: synthetic data render their validation pairs at --val-crop
    (0: :data:`SYNTHETIC_VAL_SIZE`), photo pairs are centre-cropped to it (0: whole images)."""
    if cfg.data_kind == "synthetic":
        return cfg.val_crop or SYNTHETIC_VAL_SIZE
    return cfg.val_crop


def procedural_scene_crop(cfg: Any) -> int:
    """The largest crop a run's procedural scenes are drawn for: its largest training crop, and the
    --val-crop it had when the scenes were first drawn (a resume may lower --val-crop, as advice to
    a validation that ran out of memory says, but the scenes it trains on stay the run's)."""
    drawn_for = cfg.val_crop if cfg.scenes_val_crop is None else cfg.scenes_val_crop
    return max(512, cfg.crop_schedule.max_size, drawn_for)


def procedural_scene_side(cfg: Any) -> int:
    """The side of a run's procedural scenes: big enough for :func:`procedural_scene_crop` and the
    blur margin, so that they never need mirror padding (so a run's scenes depend on that crop)."""
    return procedural_scene_crop(cfg) + 2 * (int(math.ceil(cfg.max_radius)) + 2)


def _synth_sources(cfg: Any) -> list[Any]:
    from .. import synth

    if not hasattr(synth, "sharp_sources"):
        raise DataError("this kpac build's synthesiser cannot list sharp sources (kpac_cli.synth.sharp_sources missing)")
    side = procedural_scene_side(cfg)
    # skip_datasets: the blurred inputs and radius maps of a kpac synth dataset are no sharp photos
    sources = synth.sharp_sources([Path(p) for p in cfg.synthetic], include_skimage=cfg.skimage, procedural=cfg.procedural,
                                  procedural_size=(side, side), procedural_seed=cfg.seed, skip_datasets=True)
    # by the names sources had before name clashes were resolved: a run keeps its order and held-out split
    sources = sorted(sources, key=lambda s: s.sort_key or s.name)
    if not sources:
        raise DataError("no sharp images found for synthetic training (check the --synthetic folders)")
    return sources


# --cache for synthetic sources, which each DataLoader worker decodes as it first needs them:
# what each worker keeps (a cache only: the samples are the same whatever it holds).
SYNTHETIC_CACHE_BYTES = {"auto": 1 << 30, "yes": 1 << 62, "no": 0}


def split_holdout(n: int) -> list[int]:
    """Indices of the items held out for validation: every 10th, or the last one below 10 items."""
    if n >= 10:
        return [i for i in range(n) if i % 10 == 9]
    if n >= 2:
        return [n - 1]
    return []


def build_data(cfg: Any, model_stride: int, rank: int = 0, local_world: int = 1, log: Log = _silent,
               load_progress: Callable[[int, int], None] | None = None, resumed: dict[str, Any] | None = None) -> DataBundle:
    """Build the training dataset and the fixed validation samples described by a TrainConfig.

    ``resumed``: the data record of the checkpoint a resume continues (:data:`LEGACY_RECORD` for
    one written before runs kept it); data that differ from it raise :class:`DataError`.
    """
    notes: list[str] = []
    legacy_holdout = bool(resumed and resumed.get("legacy_holdout"))

    def record_of(items: Sequence[tuple[str, Sequence[str]]], noun: str,
                  file_digests: Sequence[Sequence[str | None]] | None = None) -> dict[str, Any]:
        record = data_record(items, legacy_holdout, file_digests)
        if resumed is not None:
            check_same_data(resumed, record, noun, cfg.out)
        return record

    def pairs_record(pairs: Sequence[PairFiles], noun: str) -> tuple[dict[str, Any], list[list[str | None]]]:
        """:func:`record_of` the pairs, and the digests of their files (for :func:`check_pairs_differ`:
        each file is read once)."""
        items = _pairs_items(pairs)
        file_digests = _file_digests([files for _, files in items])
        return record_of(items, noun, file_digests), file_digests

    def note(msg: str) -> None:
        notes.append(msg)
        log(msg)

    kind = cfg.data_kind
    val_crop = cfg.val_crop
    if kind == "synthetic":
        from ..synth import SynthSettings

        settings = SynthSettings(max_radius=cfg.max_radius, aperture=cfg.aperture, dual_pixel=cfg.dual)
        sources = _synth_sources(cfg)
        record = record_of([(s.name, [s.origin]) for s in sources], "sharp images")
        # Without validation nothing is held out (runs made before held out all the same: they still do)
        held = split_holdout(len(sources)) if cfg.val_count > 0 or legacy_holdout else []
        train_src = [s for i, s in enumerate(sources) if i not in set(held)]
        val_src = [sources[i] for i in held] or sources
        if held and cfg.val_count > 0:
            _check_split([(s.origin, d) for s, d in zip(sources, record["digests"])], held, "image")
        if not held and cfg.val_count > 0:
            note("only one sharp source: validation renders it with other random draws (not held out)")
        dataset = SyntheticDataset(train_src, settings, seed=cfg.seed, noise_max=cfg.noise_max, flips=cfg.flips, dual=cfg.dual,
                                   cache_bytes=SYNTHETIC_CACHE_BYTES[cfg.cache], with_radius=cfg.blur_rank_weight > 0,
                                   rescale=cfg.rescale, transpose=cfg.transpose, saturation=cfg.saturation)
        val = []
        if rank == 0 and cfg.val_count > 0:
            vds = SyntheticDataset(val_src, settings, seed=cfg.seed, noise_max=0.0, flips=False, dual=cfg.dual, cache_bytes=0)
            size = validation_crop(cfg)
            for i in range(cfg.val_count):
                rng = np.random.default_rng([cfg.seed, STREAM_VAL, i])
                views = vds.render(vds.source(i % len(val_src)), size, rng, flips=False)
                val.append(make_sample(views, rng, 0.0, cfg.dual))
        parts = []
        if cfg.synthetic:
            parts.append("photos from " + ", ".join(p.name or str(p) for p in cfg.synthetic))
        if cfg.skimage:
            parts.append("scikit-image sample images")
        if cfg.procedural:
            parts.append(f"{cfg.procedural} procedural dead-leaves scenes")
        scenes = "".join([f", rescaled by [{cfg.rescale:g}, 1]" if cfg.rescale < 1 else "",
                          ", transposed half the time" if cfg.transpose else "",
                          f", colour saturation x [1, {cfg.saturation:g}]" if cfg.saturation > 1 else ""])
        if cfg.val_count > 0:
            validation = f"validation: {len(val)} fixed renders of {len(val_src)} held-out image(s)"
        else:
            validation = "no validation" + (f" ({len(held)} image(s) held out all the same, as the run began)" if held else "")
        desc = (
            f"synthetic defocus ({'dual-pixel, ' if cfg.dual else ''}max radius {cfg.max_radius:g} px, {cfg.aperture} aperture) "
            f"rendered on the fly from {len(train_src)} sharp images ({'; '.join(parts)}{scenes}); {validation}"
        )
        return DataBundle(dataset, val, desc, len(train_src), notes, record=record)

    if kind == "dpdd":
        pairs = dpdd_split(cfg.data, "train", cfg.dual, cfg.allow_count_mismatch)
        record, file_digests = pairs_record(pairs, "training pairs")
        check_pairs_differ(pairs, file_digests, "training pairs", note)
        val_pairs: list[PairFiles] = []
        if cfg.val_count > 0:
            try:
                val_pairs = dpdd_split(cfg.data, "val", cfg.dual, cfg.allow_count_mismatch)
            except DataError as e:
                if (Path(cfg.data) / "val_c").exists():
                    raise
                note(f"no validation split ({e}); training without validation")
        desc = f"DPDD ({'dual-pixel' if cfg.dual else 'centre view'}) at {cfg.data}: {len(pairs)} training pairs"
    else:
        pairs = folder_pairs(cfg.source, cfg.target, log=note)
        record, file_digests = pairs_record(pairs, "pairs")  # before the held-out pairs are split off
        val_pairs = []
        if cfg.val_source is not None:
            val_pairs = folder_pairs(cfg.val_source, cfg.val_target, log=note)
            if cfg.val_count > 0:
                val_digests = _file_digests([files for _, files in _pairs_items(val_pairs)])
                check_held_out(_named_digests(pairs, record["digests"]),
                               _named_digests(val_pairs, [_item_digest(d) for d in val_digests]), "pair")
                check_pairs_differ(val_pairs, val_digests, "validation pairs", note)
        check_pairs_differ(pairs, file_digests, "pairs", note)  # after the held-out check, which says more
        if cfg.val_source is None and cfg.val_count > 0:
            held = split_holdout(len(pairs)) if len(pairs) >= 10 else []
            held = held[: cfg.val_count]
            if held:
                _check_split(_named_digests(pairs, record["digests"]), held, "pair")
                val_pairs = [pairs[i] for i in held]
                pairs = [p for i, p in enumerate(pairs) if i not in set(held)]
                note(f"holding out {len(val_pairs)} of the pairs for validation (every 10th); give val folders to choose them")
            else:
                note("fewer than 10 pairs and no validation folders: training without validation")
        desc = f"paired folders {cfg.source} -> {cfg.target}: {len(pairs)} training pairs"

    store = PairStore(pairs, cfg.bit_depth)
    store.check_sizes()  # before the run, also when samples are decoded as training needs them
    cached = store.decide_cache(cfg.cache, share=local_world, log=note)
    if cached:
        store.preload(progress=load_progress)
    dataset = PairedDataset(store, seed=cfg.seed, noise_max=cfg.noise_max, flips=cfg.flips, dual=cfg.dual)
    val = []
    if rank == 0 and val_pairs:
        if val_crop and val_crop % model_stride:
            raise DataError(f"val-crop {val_crop} is not a multiple of the model stride {model_stride}")
        vstore = PairStore(val_pairs, cfg.bit_depth)
        val = paired_validation(vstore, evenly_spaced(len(val_pairs), cfg.val_count), val_crop, cfg.dual)
    if cfg.val_count > 0:
        desc += f", {cfg.bit_depth}-bit; validation: {len(val)} image(s)" + (f" (centre {val_crop}x{val_crop})" if val_crop else " (whole)")
    else:
        desc += f", {cfg.bit_depth}-bit; no validation"
    return DataBundle(dataset, val, desc, len(pairs), notes, cached, record)
