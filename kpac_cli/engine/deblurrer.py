"""Load a model once, deblur many images: the engine's public face.

>>> from kpac_cli.engine import Deblurrer
>>> d = Deblurrer("kpac-3level")                      # doctest: +SKIP
>>> sharp = d.deblur(image)                           # HxWx3 float32 in [0, 1]  # doctest: +SKIP

Conventions: images are float ``HxWxC`` arrays (NumPy, or torch tensors on any device), RGB,
values in [0, 1], encoded for display (sRGB-like gamma, as photos are stored and as the models
were trained: not linear light), as
:func:`kpac_cli.images.read_image` returns them; integer arrays, values more than 0.25 outside
[0, 1] and NaN/inf are refused with a ValueError (0-255 data: divide by 255). Single-image models
take ``HxWx3``; dual-pixel models take ``HxWx6`` (left RGB then right RGB) and an optional
centre view (default: the mean of left and right; a dual model whose checkpoint asks for it gets
its views balanced first, see :mod:`kpac_cli.engine.dualpixel`). Outputs are clipped to [0, 1]; the raw,
unclipped network output is available through :meth:`Deblurrer.run`.
"""

from __future__ import annotations

import copy
import math
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..checkpoints import Checkpoint, load_checkpoint
from ..checkpoints.registry import resolve_model
from ..checkpoints.safetensors_io import bare_network
from ..images.base import checked_photo
from ..images.exif import apply_orientation
from ..model import KPACNet
from ..model.fast import FastKPACNet
from .compiled import CompiledNetwork
from .dualpixel import balance_views
from .device import (autocast, available_memory, cpu_has_fast_bf16, device_name, is_out_of_memory, precision_name, resolve_device,
                     resolve_precision)
from .tiled import (InferenceResult, ProgressFn, TiledInference, low_resolution_bytes, receptive_halos, skips_that_fit,
                    tile_that_runs)

MIN_TILE = 128
#: Peak activation bytes per pixel of a widened tile, per channel of the model's width:
#: measured 0.8 KB/pixel for the 48-channel model on the CPU fast path (1.0-1.4 KB on the
#: plain path), planned with margin.
_BYTES_PER_PIXEL_PER_CHANNEL = 24


