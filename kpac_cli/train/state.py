"""Training checkpoints (``last.pt``, ``best.pt``): atomic writes, safe reads, RNG state.

A training checkpoint is a ``torch.save`` dict holding only tensors, numbers, strings,
lists and dicts, so it loads with ``torch.load(weights_only=True)`` (nothing is unpickled
as code). Keys:

* ``format`` = ``"kpac-train"``, ``version``
* ``config``: the model's :class:`~kpac_cli.model.KPACConfig` as a dict and ``model``: its
  state dict - so :func:`kpac_cli.checkpoints.load_checkpoint` reads these files too
* ``optimizer``, ``scaler`` (fp16 loss scaling; empty otherwise), ``step`` (iterations done)
* ``optimizer_state``: ``{"file", "sha256"}`` where :func:`save_state` moved the optimiser's
  per-parameter state (Adam's two moments: twice the model's size) into a companion file
  ``<stem>.optim-<sha256[:16]>.pt`` beside the checkpoint, so that neither file is over 20 MB
  for the paper's models; checkpoints of earlier versions hold it inline and still load
* ``ema`` (only with ``--ema``): the moving average of the weights, which validation and
  export use (``model`` keeps the raw weights, for an exact resume)
* ``rng``: python / numpy / torch (/ CUDA) generator states of rank 0
* ``sampler``: ``{"next_step", "seed", "batch", "world_size"}`` - the data pipeline's whole
  state, since every sample is a function of its global index (see :mod:`.data`)
* ``train_config``: the :class:`~kpac_cli.train.TrainConfig` as a dict
* ``data_record``: the training items' names (in the run's order), sizes and SHA-256 digests,
  which a resume must find again (:func:`kpac_cli.train.data.check_same_data`); checkpoints of
  earlier versions have none (or sizes but no digests) and resume as they always did
* ``scores`` (latest validation), ``best`` (best validation), ``elapsed_s`` (training
  wall-clock so far), ``provenance`` (what an exported model will carry)

Writes go to a temporary file in the same folder, are fsync'ed, then renamed over the old
file (:mod:`kpac_cli.images.atomic`): a crash or ``kill -9`` at any moment leaves either the
old or the new checkpoint, never a torn one. The companion file is named by its content and
written before the checkpoint that names it; companions of earlier saves are removed only
after, so a crash between the writes still leaves a whole old or new pair.
"""

from __future__ import annotations

import hashlib
import io
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


def save_state(obj: dict[str, Any], path: str | Path) -> Path:
    """Save a training checkpoint atomically, the optimiser's per-parameter state apart.

    ``obj["optimizer"]["state"]`` goes to the content-named companion file (see the module
    docstring); ``obj`` itself is not changed.
    """
    path = Path(path)
    optimizer = obj["optimizer"]
    buf = io.BytesIO()
    _write(optimizer["state"], buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    companion = path.with_name(f"{path.stem}.optim-{digest[:16]}.pt")
    if not companion.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(companion) as tmp:
            Path(tmp).write_bytes(data)
    head = {**obj, "optimizer": {**optimizer, "state": {}}, "optimizer_state": {"file": companion.name, "sha256": digest}}
    atomic_save(head, path)
    for stale in path.parent.glob(f"{path.stem}.optim-*.pt"):
        if stale != companion:
            stale.unlink(missing_ok=True)
    return path


def load_state(path: str | Path, optimizer: bool = True) -> dict[str, Any]:
    """Read a training checkpoint safely (``weights_only=True``) onto the CPU.

    With ``optimizer`` (for resuming) the optimiser state is read back from its companion
    file, which must be there and match its SHA-256; without it (exporting, reading the
    weights) the companion is not needed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: unreadable training checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a kpac training checkpoint (use a last.pt or best.pt written by kpac train)")
    ref = obj.pop("optimizer_state", None)
    if ref is not None and optimizer:
        companion = path.with_name(ref["file"])
        if not companion.is_file():
            raise CheckpointError(f"{path}: its optimiser state {companion.name} is missing (it belongs beside the checkpoint)")
        data = companion.read_bytes()
        if hashlib.sha256(data).hexdigest() != ref["sha256"]:
            raise CheckpointError(f"{companion}: damaged (SHA-256 does not match {path.name})")
        try:
            obj["optimizer"]["state"] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{companion}: unreadable optimiser state ({type(e).__name__}: {e})") from None
    return obj


def resolve_checkpoint(run: str | Path, which: str = "last") -> Path:
    """A run folder (-> its ``last.pt``/``best.pt``) or a checkpoint file."""
    run = Path(run)
    if run.is_dir():
        path = run / f"{which}.pt"
        if not path.is_file():
            if which == "best" and (run / "last.pt").is_file():  # best.pt is written by validation only
                raise CheckpointError(f"{run} holds no best.pt: no validation has scored the run yet, or it runs "
                                      "without validation (--val-count 0); its last.pt is there (--from last)")
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
