"""Carry trained weights over to a related architecture, as a warm start for training.

Two relations are supported, each exact in a stated sense:

* **levels 3 -> 2** (or 2 -> 3): the 2-level network is the 3-level one without its deepest
  encoder level (``encoder.c4*``) and the decoder's matching upsampling (``decoder.d0*``); every
  other tensor has the same name and shape and is copied. Layers only the target has keep
  their fresh initialisation. This is a warm start, not an equivalent network: the KPAC
  blocks then see features one level shallower and need fine-tuning.
* **in_views 1 -> 2**: the first convolution's weights are split half/half over the left and
  right views, so the dual-pixel network starts out computing exactly what the single-image
  network computes on the centre view ``(left + right) / 2``; **2 -> 1** sums the halves, so
  the single network computes what the dual one does when both views are the image.

Every other architecture field must match: there is no sensible copy between, say, widths.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from torch import Tensor

from .config import KPACConfig

_FIRST_CONV = "encoder.c0.weight"
_TRANSFERABLE = {"levels", "in_views"}


def transfer_state(state: dict[str, Tensor], source: KPACConfig, target: KPACConfig,
                   fresh: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Weights for ``target`` built from ``state`` (trained for ``source``).

    ``fresh`` is a freshly initialised ``target`` model's state dict; tensors that have no
    counterpart in ``state`` are taken from it. Returns the new state and the names taken
    from ``fresh``. Raises ValueError when the architectures differ in anything but
    ``levels`` and ``in_views``.
    """
    differing = {f.name for f in fields(KPACConfig) if f.compare and getattr(source, f.name) != getattr(target, f.name)}
    if differing - _TRANSFERABLE:
        raise ValueError(f"cannot carry weights across a change of {', '.join(sorted(differing - _TRANSFERABLE))}; "
                         f"only {' and '.join(sorted(_TRANSFERABLE))} may differ")
    out: dict[str, Tensor] = {}
    fresh_names: list[str] = []
    for name, init in fresh.items():
        have = state.get(name)
        if name == _FIRST_CONV and have is not None and source.in_views != target.in_views:
            if source.in_views == 1:  # W c = (W/2) l + (W/2) r  for  c = (l + r) / 2
                out[name] = torch.cat([have / 2, have / 2], dim=1)
            else:  # dual with both views = x:  W_l x + W_r x
                out[name] = have[:, :3] + have[:, 3:]
        elif have is not None and have.shape == init.shape:
            out[name] = have.clone()
        else:
            out[name] = init.clone()
            fresh_names.append(name)
    return out, fresh_names
