"""What a training run does: :class:`TrainConfig` (defaults = the paper's recipe).

The paper's recipe (Son et al., ICCV 2021, Sec. 5 and Appendix G):

* stage ``l1``: Adam (beta1 0.9, beta2 0.99), fixed learning rate 1e-4, batch 4, random
  512x512 crops with flips and Gaussian noise (sigma uniform in [0, 3%]) added to the input,
  L1 loss, 200k iterations;
* stage ``perceptual``: initialised from the L1 model, loss L1 + 7e-4 x MSE of VGG-19
  conv4_4 (after ReLU) features, learning rate 5e-5, 100k iterations.

Conventions: ``batch`` is per process (under ``torchrun`` the global batch is
``batch * world_size``); iterations count batches drawn, including batches skipped for a
non-finite loss; ``crop`` is a :class:`CropSchedule` string (``"512"`` or
``"128:20000,256:60000,512"``) and ``lr`` a number or an :class:`LRSchedule` string
(``"2e-4:12000,1e-4"``, step decay; the paper keeps it fixed).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..model import KPACConfig

STAGES = ("l1", "perceptual")
STAGE_DEFAULTS = {"l1": {"iterations": 200_000, "lr": 1e-4}, "perceptual": {"iterations": 100_000, "lr": 5e-5}}


class StepSchedule:
    """A value as a function of the iteration: ``"VALUE:UNTIL,VALUE:UNTIL,...,VALUE"``.

    ``"128:20000,256:60000,512"`` is 128 for iterations [0, 20000), 256 for [20000, 60000)
    and 512 afterwards; a plain ``"512"`` is a constant. Used for the crop size and the
    learning rate (``"2e-4:12000,1e-4"``: step decay).
    """

    what = "schedule"

    def __init__(self, spec: str | float) -> None:
        self.spec = str(spec).replace(" ", "")
        self.stages: list[tuple[Any, int | None]] = []  # (value, until) ; until None = forever
        parts = [p for p in self.spec.split(",") if p]
        if not parts:
            raise ValueError(f"empty {self.what}")
        last_until = 0
        for i, part in enumerate(parts):
            value_s, _, until_s = part.partition(":")
            try:
                value = self.parse(value_s)
                until = int(until_s) if until_s else None
            except ValueError:
                raise ValueError(f"bad {self.what} {self.spec!r}: expected VALUE or VALUE:UNTIL, got {part!r}") from None
            self.check(value)
            if until is None and i != len(parts) - 1:
                raise ValueError(f"bad {self.what} {self.spec!r}: only the last entry may omit ':UNTIL'")
            if until is not None:
                if until <= last_until:
                    raise ValueError(f"bad {self.what} {self.spec!r}: iterations must increase")
                last_until = until
            self.stages.append((value, until))
        if self.stages[-1][1] is not None:
            self.stages.append((self.stages[-1][0], None))  # the last value continues

    def parse(self, text: str) -> Any:
        return float(text)

    def check(self, value: Any) -> None:
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"bad {self.what} {self.spec!r}: values must be positive, got {value}")

    def at(self, step: int) -> Any:
        for value, until in self.stages:
            if until is None or step < until:
                return value
        raise AssertionError("unreachable")

    @property
    def values(self) -> list[Any]:
        return sorted({v for v, _ in self.stages})

    def __str__(self) -> str:
        return self.spec

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


class CropSchedule(StepSchedule):
    """Crop size (pixels, square) as a function of the iteration; see :class:`StepSchedule`."""

    what = "crop schedule"

    def parse(self, text: str) -> int:
        return int(text)

    def check(self, value: int) -> None:
        if value < 8:
            raise ValueError(f"bad crop schedule {self.spec!r}: crop size {value} is too small")

    size_at = StepSchedule.at

    @property
    def sizes(self) -> list[int]:
        return self.values

    @property
    def max_size(self) -> int:
        return max(self.sizes)

    def check_multiple(self, stride: int) -> None:
        bad = [s for s in self.sizes if s % stride]
        if bad:
            raise ValueError(f"crop sizes must be multiples of the model stride {stride}, got {bad}")


class LRSchedule(StepSchedule):
    """Learning rate as a function of the iteration; see :class:`StepSchedule`."""

    what = "learning-rate schedule"


def _same_folder(a: Path, b: Path) -> bool:
    """Whether two paths name one folder (also through a symbolic link, or another spelling of the
    name on a case-insensitive file system)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare the names
        return a.resolve() == b.resolve()


