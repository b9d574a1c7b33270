"""VGG-19 features up to conv4_4 (+ ReLU) for the perceptual stage, without torchvision.

Weights are ImageNet's, in torchvision's file format (``vgg19-dcbb9e9d.pth``: a state dict
with keys ``features.N.weight`` / ``features.N.bias``), read with
``torch.load(weights_only=True)``, so a file from anywhere cannot run code. Only the
convolutions up to conv4_4 (``features.0`` .. ``features.25``) are used.

Conventions: :class:`VGG19Features` takes RGB in [0, 1] and applies ImageNet's mean/std
normalisation itself; it is frozen (no gradients to its weights, always in eval mode).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VGG19_FILE = "vgg19-dcbb9e9d.pth"

# torchvision's vgg19 "E" configuration up to conv4_4: channel counts, "M" = 2x2 max-pool.
_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGWeightsMissing(Exception):
    """The VGG-19 weights the perceptual stage needs are not on this machine."""


def default_weights_path() -> Path:
    """Where torch's hub keeps torchvision's download: ``torch.hub.get_dir()/checkpoints/``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE


def find_vgg_weights(explicit: str | Path | None = None) -> Path:
    """The weights file to use, or VGGWeightsMissing saying where to put one."""
    if explicit is not None:
        p = Path(explicit)
        if not p.is_file():
            raise VGGWeightsMissing(f"VGG-19 weights not found at {p}")
        return p
    p = default_weights_path()
    if p.is_file():
        return p
    raise VGGWeightsMissing(
        "the perceptual stage needs ImageNet VGG-19 weights in torchvision's format "
        f"({VGG19_FILE}, 548 MB, published by torchvision); put the file at {p} "
        "or pass its location with --vgg-weights PATH"
    )


class VGG19Features(nn.Module):
    """conv1_1 ... conv4_4 with ReLUs and max-pools; output = relu4_4 features."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in _CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                cin = int(v)
        self.features = nn.Sequential(*layers)  # indices match torchvision's vgg19().features
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VGG19Features":
        return super().train(False)  # frozen feature extractor

    def forward(self, rgb01: Tensor) -> Tensor:
        return self.features((rgb01 - self.mean.to(rgb01.dtype)) / self.std.to(rgb01.dtype))

    def load_torchvision(self, path: str | Path) -> None:
        """Load ``features.N.*`` tensors from a torchvision VGG-19 state dict file."""
        path = Path(path)
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - weights_only refusals come as several types
            raise VGGWeightsMissing(f"{path}: not a readable VGG-19 weights file ({type(e).__name__}: {e})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or wrong:
            what = f"missing {missing[0]}" if missing else f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}"
            raise VGGWeightsMissing(f"{path}: not torchvision VGG-19 weights ({what})")
        self.load_state_dict({k: state[k].float() for k in own})


def load_vgg19(explicit: str | Path | None = None) -> VGG19Features:
    model = VGG19Features()
    model.load_torchvision(find_vgg_weights(explicit))
    return model


class PerceptualLoss(nn.Module):
    """``weight * MSE(vgg(pred), vgg(target))`` on images given in the network's [-1, 1]."""

    def __init__(self, vgg: VGG19Features, weight: float = 7e-4) -> None:
        super().__init__()
        self.vgg, self.weight = vgg, weight

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        fp = self.vgg((pred + 1) * 0.5)
        with torch.no_grad():
            ft = self.vgg((target + 1) * 0.5)
        return self.weight * F.mse_loss(fp.float(), ft.float())


__all__ = ["VGG19Features", "VGGWeightsMissing", "PerceptualLoss", "find_vgg_weights", "load_vgg19", "default_weights_path", "VGG19_FILE"]
