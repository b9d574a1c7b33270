"""Benchmarks of the machine and of the KPAC engines (the core of ``kpac bench``; no CLI here).

Conventions:

* **FLOPs** follow :mod:`kpac_cli.model.flops` (2 per multiply-add, each atrous branch a full
  convolution, transposed convolutions at the input size). Rates are "useful" GFLOP/s: a
  formulation that executes extra arithmetic is charged only the model's own FLOPs.
* **The machine's ceiling** is the rate of one dense 3x3 'same' convolution, 96 -> 96
  channels on a 360x640 map (38.22 GFLOP), the best of PyTorch NCHW, PyTorch channels_last
  and onnxruntime (when installed) with the same number of threads.
* **Efficiency** = model rate / ceiling rate. The headline (``efficiency``) is that of the
  path ``kpac deblur`` runs on the device (:func:`engine_backend`: the fused CPU path, the
  channels_last model elsewhere); the other backends measured are comparisons, never the
  headline, however fast (``kpac deblur`` never runs onnxruntime). The ceiling is a
  reference rate, not a bound: layers of other shapes can run faster than the reference
  convolution (the model's 5x5 KPAC convolutions at 1/4 or 1/8 of the image's resolution,
  whose maps stay in cache,
  ran at ~1.2x its rate on a 2-core EPYC; at a small image size the whole model stays in cache
  while the reference map does not), and the per-round ratios scatter with load; so a
  value slightly above 1 is a real measurement, reported as measured (see
  :data:`EFFICIENCY_NOTE`), not clipped. Shared and noisy machines make absolute times
  unreliable, so every comparison here is measured *interleaved*: each round runs every
  candidate once (in a rotated order), and a ratio is computed per round; the reported
  value is the median over rounds. A burst of load from another process then slows both
  sides of a ratio instead of biasing it.
* Timings are wall-clock seconds after ``warmup`` untimed calls; CUDA work is synchronised
  before the clock is read.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .engine.device import cpu_name
from .model import KPACConfig, KPACNet, build_model
from .model.config import PAPER_CONFIGS
from .model.flops import count_flops, dense_conv_flops

#: The reference dense convolution: (height, width, channels) of its input, 3x3 kernel.
CEILING_SHAPE = (360, 640, 96)
DEFAULT_SIZE = (1280, 720)  # width x height, as photos are described
DEFAULT_TILES: tuple[int | None, ...] = (256, 512, 1024, None)
MODEL_BACKENDS = ("eager", "channels_last", "fast", "onnxruntime", "compile")
#: What the efficiency means, for readers of the report (it is not clipped at 1).
EFFICIENCY_NOTE = (
    "model GFLOP/s over the reference dense 3x3 conv's GFLOP/s (the 'ceiling'): a reference rate, not a "
    "hardware bound; values above 1 happen when the model's layers run faster than the reference (5x5 kernels "
    "on maps that stay in cache, above all at a small image size, while the reference's 360x640 map is fixed) "
    "and through round-to-round noise (see efficiency_per_round)"
)

#: Relative range of the per-round efficiencies, (max - min) / median, above which the report
#: warns that the machine was busy: the interleaving keeps the median fair, but rounds that far
#: apart mean other work competed for the cores.
NOISY_SPREAD = 0.2

Runner = Callable[[], object]


# --- timing ---------------------------------------------------------------------------------
def _sync_for(device: torch.device | str | None) -> Callable[[], None]:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def time_interleaved(
    runners: Mapping[str, Runner],
    rounds: int = 5,
    warmup: int = 1,
    repeat: Mapping[str, int] | None = None,
    device: torch.device | str | None = None,
    setup: Mapping[str, Callable[[], object]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every runner, ``rounds`` samples each, measured interleaved.

    Each round calls every runner ``repeat[name]`` times (default 1) and records the mean;
    the order of the runners rotates from round to round. ``setup[name]``, when given, runs
    untimed before each of that runner's samples (e.g. to switch a process-wide setting).
    """
    sync = _sync_for(device)
    names = list(runners)
    repeat = dict(repeat or {})
    setup = dict(setup or {})
    for name in names:
        for _ in range(warmup):
            if name in setup:
                setup[name]()
            runners[name]()
    sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            n = max(1, repeat.get(name, 1))
            if name in setup:
                setup[name]()
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                runners[name]()
            sync()
            times[name].append((time.perf_counter() - t0) / n)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# --- the machine's ceiling ------------------------------------------------------------------
