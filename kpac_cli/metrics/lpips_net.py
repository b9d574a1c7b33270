"""LPIPS (AlexNet, v0.1) without torchvision, loading only locally stored weights.

LPIPS (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric", CVPR 2018), the variant the KPAC paper reports: AlexNet ``features`` (conv1-5,
each followed by ReLU; the five ReLU outputs are tapped), inputs in [-1, 1] first mapped by
the fixed scaling layer ``(x - shift) / scale`` with ``shift = (-.030, -.088, -.188)``
and ``scale = (.458, .448, .450)``; every tapped feature map is unit-normalised along
channels, the squared difference is weighted per channel by a learned non-negative 1x1
"linear" layer, averaged over space, and the five layers are summed.

Weights cannot be downloaded here, and a made-up LPIPS would be worse than none, so
:func:`load_lpips` only reads files that are already on disk (with
``torch.load(weights_only=True)``) and otherwise raises :class:`MetricUnavailable`
saying where to put them. Accepted files:

* the ``lpips`` package's linear-layer weights ``alex.pth`` (keys
  ``lin{0..4}.model.1.weight``; found inside an installed ``lpips`` package too) together
  with torchvision's ImageNet AlexNet ``alexnet-owt-7be5be79.pth`` (keys
  ``features.{0,3,6,8,10}.{weight,bias}``; ``classifier.*`` is ignored);
* or one combined state dict: the ``lpips.LPIPS`` module's own (``net.sliceK.N.*`` and
  ``linK.model.1.weight``) or this module's (``features.N.*`` and ``lins.K.weight``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from .errors import MetricUnavailable

__all__ = ["LPIPS", "load_lpips", "lpips", "LPIPS_ENV", "BACKBONE_FILE", "LINEAR_FILE", "COMBINED_FILE"]

#: Environment variable naming a weights file or folder (checked before the hub cache).
LPIPS_ENV = "KPAC_LPIPS_WEIGHTS"
#: torchvision's AlexNet checkpoint name (as cached by torchvision under the hub dir).
BACKBONE_FILE = "alexnet-owt-7be5be79.pth"
#: The lpips package's v0.1 linear-layer weights for AlexNet.
LINEAR_FILE = "alex.pth"
#: A single file holding both parts (e.g. written by :meth:`LPIPS.save`).
COMBINED_FILE = "lpips_alex.pth"

#: The smallest image side LPIPS-AlexNet takes (conv1 11x11/4, pad 2, then two 3x3/2 max-pools).
MIN_SIDE = 31
_CONV_INDICES = (0, 3, 6, 8, 10)  # positions of the convolutions in AlexNet.features
_CHANNELS = (64, 192, 384, 256, 256)
_TAPS = (1, 4, 7, 9, 11)  # the ReLU after each convolution


class LPIPS(nn.Module):
    """The LPIPS-AlexNet network. A fresh instance holds *random* weights.

    The random initialisation (non-negative linear weights) exists for testing the
    wiring only; use :func:`load_lpips` for real LPIPS values.
    """

    def __init__(self) -> None:
        super().__init__()
        # Same layer order and indices as torchvision's AlexNet.features, so checkpoint
        # keys map one to one.
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
        )
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in _CHANNELS)
        for lin in self.lins:  # learned LPIPS weights are non-negative; mimic that
            nn.init.uniform_(lin.weight, 0.0, 2.0 / lin.in_channels)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.eval()
        self.requires_grad_(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(x)
        return out

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """LPIPS distance per image.

        Parameters
        ----------
        x0, x1 : (N, 3, H, W) tensors
            RGB images in [-1, 1] (the ``lpips`` package's convention).

        Returns
        -------
        (N,) tensor
        """
        if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[1] != 3:
            raise ValueError(f"expected two (N, 3, H, W) tensors of one shape, got {tuple(x0.shape)}, {tuple(x1.shape)}")
        f0 = self._taps((x0 - self.shift) / self.scale)
        f1 = self._taps((x1 - self.shift) / self.scale)
        total = x0.new_zeros(x0.shape[0])
        for a, b, lin in zip(f0, f1, self.lins):
            diff = (_unit(a) - _unit(b)) ** 2
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return total

    def save(self, path: str | os.PathLike) -> None:
        """Write one combined state dict (loadable by :func:`load_lpips`)."""
        torch.save(self.state_dict(), path)


def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # Same epsilon placement as the lpips package's normalize_tensor.
    return x / (torch.sqrt((x * x).sum(dim=1, keepdim=True)) + eps)


@torch.no_grad()
def lpips(pred: np.ndarray, target: np.ndarray, model: LPIPS) -> float:
    """LPIPS distance of two ``(H, W, 3)`` float images in [0, 1] (lower is more similar).

    The images are mapped to [-1, 1] (``2 x - 1``) as the ``lpips`` package's
    ``normalize=True`` does. Both sides need at least :data:`MIN_SIDE` (31) pixels: below
    that AlexNet's second max-pooling has nothing left to pool.
    """
    p, t = np.asarray(pred, dtype=np.float32), np.asarray(target, dtype=np.float32)
    if p.shape != t.shape or p.ndim != 3 or p.shape[2] != 3:
        raise ValueError(f"LPIPS needs two (H, W, 3) images of one shape, got {p.shape} and {t.shape}")
    if min(p.shape[:2]) < MIN_SIDE:
        raise ValueError(f"image too small for LPIPS (AlexNet needs at least {MIN_SIDE} pixels a side): {p.shape[:2]}")
    dev = next(model.parameters()).device

    def prep(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None].to(dev) * 2 - 1

    return float(model(prep(p), prep(t))[0])


# ------------------------------------------------------------------------------ loading


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise MetricUnavailable(f"cannot read LPIPS weights from {path}: {e.strerror or e}") from e
    except Exception as e:  # noqa: BLE001 - not a torch file, or refused by weights_only
        # PyTorch's own message advises weights_only=False, which this loader never uses
        raise MetricUnavailable(
            f"cannot read LPIPS weights from {path}: not a PyTorch weights file holding only tensors "
            f"({type(e).__name__})"
        ) from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise MetricUnavailable(f"{path} does not hold a state dict")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


_LIN_RE = re.compile(r"^(?:module\.)?lin(\d)\.model\.(\d)\.weight$")
_SLICE_RE = re.compile(r"^(?:module\.)?net\.slice\d\.(\d+)\.(weight|bias)$")
_FEAT_RE = re.compile(r"^(?:module\.)?features\.(\d+)\.(weight|bias)$")
_OWN_LIN_RE = re.compile(r"^lins\.(\d)\.weight$")


def _normalise_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map any accepted naming (torchvision, lpips, ours) to this module's keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if m := _LIN_RE.match(key):
            out[f"lins.{m.group(1)}.weight"] = value
        elif m := (_SLICE_RE.match(key) or _FEAT_RE.match(key)):
            out[f"features.{m.group(1)}.{m.group(2)}"] = value
        elif _OWN_LIN_RE.match(key):
            out[key] = value
        # anything else (classifier.*, scaling_layer.*) is not needed
    return out


def _has_backbone(keys: set[str]) -> bool:
    return all(f"features.{i}.weight" in keys for i in _CONV_INDICES)


def _has_linear(keys: set[str]) -> bool:
    return all(f"lins.{i}.weight" in keys for i in range(5))


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _lpips_package_weights() -> Path | None:
    """``alex.pth`` inside an installed ``lpips`` package (found without importing it)."""
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        cand = Path(loc) / "weights" / "v0.1" / LINEAR_FILE
        if cand.is_file():
            return cand
    return None


def _candidates_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    names = [COMBINED_FILE, LINEAR_FILE, BACKBONE_FILE]
    found = [folder / n for n in names if (folder / n).is_file()]
    found += sorted(p for p in folder.glob("alexnet-owt-*.pth") if p.name != BACKBONE_FILE)
    return found


def load_lpips(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu") -> LPIPS:
    """Load LPIPS-AlexNet (v0.1) weights from local files only.

    Parameters
    ----------
    path : path-like, optional
        A combined weights file, the ``alex.pth`` linear weights (the AlexNet backbone is
        then looked for next to it and in the default places), or a folder holding
        ``alex.pth`` + ``alexnet-owt-7be5be79.pth`` (or ``lpips_alex.pth``). Without a
        path: ``$KPAC_LPIPS_WEIGHTS`` (file or folder), then PyTorch's hub cache
        ``torch.hub.get_dir()/checkpoints/`` (where torchvision caches
        ``alexnet-owt-7be5be79.pth``), then an installed ``lpips`` package's own
        ``weights/v0.1/alex.pth``.
    device : str or torch.device
        Where to put the network.

    Returns
    -------
    LPIPS
        In eval mode, without gradients.

    Raises
    ------
    MetricUnavailable
        When the weights are missing or unreadable; the message says which files were
        found, which are missing and where to put them. Never falls back to random
        weights.
    """
    # Most specific first; a later source only fills in what the earlier ones lacked.
    sources: list[Path] = []
    given: Path | None = None  # the file or folder the caller (or $KPAC_LPIPS_WEIGHTS) named
    env_missing = ""
    if path is not None:
        given = Path(path).expanduser()
        if not given.exists():
            raise MetricUnavailable(f"LPIPS weights not found at {given}")
    elif env := os.environ.get(LPIPS_ENV):
        given = Path(env).expanduser()
        if not given.exists():  # passed over, but said if nothing else is found
            env_missing = f"${LPIPS_ENV} names {given}, which does not exist; "
            given = None
    if given is not None:
        sources += _candidates_in(given) if given.is_dir() else [given, *_candidates_in(given.parent)]
    sources += _candidates_in(_hub_checkpoints())
    if (pkg := _lpips_package_weights()) is not None:
        sources.append(pkg)

    merged: dict[str, torch.Tensor] = {}
    used: list[str] = []
    seen: set[Path] = set()
    given_file_unused = False  # a named file that holds no LPIPS or AlexNet tensors
    for src in sources:
        src = src.resolve()
        if src in seen:
            continue
        seen.add(src)
        keys = _normalise_keys(_load_state(src))
        if not keys and given is not None and given.is_file() and src == given.resolve():
            given_file_unused = True
        new = {k: v for k, v in keys.items() if k not in merged}
        if new:
            merged.update(new)
            used.append(str(src))
        if _has_backbone(set(merged)) and _has_linear(set(merged)):
            break

    have = set(merged)
    missing = []
    if not _has_linear(have):
        missing.append(f"the LPIPS linear layers ('{LINEAR_FILE}' from the lpips package, weights/v0.1/)")
    if not _has_backbone(have):
        missing.append(f"the AlexNet backbone (torchvision's '{BACKBONE_FILE}')")
    if missing:
        if given is None:
            where = f"{_hub_checkpoints()} (or set ${LPIPS_ENV})"
        else:
            where = f"{given if given.is_dir() else given.parent} or {_hub_checkpoints()}"
        held = f"{given} holds no LPIPS or AlexNet weights; " if given_file_unused else ""
        raise MetricUnavailable(
            f"LPIPS weights not available: {env_missing}{held}missing " + " and ".join(missing)
            + f"; put the files in {where}"
        )

    model = LPIPS()
    own = model.state_dict()
    state = {k: merged[k] for k in own}
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise MetricUnavailable(
                f"LPIPS weights do not match AlexNet: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
                f" (from {', '.join(used)})"
            )
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    model.sources = tuple(used)  # type: ignore[attr-defined]  # provenance for reports
    return model.to(device)


def describe(model: Any) -> str:
    """One line naming the weight files a loaded model came from."""
    src = getattr(model, "sources", ())
    return "LPIPS v0.1 AlexNet, weights: " + (", ".join(Path(s).name for s in src) if src else "random (untrained)")
