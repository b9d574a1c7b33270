"""The training loop: :func:`train` and :func:`export_model`.

Conventions
-----------
* Progress goes to ``callback(TrainEvent)`` (the CLI draws it; the core has no UI) and,
  on rank 0, to ``OUT/log.jsonl`` (one JSON object per line, ``event`` names the kind;
  TensorBoard scalars too when ``torch.utils.tensorboard`` is importable).
* Checkpoints ``OUT/last.pt`` (every ``save_every`` iterations, on a signal, at the end) and
  ``OUT/best.pt`` (best validation PSNR) are written atomically by rank 0 and restore the
  run exactly: resuming at step s gives bit-for-bit the weights of an uninterrupted run.
* A non-finite loss skips its batch (no optimiser step, on every rank); after
  ``max_nonfinite`` in a row training stops with :class:`TrainingError` and the previous
  checkpoint stays as it was. Weights are checked finite before every write.
* SIGINT/SIGTERM: the current iteration finishes, ``last.pt`` is saved, and :func:`train`
  returns with ``interrupted=True`` (a second SIGINT raises KeyboardInterrupt at once). Under
  several processes a signal to any one of them stops them all, each with that signal. A
  validation stops at its next image. At the end of the run a signal (to rank 0) before the
  export stops it too (``interrupted_during``: "final validation" or "export"): ``last.pt``
  holds every iteration, and a resume validates and exports without training; a signal during
  the export itself (a moment) lets it complete. A signal to another rank then stops nothing:
  that rank waits for rank 0 in the last agreement (its handler runs only once rank 0 joins),
  and the run ends complete, exported, every rank as done, one final validation after the signal.
* At the end the model is exported as ``OUT/model.safetensors`` (kpac's checkpoint format,
  loadable by ``kpac deblur --model``) with the run's provenance in its metadata. Resuming a
  run that has done its iterations trains and writes nothing and says so
  (``TrainResult.already_complete``), unless it stopped before that export: then it finishes.
* A data problem met mid-run (a photo that cannot be read; photos are read as training needs
  them unless cached) saves ``last.pt`` at the iterations done, then raises a
  :class:`TrainingError` (the run failed; the same problem before the run is a DataError). So
  does a validation that fails (out of memory on whole images, ``best.pt`` that cannot be
  written), periodic or final: its error then says where ``last.pt`` stands (a full disk's
  OSError is raised as it is), and running out of memory there names what helps a validation
  (``--val-crop``), not what helps training. A resume may change ``--val-crop``: scores at
  another size compare with none before, so the best score (best.pt) starts afresh there, and
  the log says so (a ``validation_changed`` record).
* A run that fails once its log is open ends the log with a ``failed`` record (the one-line
  error, the iterations done), unless the log itself is what failed.
* Several processes (``torchrun``) stop together: a rank whose data fail, or whose set-up
  fails, or rank 0 when its log, validation, a checkpoint or the end of the run (final
  validation, ``last.pt``, export) fails, says so at the next point where the ranks synchronise
  (the per-step agreement; one point at the end of the set-up, one at the end of the run),
  instead of leaving the others waiting there forever. The failure is then raised on every
  rank: the error itself where it is reported (rank 0 for data problems, with where ``last.pt``
  stands; else the first rank that failed), :class:`RankFailed` on the others.
* A rank that fails between two such points (out of memory in its backward pass, while the
  others wait for its gradients in DDP's all-reduce; a second Ctrl-C) cannot tell the others:
  it joins no further collective and leaves at once (running out of memory is then a one-line
  TrainingError). The others stop with :class:`ProcessLost` when they lose contact with it
  (gloo), or when the launcher stops them on its exit (``torchrun``, whatever the backend).
  A rank that hangs, or dies without its connections closing (NCCL), ends neither: without a
  launcher the others wait for the process group's timeout, which ``dist_timeout``
  (``--dist-timeout``) shortens; each then says so itself (gloo; NCCL's watchdog ends them).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import __version__
from ..checkpoints import load_checkpoint, read_metadata, save_checkpoint
from ..checkpoints.safetensors_io import load_state_dict_checked, trained_weights
from ..engine.device import autocast, cpu_has_fast_bf16, cpu_name
from ..engine.device import resolve_device as _engine_device
from ..images import ImageError, cleanup_stale_temps
from ..metrics import psnr, ssim
from ..model import KPACConfig, KPACNet, build_model, count_parameters, transfer_state
from .. import distributed as D
from .blur_ranking import attention_blur_loss
from .config import STAGE_DEFAULTS, TrainConfig
from .data import (
    LEGACY_RECORD, DataBundle, DataError, StepBatchSampler, build_data, collate, procedural_scene_crop, procedural_scene_side,
    validation_crop, worker_init,
)
from .state import FORMAT, VERSION, capture_rng, load_state, resolve_checkpoint, restore_rng, save_state, weights_finite
from .vgg import PerceptualLoss, find_vgg_weights, load_vgg19


class TrainingError(Exception):
    """Training cannot start or cannot go on; the message says why and what to do."""


class RankFailed(TrainingError):
    """Another process of a multi-process run failed, and that process reports why: this one
    stops with it (``reporter``: the rank that says what went wrong)."""

    def __init__(self, reporter: int, message: str) -> None:
        super().__init__(f"process {reporter} stopped the run: {message}")
        self.reporter = reporter


class ProcessLost(TrainingError):
    """A multi-process run lost another of its processes between two agreements (it failed on
    its own, or was killed): this one stops too. The process that failed says why itself (or its
    exit status does, in the launcher's report). ``timed_out``: the others did not answer within
    the process group's timeout (one hung, or could not join): none of them may ever say why."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


@dataclass
class TrainEvent:
    """One progress report. ``kind``: message, load, start, step, nonfinite, val, checkpoint, end.

    ``data`` by kind: message ``{text, level}``; load ``{done, total}`` (decoding images);
    start ``{description, device, precision, params, world_size, resumed_from}``;
    step ``{loss, lr, it_s, eta_s, crop}``; nonfinite ``{loss, consecutive}``;
    val ``{psnr, ssim, best_psnr}``; checkpoint ``{path, kind}``; end ``{result}``.
    """

    kind: str
    step: int = 0
    total: int = 0
    data: dict[str, Any] = field(default_factory=dict)


Callback = Callable[[TrainEvent], None]


@dataclass
class TrainResult:
    """What a call of :func:`train` did."""

    out_dir: Path
    step: int
    total: int
    interrupted: bool = False
    signal: int | None = None
    # what the signal stopped: "training", or the end of the run ("final validation", "export"),
    # which a resume then finishes without training
    interrupted_during: str | None = None
    model_path: Path | None = None
    last_checkpoint: Path | None = None
    best_checkpoint: Path | None = None
    scores: dict[str, float] = field(default_factory=dict)
    best_scores: dict[str, float] = field(default_factory=dict)
    wall_clock_s: float = 0.0
    losses: list[float] = field(default_factory=list)  # per iteration of this call, nan when skipped
    skipped: int = 0
    model: KPACNet | None = field(default=None, repr=False)  # the trained network (unwrapped, on its device)
    already_complete: bool = False  # a resume of a run that had done its iterations: nothing trained or written

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir), "step": self.step, "total": self.total, "interrupted": self.interrupted,
            "interrupted_during": self.interrupted_during, "signal": self.signal, "model_path": None if self.model_path is None else str(self.model_path),
            "last_checkpoint": None if self.last_checkpoint is None else str(self.last_checkpoint),
            "best_checkpoint": None if self.best_checkpoint is None else str(self.best_checkpoint),
            "scores": self.scores, "best_scores": self.best_scores, "wall_clock_s": round(self.wall_clock_s, 3),
            "skipped": self.skipped, "already_complete": self.already_complete,
        }


