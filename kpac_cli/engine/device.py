"""Choosing a device and a numeric precision, and what memory is available there."""

from __future__ import annotations

import os
import platform
from contextlib import nullcontext
from pathlib import Path
from typing import ContextManager

import torch

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


DEVICE_KINDS = ("cpu", "cuda", "mps")


def device_name(name: str | torch.device | None) -> str:
    """The lower-case spelling of a device (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``; a
    :class:`torch.device` or None, meaning ``auto``, too), whether or not it exists here.

    Raises ValueError for anything else, so that a misspelt device is refused where it is given.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if name is None or name == "":
        return "auto"
    if not isinstance(name, str):
        raise ValueError(f"device must be a name such as 'cpu' or 'cuda:0' (or a torch.device), got {name!r}")
    name = name.strip().lower()
    if name == "auto":
        return name
    try:
        kind = torch.device(name).type
    except RuntimeError:
        kind = None
    if kind not in DEVICE_KINDS:
        raise ValueError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)")
    return name


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> the first CUDA GPU, else Apple's MPS, else the CPU; or an explicit name.

    Raises ValueError for a device that is not available here, naming what is.
    """
    name = device_name(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available (this PyTorch build: {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise ValueError("device 'mps' requested but Apple MPS is not available")
    return dev


#: The torch dtypes a precision may be given as, by the name they stand for.
_PRECISION_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def precision_name(name: str | torch.dtype | None) -> str:
    """The spelling of a precision among :data:`PRECISIONS` (a torch dtype such as
    ``torch.bfloat16``, or None, meaning ``auto``, too). Raises ValueError for anything else."""
    if isinstance(name, torch.dtype):
        if name not in _PRECISION_DTYPES:
            raise ValueError(f"unknown precision {name} (use one of {', '.join(PRECISIONS)}, or torch.float32, "
                             "torch.float16 or torch.bfloat16)")
        return _PRECISION_DTYPES[name]
    if name is None or name == "":
        return "auto"
    if not isinstance(name, str) or name.strip().lower() not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r} (use one of {', '.join(PRECISIONS)})")
    return name.strip().lower()


def resolve_precision(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto`` = fp16 on CUDA, fp32 elsewhere; fp16 only where the device supports it."""
    name = precision_name(name)
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name == "fp16" and device.type == "cpu":
        raise ValueError("fp16 is not supported for inference on the CPU; use bf16 or fp32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bf16; use fp16 or fp32")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def autocast(device: torch.device, dtype: torch.dtype) -> ContextManager:
    """Mixed precision for everything but fp32 (convolutions in ``dtype``, sums in fp32)."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def available_memory(device: torch.device) -> int:
    """Bytes that inference may use on ``device`` now (free GPU memory, or available RAM)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # What PyTorch's caching allocator holds without a tensor in it is ours to use, but the
        # driver counts it as taken: without it, every photo after the first of a batch would be
        # planned for the memory the first one left cached (smaller tiles, skip maps recomputed).
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free) + max(int(cached), 0)
    return available_ram()


def available_ram() -> int:
    """Bytes of main memory available now: ``MemAvailable``, or less when the process's control
    group (a container's memory limit) leaves less; 4 GiB when it cannot be told."""
    ram = _system_available_ram()
    left = _cgroup_memory_left()
    return ram if left is None else min(ram, left)


def _system_available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


CGROUP_ROOT = Path("/sys/fs/cgroup")
_PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def _cgroup_memory_left() -> int | None:
    """Bytes the memory limits of this process's control group and its parents leave (cgroup
    v2, else v1), or None where none is set. Inside a container ``MemAvailable`` is the host's:
    planning with it would exceed the container's limit, and the kernel kills the process
    outright. Reclaimable page cache (``inactive_file``) counts as free, as container runtimes
    count it."""
    try:
        own = _PROC_SELF_CGROUP.read_text()
    except OSError:
        own = ""
    v2 = next((line[3:].strip() for line in own.splitlines() if line.startswith("0::")), "/")
    v1 = next((line.split(":", 2)[2].strip() for line in own.splitlines() if ":memory:" in line), "/")
    lefts = []
    for root, limit_name, usage_name, folder in ((CGROUP_ROOT, "memory.max", "memory.current", v2),
                                                  (CGROUP_ROOT / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", v1)):
        path = root / folder.lstrip("/")
        while True:  # the group itself and every parent: the tightest limit applies
            left = _group_memory_left(path, limit_name, usage_name)
            if left is not None:
                lefts.append(left)
            if path == root or root not in path.parents:
                break
            path = path.parent
        if lefts:
            break
    return min(lefts) if lefts else None


def _group_memory_left(folder: Path, limit_name: str, usage_name: str) -> int | None:
    """What one group's limit leaves, or None where it sets none (or cannot be read)."""
    try:
        limit_text = (folder / limit_name).read_text().strip()
        if limit_text == "max":
            return None
        limit = int(limit_text)
        usage = int((folder / usage_name).read_text().strip())
    except (OSError, ValueError):
        return None
    if limit >= 1 << 60:  # cgroup v1 writes "no limit" as a number near 2**63
        return None
    try:
        stat = dict(line.split(" ", 1) for line in (folder / "memory.stat").read_text().splitlines() if " " in line)
        # v1's usage counts the group's children, as its total_ figures do; v2 has inactive_file only
        reclaimable = int(stat.get("total_inactive_file", stat.get("inactive_file", 0)))
    except (OSError, ValueError):
        reclaimable = 0
    return max(limit - usage + reclaimable, 0)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_fast_bf16() -> bool:
    """True on CPUs that multiply bf16 in hardware: Intel AMX or AVX512-BF16 (AMD Zen 4 on).

    Only there is bf16 autocast worth choosing on a CPU: a training step took half the fp32
    time on a 2-core Zen 4 EPYC (AVX512-BF16) and a quarter on an AMX Xeon. Without either
    (AVX2: older EPYC and most laptop chips) oneDNN emulates bf16: a step took 12x longer than
    in fp32 on a 2-core AVX2 EPYC (``benchmarks/train_throughput.py`` measures both on the
    machine at hand).
    """
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if all(probe is not None for probe in probes):  # private in PyTorch 2.x
        try:
            return any(bool(probe()) for probe in probes)
        except RuntimeError:
            pass
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and {"amx_bf16", "avx512_bf16"} & set(line.split()) for line in f)
    except OSError:
        return False


def is_out_of_memory(err: BaseException) -> bool:
    """True for CUDA OOM and for the CPU allocator's 'can't allocate memory' errors."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    msg = str(err).lower()
    return isinstance(err, (RuntimeError, MemoryError)) and ("out of memory" in msg or "can't allocate memory" in msg or isinstance(err, MemoryError))