def _onnx_conv_session(channels: int, threads: int, weight: np.ndarray, bias: np.ndarray):
    """An onnxruntime session holding one 3x3 'same' convolution (None if onnxruntime is absent)."""
    try:
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    from .export import make_session  # onnxruntime is imported lazily there

    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    graph = helper.make_graph(
        [node], "dense_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, "h", "w_"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, "h", "w_"])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 8)  # readable by older onnxruntime releases too
    try:
        return make_session(model.SerializeToString(), threads=threads)
    except ImportError:
        return None


def ceiling_runners(
    device: torch.device | str = "cpu",
    threads: int | None = None,
    shape: tuple[int, int, int] = CEILING_SHAPE,
    include_onnx: bool = True,
) -> dict[str, Runner]:
    """Callables running the reference dense conv on each backend available here (fp32)."""
    dev = torch.device(device)
    h, w, c = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, c, h, w, generator=gen)
    weight = torch.randn(c, c, 3, 3, generator=gen) * (1 / (9 * c)) ** 0.5
    bias = torch.randn(c, generator=gen) * 0.1
    xd, wd, bd = x.to(dev), weight.to(dev), bias.to(dev)
    xc = xd.contiguous(memory_format=torch.channels_last)
    wc = wd.contiguous(memory_format=torch.channels_last)

    def nchw() -> object:
        with torch.inference_mode():
            return F.conv2d(xd, wd, bd, padding=1)

    def channels_last() -> object:
        with torch.inference_mode():
            return F.conv2d(xc, wc, bd, padding=1)

    runners: dict[str, Runner] = {"torch_nchw": nchw, "torch_channels_last": channels_last}
    if include_onnx and dev.type == "cpu":
        sess = _onnx_conv_session(c, threads or torch.get_num_threads(), weight.numpy(), bias.numpy())
        if sess is not None:
            from .export import bound_runner

            runners["onnxruntime"] = bound_runner(sess, {"x": x.numpy()}, "y", (1, c, h, w))
    return runners


# --- model runners ------------------------------------------------------------------------
@dataclass
class PreparedRunner:
    run: Runner
    setup_seconds: float = 0.0  # export/compile/prepack time, before the first timed call
    note: str = ""


def random_model(config: KPACConfig, seed: int = 0) -> KPACNet:
    """A model with seeded random weights (speed does not depend on the weights)."""
    torch.manual_seed(seed)
    return build_model(config).eval()


def model_runner(
    model: KPACNet,
    backend: str,
    height: int,
    width: int,
    device: torch.device | str = "cpu",
    precision: torch.dtype = torch.float32,
    threads: int | None = None,
) -> PreparedRunner:
    """A callable running the whole network once on a random ``height x width`` image.

    ``backend``: ``eager`` (NCHW), ``channels_last``, ``fast`` (:mod:`kpac_cli.model.fast`,
    channels_last), ``onnxruntime`` (CPU, fp32) or ``compile`` (``torch.compile``, inductor;
    the compile time is ``setup_seconds``).
    """
    dev = torch.device(device)
    cfg = model.config
    s = cfg.stride
    h, w = -(-height // s) * s, -(-width // s) * s
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, cfg.in_channels, h, w, generator=gen) * 2 - 1
    autocast = (
        torch.autocast(device_type=dev.type, dtype=precision) if precision != torch.float32 else None
    )
    t0 = time.perf_counter()

    if backend == "onnxruntime":
        if dev.type != "cpu" or precision != torch.float32:
            raise ValueError("the onnxruntime backend runs on the CPU in fp32")
        from .export import OnnxBackend

        onnx_backend = OnnxBackend(copy.deepcopy(model).cpu(), threads=threads)
        xn = x.numpy()
        ref = onnx_backend.default_reference(xn)
        return PreparedRunner(lambda: onnx_backend.run(xn, ref), time.perf_counter() - t0)

    model = copy.deepcopy(model)  # the layouts below convert parameters in place
    if backend == "eager":
        net: Any = model.to(dev).to(memory_format=torch.contiguous_format)
        xd = x.to(dev)
    elif backend in ("channels_last", "compile"):
        net = model.to(dev).to(memory_format=torch.channels_last)
        xd = x.to(dev).contiguous(memory_format=torch.channels_last)
    elif backend == "fast":
        from .model.fast import FastKPACNet

        net = FastKPACNet(model.to(dev).to(memory_format=torch.channels_last))
        xd = x.to(dev).contiguous(memory_format=torch.channels_last)
    else:
        raise ValueError(f"unknown backend {backend!r} (one of {', '.join(MODEL_BACKENDS)})")

    if backend == "compile":
        net = torch.compile(net, dynamic=False)

    def run() -> object:
        with torch.inference_mode():
            if autocast is None:
                return net(xd)
            with autocast:
                return net(xd)

    setup = 0.0
    if backend in ("compile", "fast"):
        run()  # compiles / prepacks; counted as setup, not as the first timed call
        _sync_for(dev)()
        setup = time.perf_counter() - t0
    return PreparedRunner(run, setup)