@dataclass
class EngineOptions:
    """How to run a model.

    device : ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps``, or a :class:`torch.device`
    precision : ``auto`` (fp16 on CUDA, fp32 elsewhere) | ``fp32`` | ``fp16`` | ``bf16``, or
        ``torch.float32`` / ``torch.float16`` / ``torch.bfloat16``

    Every field is checked when the options are made: a value that cannot be used raises a
    ValueError naming the field (whether a device exists here is checked by :class:`Deblurrer`).
    tile : ``"auto"`` (from the memory available), an int (tile side in pixels; at least
        128, smaller sizes are raised to it: the tile would be mostly overlap), or ``None``/0
        for the whole image at once. Tiling is exact: it never changes the output beyond
        float rounding. :attr:`RunStats.tile` tells the tile a run used.
    channels_last : use the NHWC memory layout (faster convolutions on CPU and GPU).
    memory_budget : bytes the engine may plan for, twice over: the working set of one tile
        (``tile="auto"``) and, when tiling, the encoder's skip feature maps kept between the
        two passes instead of recomputed (the deepest, smallest first). Default: a share of
        what is free once the photo's own memory is counted (:meth:`Deblurrer.resident_bytes`:
        its float copies and the low-resolution maps; on the CPU a quarter of the rest, at
        most 1 GiB; on a GPU 40 %), so that a large photo in a tight container gets smaller
        tiles instead of the process being killed.
    compile : run the network's stages through ``torch.compile`` (static shapes, same-shaped
        tiles); the time spent compiling is reported in :attr:`RunStats.compile_seconds`.
        Pays on GPUs for many same-sized photos; on the CPU our hand-fused path is faster.
    strength : how much of the network's correction to apply, in [0, 1]: the network is
        residual (its output is the input plus a predicted correction, the paper's global
        skip), and the correction is scaled by this; 1 (default) is the model's output, 0 the
        input (exactly once written as 8 or 16 bits; float outputs within float32 rounding,
        about 1e-8, of the network's [-1, 1] units). Lower values temper over-sharpening on
        real photos.
    ensemble : self-ensemble, 1 (default), 2, 4 or 8: the model runs on this many flips and
        transposes of the photo (the first ``ensemble`` of: as is, left-right flipped, upside
        down, both; then each of those transposed) and the outputs, mapped back, are averaged.
        Costs ``ensemble`` times the time; +0.10 dB at 8 on the held-out synthetic benchmark
        for kpac-3level. Dual-pixel models take at most 4 (flips; a left-right flip also swaps
        the views, as a mirrored camera would): a transpose would turn their horizontal defocus
        disparity vertical.
    """

    device: str = "auto"
    precision: str = "auto"
    tile: int | str | None = "auto"
    channels_last: bool = True
    memory_budget: int | None = None
    compile: bool = False
    strength: float = 1.0
    ensemble: int = 1

    def __post_init__(self) -> None:
        # Every field is checked here, where it is given: a misspelt device or a string budget
        # would otherwise fail later, deep in a run, without naming the option.
        self.device = device_name(self.device)  # a torch.device too; availability: Deblurrer
        self.precision = precision_name(self.precision)  # torch.float32 / bfloat16 / float16 too
        for name in ("channels_last", "compile"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):  # the string "no" would switch it on
                raise ValueError(f"{name} must be True or False, got {value!r}")
            setattr(self, name, bool(value))
        budget = self.memory_budget
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not float(budget).is_integer() or budget < 0:
                raise ValueError(f"memory_budget must be a number of bytes (an int >= 0, e.g. 8 << 30) or None, got {budget!r}")
            self.memory_budget = int(budget)
        # one spelling per meaning from here on: "auto", None (the whole image) or an int
        tile = self.tile
        if isinstance(tile, str):  # spelt as device and precision are: any case, blanks around
            tile = int(tile) if tile.strip().isdigit() else tile.strip().lower()
        if isinstance(tile, numbers.Real) and not isinstance(tile, bool) and float(tile).is_integer() and tile >= 0:
            self.tile = int(tile) or None  # 256.0, np.float32(256), "256" -> 256; 0, "00" -> whole
        elif tile in ("none", "whole"):
            self.tile = None
        elif tile == "auto":
            self.tile = tile
        elif tile is not None:
            raise ValueError(f"tile must be 'auto', a size in pixels, or 0 / None for the whole image; got {self.tile!r}")
        strength = self.strength
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
        self.strength = float(strength)
        if isinstance(self.ensemble, bool) or not isinstance(self.ensemble, (int, np.integer)) or self.ensemble not in ENSEMBLE_SIZES:
            raise ValueError(f"ensemble must be one of {', '.join(map(str, ENSEMBLE_SIZES))}, got {self.ensemble!r}")
        self.ensemble = int(self.ensemble)


ENSEMBLE_SIZES = (1, 2, 4, 8)


def dihedral(x: torch.Tensor, k: int, inverse: bool = False) -> torch.Tensor:
    """The k-th of the 8 flips/transposes of an (N, C, H, W) tensor (bit 0: left-right flip,
    bit 1: upside down, bit 2: transpose, applied in that order), or its inverse."""
    if inverse and k & 4:
        x = x.transpose(2, 3)
    if k & 1:
        x = x.flip(3)
    if k & 2:
        x = x.flip(2)
    if not inverse and k & 4:
        x = x.transpose(2, 3)
    return x


#: The EXIF orientation that undoes each one: 6 and 8 turn a quarter each way, the others
#: undo themselves.
_UNDOING_ORIENTATION = {6: 8, 8: 6}

#: The flip/transpose of :func:`dihedral` that each EXIF orientation (1-8) applies to show the
#: pixels upright (``kpac_cli.images.exif.apply_orientation``).
ORIENTATION_DIHEDRAL = {1: 0, 2: 1, 3: 3, 4: 2, 5: 4, 6: 6, 7: 7, 8: 5}