@dataclass
class TrainConfig:
    """Everything a training run needs; the defaults are the paper's recipe.

    Data (exactly one kind): ``data`` (a DPDD folder), ``source``/``target`` (paired folders),
    or synthetic pairs from ``synthetic`` folders of sharp photos, ``skimage`` images and/or
    ``procedural`` dead-leaves scenes. ``model=None`` means the paper's 3-level network
    (single-image, or dual-pixel with ``dual``), or the architecture of ``init``.
    ``iterations``/``lr`` of None take the stage's default (200k/1e-4 for ``l1``,
    100k/5e-5 for ``perceptual``). ``resume`` continues from ``out/last.pt``.
    """

    out: Path = Path("runs/kpac")
    # data
    data: Path | None = None
    source: Path | None = None
    target: Path | None = None
    val_source: Path | None = None
    val_target: Path | None = None
    synthetic: tuple[Path, ...] = ()
    skimage: bool = False
    procedural: int = 0
    allow_count_mismatch: bool = False
    bit_depth: int = 8
    dual: bool = False
    cache: str = "auto"  # auto | yes | no: keep decoded training images in memory
    max_radius: float = 12.0  # synthetic blur
    aperture: str = "disc"
    # Synthetic data, not in the paper: each crop comes from its source as if downscaled by a
    # random factor in [rescale, 1] (1: off), and is transposed half the time: more distinct
    # scenes from few photos. Why: on 70 photos, a longer kpac-3level fine-tune gained 0.48 dB
    # on held-out photos of the same sets but 0.08 dB on other photos (weights/README.md).
    rescale: float = 1.0
    transpose: bool = False
    # Synthetic data, not in the paper: each crop's colours moved from grey by a random factor
    # in [1, saturation] (1: off). Why: the training photos are muted; the +1.99 dB kpac-3level
    # gained 0.37 dB less on held-out renders with 1.5x the saturation, 0.23 dB more on grey ones.
    saturation: float = 1.0
    # model
    model: KPACConfig | None = None
    init: Path | None = None
    # recipe
    stage: str = "l1"
    iterations: int | None = None
    lr: float | str | None = None  # a number or an LRSchedule string
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    batch: int = 4
    crop: str = "512"
    noise_max: float = 0.03
    flips: bool = True
    perceptual_weight: float = 7e-4
    blur_rank_weight: float = 0.0  # not in the paper: see kpac_cli.train.blur_ranking
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: off; not in the paper)
    vgg_weights: Path | None = None
    grad_clip: float = 0.0
    max_nonfinite: int = 20
    seed: int = 0
    # validation, logging, checkpoints
    val_every: int = 5000
    val_count: int = 8
    val_crop: int = 512  # centre crop of each validation image; 0 = whole image
    # The --val-crop a run's procedural scenes were drawn for, once a resume changed --val-crop
    # (None: --val-crop itself): the scenes are what the run trains on, so they stay as they were.
    scenes_val_crop: int | None = None
    save_every: int = 1000
    log_every: int = 100
    resume: bool = False
    tensorboard: bool = True
    # execution
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    channels_last: bool | None = None  # None: on (NHWC is faster on CPUs and GPUs alike)
    workers: int = -1  # -1: automatic
    threads: int | None = None
    # Seconds a process of a multi-process run waits for the others before it gives up (None:
    # torch's default, 30 min; 10 for NCCL): what bounds the wait for one that hung, or died
    # without its connections closing, when no launcher (torchrun) ends the others on its exit.
    dist_timeout: float | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("out", "data", "source", "target", "val_source", "val_target", "init", "vgg_weights"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, Path):
                setattr(self, name, Path(v))
        self.synthetic = tuple(Path(p) for p in self.synthetic)
        if isinstance(self.model, dict):
            self.model = KPACConfig.from_dict(self.model)

    # -- derived -----------------------------------------------------------------------
    @property
    def total_iterations(self) -> int:
        return int(self.iterations if self.iterations is not None else STAGE_DEFAULTS[self.stage]["iterations"])

    @property
    def lr_schedule(self) -> LRSchedule:
        return LRSchedule(self.lr if self.lr is not None else STAGE_DEFAULTS[self.stage]["lr"])

    @property
    def learning_rate(self) -> float:
        """The learning rate at the first iteration."""
        return float(self.lr_schedule.at(0))

    @property
    def crop_schedule(self) -> CropSchedule:
        return CropSchedule(self.crop)

    @property
    def data_kind(self) -> str:
        """``dpdd``, ``paired`` or ``synthetic``."""
        if self.data is not None:
            return "dpdd"
        if self.source is not None or self.target is not None:
            return "paired"
        return "synthetic"

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent setting (by its ``kpac train`` flag)."""
        if self.val_count < 0 or self.val_crop < 0 or self.procedural < 0:  # first: a negative --procedural is no data
            raise ValueError("--val-count, --val-crop and --procedural must be >= 0")
        kinds = [self.data is not None, self.source is not None or self.target is not None,
                 bool(self.synthetic) or self.skimage or self.procedural > 0]
        if sum(kinds) == 0:
            raise ValueError("no training data: give --data DPDD, --source and --target, or synthetic sources "
                             "(--synthetic, --skimage, --procedural)")
        if sum(kinds) > 1:
            raise ValueError("give only one kind of training data: --data, --source/--target, or synthetic sources "
                             "(--synthetic, --skimage, --procedural)")
        if (self.source is None) != (self.target is None):
            raise ValueError("--source and --target must be given together")
        if (self.val_source is None) != (self.val_target is None):
            raise ValueError("--val-source and --val-target must be given together")
        if self.val_source is not None and self.data_kind != "paired":
            # DPDD validates on its val split and synthetic data on held-out sources
            raise ValueError("--val-source and --val-target go with --source/--target (--data validates on its val split, "
                             "synthetic data on held-out sources)")
        if self.data_kind == "paired" and self.dual:
            raise ValueError("--dual needs the DPDD layout (left/right views) or synthetic data")
        for inputs, targets, flags in ((self.source, self.target, "--source and --target"),
                                       (self.val_source, self.val_target, "--val-source and --val-target")):
            if inputs is not None and targets is not None and _same_folder(inputs, targets):
                # every pair would be a photo and itself: the model would learn to change nothing
                raise ValueError(f"{flags} are the same folder ({inputs}): give the folder of defocused photos "
                                 "and the folder of their sharp counterparts")
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.bit_depth not in (8, 16):
            raise ValueError(f"--bit-depth must be 8 or 16, got {self.bit_depth}")
        if self.cache not in ("auto", "yes", "no"):
            raise ValueError(f"--cache must be auto, yes or no, got {self.cache!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        # Checked here although only synthetic data uses them: SynthSettings would refuse them
        # later, after the run folder exists, naming its own fields.
        if not (math.isfinite(self.max_radius) and self.max_radius >= 0):
            raise ValueError(f"--max-radius must be a number >= 0, got {self.max_radius:g}")
        if self.aperture not in ("disc", "polygon"):
            raise ValueError(f"--aperture must be disc or polygon, got {self.aperture!r}")
        for name in ("batch", "save_every", "log_every", "val_every", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.workers < -1:
            raise ValueError(f"--workers must be >= 0, or -1 (automatic), got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.dist_timeout is not None and not (math.isfinite(self.dist_timeout) and self.dist_timeout > 0):
            raise ValueError(f"--dist-timeout must be a number of seconds > 0, got {self.dist_timeout:g}")
        if self.total_iterations < 0:
            raise ValueError("--iterations must be >= 0")
        try:
            self.lr_schedule  # raises on a bad schedule or a rate <= 0
        except ValueError as e:
            raise ValueError(f"--lr: {e}") from None
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("--beta1 and --beta2 must lie in [0, 1)")
        if not (math.isfinite(self.noise_max) and self.noise_max >= 0):
            raise ValueError("--noise-max must be >= 0")
        if not 0 < self.rescale <= 1:
            raise ValueError(f"--rescale must lie in (0, 1], got {self.rescale}")
        if not (math.isfinite(self.saturation) and self.saturation >= 1):  # inf: no factor can be drawn
            raise ValueError(f"--saturation must be a number >= 1, got {self.saturation}")
        if (self.rescale < 1 or self.transpose or self.saturation > 1) and self.data_kind != "synthetic":
            raise ValueError("--rescale, --transpose and --saturation apply to synthetic data (they change the sharp scene before rendering)")
        if not 0 <= self.ema < 1:
            raise ValueError(f"--ema must lie in [0, 1), got {self.ema}")
        # NaN passes every "< 0" test and then silently switches the term off (or poisons the loss)
        for name in ("blur_rank_weight", "perceptual_weight", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a number >= 0, got {value:g}")
        if self.blur_rank_weight > 0 and self.data_kind != "synthetic":
            raise ValueError("--blur-rank-weight needs synthetic data (it uses the true blur radius of every pixel)")
        if self.blur_rank_weight > 0 and self.model is not None and not self.model.scale_attention:
            raise ValueError("--blur-rank-weight needs a model with scale attention")
        try:
            sched = self.crop_schedule  # raises on a bad schedule
            if self.model is not None:
                sched.check_multiple(self.model.stride)
        except ValueError as e:
            raise ValueError(f"--crop: {e}") from None
        if self.model is not None:
            if self.val_crop:
                if self.val_crop % self.model.stride:
                    raise ValueError(f"--val-crop must be a multiple of the model stride {self.model.stride}")
            if self.dual and self.model.in_views != 2:
                raise ValueError("dual-pixel training needs a model with in_views=2")
            if not self.dual and self.model.in_views != 1:
                raise ValueError("a dual-pixel model (in_views=2) needs dual-pixel data (--dual)")

    # -- (de)serialisation, for the checkpoint ------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in list(d.items()):
            if isinstance(v, Path):
                d[k] = str(v)
        d["synthetic"] = [str(p) for p in self.synthetic]
        d["model"] = None if self.model is None else self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "synthetic" in kw:
            kw["synthetic"] = tuple(kw["synthetic"])
        return cls(**kw)

    def replace(self, **changes: Any) -> "TrainConfig":
        return replace(self, **changes)
