"""The architecture of a KPAC network as a small, serialisable config.

A model is built from its config alone (:func:`kpac_cli.model.build_model`), and every
checkpoint carries its config, so nothing about a model is ever guessed from a file name.
The defaults are the paper's 3-level single-image network; the fields cover the ablations
of the paper's Tables 1-3 (number of blocks, kernel size, dilation rates, attention on/off,
shared vs. unshared atrous kernels).
"""

from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class KPACConfig:
    """Architecture of a KPAC deblurring network.

    Attributes
    ----------
    levels : int
        Number of stride-2 encoder levels (2 or 3). The KPAC blocks run at 1/2**levels of the
        input resolution, so the network takes sizes that are multiples of ``2**levels``
        (:attr:`stride`); the engine (:class:`kpac_cli.engine.Deblurrer`) pads any size.
    in_views : int
        1 for a single image (RGB in), 2 for dual-pixel input (left and right views, 6 channels
        in; the residual is added to the centre view).
    channels : int
        Width of the full- and half-resolution levels; the deeper levels and the KPAC blocks
        use twice this. The paper uses 48.
    blocks : int
        Number of KPAC blocks (the paper uses 2; Table 2 ablates 1-4).
    kernel_size : int
        Size of the atrous kernel shared by the branches (paper: 5).
    dilations : tuple of int
        Dilation rates of the parallel atrous branches (paper: 1..5).
    scale_attention, shape_attention : bool
        Whether the per-pixel scale attention and per-channel shape attention are used
        (Table 3 ablations). When off, the attention weights are 1.
    shared_kernel : bool
        One atrous kernel shared by all branches (the paper's key idea) or one per branch.
    """

    levels: int = 3
    in_views: int = 1
    channels: int = 48
    blocks: int = 2
    kernel_size: int = 5
    dilations: tuple[int, ...] = (1, 2, 3, 4, 5)
    scale_attention: bool = True
    shape_attention: bool = True
    shared_kernel: bool = True
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        # Types first: a config read from a file may hold 48.0 or true where a count belongs,
        # which the range checks below would pass and the model build would then trip over.
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if not _is_int(value):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if not isinstance(self.dilations, (list, tuple)) or not all(_is_int(d) for d in self.dilations):
            raise ValueError(f"dilations must be positive integers, got {self.dilations!r}")
        object.__setattr__(self, "dilations", tuple(int(d) for d in self.dilations))
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):  # the string "false" would switch a part on
                raise ValueError(f"{name} must be true or false, got {value!r}")
        if self.levels not in (2, 3):
            raise ValueError(f"levels must be 2 or 3, got {self.levels}")
        if self.in_views not in (1, 2):
            raise ValueError(f"in_views must be 1 or 2, got {self.in_views}")
        if self.channels < 8 or self.channels % 4:
            raise ValueError(f"channels must be a multiple of 4 and >= 8, got {self.channels}")
        if self.blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {self.blocks}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {self.kernel_size}")
        if not self.dilations or min(self.dilations) < 1:
            raise ValueError(f"dilations must be positive integers, got {self.dilations}")

    @property
    def stride(self) -> int:
        """Total downsampling factor of the encoder; input sizes are padded to a multiple."""
        return 2**self.levels

    @property
    def in_channels(self) -> int:
        return 3 * self.in_views

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dilations"] = list(self.dilations)
        if not d["extra"]:
            d.pop("extra")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KPACConfig":
        if not isinstance(d, dict):  # e.g. a list or a string read from a file's metadata
            raise ValueError(f"a KPACConfig is a JSON object of fields, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown KPACConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "KPACConfig":
        return cls.from_dict(json.loads(s))


_INT_FIELDS = ("levels", "in_views", "channels", "blocks", "kernel_size")
_BOOL_FIELDS = ("scale_attention", "shape_attention", "shared_kernel")


def _is_int(value: Any) -> bool:
    """An integer (a NumPy one too), but not a bool, which Python counts as one."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


#: The configurations of the authors' three released models (paper, Table 4).
PAPER_CONFIGS: dict[str, KPACConfig] = {
    "single_2level": KPACConfig(levels=2),
    "single_3level": KPACConfig(levels=3),
    "dual": KPACConfig(levels=3, in_views=2),
}