# --- efficiency -----------------------------------------------------------------------------
@dataclass
class EfficiencyReport:
    """Model rate over the machine's ceiling, measured interleaved in one process."""

    efficiency: float  # median over rounds of (model rate / best ceiling rate of that round)
    model_seconds: float
    model_gflops_per_s: float
    ceiling_gflops_per_s: float  # median over rounds of the best ceiling backend
    ceiling_backend: str  # the backend that was best most often
    ceiling_by_backend: dict[str, float]  # median GFLOP/s per backend
    model_flops: int
    rounds: int
    per_round: list[float] = field(default_factory=list)


def efficiency_from_times(
    model_times: Sequence[float], ceiling_times: Mapping[str, Sequence[float]], model_flops: int, conv_flops: int
) -> EfficiencyReport:
    """Per round r: (model_flops / model_times[r]) / max over backends of conv_flops / ceiling_times[b][r]."""
    rounds = len(model_times)
    per_round, best_names = [], []
    for r in range(rounds):
        rates = {b: conv_flops / t[r] for b, t in ceiling_times.items()}
        best = max(rates, key=rates.get)
        best_names.append(best)
        per_round.append((model_flops / model_times[r]) / rates[best])
    by_backend = {b: conv_flops / median(t) / 1e9 for b, t in ceiling_times.items()}
    best_rates = [max(conv_flops / t[r] for t in ceiling_times.values()) for r in range(rounds)]
    m = median(model_times)
    return EfficiencyReport(
        efficiency=median(per_round),
        model_seconds=m,
        model_gflops_per_s=model_flops / m / 1e9,
        ceiling_gflops_per_s=median(best_rates) / 1e9,
        ceiling_backend=max(set(best_names), key=best_names.count),
        ceiling_by_backend=by_backend,
        model_flops=model_flops,
        rounds=rounds,
        per_round=per_round,
    )


def measure_efficiency(
    model: KPACNet,
    height: int = 720,
    width: int = 1280,
    backends: Sequence[str] = ("channels_last",),
    device: torch.device | str = "cpu",
    rounds: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    include_onnx_ceiling: bool = True,
) -> dict[str, EfficiencyReport]:
    """Efficiency of each model backend, all interleaved with the ceiling convolutions."""
    flops = count_flops(model.config, height, width)["total"]
    h, w, c = CEILING_SHAPE
    conv_flops = dense_conv_flops(h, w, c, c)
    ceiling = ceiling_runners(device, threads, include_onnx=include_onnx_ceiling)
    models = {f"model:{b}": model_runner(model, b, height, width, device, threads=threads).run for b in backends}
    # a conv call is ~1/15 of a model call: repeat it so both are timed over similar spans
    repeat = {name: 3 for name in ceiling}
    times = time_interleaved({**ceiling, **models}, rounds, warmup, repeat, device)
    ceil_times = {k: times[k] for k in ceiling}
    return {b: efficiency_from_times(times[f"model:{b}"], ceil_times, flops, conv_flops) for b in backends}


def engine_backend(device: torch.device | str) -> str:
    """The backend that runs what :class:`~kpac_cli.engine.Deblurrer` (``kpac deblur``) runs on
    ``device`` by default: the fused CPU path on the CPU, the channels_last model elsewhere."""
    return "fast" if torch.device(device).type == "cpu" else "channels_last"


