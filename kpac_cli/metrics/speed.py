"""Model size and speed, as in the paper's Table 5: parameters, FLOPs, seconds per image.

Measurement (:func:`measure_speed`):

* the input is a random ``(1, C, H, W)`` tensor already on the device (default 1280x720,
  padded to the encoder stride as the engine pads), so the time is the network's forward
  pass: no image decoding, host-device copies or tiling;
* the model runs exactly as the engine runs it: the engine's network (on the CPU the fused
  fast path, :class:`kpac_cli.model.fast.FastKPACNet`), same device, precision (autocast for
  fp16 / bf16), memory layout (channels-last unless disabled) and ``torch.inference_mode``;
* with a self-ensemble (``EngineOptions.ensemble`` N > 1) one timed run is what the engine
  does per image: N passes over the flips/transposes of the input, each mapped back, and
  their mean; ``seconds`` is per image (all N passes), ``seconds_per_pass`` its N-th part,
  and ``flops`` counts all N passes;
* ``warmup`` untimed runs first (kernel selection, caches, lazy initialisation), then
  ``runs`` timed runs, each bracketed by a device synchronisation
  (``torch.cuda.synchronize`` on CUDA, ``torch.mps.synchronize`` on MPS) so that the
  clock sees the finished computation, not just the queued kernels;
* the wall clock is :func:`time.perf_counter`; the report gives the mean, the median and
  the minimum of the timed runs (the paper reports an average).

FLOPs come from :func:`kpac_cli.model.flops.count_flops` when that module is present
(convolutions only, 2 FLOPs per multiply-add); otherwise they are reported as unavailable
with the reason. Parameters are counted over all tensors of the network.

No Typer or rich here.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

__all__ = ["PAPER_SIZE", "SpeedResult", "count_model_flops", "describe_method", "measure_speed", "synchronize"]

#: The paper's Table 5 input size (width x height).
PAPER_SIZE = (1280, 720)


@dataclass
class SpeedResult:
    """Size and speed of one model on one device (see the module notes for the method)."""

    model: str
    device: str
    device_name: str
    precision: str
    width: int
    height: int
    params: int
    flops: int | None  # None when the FLOP counter is unavailable (see flops_note)
    flops_note: str
    seconds: float  # mean of the timed runs
    seconds_median: float
    seconds_min: float
    times: list[float]
    warmup: int
    runs: int
    channels_last: bool
    threads: int | None  # torch intra-op threads (CPU only)
    ensemble: int = 1  # network passes per image (self-ensemble); times and FLOPs cover them all
    torch_version: str = field(default_factory=lambda: torch.__version__)

    @property
    def gflops_per_s(self) -> float | None:
        if self.flops is None or not self.seconds > 0:
            return None
        return self.flops / self.seconds / 1e9

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gflops_per_s"] = self.gflops_per_s
        d["seconds_per_pass"] = self.seconds / self.ensemble
        d["megapixels_per_s"] = self.width * self.height / 1e6 / self.seconds if self.seconds > 0 else None
        return d


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on ``device`` (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


def count_model_flops(config: Any, height: int, width: int) -> tuple[int | None, str]:
    """``(flops, note)`` for one ``height x width`` image; ``(None, reason)`` when unavailable."""
    try:
        from ..model.flops import count_flops
    except ImportError as e:
        return None, f"unavailable: FLOP counter not installed ({e})"
    try:
        total = int(count_flops(config, height, width)["total"])
    except Exception as e:  # noqa: BLE001 - a counter that cannot handle this config
        return None, f"unavailable: {type(e).__name__}: {e}"
    return total, "analytic count of the convolutions, 2 FLOPs per multiply-add (kpac_cli.model.flops)"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    from ..engine.device import cpu_name  # the CPU's model name, as kpac bench reports it

    return cpu_name() or "cpu"


def measure_speed(
    deblurrer: Any,
    *,
    width: int = PAPER_SIZE[0],
    height: int = PAPER_SIZE[1],
    warmup: int = 3,
    runs: int = 10,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> SpeedResult:
    """Parameters, FLOPs and time per image of a loaded model, as its engine options run it.

    Parameters
    ----------
    deblurrer : kpac_cli.engine.Deblurrer
        The model, already on its device with its precision (the engine's options; with
        ``ensemble`` N every timed run is the N passes of the self-ensemble).
    width, height : int
        Input size; default 1280x720 (the paper's Table 5).
    warmup, runs : int
        Untimed runs first, then timed runs (``runs >= 1``).
    seed : int
        Seed of the random input (its values do not affect the time).
    clock : callable
        Time source, seconds (for tests).

    Returns
    -------
    SpeedResult
    """
    if width < 1 or height < 1:
        raise ValueError(f"size must be positive, got {width}x{height}")
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    from ..engine.deblurrer import dihedral, ensemble_inputs
    from ..engine.device import autocast
    from ..engine.tiled import pad_to_multiple
    from ..model import count_parameters

    model = deblurrer.model
    network = getattr(deblurrer, "network", model)  # what the engine calls (fast path on the CPU)
    config = deblurrer.config
    device: torch.device = deblurrer.device
    dtype: torch.dtype = deblurrer.dtype
    channels_last = bool(getattr(deblurrer.options, "channels_last", True))
    ensemble = int(getattr(deblurrer.options, "ensemble", 1))
    layout = torch.channels_last if channels_last else torch.contiguous_format

    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((1, config.in_channels, height, width), generator=gen) * 2 - 1
    x = pad_to_multiple(x, config.stride)
    x = x.to(device).contiguous(memory_format=layout)
    ref = model.default_reference(x)

    def one_pass(xk: torch.Tensor, refk: torch.Tensor) -> torch.Tensor:
        # the stages the engine's whole-image path calls (CompiledNetwork has no forward)
        skips, encoded = network.encode(xk.contiguous(memory_format=layout))
        return network.decode(network.bottleneck(encoded).features, skips) + refk

    def forward() -> None:
        with torch.inference_mode(), autocast(device, dtype):
            # the self-ensemble as Deblurrer.run does it: each flip/transpose, mapped back, averaged
            out = sum(dihedral(one_pass(xk, refk), k, inverse=True)
                      for k, xk, refk in ensemble_inputs(x, ref, ensemble, config.in_views == 2))
            out = out / ensemble

    for _ in range(warmup):
        forward()
    synchronize(device)
    times = []
    for _ in range(runs):
        synchronize(device)
        t0 = clock()
        forward()
        synchronize(device)
        times.append(clock() - t0)

    flops, note = count_model_flops(config, height, width)
    if flops is not None and ensemble > 1:
        # transposed passes run on a width x height input (padded to the stride the other way)
        flops_t, _ = count_model_flops(config, width, height)
        n_t = sum(1 for k in range(ensemble) if k & 4)
        flops = flops * (ensemble - n_t) + (flops_t or flops) * n_t
        note += f"; all {ensemble} passes of the self-ensemble"
    precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
    return SpeedResult(
        model=str(getattr(deblurrer, "name", "model")),
        device=str(device),
        device_name=_device_name(device),
        precision=precision,
        width=width,
        height=height,
        params=int(count_parameters(model)),
        flops=flops,
        flops_note=note,
        seconds=math.fsum(times) / len(times),
        seconds_median=float(statistics.median(times)),
        seconds_min=min(times),
        times=times,
        warmup=warmup,
        runs=runs,
        channels_last=channels_last,
        threads=torch.get_num_threads() if device.type == "cpu" else None,
        ensemble=ensemble,
    )


def describe_method(ensemble: int = 1) -> str:
    """One line for reports: how the time was measured (``ensemble``: passes per image)."""
    what = (
        "forward pass of the network" if ensemble == 1 else
        f"{ensemble} forward passes of the network per image (the self-ensemble's flips/transposes, "
        "mapped back and averaged; seconds per image cover all of them)"
    )
    return (
        f"{what} on a random input already on the device, as the engine runs it "
        "(network, precision, memory layout, inference mode); warm-up runs first, every timed run between device "
        f"synchronisations; wall clock time.perf_counter; {os.cpu_count()} CPU cores visible"
    )