# --------------------------------------------------------------------------------------
# Losses (validation scores are kpac_cli.metrics' psnr/ssim: data range 1, 7x7 uniform SSIM)
# --------------------------------------------------------------------------------------


def l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    return (pred.float() - target.float()).abs().mean()


# --------------------------------------------------------------------------------------
# Setup helpers
# --------------------------------------------------------------------------------------


def resolve_device(name: str, dist_info: D.DistInfo) -> torch.device:
    """The inference engine's device choice, with what training adds.

    Under DDP, ``auto`` and a plain ``cuda`` mean this process's GPU (its local rank); a
    single process's ``auto`` names the current GPU. ``auto`` trains on CUDA or the CPU,
    never on MPS unless asked for, as training always has.
    """
    name = D.device_for_rank(name, dist_info)
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    try:
        dev = _engine_device(name)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    if dev.type == "cuda" and dev.index is None and name == "auto":
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs that support it and on CPUs with AMX or AVX512-BF16, else fp32.

    bf16 here is autocast: weights, gradients and Adam's moments stay fp32, convolutions run in
    bf16. fp16 uses loss scaling and needs CUDA.
    """
    name = (name or "auto").lower()
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32
    if name == "fp16" and device.type != "cuda":
        raise TrainingError("fp16 training needs a CUDA GPU (it relies on loss scaling); use bf16 or fp32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingError("this GPU does not support bf16; use fp16 or fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def hardware_summary(device: torch.device, world: int) -> dict[str, Any]:
    hw: dict[str, Any] = {"device": device.type, "processes": world, "cpu": cpu_name(),
                          "cpu_count": _cpu_count(), "torch": str(torch.__version__)}
    if device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(device)
    return hw


def new_run_architecture(cfg: TrainConfig, init_cfg: KPACConfig | None) -> KPACConfig:
    """The architecture a new run builds: ``cfg.model`` if given, else that of the ``--init``
    weights (``init_cfg``) with the views ``--dual`` asks for, else the paper's default."""
    if cfg.model is not None:
        return cfg.model
    if init_cfg is not None:
        return replace(init_cfg, in_views=2 if cfg.dual else 1)
    return KPACConfig(in_views=2 if cfg.dual else 1)


def _init_weights(path: Path) -> tuple[KPACConfig, dict[str, Tensor]]:
    """Weights to start from (or to blend with): a kpac .safetensors, or a training checkpoint (last.pt/best.pt)."""
    try:
        if path.is_dir():
            path = resolve_checkpoint(path, "last")
        ck = load_checkpoint(path)
    except Exception as e:  # noqa: BLE001
        raise TrainingError(f"cannot load weights from {path}: {e}") from None
    return ck.config, ck.state_dict


def _provenance(cfg: TrainConfig, bundle_desc: str, step: int, scores: dict, best: dict, elapsed: float,
                hw: dict, model_cfg: KPACConfig, world: int) -> dict[str, Any]:
    loss = "L1" if cfg.stage == "l1" else f"L1 + {cfg.perceptual_weight:g} x MSE(VGG-19 relu4_4)"
    if cfg.blur_rank_weight > 0:
        loss += f" + {cfg.blur_rank_weight:g} x (detection + size) ranking of the block-1 scale attention"
    prov = {
        "name": cfg.out.name,
        "description": cfg.description or f"KPAC ({model_cfg.levels}-level{', dual-pixel' if model_cfg.in_views == 2 else ''}) trained with kpac train, {cfg.stage} stage",
        "trained_on": bundle_desc,
        "iterations": step,
        "stage": cfg.stage,
        "loss": loss,
        "crop": cfg.crop,
        "batch": cfg.batch,
        "global_batch": cfg.batch * world,
        "optimizer": f"Adam(lr={cfg.lr_schedule}, betas=({cfg.beta1:g}, {cfg.beta2:g}))",
        "noise_augmentation": cfg.noise_max,
        "bit_depth": cfg.bit_depth,
        "init": None if cfg.init is None else str(cfg.init),
        "seed": cfg.seed,
        "scores": scores,
        "best_scores": best,
        "wall_clock_s": round(elapsed, 1),
        "hardware": hw,
        "source": "kpac train",
        "kpac_version": __version__,
    }
    if cfg.ema > 0:
        prov["weight_average"] = f"exponential moving average, decay {cfg.ema:g}"
    if model_cfg.in_views == 2 and cfg.data_kind == "synthetic":
        prov["balance_views"] = True  # trained on vignetting-free views: balance real ones (engine.dualpixel)
    # Plain JSON types only: the training checkpoint must load with weights_only=True.
    return json.loads(json.dumps(prov, default=str))