def engine_precision(device: torch.device | str) -> str:
    """The precision ``kpac deblur`` runs in on ``device`` by default (``--precision auto``)."""
    from .engine import resolve_precision

    dtype = resolve_precision("auto", torch.device(device))
    return next(name for name, d in _DTYPES.items() if d == dtype)


def headline_backend(measured: Sequence[str], device: torch.device | str) -> str:
    """The backend whose efficiency is the headline: the engine's path when it was measured,
    else the first one measured (the report then says the engine's path was not)."""
    engine = engine_backend(device)
    return engine if engine in measured else measured[0]


# --- precisions, configs, tiles --------------------------------------------------------------
def available_precisions(device: torch.device | str) -> list[str]:
    """Precisions the engine accepts on ``device`` (see :func:`kpac_cli.engine.resolve_precision`)."""
    from .engine import resolve_precision

    out = []
    for p in ("fp32", "bf16", "fp16"):
        try:
            resolve_precision(p, torch.device(device))
        except ValueError:
            continue
        out.append(p)
    return out


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def config_throughput(
    configs: Mapping[str, KPACConfig] | None = None,
    height: int = 720,
    width: int = 1280,
    device: torch.device | str = "cpu",
    precisions: Sequence[str] | None = None,
    backend: str = "channels_last",
    rounds: int = 3,
    warmup: int = 1,
) -> list[dict[str, Any]]:
    """Whole-image throughput of every config x precision (interleaved within a config).

    ``configs`` None: the paper configs. ``precisions`` None: those the engine accepts on
    ``device`` that ``backend`` runs (the onnxruntime backend runs fp32 only).
    """
    configs = dict(PAPER_CONFIGS if configs is None else configs)
    if precisions is None:
        precisions = ["fp32"] if backend == "onnxruntime" else available_precisions(device)
    precisions = list(precisions)
    rows = []
    for name, cfg in configs.items():
        model = random_model(cfg)
        runners = {p: model_runner(model, backend, height, width, device, _DTYPES[p]).run for p in precisions}
        times = time_interleaved(runners, rounds, warmup, device=device)
        flops = count_flops(cfg, height, width)["total"]
        for p in precisions:
            t = median(times[p])
            rows.append({
                "config": name, "precision": p, "backend": backend, "seconds": t,
                "megapixels_per_s": height * width / t / 1e6, "gflops_per_s": flops / t / 1e9,
            })
    return rows