def ensemble_inputs(x: torch.Tensor, ref: torch.Tensor, n: int, dual: bool) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The self-ensemble's ``n`` passes: ``(k, input, reference)`` with the k-th flip/transpose
    applied (k = 0: as given); a pass's output goes back with ``dihedral(out, k, inverse=True)``.
    A dual-pixel input mirrored left-right has its views swapped: the left photodiodes of a
    mirrored camera see what the right ones saw."""
    for k in range(n):
        xk = dihedral(x, k)
        if k & 1 and dual:
            xk = torch.cat([xk[:, 3:], xk[:, :3]], dim=1)
        # a single-image model's reference is its input: one tensor, not two equal copies
        yield k, xk, (xk if ref is x else dihedral(ref, k))


@dataclass
class RunStats:
    tile: int | None = None  # tile side actually used (None: whole image)
    precision: str = "fp32"  # the precision the image was finished in
    fell_back_to_fp32: bool = False  # a half-precision run gave non-finite values and was redone
    tile_reductions: int = 0  # times the tile was halved after running out of memory
    kept_skips: int = 0  # skip feature maps kept between the tiled passes (0: all recomputed)
    seconds: float = 0.0
    compile_seconds: float = 0.0  # compilation (and first runs) of new shapes in this call
    notes: list[str] = field(default_factory=list)


_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


class Deblurrer:
    """A loaded model on a device, ready to deblur images of any size.

    ``model``: a shipped model's name, a weights file, a :class:`Checkpoint`, or a bare
    :class:`KPACNet` (copied, so the caller's module is left as it was; also inside
    ``torch.compile``, DataParallel or :class:`FastKPACNet`, and of any float dtype: the copy's
    parameters are float32, ``EngineOptions.precision`` says what it computes in). A bare network carries
    no provenance: it is named "model" and a dual-pixel one sees its views as given; load the
    file (:func:`kpac_cli.checkpoints.load_checkpoint`) to keep what its metadata says, such as
    a dual-pixel model's view balancing.
    """

    def __init__(self, model: KPACNet | Checkpoint | str | Path = "default", options: EngineOptions | None = None) -> None:
        if options is not None and not isinstance(options, EngineOptions):  # a dict would fail later, on a missing attribute
            raise TypeError(f"options must be an EngineOptions (EngineOptions(**fields) for a dict), got {type(options).__name__}")
        self.options = options or EngineOptions()
        self.device = resolve_device(self.options.device)
        self.dtype = resolve_precision(self.options.precision, self.device)
        self.name, self.provenance = "model", {}
        # what the caller should hear once, not once per image
        self.setup_notes: list[str] = []
        if self.device.type == "cpu" and self.dtype == torch.bfloat16 and not cpu_has_fast_bf16():
            self.setup_notes.append("bf16 on this CPU is emulated (it has neither AMX nor AVX512-BF16): several times "
                                    "slower than fp32, which --precision auto chooses here")
        if isinstance(model, (str, Path)):
            path, self.name = resolve_model(model)
            model = load_checkpoint(path)
        if isinstance(model, Checkpoint):
            self.provenance = dict(model.provenance)
            self.name = self.provenance.get("name", self.name)
            model = model.build()
        else:
            model = _own_float32_copy(model)
        self.model = model.eval().to(self.device)
        if self.options.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.config = self.model.config
        # A dual-pixel model trained on vignetting-free views gets its views balanced
        # (see engine.dualpixel); its checkpoint says so. Other models see the views as given.
        self.balance_views = self.config.in_views == 2 and bool(self.provenance.get("balance_views"))
        # What the engine runs: on the CPU the same function restructured for oneDNN (fused
        # activations, no skip concatenations, a GEMM-friendly last layer; the plain model within ~4e-7 on the shipped models).
        self.network = FastKPACNet(self.model) if self.device.type == "cpu" else self.model
        if self.options.compile:  # inductor fuses the plain model itself (oneDNN's fused ops do not trace)
            self.network = CompiledNetwork(self.model)
        if self.options.ensemble > self.max_ensemble:
            raise ValueError("a dual-pixel model's self-ensemble is at most 4 (flips only: a transpose would turn "
                             "the views' horizontal defocus disparity vertical)")
        self.last_stats = RunStats()

    @property
    def max_ensemble(self) -> int:
        """The largest self-ensemble this model takes: 8, or 4 (flips only) for dual-pixel views."""
        return 4 if self.config.in_views == 2 else ENSEMBLE_SIZES[-1]

    # -- planning ---------------------------------------------------------------------------
    def bytes_per_pixel(self) -> int:
        return _BYTES_PER_PIXEL_PER_CHANNEL * self.config.channels

    def resident_bytes(self, height: int, width: int) -> int:
        """Bytes a run of a ``height`` x ``width`` photo holds besides the two planned pools:
        the low-resolution maps of a tiled run (:func:`~kpac_cli.engine.tiled.low_resolution_bytes`)
        and, when the device is the CPU, the photo's float32 copies: the caller's, the network
        input (and its padded copy when the size is no multiple of the stride), a dual-pixel
        model's balanced views and centre view, and the output; with a self-ensemble, also the
        flipped input (and reference) of the pass running and the sum of the passes before it."""
        maps = low_resolution_bytes(self.config, height, width, torch.finfo(self.dtype).bits // 8)
        if self.device.type != "cpu":
            return maps  # the copies are in host memory, not the GPU's
        padded = int(height % self.config.stride != 0 or width % self.config.stride != 0)
        inputs = 2 + padded + int(self.balance_views)
        references = (1 + padded) if self.config.in_views == 2 else 0  # a single image is its own
        outputs = 1
        if self.options.ensemble > 1:  # held while every pass after the first runs
            inputs, references, outputs = inputs + 1, references + int(references > 0), outputs + 1
        return maps + (inputs * self.config.in_channels + (references + outputs) * 3) * 4 * height * width

    def memory_budget(self, height: int | None = None, width: int | None = None) -> int:
        """Bytes of each planned pool (see ``EngineOptions.memory_budget``), for a photo of
        ``height`` x ``width`` when given (its :meth:`resident_bytes` are not the pools')."""
        if self.options.memory_budget is not None:
            return int(self.options.memory_budget)
        free = available_memory(self.device)
        if height is not None and width is not None:
            free = max(0, free - self.resident_bytes(height, width))
        # two pools of this size: one tile's working set and the kept skip maps
        return int(free * 0.4) if self.device.type == "cuda" else min(int(free * 0.25), 1 << 30)

    def plan_kept_skips(self, height: int, width: int, dtype: torch.dtype) -> int:
        """How many skip maps a tiled run keeps between its passes (see :class:`TiledInference`)."""
        itemsize = torch.finfo(dtype).bits // 8
        return skips_that_fit(self.config, height, width, self.memory_budget(height, width), itemsize)

    def plan_tile(self, height: int, width: int) -> int | None:
        """Tile side for ``tile="auto"``: the whole image if it fits the budget, else the
        largest stride-aligned tile whose widened size fits."""
        opt = self.options.tile
        if opt is None:
            return None
        if opt != "auto":
            return max(MIN_TILE, opt)
        budget = self.memory_budget(height, width)
        bpp = self.bytes_per_pixel()
        # The widest tensor, the decoder's last concatenation, holds 2 x channels values per
        # pixel; at 2**31 elements PyTorch's CUDA kernels leave 32-bit indexing (slow paths or
        # errors, not an out-of-memory that halving the tile would answer). A GPU with 65 GB
        # free would otherwise run a 22-megapixel photo whole.
        most_pixels = (2**31 - 1) // (2 * self.config.channels)
        if height * width * bpp <= budget and height * width <= most_pixels:
            return None
        halo = max(receptive_halos(self.config))
        side = min(int(math.sqrt(budget / bpp)), math.isqrt(most_pixels)) - 2 * halo
        stride = self.config.stride
        return max(MIN_TILE, side // stride * stride)

    # -- running ----------------------------------------------------------------------------
    def _as_tensors(self, image: np.ndarray, center: np.ndarray | None, orientation: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's input and reference, in [-1, 1] units, turned back from the EXIF
        ``orientation`` they were shown upright by (1: as given)."""
        cin = self.config.in_channels
        if isinstance(image, (str, Path)):  # it would read as an array of one string
            raise TypeError(f"image must be an array, not a file name ({str(image)!r}): read it with kpac_cli.read_image, "
                            "or deblur files with kpac_cli.engine.deblur_file")
        image = checked_photo(_host_array(image), "image")
        if center is not None and self.config.in_views != 2:
            raise ValueError("a centre view is for dual-pixel models; this model takes one RGB image")
        center = None if center is None else checked_photo(_host_array(center), "centre view")
        if image.ndim != 3 or image.shape[2] != cin:
            kind = "HxWx3 RGB" if cin == 3 else "HxWx6 (left RGB, right RGB)"
            raise ValueError(f"this model takes {kind} images, got shape {image.shape}{_layout_hint(image.shape, cin)}")
        if center is not None and center.shape != image.shape[:2] + (3,):
            raise ValueError(f"centre view must be {image.shape[:2] + (3,)}, got {center.shape}")
        if orientation != 1:
            undo = _UNDOING_ORIENTATION.get(orientation, orientation)
            image = apply_orientation(image, undo)
            center = None if center is None else apply_orientation(center, undo)
        views = image
        if self.balance_views:
            if center is None:
                center = image.reshape(image.shape[:2] + (2, 3)).mean(axis=2)  # the views as captured
            views = balance_views(image)
        x = _network_units(views)
        if center is not None:
            ref = _network_units(center)
        else:
            ref = self.model.default_reference(x)
        return x, ref

    def run(
        self,
        image: np.ndarray,
        center: np.ndarray | None = None,
        progress: ProgressFn | bool | None = None,
        keep_attention: bool = False,
        orientation: int = 1,
    ) -> InferenceResult:
        """Raw inference: output (1, 3, H, W) in [-1, 1] units, unclipped, plus attention maps.

        Runs out-of-memory-safe (the tile is halved and the image retried) and half-precision-
        safe (non-finite values make it redo the image in fp32); :attr:`last_stats` says what
        happened. With ``options.ensemble`` > 1 the output is the mean over that many
        flips/transposes of the image, each mapped back. ``progress``: as for :meth:`deblur`.

        ``orientation`` is the EXIF orientation (1-8) the image was turned upright by when read
        (``ImageInfo.orientation_applied``). A dual-pixel model runs on the views as the sensor
        recorded them, where their defocus disparity is horizontal (turned upright, a portrait
        capture's is vertical), and the output is turned upright after (the attention maps are
        not: :attr:`InferenceResult.orientation` says how to turn them); a single-image model
        runs on the image as given.
        """
        return self._run(image, center, progress, keep_attention, orientation, self.options.ensemble)

    def _run(self, image: np.ndarray, center: np.ndarray | None, progress: ProgressFn | bool | None, keep_attention: bool,
             orientation: int, passes: int) -> InferenceResult:
        """:meth:`run` with ``passes`` self-ensemble passes (the options' or, for attention maps alone, 1)."""
        if orientation not in ORIENTATION_DIHEDRAL:
            raise ValueError(f"orientation must be an EXIF orientation, 1-8; got {orientation!r}")
        if not (progress is None or isinstance(progress, bool) or callable(progress)):
            # a truthy string or number would fail deep in the run, on calling it
            raise TypeError(f"progress must be True, False, None or a callable, got {type(progress).__name__}")
        if progress is True:
            with tqdm_progress() as bars:
                return self._run(image, center, bars, keep_attention, orientation, passes)
        if self.config.in_views != 2:
            orientation = 1
        upright = ORIENTATION_DIHEDRAL[orientation]
        progress = progress or None  # False: none
        x, ref = self._as_tensors(image, center, orientation)
        h, w = x.shape[-2:]
        stats = RunStats(tile=tile_that_runs(self.plan_tile(h, w), h, w, self.config.stride), precision=_DTYPE_NAMES[self.dtype])
        t0 = time.perf_counter()
        compiled_before = getattr(self.network, "compile_seconds", 0.0)
        stats.kept_skips = self.plan_kept_skips(h, w, self.dtype) if stats.tile is not None else 0
        n = passes
        # self-ensemble: every flip/transpose, mapped back and averaged (attention maps stay
        # those of the photo as given)
        for k, xk, refk in ensemble_inputs(x, ref, n, self.config.in_views == 2):
            one = self._run_guarded(xk, refk, stats, _pass_progress(progress, k, n), keep_attention and k == 0,
                                    f" (self-ensemble pass {k + 1} of {n}; the passes before it kept)" if k else "")
            if k == 0:
                result = one
            else:
                result.output = result.output + dihedral(one.output, k, inverse=True)
            del one  # in the sum now: not held through the next pass besides it
        if n > 1:
            result.output = result.output / n
        if self.options.strength != 1.0:
            result.output = ref + self.options.strength * (result.output - ref)  # scale the residual
        if upright:  # the attention maps stay on the grid the model ran on: see InferenceResult
            result.output, result.orientation = dihedral(result.output, upright), orientation
        stats.seconds = time.perf_counter() - t0
        if isinstance(self.network, CompiledNetwork):
            stats.compile_seconds = self.network.compile_seconds - compiled_before
        self.last_stats = stats
        return result

    def _run_guarded(self, x: torch.Tensor, ref: torch.Tensor, stats: RunStats, progress: ProgressFn | None,
                     keep_attention: bool, which_pass: str = "") -> InferenceResult:
        """One pass of the tiled engine, retried with half the tile on out-of-memory and in
        fp32 on non-finite half-precision output; ``stats`` records both (and carries them to
        the next pass of a self-ensemble)."""
        h, w = x.shape[-2:]
        dtype = _DTYPES[stats.precision]
        while True:
            engine = TiledInference(self.network, self.device, lambda: autocast(self.device, dtype),
                                    self.options.channels_last, stats.kept_skips, static_shapes=self.options.compile)
            try:
                result = engine(x, ref, stats.tile, progress, keep_attention)
            except Exception as e:  # noqa: BLE001 - only out-of-memory is retried
                if not is_out_of_memory(e):
                    raise
                current = stats.tile or max(h, w)
                if current <= MIN_TILE:
                    smallest = f"{MIN_TILE}px tiles" if stats.tile else f"the whole {w}x{h} image (too small to tile)"
                    raise MemoryError(f"out of memory on {self.device} even with {smallest}") from e
                stats.tile = tile_that_runs(max(MIN_TILE, current // 2), h, w, self.config.stride)
                stats.tile_reductions += 1
                stats.kept_skips = 0  # memory first: recompute every skip map
                stats.notes.append(f"out of memory: tile reduced to {stats.tile}, skip maps recomputed")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if dtype != torch.float32 and not torch.isfinite(result.output).all():
                # fp16 overflow would otherwise become black or NaN pixels in the photo
                stats.fell_back_to_fp32 = True
                stats.notes.append(f"non-finite values in {_DTYPE_NAMES[dtype]}: redone in fp32{which_pass}")
                dtype = torch.float32
                stats.precision = "fp32"
                stats.kept_skips = min(stats.kept_skips, self.plan_kept_skips(h, w, dtype))
                continue
            return result

    def deblur(self, image: np.ndarray, center: np.ndarray | None = None, progress: ProgressFn | bool | None = None,
               orientation: int = 1) -> np.ndarray:
        """Deblur one image (see the module docstring for conventions); returns HxWx3 in [0, 1].

        ``progress=True`` shows a tqdm bar (for notebooks and scripts); a callable receives
        ``(stage, done, total)``. ``orientation``: as for :meth:`run` (dual-pixel views read
        with :func:`~kpac_cli.images.read_dual_pixel` pass ``info.orientation_applied``).
        """
        result = self.run(image, center, progress, orientation=orientation)
        with torch.inference_mode():  # in place (a 24-megapixel photo's float copies are 288 MB each)
            return result.output.add_(1).mul_(0.5).clamp_(0, 1)[0].permute(1, 2, 0).numpy()

    def scale_attention(self, image: np.ndarray, center: np.ndarray | None = None, orientation: int = 1) -> list[np.ndarray | None]:
        """Per KPAC block, the scale-attention maps alpha: (len(dilations), h, w) at the blocks'
        resolution (1/stride of the image, cropped to ceil(H/stride) x ceil(W/stride)), from one
        pass over the image, whatever ``options.ensemble`` (the maps are that pass's).

        ``orientation``: as for :meth:`deblur`. A dual-pixel model runs on the views in the
        sensor's frame, and its maps come back turned upright, as the image was given (their
        cells lie on the sensor's grid: where the sensor's last row or column of cells is
        partial, it is the first of the upright maps' after a flip)."""
        result = self._run(image, center, None, True, orientation, passes=1)
        s, (x_h, x_w) = self.config.stride, result.output.shape[-2:]
        turned = ORIENTATION_DIHEDRAL[result.orientation]
        if turned & 4:  # the output is upright; the maps are still in the frame the model ran in
            x_h, x_w = x_w, x_h
        hh, ww = -(-x_h // s), -(-x_w // s)
        return [None if a is None else dihedral(a[:, :, :hh, :ww], turned)[0].contiguous().numpy() for a in result.scale_attention]


def _host_array(image: Any) -> Any:
    """A torch tensor as a NumPy array (one on a GPU, or one that requires grad, included);
    anything else as given."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        return (image.float() if image.dtype == torch.bfloat16 else image).numpy()  # NumPy has no bfloat16
    return image


def _network_units(image: np.ndarray) -> torch.Tensor:
    """A [0, 1] ``HxWxC`` array as a (1, C, H, W) float32 tensor in the network's [-1, 1] units.

    Scaled in NumPy into a new array, so that the tensor never shares the caller's memory: a
    read-only array (a memory map, ``np.frombuffer``, a JAX array) would make ``torch.from_numpy``
    warn of undefined behaviour, though nothing writes to it."""
    scaled = np.ascontiguousarray(image, dtype=np.float32) * np.float32(2)
    scaled -= 1
    return torch.from_numpy(scaled).permute(2, 0, 1)[None]


def _layout_hint(shape: tuple[int, ...], channels: int) -> str:
    """What to do with an image array of the wrong ``shape`` for a model of ``channels`` inputs."""
    if len(shape) == 4 and shape[0] == 1:  # a batch of one, as torch code holds images
        if shape[1] in (3, 6) and shape[3] not in (3, 6):
            return " (a channels-first batch of one? image[0].permute(1, 2, 0) for a tensor, np.moveaxis(image[0], 0, -1) for an array)"
        return " (a batch of one? image[0]: one image at a time)"
    if channels != 3:
        if len(shape) == 3 and shape[2] == 3:
            return " (one view? a dual-pixel model takes both: np.concatenate([left, right], axis=2))"
        return ""
    if len(shape) == 3 and shape[0] == 3 and shape[2] != 3:
        return " (channels first? np.moveaxis(image, 0, -1))"
    if len(shape) == 2 or (len(shape) == 3 and shape[2] == 1):
        return " (grey? deblur np.dstack([image] * 3) and keep one channel)"
    if len(shape) == 3 and shape[2] == 4:
        return " (RGBA? deblur image[..., :3] and put the alpha back)"
    return ""


def _own_float32_copy(model: torch.nn.Module) -> KPACNet:
    """A float32 copy of the :class:`KPACNet` in ``model``: the engine feeds float32 tensors
    and runs other precisions through autocast, so a ``.half()`` or ``.double()`` module would
    otherwise fail deep in the first convolution; a wrapper's network is unwrapped."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a shipped model's name, a weights file, a Checkpoint or a KPACNet, "
                        f"got {type(model).__name__}")
    network = bare_network(model)  # TypeError naming the module when it holds no KPACNet
    return copy.deepcopy(network).float()


def _pass_progress(progress: ProgressFn | None, k: int, n: int) -> ProgressFn | None:
    """``progress`` for pass k of an n-pass self-ensemble: stages named ``"encode 3/8"``."""
    if progress is None or n == 1:
        return progress
    return lambda stage, done, total: progress(f"{stage} {k + 1}/{n}", done, total)


class tqdm_progress:
    """A progress callback that drives tqdm bars (one per stage)."""

    def __enter__(self) -> Callable[[str, int, int], None]:
        from tqdm.auto import tqdm

        self._bars: dict[str, object] = {}

        def cb(stage: str, done: int, total: int) -> None:
            bar = self._bars.get(stage)
            if bar is None:
                bar = self._bars[stage] = tqdm(total=total, desc=stage, leave=False)
            bar.n = done
            bar.refresh()

        return cb

    def __exit__(self, *exc) -> None:
        for bar in self._bars.values():
            bar.close()
