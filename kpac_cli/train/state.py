"""Training checkpoints (``last.pt``, ``best.pt``): atomic writes, safe reads, RNG state.

A training checkpoint is a ``torch.save`` dict holding only tensors, numbers, strings,
lists and dicts, so it loads with ``torch.load(weights_only=True)`` (nothing is unpickled
as code). Keys:

* ``format`` = ``"kpac-train"``, ``version``
* ``config``: the model's :class:`~kpac_cli.model.KPACConfig` as a dict and ``model``: its
  state dict - so :func:`kpac_cli.checkpoints.load_checkpoint` reads these files too
* ``optimizer``, ``scaler`` (fp16 loss scaling; empty otherwise), ``step`` (iterations done)
* ``rng``: python / numpy / torch (/ CUDA) generator states of rank 0
* ``sampler``: ``{"next_step", "seed", "batch", "world_size"}`` - the data pipeline's whole
  state, since every sample is a function of its global index (see :mod:`.data`)
* ``train_config``: the :class:`~kpac_cli.train.TrainConfig` as a dict
* ``scores`` (latest validation), ``best`` (best validation), ``elapsed_s`` (training
  wall-clock so far), ``provenance`` (what an exported model will carry)

Writes go to a temporary file in the same folder, are fsync'ed, then renamed over the old
file (:mod:`kpac_cli.images.atomic`): a crash or ``kill -9`` at any moment leaves either the
old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..images import atomic_output

FORMAT = "kpac-train"
VERSION = 1


def _write(obj: Any, f: BinaryIO) -> None:
    torch.save(obj, f)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (:func:`kpac_cli.images.atomic_output`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        _write(obj, f)
    return path


class CheckpointError(Exception):
    """A training checkpoint that is missing, unreadable or not kpac's."""


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint safely (``weights_only=True``) onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: unreadable training checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a kpac training checkpoint (use a last.pt or best.pt written by kpac train)")
    return obj


def resolve_checkpoint(run: str | Path, which: str = "last") -> Path:
    """A run folder (-> its ``last.pt``/``best.pt``) or a checkpoint file."""
    run = Path(run)
    if run.is_dir():
        path = run / f"{which}.pt"
        if not path.is_file():
            raise CheckpointError(f"{run} holds no {which}.pt (nothing saved yet?)")
        return path
    if run.is_file():
        return run
    raise CheckpointError(f"no such run folder or checkpoint: {run}")


def capture_rng() -> dict[str, Any]:
    py = random.getstate()
    npk, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(py[0]), "state": [int(v) for v in py[1]], "gauss": py[2]},
        "numpy": {"kind": str(npk), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def weights_finite(state_dict: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state_dict.values() if t.is_floating_point())