def tile_sweep(
    model: KPACNet,
    height: int = 720,
    width: int = 1280,
    tiles: Sequence[int | None] = DEFAULT_TILES,
    device: str = "cpu",
    precision: str = "fp32",
    rounds: int = 3,
    warmup: int = 1,
) -> list[dict[str, Any]]:
    """Time :class:`~kpac_cli.engine.Deblurrer` (the real engine path) with each tile size.

    ``None`` is the whole image. Each row says the tile that really ran (``effective_tile``,
    None for the whole image) and, where that differs from the tile asked for, why
    (``tile_note``): the engine raises tiles below its minimum, rounds them down to the
    network's stride, runs a tile not smaller than the image as the whole image, and halves
    a tile that runs out of memory (the tile of the last timed run is the one reported).
    """
    from .engine.deblurrer import MIN_TILE

    from .engine import Deblurrer, EngineOptions

    rng = np.random.default_rng(0)
    image = rng.random((height, width, model.config.in_channels), dtype=np.float32)
    runners, effective, notes, engines = {}, {}, {}, {}
    s = model.config.stride
    for t in tiles:
        key = "whole" if t is None else str(t)
        if key in runners:  # asked twice: one row
            continue
        d = Deblurrer(model, EngineOptions(device=device, precision=precision, tile=t or None))
        planned = d.plan_tile(height, width)
        # as TiledInference runs it: a multiple of the stride, the whole image when it covers it
        eff = None if planned is None else max(s, planned // s * s)
        if eff is not None and eff >= max(-(-height // s) * s, -(-width // s) * s):
            eff = None
        effective[key] = eff
        if t is not None and eff is None:
            raised = f" (even raised to the engine's {MIN_TILE} px minimum)" if t < MIN_TILE else ""
            notes[key] = f"not smaller than the {width}x{height} image{raised}: ran as the whole image"
        elif t is not None and eff != t:
            why = f"raised to the engine's {MIN_TILE} px minimum" if t < MIN_TILE else f"a multiple of the stride {s}"
            notes[key] = f"ran as {eff} ({why})"
        runners[key] = (lambda d=d: d.run(image))
        engines[key] = d
    times = time_interleaved(runners, rounds, warmup, device=device)
    rows = []
    for key, ts in times.items():
        ran = engines[key].last_stats.tile  # the engine's own word, e.g. a tile halved after running out of memory
        if ran != effective[key]:
            effective[key] = ran
            why = "; ".join(engines[key].last_stats.notes) or "the engine's choice"
            notes[key] = f"ran as {'the whole image' if ran is None else ran} ({why})"
        t = median(ts)
        row = {"tile": key, "effective_tile": effective[key], "seconds": t, "megapixels_per_s": height * width / t / 1e6}
        if key in notes:
            row["tile_note"] = notes[key]
        rows.append(row)
    return rows


def ran_tile(row: Mapping[str, Any]) -> str:
    """The tile a sweep row really ran: its ``effective_tile`` ("whole" for None), or the
    requested ``tile`` for rows that do not say."""
    if "effective_tile" not in row:
        return row["tile"]
    return "whole" if row["effective_tile"] is None else str(row["effective_tile"])


def recommend_tile(rows: Sequence[Mapping[str, Any]], tolerance: float = 0.05) -> str:
    """The tile to use: the smallest (least memory) within ``tolerance`` of the fastest.

    Ranked by the tile that ran (:func:`ran_tile`), not the one asked for: a requested 64
    that the engine ran as the whole image recommends ``"whole"``.
    """
    best = min(r["seconds"] for r in rows)

    def size(tile: str) -> float:
        return math.inf if tile == "whole" else int(tile)

    ok = [ran_tile(r) for r in rows if r["seconds"] <= best * (1 + tolerance)]
    return min(ok, key=size)


# --- memory and noise ------------------------------------------------------------------------
def whole_image_bytes(configs: Sequence[KPACConfig], height: int, width: int) -> int:
    """Peak activation bytes of one fp32 pass of the widest of ``configs`` on the whole
    ``height x width`` image, as the engine plans a tile's: the efficiency and throughput runs
    (and a ``whole`` tile-sweep row) are never tiled."""
    from .engine.deblurrer import _BYTES_PER_PIXEL_PER_CHANNEL

    def padded(n: int, stride: int) -> int:
        return -(-n // stride) * stride

    return max(_BYTES_PER_PIXEL_PER_CHANNEL * c.channels * padded(height, c.stride) * padded(width, c.stride)
               for c in configs)


def memory_problem(configs: Sequence[KPACConfig], height: int, width: int, device: torch.device | str) -> str | None:
    """Why the untiled runs of a ``height x width`` image do not fit the memory free on
    ``device`` now, or None when they do (past it the OS kills the process or swaps for minutes)."""
    from .engine.device import available_memory

    dev = torch.device(device)
    need, free = whole_image_bytes(configs, height, width), available_memory(dev)
    if need <= free:
        return None
    return (f"measuring {width}x{height} runs the whole image untiled, which needs about {need / 2**30:.1f} GiB; "
            f"{free / 2**30:.1f} GiB is free on {dev}: use a smaller size (kpac deblur tiles large photos)")


def relative_spread(values: Sequence[float]) -> float | None:
    """(max - min) / median of per-round values; None for fewer than 2 rounds."""
    if len(values) < 2:
        return None
    return (max(values) - min(values)) / median(values)


def noise_warnings(per_round: Sequence[float], loadavg: Sequence[float] | None, cpu_count: int | None) -> list[str]:
    """What the report must say when its rounds scattered too much to be an idle machine's figures."""
    spread = relative_spread(per_round)
    if spread is None or spread <= NOISY_SPREAD:
        return []
    load = f"; load average {loadavg[0]:.1f} on {cpu_count} CPUs at the start" if loadavg and cpu_count else ""
    return [f"the efficiency's rounds spread by {spread:.0%} of their median (more than {NOISY_SPREAD:.0%}){load}: "
            "other work was competing for the machine, so the figures are not an idle machine's; "
            "rerun on an idle machine or with more rounds"]


# --- everything, for `kpac bench` ---------------------------------------------------------------
def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    dev = torch.device(device)
    info: dict[str, Any] = {
        "device": str(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_name(),
        "loadavg": _loadavg(),
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def run_benchmark(
    height: int = 720,
    width: int = 1280,
    device: str = "cpu",
    rounds: int = 5,
    warmup: int = 1,
    tiles: Sequence[int | None] = DEFAULT_TILES,
    configs: Mapping[str, KPACConfig] | None = None,
    backends: Sequence[str] = ("channels_last",),
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The whole ``kpac bench`` report as a JSON-ready dict (``efficiency`` at the top level).

    ``efficiency`` is that of ``kpac deblur``'s path on the device (``engine_backend``) when it
    is among ``backends``, else of the first backend (``engine_backend_measured`` false); every
    backend's is under ``backends``.

    The efficiency is measured over ``rounds`` rounds; the config throughput and the tile sweep,
    which have more candidates, over ``max(2, rounds // 2)`` each (``report["rounds"]``), the
    tile sweep in the precision ``kpac deblur`` runs on the device by default (``tiles_precision``).
    ``warnings`` says when the efficiency's rounds scattered past :data:`NOISY_SPREAD`.

    Raises MemoryError, before measuring, when the untiled runs would not fit the free memory.
    """
    from .engine import resolve_device

    say = progress or (lambda msg: None)
    dev = resolve_device(device)
    model = random_model(PAPER_CONFIGS["single_3level"])
    problem = memory_problem([model.config, *(PAPER_CONFIGS if configs is None else configs).values()], height, width, dev)
    if problem is not None:  # refused before minutes of work, not killed by the OS midway
        raise MemoryError(problem)
    sweep_rounds = max(2, rounds // 2)  # the configs and tiles: many candidates, fewer rounds each
    report: dict[str, Any] = {
        "machine": machine_info(dev),
        "size": [width, height],
        "rounds": {"efficiency": rounds, "configs": sweep_rounds, "tiles": sweep_rounds},
        "warmup": warmup,
    }

    say("efficiency (3-level model vs the dense-conv ceiling)")
    eff = measure_efficiency(model, height, width, backends, dev, rounds, warmup)
    headline = headline_backend(list(eff), dev)
    main = eff[headline]
    report["efficiency"] = round(main.efficiency, 4)
    report["efficiency_backend"] = headline
    report["engine_backend"] = engine_backend(dev)
    report["engine_backend_measured"] = report["engine_backend"] in eff
    report["engine_precision"] = engine_precision(dev)
    report["efficiency_precision"] = "fp32"  # the model's and the ceiling's
    report["efficiency_per_round"] = [round(v, 4) for v in main.per_round]
    spread = relative_spread(main.per_round)
    report["efficiency_spread"] = None if spread is None else round(spread, 4)
    report["efficiency_note"] = EFFICIENCY_NOTE
    report["ceiling"] = {
        "gflops_per_s": round(main.ceiling_gflops_per_s, 1),
        "backend": main.ceiling_backend,
        "by_backend": {k: round(v, 1) for k, v in main.ceiling_by_backend.items()},
        "shape": {"height": CEILING_SHAPE[0], "width": CEILING_SHAPE[1], "channels": CEILING_SHAPE[2], "kernel": 3},
    }
    report["backends"] = {
        b: {"efficiency": round(e.efficiency, 4), "seconds": e.model_seconds, "gflops_per_s": round(e.model_gflops_per_s, 1)}
        for b, e in eff.items()
    }
    report["model_flops"] = main.model_flops

    say("throughput per model config and precision")
    report["configs"] = config_throughput(configs, height, width, dev, None, backends[0], sweep_rounds, warmup)

    say("tile sweep (3-level model, engine path)")
    # in the precision kpac deblur runs there by default: the tile recommended is for it
    sweep = tile_sweep(model, height, width, tiles, str(dev), report["engine_precision"], sweep_rounds, warmup)
    report["tiles"] = sweep
    report["tiles_precision"] = report["engine_precision"]
    report["recommended_tile"] = recommend_tile(sweep)
    report["machine"]["loadavg_after"] = _loadavg()
    report["warnings"] = noise_warnings(main.per_round, report["machine"]["loadavg"], report["machine"]["cpu_count"])
    return report