class _Signals:
    """First SIGINT/SIGTERM asks the run to stop (the loop, a validation, the end of the run);
    a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def stop_requested(self) -> bool:
        return self.received is not None

    def _handler(self, signum: int, _frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> "_Signals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _pad_to(x: Tensor, stride: int) -> tuple[Tensor, int, int]:
    # Replicate padding, not the engine's reflect (pad_to_multiple): validation scores stay
    # comparable with the runs (and best.pt choices) made so far.
    h, w = x.shape[-2:]
    ph, pw = (-h) % stride, (-w) % stride
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, h, w


@torch.no_grad()
def validate(model: KPACNet, samples: list[dict[str, np.ndarray]], device: torch.device, dtype: torch.dtype,
             channels_last: bool = False, stop: Callable[[], bool] | None = None) -> dict[str, float] | None:
    """Mean PSNR/SSIM of the model's outputs (clipped to [0, 1]) over fixed samples.

    ``stop`` is asked before each sample: when it says so (a signal came), validation ends
    there and returns None (a large validation set takes minutes).
    """
    if not samples:
        return {}
    was_training = model.training
    model.eval()
    ps, ss = [], []
    stride = model.config.stride
    for s in samples:
        if stop is not None and stop():
            model.train(was_training)
            return None
        x = torch.from_numpy(s["input"])[None].to(device) * 2 - 1
        x, h, w = _pad_to(x, stride)
        ref = None
        if "reference" in s:
            ref, _, _ = _pad_to(torch.from_numpy(s["reference"])[None].to(device) * 2 - 1, stride)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            y = model(x, ref)
        out = ((y.float()[0, :, :h, :w] + 1) * 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        tgt = np.ascontiguousarray(s["target"].transpose(1, 2, 0))
        ps.append(psnr(out, tgt))
        ss.append(ssim(out, tgt))
    model.train(was_training)
    return {"psnr": float(np.mean(ps)), "ssim": float(np.mean(ss))}


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def _worker_error_message(error: Exception) -> str:
    """The message of an error a DataLoader worker raised, without the worker's traceback that
    torch puts before it when it raises the error again in this process."""
    text = str(error)
    if "DataLoader worker" not in text:
        return text
    name = f"{type(error).__module__}.{type(error).__qualname__}: "
    at = text.rfind(name)
    return text[at + len(name):].strip() if at >= 0 else text


@dataclass(frozen=True)
class _DataProblem:
    """What :func:`_batches` yields in place of a batch when the data fail: the one-line message."""

    message: str


def _batches(loader: Any) -> Any:
    """The loader's batches. A data problem met on the way (an unreadable photo, a pair whose
    sizes differ; photos are read as training needs them unless cached) ends them with a
    :class:`_DataProblem` holding the one-line message it had, also from a worker process: the
    loop stops every rank with it. (A failed run, not a usage error: the same data passed the
    checks before the run.)"""
    batches = iter(loader)
    try:
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (DataError, ImageError) as e:
                yield _DataProblem(_worker_error_message(e))
                return
            yield batch
    finally:
        # The workers ignore SIGTERM (worker_init), so they are shut down here: an error raised
        # from the loader keeps it alive in its traceback, and at exit multiprocessing would
        # wait forever for workers that its SIGTERM does not end.
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _first_failure(info: D.DistInfo, own: tuple[str, str] | None) -> tuple[int, str, str]:
    """``(rank, kind, message)`` of the lowest rank that failed, on every rank: called by all
    ranks once an agreement said that one did (``own``: this rank's ``(kind, message)``, or None)."""
    reports = D.gather_object(info, own)
    rank, (kind, message) = next((r, rep) for r, rep in enumerate(reports) if rep is not None)  # type: ignore[misc]
    return rank, kind, message


def _signal_of_the_run(info: D.DistInfo, own: int | None) -> int | None:
    """The signal that stops the run, the same on every rank (the lowest rank's that received
    one): a signal sent to one process stops all of them, which then report and exit alike.
    Called by every rank once an agreement said that one received a signal."""
    return next((s for s in D.gather_object(info, own) if s is not None), None)  # type: ignore[misc]


def _start_together(info: D.DistInfo, device: torch.device, error: Exception | None) -> None:
    """The end of a multi-process run's set-up, which every rank reaches or says why not: a rank
    that failed (its data differ from the run's, rank 0's validation photos cannot be read...)
    would otherwise leave the others waiting for it in DDP's first broadcast. When one failed,
    its error is raised on it and :class:`RankFailed` on the others."""
    (failed,) = D.agree(info, [error is not None], device)
    if not failed:
        return
    rank, _, message = _first_failure(info, None if error is None else ("error", _one_line(error)))
    if error is not None and rank == info.rank:
        raise error
    raise RankFailed(rank, message) from None


class _Log:
    """Rank 0's JSONL (+ optional TensorBoard) log."""

    def __init__(self, out: Path | None, tensorboard: bool) -> None:
        self.f = None
        self.tb = None
        self.broken = False  # a write failed (a full disk): nothing more is written
        if out is None:
            return
        self.f = open(out / "log.jsonl", "a", buffering=1, encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

                self.tb = SummaryWriter(str(out / "tb"))
            except Exception:  # noqa: BLE001 - optional
                self.tb = None

    def write(self, event: str, **fields: Any) -> None:
        if self.f is None:
            return
        rec = {"event": event, "time": round(time.time(), 3), **fields}
        try:
            self.f.write(json.dumps(rec, default=str) + "\n")
            if self.tb is not None and "step" in fields:
                for k, v in fields.items():
                    if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                        self.tb.add_scalar(f"{event}/{k}", v, fields["step"])
        except Exception:
            self.broken = True  # the record may be half written, or left in the buffer: nothing goes after it
            raise

    def failed(self, step: int, error: BaseException) -> None:
        """The last record of a run that failed: at ``step`` iterations, with ``error``'s one line.
        Not when the log itself failed; a write that fails too (the disk is full) is let go: the
        error that ended the run is the one reported."""
        if self.broken:
            return
        try:
            self.write("failed", step=step, error=_one_line(error))
        except Exception:  # noqa: BLE001 - see above
            pass

    def close(self) -> None:
        if self.f is not None:
            try:
                self.f.close()
            except OSError:
                # the lines a failed write left buffered fail again: that error was raised already
                if not self.broken:
                    raise
        if self.tb is not None:
            self.tb.close()


def train(cfg: TrainConfig, callback: Callback | None = None) -> TrainResult:
    """Train (or resume training) a KPAC network as ``cfg`` describes; see the module docs.

    Raises TrainingError (and DataError / VGGWeightsMissing, subclasses of Exception with
    one-line messages) for problems a user can fix.
    """
    emit = callback or (lambda _e: None)
    try:
        cfg.validate()
    except ValueError as e:
        raise TrainingError(str(e)) from None

    dist0 = D.env_info()
    device = resolve_device(cfg.device, dist0)
    try:
        dist_info = D.setup(device, cfg.dist_timeout)
    except Exception as e:
        if not D.lost_contact(e):
            raise
        raise ProcessLost(f"process {dist0.rank} could not join the other processes of the run "
                          f"({D.communication_error_summary(e)}); are they all started, with the same "
                          "MASTER_ADDR and MASTER_PORT?", timed_out=D.timed_out(e)) from None
    old_threads = torch.get_num_threads()
    ranks = _Ranks()

    def all_set_up() -> None:
        ranks.set_up = True
        _start_together(dist_info, device, None)
        ranks.together = False  # until the next agreement, a rank that fails fails alone

    try:
        return _train(cfg, emit, device, dist_info, all_set_up, ranks)
    except Exception as e:
        if dist_info.enabled and D.lost_contact(e):  # another rank is gone: no agreement can be reached
            ranks.together = False
        elif dist_info.enabled and not ranks.set_up:  # tell the ranks waiting at the end of the set-up
            _start_together(dist_info, device, e)
        raised = _as_raised(e, dist_info, ranks.step, cfg.dist_timeout)
        if raised is not e:
            raise raised from e
        raise
    except BaseException:  # KeyboardInterrupt (a second Ctrl-C), SystemExit: wherever this rank was
        ranks.together = False
        raise
    finally:
        torch.set_num_threads(old_threads)
        D.teardown(dist_info, together=ranks.together)


@dataclass
class _Ranks:
    """Where the processes of a run stand, for :func:`train`'s clean-up."""

    set_up: bool = False  # every rank reached the end of the set-up
    # Every rank leaves train() at the same point (an agreement decided it), so they may wait
    # for each other there. False between agreements: a rank that fails then fails alone, and
    # the others wait for it in a collective (DDP's gradient all-reduce, the next agreement).
    together: bool = True
    step: int = 0  # iterations done


def _iterations(n: int) -> str:
    return f"{n} iteration{'s' if n != 1 else ''}"


def _as_raised(error: Exception, info: D.DistInfo, step: int, dist_timeout: float | None = None) -> Exception:
    """What :func:`train` raises for ``error``, met after ``step`` iterations: a one-line
    TrainingError when another process was lost (``dist_timeout``: the run's --dist-timeout) or
    memory ran out, else ``error`` itself."""
    if info.enabled and D.timed_out(error):
        within = "the process group's timeout" if dist_timeout is None else f"--dist-timeout {dist_timeout:g} s"
        return ProcessLost(f"process {info.rank} stopped after {_iterations(step)}: another process of the run did not "
                           f"answer within {within} ({D.communication_error_summary(error)}): it hung, or ended "
                           "without closing its connections", timed_out=True)
    if info.enabled and D.lost_contact(error):
        return ProcessLost(f"process {info.rank} stopped after {_iterations(step)}: it lost contact with "
                           f"another process of the run ({D.communication_error_summary(error)}), which ended or "
                           "stopped answering; that process's message, or its exit status, says why")
    return _out_of_memory(error, info, step) or error


def _out_of_memory(error: Exception, info: D.DistInfo, step: int, val_crop: int | None = None) -> TrainingError | None:
    """A one-line TrainingError for running out of memory (GPU or CPU) mid-run, with what to change
    where it happened: in training, or (``val_crop`` given: the run's --val-crop) in a validation;
    None for other errors."""
    text = str(error)
    if isinstance(error, TrainingError):  # said in one line already
        return None
    if not isinstance(error, torch.OutOfMemoryError) and not any(m in text for m in ("can't allocate memory", "not enough memory")):
        return None
    size = re.search(r"allocate ([\d.]+ ?[KMGT]i?B|\d+ bytes)", text)
    who = f"process {info.rank} " if info.enabled else ""
    where = "" if val_crop is None else " in a validation"
    return TrainingError(f"{who}ran out of {'GPU ' if isinstance(error, torch.OutOfMemoryError) else ''}memory{where} after "
                         f"{_iterations(step)}{f' (allocating {size.group(1)})' if size else ''}; {_memory_advice(val_crop)}")


def _memory_advice(val_crop: int | None) -> str:
    """What lowers the memory training (``val_crop`` None) or a validation at ``val_crop`` needs. A
    validation runs one image at a time, whole or as a centre crop: its batch is no --batch."""
    if val_crop is None:
        return "try a smaller --batch or --crop"
    if val_crop == 0:
        return "this run validates whole images: try --val-crop SIZE (a centre crop of each), or smaller validation images"
    return f"try a --val-crop smaller than this run's {val_crop}"


def _sampling_changes(saved: dict, cfg: TrainConfig, world_size: int) -> str | None:
    """What a resume changes of how batches are drawn (``saved``: the checkpoint's sampler state),
    in words, or None: the seed, ``--batch`` (per process) and the number of processes, and
    with them the global batch each step averages over."""
    now = {"seed": cfg.seed, "batch": cfg.batch, "world_size": world_size}
    names = {"seed": "--seed", "batch": "--batch", "world_size": "processes"}
    changes = [f"{names[k]} {saved[k]} -> {v}" for k, v in now.items() if k in saved and saved[k] != v]
    if not changes:
        return None
    if {"batch", "world_size"} <= saved.keys() and saved["batch"] * saved["world_size"] != cfg.batch * world_size:
        changes.append(f"so the global batch (--batch x processes) {saved['batch'] * saved['world_size']} -> {cfg.batch * world_size}")
    return ", ".join(changes)


def _validation_change(ckpt: dict[str, Any], cfg: TrainConfig) -> tuple[int, int] | None:
    """``(before, now)``: the --val-crop of the checkpoint a resume continues and this run's, when
    they make validations of another size (scores that are not comparable); else None."""
    saved = (ckpt.get("train_config") or {}).get("val_crop")
    if saved is None or cfg.val_count == 0:
        return None
    if validation_crop(cfg.replace(val_crop=int(saved))) == validation_crop(cfg):  # synthetic: 0 is 256
        return None
    return int(saved), cfg.val_crop


def resumed_config(cfg: TrainConfig, checkpoint: dict[str, Any]) -> TrainConfig:
    """``cfg`` as it continues the run that saved ``checkpoint`` (its last.pt): the procedural
    scenes stay those the run trains on (drawn for its largest crop and its --val-crop, which a
    resume may lower). Raises ValueError, naming the flag, for what would make the run other than
    its checkpoint says: other scenes, validation renders larger than them, fewer iterations than done."""
    saved = checkpoint.get("train_config")
    started = TrainConfig.from_dict(saved) if saved else None
    if cfg.procedural and started is not None:
        drawn_for = started.val_crop if started.scenes_val_crop is None else started.scenes_val_crop
        if started.procedural and cfg.scenes_val_crop is None and cfg.val_crop != drawn_for:
            cfg = cfg.replace(scenes_val_crop=drawn_for)
        if started.procedural and procedural_scene_crop(cfg) != procedural_scene_crop(started):
            # the scenes are drawn at a size the largest crop sets: other scenes, other validation
            raise ValueError(f"--crop: the largest crop may not change when resuming a run with procedural scenes "
                             f"(they are drawn for it); keep its largest size, {started.crop_schedule.max_size}")
        if started.procedural and procedural_scene_side(cfg) != procedural_scene_side(started):
            raise ValueError(f"--max-radius: may not change when resuming a run with procedural scenes (they are "
                             f"drawn with a margin for it); keep {started.max_radius:g}")
        if validation_crop(cfg) > procedural_scene_crop(cfg):
            # a validation render larger than the scenes would be padded with their mirror image
            raise ValueError(f"--val-crop {cfg.val_crop}: this run's procedural scenes are drawn for crops up to "
                             f"{procedural_scene_crop(cfg)} px; give at most that")
    if started is not None:
        _check_held_out_pairs_stay(cfg, started, checkpoint.get("data_record"))
    done = int(checkpoint.get("step", 0))
    if cfg.total_iterations < done:
        raise ValueError(f"--iterations {cfg.total_iterations}: the run has done {_iterations(done)} already; "
                         f"give more to continue it, or export it with --export-only")
    return cfg


def _check_held_out_pairs_stay(cfg: TrainConfig, started: TrainConfig, record: dict[str, Any] | None) -> None:
    """Raise ValueError when a resume of a run on --source/--target pairs would add or drop its
    validation folders while the run holds out pairs for validation without them (every 10th of
    10 or more): the held-out pairs would join training, or other pairs leave it."""
    if not (started.data_kind == cfg.data_kind == "paired" and started.val_count > 0 and cfg.val_count > 0):
        return
    if (started.val_source is None) == (cfg.val_source is None):
        return
    names = (record or {}).get("names")
    if names is not None and len(names) < 10:  # nothing held out: the training pairs stay the same
        return
    if started.val_source is None:
        raise ValueError("--val-source and --val-target cannot be added when resuming: the run holds out every 10th "
                         "pair for validation, which would then join the training pairs; start a new run from its "
                         f"weights with --init {cfg.out} to validate on folders")
    raise ValueError(f"--val-source and --val-target ({started.val_source}, {started.val_target}) cannot be dropped "
                     "when resuming: every 10th training pair would be held out for validation instead")


def check_run_folder(cfg: TrainConfig) -> None:
    """Raise ValueError when ``cfg.out`` cannot hold the run: a file, or, for a new run (not
    ``resume``), a folder that holds a run already (its checkpoints and model would be replaced)."""
    if cfg.out.exists() and not cfg.out.is_dir():
        raise ValueError(f"--run-dir {cfg.out}: is a file (the run folder holds the checkpoints and the log)")
    if not cfg.resume and (cfg.out / "last.pt").exists():
        raise ValueError(f"{cfg.out} already holds a run (last.pt); continue it with --resume {cfg.out} or "
                         "choose another --run-dir")


def _train(cfg: TrainConfig, emit: Callback, device: torch.device, dist_info: D.DistInfo,
           all_set_up: Callable[[], None], ranks: _Ranks) -> TrainResult:
    main = dist_info.is_main
    out = cfg.out
    total = cfg.total_iterations

    def message(text: str, level: str = "info") -> None:
        if main:
            emit(TrainEvent("message", data={"text": text, "level": level}))

    dtype = resolve_precision(cfg.precision, device)
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_fast_bf16():
        # measured on a 2-core AVX2 EPYC: 0.034 it/s against 0.42 in fp32 (channels_last, 256 px, batch 4)
        message("bf16 on this CPU (neither AMX nor AVX512-BF16) is emulated and more than 10x slower than fp32; "
                "--precision auto picks fp32 here", "warning")
    # NHWC convolutions are faster on CPUs too (benchmarks/train_throughput.py: 1.1-1.2x on a
    # 2-core AVX2 EPYC); a resumed run may switch layout freely. None (not given): on.
    channels_last = cfg.channels_last is not False

    # -- where we start from: a checkpoint to resume, weights to initialise from, or nothing
    ckpt: dict[str, Any] | None = None
    try:
        check_run_folder(cfg)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    if cfg.resume:
        last = out / "last.pt"
        if not last.is_file():
            raise TrainingError(f"nothing to resume: {last} does not exist")
        ckpt = load_state(last)
        try:
            cfg = resumed_config(cfg, ckpt)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        if int(ckpt["step"]) >= total and not _export_pending(out / "model.safetensors", int(ckpt["step"])):
            # Done before: training on would be nothing, and re-exporting could replace a model
            # exported otherwise since (--export-only --overwrite).
            return _already_complete(out, ckpt, total, message, cfg.description)
    init_state: dict[str, Tensor] | None = None
    model_cfg = cfg.model
    if ckpt is not None:
        saved = KPACConfig.from_dict(ckpt["config"])
        if model_cfg is not None and model_cfg != saved:
            raise TrainingError(f"the architecture differs from the checkpoint being resumed ({saved.to_json()})")
        model_cfg = saved
    elif cfg.init is not None:
        init_cfg, init_state = _init_weights(cfg.init)
        model_cfg = new_run_architecture(cfg, init_cfg)
        if model_cfg != init_cfg:
            torch.manual_seed(cfg.seed)  # the same fresh weights the model below starts from
            try:
                init_state, fresh = transfer_state(init_state, init_cfg, model_cfg, build_model(model_cfg).state_dict())
            except ValueError as e:
                raise TrainingError(f"cannot start from {cfg.init} ({init_cfg.to_json()}): {e}") from None
            message(f"carried the weights of {cfg.init} over to {model_cfg.to_json()}"
                    + (f"; {len(fresh)} tensors start fresh ({', '.join(fresh)})" if fresh else ""))
    if model_cfg is None:
        model_cfg = new_run_architecture(cfg, None)
    try:
        cfg.replace(model=model_cfg).validate()
    except ValueError as e:
        raise TrainingError(str(e)) from None

    # -- the perceptual stage needs VGG weights: fail now, not after loading the data
    perceptual: PerceptualLoss | None = None
    if cfg.stage == "perceptual":
        find_vgg_weights(cfg.vgg_weights)  # raises VGGWeightsMissing with where to put the file
        perceptual = PerceptualLoss(load_vgg19(cfg.vgg_weights), cfg.perceptual_weight).to(device)
        if cfg.init is None and ckpt is None:
            message("the perceptual stage normally starts from an L1-trained model (--init PATH)", "warning")

    if main:
        out.mkdir(parents=True, exist_ok=True)
        # Temp files left by a checkpoint writer killed mid-way (kill -9, power loss); the
        # ".*.pt.*.tmp" ones are from kpac versions before state.atomic_save used images.atomic.
        cleanup_stale_temps(out)
        for stale in out.glob(".*.pt.*.tmp"):
            stale.unlink(missing_ok=True)

    # -- threads and workers. On a CPU a model step costs 10-100x a sample (see
    # benchmarks/train_throughput.py), so one mostly idle worker suffices and the model keeps
    # every core of this rank; a GPU eats samples much faster and needs several workers.
    cpus = max(1, _cpu_count() // dist_info.local_world_size)
    kind = cfg.data_kind
    heavy_workers = kind == "synthetic" or cfg.cache == "no"
    workers = cfg.workers
    if workers < 0:
        if device.type == "cpu":
            workers = 1
        else:
            workers = min(8, max(1, cpus - 1)) if heavy_workers else min(4, cpus)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or min(torch.get_num_threads(), cpus))
    elif cfg.threads:
        torch.set_num_threads(cfg.threads)

    # -- data
    bundle: DataBundle = build_data(
        cfg, model_cfg.stride, rank=dist_info.rank, local_world=dist_info.local_world_size, log=message,
        load_progress=(lambda d, n: emit(TrainEvent("load", data={"done": d, "total": n}))) if main else None,
        resumed=None if ckpt is None else ckpt.get("data_record", LEGACY_RECORD),
    )

    # -- model, optimiser, loss scaling
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every rerun
    model = build_model(model_cfg)
    if init_state is not None:
        load_state_dict_checked(model, init_state)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    start = 0
    elapsed0 = 0.0
    best: dict[str, float] = {}
    scores: dict[str, float] = {}
    validation_changed: tuple[int, int] | None = None
    if ckpt is not None:
        load_state_dict_checked(model, ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        start = int(ckpt["step"])
        ranks.step = start
        elapsed0 = float(ckpt.get("elapsed_s", 0.0))
        best = dict(ckpt.get("best") or {})
        scores = dict(ckpt.get("scores") or {})
        restore_rng(ckpt["rng"])
        changed = _sampling_changes(ckpt.get("sampler") or {}, cfg, dist_info.world_size)
        if changed:
            message(f"{changed} since the checkpoint was saved: the data order will not be the same", "warning")
        validation_changed = _validation_change(ckpt, cfg)
        if validation_changed is not None:
            # Scores at another size compare with nothing before: the best one (which decides
            # best.pt) starts afresh, and so does the last, which the final validation checks.
            best, scores = {}, {}
            message(f"--val-crop {validation_changed[0]} -> {validation_changed[1]}: validation scores from iteration "
                    f"{start} on are not comparable with earlier ones; the best score starts afresh (best.pt is "
                    "replaced at the next validation)")

    # An exponential moving average of the weights (--ema; not in the paper): checkpoints on a
    # plateau differ by several hundredths of a dB, and an average of three scored above each
    # (README). It is validated and exported; the raw weights stay in "model", for an exact resume.
    ema: dict[str, Tensor] | None = None
    ema_pairs: list[tuple[Tensor, Tensor]] = []
    if cfg.ema > 0:
        live = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        saved_ema = (ckpt or {}).get("ema")
        if ckpt is not None and saved_ema is None:
            message("--ema: the average starts from the resumed weights")
        ema = {k: (saved_ema[k] if saved_ema is not None else v).detach().to(device, torch.float32).clone() for k, v in live.items()}
        ema_pairs = [(ema[k], live[k]) for k in live]  # state_dict tensors share the parameters' storage

    def exported_model() -> KPACNet:  # what validation scores and the run exports
        if ema is None:
            return model
        averaged = build_model(model_cfg).to(device)
        load_state_dict_checked(averaged, {**model.state_dict(), **ema})
        return averaged.to(memory_format=torch.channels_last) if channels_last else averaged

    # the compute precision too: bf16 autocast on AMX or AVX512-BF16 CPUs trains 2-4x faster than fp32
    precision = str(dtype).removeprefix("torch.")  # "bfloat16", "float32", ...
    hw = {**hardware_summary(device, dist_info.world_size), "precision": precision}
    ddp_model: nn.Module = model
    if dist_info.enabled:
        all_set_up()  # every rank is ready, or every rank stops here
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    log = _Log(None, False)  # rank 0's is opened once every rank has set up
    last_path, best_path = out / "last.pt", out / "best.pt"
    result = TrainResult(out_dir=out, step=start, total=total, scores=scores, best_scores=dict(best), model=model)
    t0 = time.monotonic()

    def elapsed() -> float:
        return elapsed0 + time.monotonic() - t0

    last_saved = start  # the iteration last.pt holds (a resume's, until the first save)

    def save(path: Path, step: int, kind_: str) -> None:
        nonlocal last_saved
        if not main:
            return
        state = model.state_dict()
        if not weights_finite(state) or (ema is not None and not weights_finite(ema)):
            raise TrainingError(f"refusing to write {path.name}: the weights are not finite (step {step})")
        obj = {
            "format": FORMAT, "version": VERSION,
            "config": model_cfg.to_dict(),
            "model": {k: v.detach().cpu() for k, v in state.items()},
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "step": step,
            "rng": capture_rng(),
            "sampler": {"next_step": step, "seed": cfg.seed, "batch": cfg.batch, "world_size": dist_info.world_size},
            # the stage defaults resolved, so that a resume never takes a later version's
            "train_config": cfg.replace(model=model_cfg, resume=False, iterations=cfg.total_iterations,
                                        lr=cfg.lr if cfg.lr is not None else STAGE_DEFAULTS[cfg.stage]["lr"]).to_dict(),
            "data_record": bundle.record,
            "scores": scores, "best": best, "elapsed_s": elapsed(),
            "provenance": _provenance(cfg, bundle.description, step, scores, best, elapsed(), hw, model_cfg, dist_info.world_size),
        }
        if ema is not None:
            obj["ema"] = {k: v.detach().cpu() for k, v in ema.items()}
        save_state(obj, path)
        if path == last_path:
            last_saved = step
        log.write("checkpoint", step=step, path=str(path), kind=kind_)
        emit(TrainEvent("checkpoint", step, total, {"path": str(path), "kind": kind_}))

    def run_validation(step: int) -> bool:
        """Validate at ``step``: scores, best.pt. False when a signal stopped it: nothing is recorded."""
        nonlocal scores, best
        if not main or not bundle.val:
            return True
        new_scores = validate(exported_model(), bundle.val, device, dtype, channels_last, stop=signals.stop_requested)
        if new_scores is None:
            log.write("val_stopped", step=step)
            return False
        scores = new_scores
        scores["step"] = step
        improved = not best or scores["psnr"] > best.get("psnr", -math.inf)
        if improved:
            best = dict(scores)
        log.write("val", step=step, psnr=scores["psnr"], ssim=scores["ssim"], best_psnr=best["psnr"])
        emit(TrainEvent("val", step, total, {"psnr": scores["psnr"], "ssim": scores["ssim"], "best_psnr": best["psnr"]}))
        result.scores, result.best_scores = dict(scores), dict(best)
        if improved:
            save(best_path, step, "best")
            result.best_checkpoint = best_path
        return True

    failure: tuple[str, str] | None = None  # this rank's (kind, message), told the others at the next agreement
    failed_with: Exception | None = None  # the error behind it, raised again here

    def attempt(action: Callable[[], None]) -> None:
        """Rank 0's log, validation or checkpoint. Under several processes a failure waits for the
        next agreement, where the other ranks learn of it instead of waiting for rank 0 forever."""
        nonlocal failure, failed_with
        if failure is not None:
            return
        if not dist_info.enabled:
            action()
            return
        try:
            action()
        except Exception as e:  # noqa: BLE001 - raised again, on this rank, once the others know
            failure, failed_with = ("error", _one_line(e)), e

    def start_log() -> None:
        nonlocal log
        log = _Log(out, cfg.tensorboard)
        for n in bundle.notes:
            log.write("note", text=n)
        log.write("start", step=start, total=total, resumed=ckpt is not None, data=bundle.description, device=str(device),
                  precision=precision, channels_last=channels_last,
                  world_size=dist_info.world_size, workers=workers, threads=torch.get_num_threads(), config=cfg.replace(model=model_cfg).to_dict(),
                  params=count_parameters(model), kpac_version=__version__)
        if validation_changed is not None:  # a reader of the log compares no scores across this record
            log.write("validation_changed", step=start, previous_val_crop=validation_changed[0],
                      val_crop=validation_changed[1])
        emit(TrainEvent("start", start, total, {
            "description": bundle.description, "device": str(device), "precision": precision,
            "channels_last": channels_last, "params": count_parameters(model), "world_size": dist_info.world_size, "resumed_from": start if ckpt else None,
            "workers": workers, "threads": torch.get_num_threads(), "cached": bundle.cached,
        }))

    if main:
        attempt(start_log)

    def log_nonfinite(step: int, loss_value: float, consecutive: int) -> None:
        log.write("nonfinite", step=step, loss=loss_value, consecutive=consecutive)
        emit(TrainEvent("nonfinite", step, total, {"loss": loss_value, "consecutive": consecutive}))

    lr_at = cfg.lr_schedule.at
    sampler = StepBatchSampler(start, total, cfg.batch, cfg.crop_schedule.size_at, dist_info.rank, dist_info.world_size)
    loader = torch.utils.data.DataLoader(
        bundle.dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
        pin_memory=device.type == "cuda", worker_init_fn=worker_init if workers > 0 else None,
        prefetch_factor=4 if workers > 0 else None,
    )

    # The block-1 scale attention, captured on the way through, for the blur-ranking loss.
    first_alpha: list[Tensor] = []
    if cfg.blur_rank_weight > 0:
        model.blocks[0].register_forward_hook(lambda m, _i, out: first_alpha.append(out[1]) if m.training else None)

    def where_last_stands() -> str:
        """For a failure's message (rank 0): the iteration last.pt holds, "" when there is none."""
        if not main or not last_path.is_file():
            return ""
        return f" (training stopped at iteration {step}; {last_path} holds iteration {last_saved})"

    def keep_progress() -> str:
        """On a data problem: save the iterations done since the last checkpoint; say where they are."""
        if step > last_saved:
            save(last_path, step, "last")
        return where_last_stands()

    def validate_keeping_progress() -> bool:
        """This step's validation (:func:`run_validation`). Should it fail (out of memory on whole
        images, a best.pt that cannot be written), last.pt first keeps the iterations done, as on a
        data problem. Running out of memory becomes a TrainingError that says what helps a
        validation, and a TrainingError says where last.pt stands; an OSError (a full disk: the
        command line reads last.pt to say where it stands) or an unforeseen error is raised as it is."""
        nonlocal scores, best
        before = scores, best
        try:
            return run_validation(step)
        except Exception as e:
            scores, best = before  # last.pt holds no part of a validation that failed
            if step > last_saved:
                try:
                    save(last_path, step, "last")
                except Exception:  # noqa: BLE001 - last.pt stays as it was; the validation's error is reported
                    pass
            lacking = _out_of_memory(e, dist_info, step, validation_crop(cfg))
            if lacking is not None or isinstance(e, TrainingError):
                raise TrainingError(f"{lacking or e}{where_last_stands()}") from e
            raise

    model.train()
    consecutive = 0
    window: deque[float] = deque(maxlen=50)  # timestamps of recent iterations, for it/s
    window.append(time.monotonic())
    log_losses: list[float] = []
    log_rank: list[tuple[float, float]] = []  # the blur-ranking terms alone, when they are on

    def stop_together(reporter: int, kind: str, text: str) -> None:
        """A rank failed (the agreement said so; ``reporter`` failed first): every rank stops. A data
        problem is reported by rank 0, with where last.pt stands; another failure (rank 0's log,
        validation or checkpoint) by the rank it happened on; the other ranks raise RankFailed."""
        ranks.together = True
        if kind == "data":
            text += keep_progress()
            raise TrainingError(text) if main else RankFailed(0, text)
        if failed_with is not None and reporter == dist_info.rank:
            raise failed_with
        raise RankFailed(reporter, text)

    def fetch() -> Any:
        """The next batch; a data problem becomes this rank's failure, told at the next agreement."""
        nonlocal failure
        batch = next(batches, None)
        if isinstance(batch, _DataProblem):
            failure = failure or ("data", batch.message)
            return None
        return batch

    step = start
    # Batches are read one step ahead: under DDP the forward pass may itself be a collective
    # (bucket rebuilding), so a rank cannot skip it; reading the next batch before the step's
    # agreement lets a data problem travel with it while the step completes on every rank.
    batches = _batches(loader)
    try:
        with _Signals() as signals:
            batch = fetch() if start < total else None
            if start < total and D.agree(dist_info, [failure is not None], device)[0]:
                stop_together(*_first_failure(dist_info, failure))
            for step_i in range(start, total):
                x = batch["input"].to(device, non_blocking=True) * 2 - 1
                target = batch["target"].to(device, non_blocking=True) * 2 - 1
                ref = batch["reference"].to(device, non_blocking=True) * 2 - 1 if "reference" in batch else None
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                for g in optimizer.param_groups:  # the schedule's rate, also right after a resume
                    g["lr"] = lr_at(step_i)
                with autocast(device, dtype):
                    pred = ddp_model(x, ref)
                    loss = l1_loss(pred, target)
                    if perceptual is not None:
                        loss = loss + perceptual(pred, target)
                if first_alpha:
                    radius = batch["radius"].to(device, non_blocking=True)
                    detection, size = attention_blur_loss(first_alpha.pop(), radius, model_cfg.dilations, model_cfg.stride)
                    log_rank.append((float(detection.detach()), float(size.detach())))
                    loss = loss + cfg.blur_rank_weight * (detection + size)
                batch = fetch() if step_i + 1 < total else None  # while the forward pass runs on a GPU
                loss_value = float(loss.detach())
                nonfinite, stop, failed = D.agree(
                    dist_info, [not math.isfinite(loss_value), signals.received is not None, failure is not None], device)
                data_problem = None
                if failed:
                    reporter, kind, text = _first_failure(dist_info, failure)
                    if kind != "data":  # rank 0's validation or checkpoint failed: stop before this step's backward
                        stop_together(reporter, kind, text)
                    data_problem = (reporter, kind, text)  # with the next batch: this step completes first
                if not nonfinite:
                    scaler.scale(loss).backward()
                    if cfg.grad_clip > 0:
                        scaler.unscale_(optimizer)
                        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                        nonfinite = not bool(torch.isfinite(norm)) and not scaler.is_enabled()
                    if not nonfinite:
                        scaler.step(optimizer)
                        scaler.update()
                        if ema_pairs:  # an fp16 step skipped by the scaler still counts: rare, harmless
                            with torch.no_grad():
                                for avg, w in ema_pairs:
                                    avg.lerp_(w.float(), 1 - cfg.ema)
                optimizer.zero_grad(set_to_none=True)
                step = step_i + 1
                result.step = ranks.step = step
                if nonfinite:
                    consecutive += 1
                    result.skipped += 1
                    result.losses.append(float("nan"))
                    if main:
                        attempt(lambda: log_nonfinite(step, loss_value, consecutive))
                    if consecutive >= cfg.max_nonfinite:  # every rank at once: rank 0 says it
                        ranks.together = True
                        keep = f"; the last good checkpoint is {last_path}" if last_path.is_file() else ""
                        text = (f"stopped at iteration {step}: {consecutive} non-finite losses in a row "
                                f"(try a lower --lr, --precision fp32 or --grad-clip){keep}")
                        raise TrainingError(text) if main else RankFailed(0, text)
                else:
                    consecutive = 0
                    result.losses.append(loss_value)
                    log_losses.append(loss_value)
                now = time.monotonic()
                window.append(now)
                it_s = (len(window) - 1) / max(1e-9, window[-1] - window[0])
                if main:
                    emit(TrainEvent("step", step, total, {"loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                                                          "it_s": it_s, "eta_s": (total - step) / it_s if it_s > 0 else None,
                                                          "crop": int(x.shape[-1])}))
                    if step % cfg.log_every == 0 or step == total:
                        if log_losses:
                            extra = dict(zip(("blur_rank", "blur_size_rank"), np.mean(log_rank, axis=0).tolist())) if log_rank else {}
                            attempt(lambda: log.write("train", step=step, loss=float(np.mean(log_losses)), lr=optimizer.param_groups[0]["lr"],
                                                      it_s=round(it_s, 4), crop=int(x.shape[-1]), elapsed_s=round(elapsed(), 2), **extra))
                        log_losses, log_rank = [], []
                if data_problem is not None:
                    stop_together(*data_problem)
                if step % cfg.val_every == 0 and step != total:
                    attempt(validate_keeping_progress)
                if stop:
                    result.interrupted = True
                    result.signal = _signal_of_the_run(dist_info, signals.received)
                    break
                if step % cfg.save_every == 0 and step != total:
                    attempt(lambda: save(last_path, step, "last"))
                    result.last_checkpoint = last_path

            # The end of the run keeps the signal handlers: a signal there (a final validation
            # takes minutes on a large set) stops it cleanly too, and a resume finishes it.
            def stop_at_end(during: str) -> None:
                """Rank 0's end of the run, stopped by a signal: last.pt keeps every iteration done."""
                result.interrupted, result.signal, result.interrupted_during = True, signals.received, during
                if step > last_saved:
                    save(last_path, step, "last")
                result.last_checkpoint = last_path
                log.write("interrupted", step=step, signal=result.signal, during=during)

            def finish() -> None:
                """Rank 0's end of the run: last.pt and, when the iterations are done, the final validation
                and the export; a signal before the export stops it (a resume finishes it)."""
                result.wall_clock_s = elapsed()
                if result.interrupted:
                    save(last_path, step, "last")
                    result.last_checkpoint = last_path
                    result.interrupted_during = "training"
                    if main:
                        log.write("interrupted", step=step, signal=result.signal, during="training")
                    return
                if main and signals.stop_requested():  # it came after the loop's last agreement
                    return stop_at_end("final validation")
                if step >= total and (not scores or scores.get("step") != step) and bundle.val:
                    if step > last_saved:  # first: the validation takes minutes on a large set, and may fail
                        save(last_path, step, "last")
                    if not validate_keeping_progress():
                        return stop_at_end("final validation")
                save(last_path, step, "last")
                result.last_checkpoint = last_path
                if main and signals.stop_requested():  # during last.pt's write: the export is left to a resume
                    return stop_at_end("export")
                if main:
                    prov = _provenance(cfg, bundle.description, step, scores, best, elapsed(), hw, model_cfg, dist_info.world_size)
                    result.model_path = save_checkpoint(out / "model.safetensors", exported_model(), prov)
                    log.write("end", step=step, model=str(result.model_path), scores=scores, wall_clock_s=round(elapsed(), 2))

            stopped_in_training = result.interrupted  # the same on every rank (agreed in the loop)
            attempt(finish)  # skipped when rank 0 failed after the last agreement
            # The last agreement: a failure of rank 0's end (or one met after the loop's last
            # agreement) ends every rank with it, rather than the others ending as if all went well;
            # a signal that stopped rank 0's end stops every rank with it.
            failed, stopped_at_end = D.agree(dist_info, [failure is not None, result.interrupted], device)
            if failed:
                stop_together(*_first_failure(dist_info, failure))
            if stopped_at_end and not stopped_in_training:
                result.interrupted = True
                result.signal = _signal_of_the_run(dist_info, result.signal)
                result.interrupted_during = result.interrupted_during or "end of the run"
        ranks.together = True
        result.wall_clock_s = elapsed()
        if main:
            emit(TrainEvent("end", step, total, {"result": result.to_dict()}))
        return result
    except Exception as e:
        # The log's last record says that the run failed, and why (rank 0's log: the others have none).
        log.failed(ranks.step, _as_raised(e, dist_info, ranks.step, cfg.dist_timeout))
        raise
    finally:
        batches.close()  # its workers end now, whatever ended the loop
        log.close()


def _export_pending(model_path: Path, step: int) -> bool:
    """Whether a run whose last.pt is at ``step`` still has its end to do (final validation,
    export): no model yet, or only the one its training exported at fewer iterations (it was
    stopped at its last iteration, or between that checkpoint and the export)."""
    if not model_path.exists():
        return True
    try:
        _, prov = read_metadata(model_path)
    except Exception:  # noqa: BLE001 - a file that is no kpac model is not this run's: left alone
        return False
    by_training = prov.get("source") == "kpac train" and "exported_from" not in prov  # not --export-only's
    return by_training and isinstance(prov.get("iterations"), int) and prov["iterations"] < step


def _holds_weights(path: Path, weights: dict[str, Tensor]) -> bool:
    """Whether the model file at ``path`` holds exactly ``weights`` (as an export stores them: float32)."""
    try:
        stored = load_checkpoint(path).state_dict
    except Exception:  # noqa: BLE001 - anything unreadable is not these weights
        return False
    return stored.keys() == weights.keys() and all(
        torch.equal(stored[k], v.to(stored[k].dtype)) for k, v in weights.items())


def _already_complete(out: Path, ckpt: dict[str, Any], total: int, message: Callable[..., None],
                      description: str) -> TrainResult:
    """A resumed run whose ``last.pt`` has done all its iterations and that was exported: say so
    in one line, and how to train on; nothing is trained or written (a new ``description`` neither)."""
    step = int(ckpt["step"])
    model_path = out / "model.safetensors"
    current = _holds_weights(model_path, trained_weights(ckpt))
    export = f"kpac train --export-only --resume {shlex.quote(str(out))} --overwrite"
    more = f"to train it further, resume with --iterations M (more than {step})"
    if description != (ckpt.get("train_config") or {}).get("description", description):
        more += f"; to describe its model anew: {export} --description TEXT"
    if current:
        message(f"{out} is already complete at {step} iterations (model: {model_path}); {more}")
    else:
        message(f"{out} is already complete at {step} iterations; {more}. {model_path} holds other weights than its "
                f"last.pt (exported otherwise?) and is left as it is; to export last.pt there: {export}", "warning")
    best = out / "best.pt"
    return TrainResult(out_dir=out, step=step, total=total, model_path=model_path if current else None,
                       last_checkpoint=out / "last.pt", best_checkpoint=best if best.is_file() else None,
                       scores=dict(ckpt.get("scores") or {}), best_scores=dict(ckpt.get("best") or {}),
                       wall_clock_s=float(ckpt.get("elapsed_s", 0.0)), already_complete=True)


def export_model(run: str | Path, output: str | Path | None = None, which: str = "last",
                 blend_with: str | Path | None = None, blend: float = 0.5, description: str | None = None) -> Path:
    """Export a run's ``last.pt``/``best.pt`` (or a checkpoint file) as a kpac safetensors model.

    ``output`` defaults to ``RUN/model.safetensors`` (``RUN/model-best.safetensors`` for best).
    ``description`` replaces the one the run recorded (its ``--description``, or a generated one).
    ``blend_with``: another model of the same architecture, typically the weights the run
    started from (``--init``); the export is then ``blend`` x the run's weights + (1 - ``blend``)
    x those, recorded in the provenance with the other file's SHA-256. Not in the paper: a
    weight-space ensemble of a fine-tune and its starting point (Wortsman et al., "Robust
    fine-tuning of zero-shot models", CVPR 2022) keeps the fine-tune's gains on the data it was
    tuned on and recovers some of what it lost elsewhere (weights/README.md: real photos).
    """
    path = resolve_checkpoint(run, which)
    state = load_state(path, optimizer=False)
    config = KPACConfig.from_dict(state["config"])
    model = build_model(config)
    weights = trained_weights(state)
    prov = dict(state.get("provenance") or {})
    if blend_with is not None:
        if not 0 <= blend <= 1:
            raise TrainingError(f"blend must lie in [0, 1], got {blend}")
        other_config, other = _init_weights(Path(blend_with))
        if other_config != config:
            raise TrainingError(f"{blend_with}: another architecture ({other_config.to_json()}) than the run's "
                                f"({config.to_json()}); weights blend only within one architecture")
        weights = {k: (blend * v.float() + (1 - blend) * other[k].float()).to(v.dtype) if v.is_floating_point() else v
                   for k, v in weights.items()}
        prov["weight_blend"] = {"fraction_of_run": blend, "with": Path(blend_with).name,
                                "with_sha256": hashlib.sha256(Path(blend_with).read_bytes()).hexdigest()}
    load_state_dict_checked(model, weights)
    if not weights_finite(model.state_dict()):
        raise TrainingError(f"{path}: the weights are not finite; refusing to export")
    if output is None:
        output = path.parent / ("model.safetensors" if path.stem == "last" else f"model-{path.stem}.safetensors")
    if description:
        prov["description"] = description
    prov["iterations"] = int(state["step"])
    prov["exported_from"] = path.name
    return save_checkpoint(output, model, prov)
