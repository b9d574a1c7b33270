"""Multi-process runs under ``torchrun`` (training and batch deblurring): detection, process group, agreement.

``torchrun --nproc_per_node=N -m kpac_cli train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``); :func:`setup` reads them, joins the
process group (NCCL for CUDA, gloo for the CPU) and picks ``cuda:LOCAL_RANK``. Without
them, or with ``WORLD_SIZE=1``, training is single-process and nothing here does anything.

Conventions: only rank 0 logs, validates and writes files; every rank must take the same
decisions at the same step (skip a non-finite batch, stop on a signal or on a failure of one
rank), which :func:`agree` settles with one tiny all-reduce per step. A rank that fails does
not leave the others waiting in a collective: it says so at the next agreement, where every
rank learns why with :func:`gather_object` and stops. A rank that fails between two
agreements leaves without joining another collective (:func:`teardown` with
``together=False``), so that its exit ends the run rather than a hang until the group's timeout.
A rank that hangs ends nothing: that timeout (:func:`setup`'s ``timeout``) is then what bounds
the others' wait, when no launcher ends them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    owns_group: bool = False  # True when setup() created the process group (and must destroy it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Ranks from the environment (torchrun's variables); single-process when absent."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return DistInfo()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return DistInfo(rank, world, local, local_world)


def device_for_rank(name: str, info: DistInfo) -> str:
    """Under ``torchrun``, ``auto`` and a plain ``cuda`` mean this rank's own GPU
    (``cuda:LOCAL_RANK``), and ``auto`` without CUDA means the CPU; an explicit index, any
    other name and a single process are left as they are."""
    name = (name or "auto").lower()
    if not info.enabled or name not in ("auto", "cuda"):
        return name
    if torch.cuda.is_available():
        return f"cuda:{info.local_rank}"
    return "cpu" if name == "auto" else name


def setup(device: torch.device, timeout: float | None = None) -> DistInfo:
    """Join the process group described by the environment (no-op for a single process).

    ``timeout``: seconds a process waits for the others, in joining and in every collective,
    before it raises (gloo) or is ended by torch's watchdog (NCCL); None: torch's default.
    """
    info = env_info()
    if not info.enabled:
        return info
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), info.local_rank, info.local_world_size, False)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, **({} if timeout is None else {"timeout": timedelta(seconds=timeout)}))
    return DistInfo(dist.get_rank(), dist.get_world_size(), info.local_rank, info.local_world_size, True)


def teardown(info: DistInfo, together: bool = True) -> None:
    """Leave the process group. ``together``: every rank leaves at this point (they agreed to
    stop, or the run ended), so they wait for each other first. Otherwise this rank leaves on
    its own (it failed, or lost another rank, between two agreements): the others may be
    waiting in a collective it will never join, so it joins none, aborts its side of the group
    and leaves at once; its exit, or the launcher's stopping the others on it, ends them."""
    if not (info.owns_group and dist.is_initialized()):
        return
    if together:
        try:
            # a rank that destroys the group while another still talks to it aborts in gloo's
            # threads ("terminate called without an active exception")
            dist.barrier()
            dist.destroy_process_group()
            return
        except Exception as e:
            if not lost_contact(e):
                raise
            # another rank ended after the last agreement (killed): this one's work is done
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    try:
        # aborting does not wait for pending work (NCCL's destroy may wait for a collective
        # that the other ranks will never complete); torch without it: the process exit frees it
        if abort is not None:
            abort()
    except Exception:  # noqa: BLE001 - leaving anyway: the failure that brought us here is what matters
        pass


def lost_contact(error: BaseException) -> bool:
    """Whether ``error`` came from the communication between the ranks (a collective whose peer
    is gone or timed out: gloo's "Connection closed by peer", NCCL's and the store's errors)
    rather than from this rank's own work."""
    return isinstance(error, dist.DistError) or "gloo/transport" in str(error)


def timed_out(error: BaseException) -> bool:
    """Whether a communication error is the process group's timeout (gloo's "Timed out waiting
    3000ms for send operation", the store's "Timed out after 4 seconds waiting for clients", a
    socket's "has timed out"): the other processes did not answer, rather than went away."""
    return lost_contact(error) and re.search(r"\btimed out\b", str(error), re.IGNORECASE) is not None


def communication_error_summary(error: BaseException) -> str:
    """The gist of a communication error: its first sentence, without gloo's source location
    ("[.../pair.cc:553] Connection closed by peer [127.0.0.1]:6581. This is typically...")."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if text.startswith("[") and "] " in text:
        text = text[text.index("] ") + 2:]
    return text.split(". ")[0].rstrip(".")


def agree(info: DistInfo, flags: list[bool], device: torch.device) -> list[bool]:
    """Logical OR of each flag over all ranks (identity for a single process)."""
    if not info.enabled:
        return flags
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def gather_object(info: DistInfo, obj: object) -> list[object]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    box: list[object] = [None] * info.world_size
    dist.all_gather_object(box, obj)
    return box


def broadcast_object(info: DistInfo, obj: object) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
