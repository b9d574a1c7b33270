"""kpac: single-image and dual-pixel defocus deblurring with KPAC networks.

The names most scripts need are here, loaded on first use (``import kpac_cli`` alone does not
import torch)::

    from kpac_cli import Deblurrer, EngineOptions, read_image, write_image

    d = Deblurrer("kpac-3level", EngineOptions(device="auto"))
    image, info = read_image("photo.png")     # float32 HxWxC in [0, 1], as stored (display-encoded)
    write_image("photo_sharp.png", d.deblur(image), info)

Everything else lives in the sub-packages: :mod:`kpac_cli.model` (the network and its
configs), :mod:`kpac_cli.checkpoints`, :mod:`kpac_cli.engine`, :mod:`kpac_cli.images`,
:mod:`kpac_cli.metrics`, :mod:`kpac_cli.synth`, :mod:`kpac_cli.train`, :mod:`kpac_cli.blurmap`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the sub-module that defines it
_LAZY = {
    "Deblurrer": "engine",
    "EngineOptions": "engine",
    "read_image": "images",
    "write_image": "images",
    "KPACConfig": "model",
    "build_model": "model",
    "load_checkpoint": "checkpoints",
    "save_checkpoint": "checkpoints",
    "resolve_model": "checkpoints.registry",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
