"""ONNX export of a KPAC network and an onnxruntime backend that runs it.

Conventions of the exported graph (``export_onnx``):

* inputs ``input`` (N, C, H, W) float32 in [-1, 1] (C = 3, or 6 for dual-pixel models:
  left RGB then right RGB) and ``reference`` (N, 3, H, W): the image the residual is added
  to (the input itself for single-image models, the centre view for dual-pixel ones);
* output ``output`` (N, 3, H, W) = residual + reference, unclipped, in [-1, 1] units;
* H and W are dynamic but must be multiples of the encoder stride (8 for 3-level models,
  4 for 2-level): the graph does no padding. :class:`OnnxBackend` pads like the engine
  (reflect at the bottom/right, cropped after), so it accepts any size. A static graph is
  fixed to one such size;
* the model's :class:`~kpac_cli.model.KPACConfig` is stored as JSON in the model's
  metadata (key ``kpac_config``), so a file is self-describing;
* so is the engine's pre-processing: metadata ``kpac_balance_views`` (JSON ``true`` or
  ``false``) says whether the left and right views are to be balanced before the graph
  (:func:`kpac_cli.engine.dualpixel.balance_views`, a dual-pixel model whose checkpoint asks
  for it), with the reference still the views as captured. The graph itself is the network
  only; :class:`OnnxBackend` balances in numpy as the engine does;
* and the rest of the contract, in words, for a runtime that has nothing but the file
  (:func:`contract_metadata`): ``kpac_stride`` (the multiple H and W must be, a number), and
  ``kpac_input``, ``kpac_reference``, ``kpac_output`` (channel order, scaling, colour
  encoding, padding, clipping), also joined as the model's ``doc_string``. The producer is
  kpac at its own version.

The graph is the whole network, not three sub-graphs (encoder, bottleneck, decoder): the
engine tiles only images that do not fit in memory, and those run on PyTorch, whose tiled
path is exact. One graph lets onnxruntime fuse and plan across the whole network, and the
file is usable from any ONNX runtime without knowing about tiling. Measured on a 2-core
AVX-512 CPU (1280x720, 1 thread, interleaved), onnxruntime 1.53 s was slower than PyTorch
channels_last 1.21 s and the fast path 0.96 s (:mod:`kpac_cli.model.fast`) once PyTorch's
allocator keeps its memory, so PyTorch stays the CPU engine; this backend is for
deployment and cross-checking.

onnxruntime and onnx are optional dependencies (``pip install kpac[onnx]``); they are
imported only when used.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from .model import KPACConfig, KPACNet

INPUT, REFERENCE, OUTPUT = "input", "reference", "output"
CONFIG_KEY = "kpac_config"
BALANCE_KEY = "kpac_balance_views"
STRIDE_KEY = "kpac_stride"
#: The oldest opset ``kpac export`` offers (its lower bound since the command exists).
MIN_OPSET = 13


def max_opset() -> int | None:
    """The newest ONNX opset this PyTorch's exporter writes (None if it does not say)."""
    try:
        from torch.onnx import _constants  # private, but the only place the exporter states its range
    except ImportError:
        return None
    value = getattr(_constants, "ONNX_MAX_OPSET", None)
    return value if isinstance(value, int) else None


def _check_opset(opset: int) -> None:
    # A newer opset than the exporter knows fails deep inside it, after it has dumped the whole
    # graph on stderr: refuse it first.
    newest = max_opset()
    if newest is not None and opset > newest:
        raise ValueError(f"opset {opset} is newer than this PyTorch's ONNX exporter writes (at most {newest})")


class _WithReference(nn.Module):
    """The network with an explicit reference input (what the graph exports)."""

    def __init__(self, model: KPACNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, reference: Tensor) -> Tensor:
        skips, encoded = self.model.encode(x)
        return self.model.decode(self.model.bottleneck(encoded).features, skips) + reference


def check_static_size(hw: tuple[int, int], stride: int) -> None:
    """ValueError unless (height, width) ``hw`` are multiples of ``stride``, naming the nearest
    valid sizes (WxH, as ``kpac export --static`` takes them)."""
    h, w = hw
    if h % stride == 0 and w % stride == 0:
        return
    up = f"{-(-w // stride) * stride}x{-(-h // stride) * stride}"
    down = f"{w // stride * stride}x{h // stride * stride}" if w >= stride and h >= stride else None
    nearest = f"{down} or {up}" if down else up
    raise ValueError(f"static size {w}x{h}: width and height must be multiples of the model's stride {stride} (nearest: {nearest})")


def contract_metadata(cfg: KPACConfig, balance_views: bool) -> dict[str, str]:
    """What a runtime must do around the graph to get ``kpac deblur``'s output, in words
    (metadata key -> text), as the engine does it (:class:`kpac_cli.engine.Deblurrer`)."""
    s = cfg.stride
    dual = cfg.in_views == 2
    shape = f"(N, {cfg.in_channels}, H, W) float32, NCHW"
    # the engine runs dual-pixel views unrotated (upright, a portrait capture's disparity is vertical)
    channels = ("left view RGB then right view RGB, as the sensor recorded them (before any EXIF rotation:"
                " defocus disparity horizontal)") if dual else "RGB"
    balance = (" The left and right views are first balanced (kpac_balance_views: a smooth gain map per view,"
               " kpac_cli.engine.dualpixel.balance_views).") if balance_views and dual else ""
    centre = ("the mean of the left and right views as captured (before any balancing), or a centre view"
              if dual else "the input itself")
    return {
        STRIDE_KEY: str(s),
        "kpac_input": (f"{shape}, {channels}; pixel values v in [0, 1] encoded for display (sRGB gamma, as photos"
                       f" are stored; not linear light) scaled to x = 2 * v - 1 (8-bit: u8 / 127.5 - 1). H and W"
                       f" must be multiples of {s}: pad at the bottom and right by reflection (by replication"
                       f" when a side is not longer than its padding), and crop the output back.{balance}"),
        "kpac_reference": f"(N, 3, H, W) float32 in the same units: the image the residual is added to, {centre}.",
        "kpac_output": ("(N, 3, H, W) float32 = residual + reference, RGB in the same units, unclipped:"
                        " v = (output + 1) / 2, clipped to [0, 1]."),
    }


def _require_onnx() -> None:
    """ImportError naming the extra to install when the ``onnx`` package is missing: PyTorch's
    exporter needs it too, and says so only with its own error after tracing the whole graph."""
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise ImportError("the onnx package is not installed: pip install 'kpac[onnx]'") from e


def _onnx_bytes(model: KPACNet, opset: int, dynamic: bool, sample_hw: tuple[int, int], balance_views: bool) -> bytes:
    _check_opset(opset)
    _require_onnx()
    model = copy.deepcopy(model).float().cpu().eval().to(memory_format=torch.contiguous_format)
    cfg = model.config
    if not dynamic:  # a graph fixed to the rounded-up size would reject the very size asked for
        check_static_size(sample_hw, cfg.stride)
    h, w = (-(-v // cfg.stride) * cfg.stride for v in sample_hw)
    x = torch.zeros(1, cfg.in_channels, h, w)
    ref = torch.zeros(1, 3, h, w)
    axes = {name: {0: "batch", 2: "height", 3: "width"} for name in (INPUT, REFERENCE, OUTPUT)} if dynamic else None
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript-based exporter: it needs no onnxscript, and the graph is plain convs
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                _WithReference(model), (x, ref), buf, dynamo=False, opset_version=opset,
                input_names=[INPUT, REFERENCE], output_names=[OUTPUT], dynamic_axes=axes,
                do_constant_folding=True,
            )
        except RuntimeError as e:  # an opset the exporter refuses although max_opset() did not say so
            if "opset" not in str(e).lower():
                raise
            raise ValueError(f"opset {opset}: {' '.join(str(e).split())}") from None
    import onnx

    from . import __version__

    proto = onnx.load_from_string(buf.getvalue())
    balance = balance_views and cfg.in_views == 2
    contract = contract_metadata(cfg, balance)
    for key, value in ((CONFIG_KEY, cfg.to_json()), (BALANCE_KEY, json.dumps(balance)), *contract.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = "KPAC defocus deblurring network. " + " ".join(
        f"{name}: {contract[f'kpac_{name}']}" for name in (INPUT, REFERENCE, OUTPUT))
    # the exporter wrote PyTorch's version here, which beside producer_name read as kpac's
    proto.producer_name, proto.producer_version = "kpac", __version__
    return proto.SerializeToString()


def export_onnx(
    model: KPACNet,
    path: str | Path | None,
    opset: int = 17,
    dynamic: bool = True,
    sample_hw: tuple[int, int] = (64, 96),
    balance_views: bool = False,
    replace: bool = True,
) -> bytes:
    """Export ``model`` (fp32, CPU copy) to ONNX at ``path``; returns the serialized model.

    ``dynamic``: height, width and batch are symbolic (multiples of the stride, see the module
    docstring); otherwise the graph is fixed to ``sample_hw`` (height, width), which must be
    multiples of the stride (ValueError otherwise). ``balance_views``: record that the views
    are balanced before the network (a dual-pixel checkpoint's ``balance_views`` provenance;
    ignored for single-image models). ``path=None`` only returns the bytes. The file is written
    atomically, its folder created if needed (as :func:`kpac_cli.checkpoints.save_checkpoint`
    does). ``replace=False``: FileExistsError if ``path`` exists when the file is committed
    (one that appeared while the graph was traced included), which is then left as it is.
    ValueError for an opset newer than this PyTorch's exporter writes (:func:`max_opset`);
    ImportError when the ``onnx`` package is not installed.
    """
    data = _onnx_bytes(model, opset, dynamic, sample_hw, balance_views)
    if path is not None:
        from .images import atomic_write_bytes

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data, replace=replace)
    return data


def read_metadata(model: str | Path | bytes) -> dict[str, str]:
    """The metadata of an ONNX file or its bytes (key -> value)."""
    import onnx

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model), load_external_data=False)
    return {entry.key: entry.value for entry in proto.metadata_props}


def _config_of(meta: Mapping[str, str], model: str | Path | bytes) -> KPACConfig:
    if CONFIG_KEY not in meta:
        raise ValueError(f"{model if not isinstance(model, bytes) else 'model'} has no {CONFIG_KEY} metadata: not exported by kpac")
    return KPACConfig.from_json(meta[CONFIG_KEY])


def read_config(model: str | Path | bytes) -> KPACConfig:
    """The KPACConfig stored in an exported file (ValueError if it has none)."""
    return _config_of(read_metadata(model), model)


def _balance_of(meta: Mapping[str, str]) -> bool:
    # files exported before the key existed do not say: False
    return bool(json.loads(meta.get(BALANCE_KEY, "false")))


def read_balance_views(model: str | Path | bytes) -> bool:
    """Whether an exported file asks for balanced dual-pixel views (False if it does not say:
    files exported before the key existed)."""
    return _balance_of(read_metadata(model))


def require_onnxruntime() -> None:
    """ImportError naming the extra to install when onnxruntime is missing (checked before an
    export whose check needs it, so that no file is written by a command that then fails)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ImportError("onnxruntime is not installed: pip install 'kpac[onnx]'") from e


def make_session(model: str | Path | bytes, threads: int | None = None):
    """An onnxruntime CPU session with full graph optimisation and ``threads`` intra-op threads
    (default: PyTorch's thread count, so comparisons use the same threads)."""
    require_onnxruntime()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def bound_runner(session, feeds: Mapping[str, np.ndarray], output: str, shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
    """A callable running ``session`` on fixed inputs into a preallocated output buffer.

    I/O binding keeps onnxruntime from allocating (and the OS from zero-filling) a fresh
    output array on every call, as a long-running process reusing buffers would.
    """
    binding = session.io_binding()
    for name, arr in feeds.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(arr, dtype=np.float32))
    out = np.empty(shape, dtype=np.float32)
    binding.bind_output(output, "cpu", 0, np.float32, list(shape), out.ctypes.data)

    def run() -> np.ndarray:
        session.run_with_iobinding(binding)
        return out

    return run


class OnnxBackend:
    """Run an exported KPAC network with onnxruntime, like the engine's whole-image path.

    >>> backend = OnnxBackend("kpac-3level.onnx")            # doctest: +SKIP
    >>> out = backend.run(x, reference)                     # doctest: +SKIP

    ``path_or_model``: an ``.onnx`` file written by :func:`export_onnx`, its bytes, or a
    :class:`~kpac_cli.model.KPACNet` (exported in memory). :meth:`run` takes NCHW float32
    arrays (or CPU tensors) in the model's [-1, 1] units, balances dual-pixel views when the
    file asks for it and pads to the stride as the engine does, and returns the unclipped
    output of the same type and size (a graph exported with a static size takes only that size,
    ValueError otherwise). ``balance_views`` overrides the file's
    ``kpac_balance_views`` (None: as the file says; False for an in-memory KPACNet).
    """

    def __init__(
        self,
        path_or_model: str | Path | bytes | KPACNet,
        threads: int | None = None,
        opset: int = 17,
        balance_views: bool | None = None,
    ) -> None:
        if isinstance(path_or_model, KPACNet):
            self.config = path_or_model.config
            data: bytes | str | Path = export_onnx(path_or_model, None, opset=opset, balance_views=bool(balance_views))
        else:
            data = path_or_model
            meta = read_metadata(data)
            self.config = _config_of(meta, data)
            if balance_views is None:
                balance_views = _balance_of(meta)
        self.balance_views = bool(balance_views) and self.config.in_views == 2
        self.session = make_session(data, threads)
        # a static graph (kpac export --static) takes one shape; None where an axis is dynamic
        self.fixed_shape = tuple(d if isinstance(d, int) else None for d in self.session.get_inputs()[0].shape)

    def default_reference(self, x: np.ndarray) -> np.ndarray:
        """The input itself, or for dual-pixel input the mean of the left and right views."""
        return x if self.config.in_views == 1 else 0.5 * (x[:, :3] + x[:, 3:])

    def run(self, x: np.ndarray | Tensor, reference: np.ndarray | Tensor | None = None) -> np.ndarray | Tensor:
        as_tensor = isinstance(x, Tensor)
        xt = _float_tensor(x, "input")
        cfg = self.config
        if xt.ndim != 4 or xt.shape[1] != cfg.in_channels:
            raise ValueError(f"expected input of shape (N, {cfg.in_channels}, H, W), got {tuple(xt.shape)}")
        if reference is None:  # taken before balancing: the engine's centre is the views as captured
            rt = xt if cfg.in_views == 1 else 0.5 * (xt[:, :3] + xt[:, 3:])
        else:
            rt = _float_tensor(reference, "reference")
        if rt.shape != (xt.shape[0], 3) + tuple(xt.shape[-2:]):
            raise ValueError(f"reference must be {(xt.shape[0], 3) + tuple(xt.shape[-2:])}, got {tuple(rt.shape)}")
        if self.balance_views:
            from .engine.dualpixel import balance_views

            # the engine balances each HxWx6 image in [0, 1] before the network (Deblurrer._as_tensors)
            images = ((xt + 1) * 0.5).permute(0, 2, 3, 1).numpy()
            xt = torch.from_numpy(np.stack([balance_views(im) for im in images])).permute(0, 3, 1, 2) * 2 - 1
        from .engine.tiled import pad_to_multiple

        h, w = xt.shape[-2:]
        xp = pad_to_multiple(xt, cfg.stride).contiguous().numpy()
        rp = pad_to_multiple(rt, cfg.stride).contiguous().numpy()
        self._check_fixed_shape(xt.shape, xp.shape)
        out = self.session.run([OUTPUT], {INPUT: xp, REFERENCE: rp})[0][..., :h, :w]
        out = np.ascontiguousarray(out)
        return torch.from_numpy(out) if as_tensor else out

    __call__ = run

    def _check_fixed_shape(self, given: tuple[int, ...], padded: tuple[int, ...]) -> None:
        """ValueError, naming the graph's shape, for input a static graph cannot take (rather
        than onnxruntime's error about its padded 'reference' input)."""
        if all(f is None or f == p for f, p in zip(self.fixed_shape, padded)):
            return
        fixed = "x".join("N" if f is None else str(f) for f in self.fixed_shape)
        raise ValueError(f"this graph was exported for input of shape {fixed} only (kpac export --static); got "
                         f"{'x'.join(map(str, given))}: export a dynamic graph to run other sizes")


def is_allocation_failure(err: BaseException) -> bool:
    """Whether ``err`` is PyTorch or onnxruntime running out of memory (a --check image too large)."""
    from .engine.device import is_out_of_memory

    msg = str(err).lower()
    return is_out_of_memory(err) or "failed to allocate memory" in msg or "bad_alloc" in msg or "bad allocation" in msg


def _float_tensor(array: np.ndarray | Tensor, name: str) -> Tensor:
    """``array`` as a float32 CPU tensor out of any autograd graph; integer data is refused, as
    the network refuses it (:meth:`KPACNet.check_input`): 0-255 values are not [-1, 1] units."""
    t = torch.as_tensor(array).detach()
    if not t.is_floating_point():
        raise ValueError(f"expected a float {name} in [-1, 1], got {t.dtype} (8-bit images: x / 127.5 - 1)")
    return t.float().cpu()


def check_export(
    model: KPACNet,
    onnx_model: str | Path | bytes,
    height: int = 128,
    width: int = 192,
    rounds: int = 3,
    threads: int | None = None,
) -> dict[str, Any]:
    """Max abs difference of onnxruntime vs PyTorch on a random image, and their times.

    PyTorch runs the model as the engine does on the CPU (channels_last) and through the
    fast path (:class:`~kpac_cli.model.fast.FastKPACNet`); times are medians of ``rounds``
    interleaved calls after one warm-up, all with the same number of threads. Both run the
    bare network: dual-pixel view balancing (numpy pre-processing, not part of the graph) is
    left out of the comparison.
    """
    from .bench import median, time_interleaved
    from .model.fast import FastKPACNet

    cfg = model.config
    h, w = (-(-v // cfg.stride) * cfg.stride for v in (height, width))
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, cfg.in_channels, h, w, generator=gen) * 2 - 1
    net = copy.deepcopy(model).float().cpu().eval().to(memory_format=torch.channels_last)
    fast = FastKPACNet(net)
    xc = x.contiguous(memory_format=torch.channels_last)
    backend = OnnxBackend(onnx_model, threads=threads, balance_views=False)
    xn = x.numpy()

    def torch_run() -> Tensor:
        with torch.inference_mode():
            return net(xc)

    def fast_run() -> Tensor:
        with torch.inference_mode():
            return fast(xc)

    expected = torch_run().contiguous().numpy()
    got = backend.run(xn)
    times = time_interleaved({"torch": torch_run, "fast": fast_run, "onnxruntime": lambda: backend.run(xn)}, rounds=rounds, warmup=1)
    t_torch, t_fast, t_ort = median(times["torch"]), median(times["fast"]), median(times["onnxruntime"])
    return {
        "height": h, "width": w,
        "max_abs_diff": float(np.abs(got - expected).max()),
        "torch_seconds": t_torch, "torch_fast_seconds": t_fast, "onnxruntime_seconds": t_ort,
        "onnxruntime_speedup": t_torch / t_ort, "onnxruntime_vs_fast": t_fast / t_ort,
    }


__all__ = ["MIN_OPSET", "OnnxBackend", "bound_runner", "check_export", "check_static_size", "contract_metadata", "export_onnx",
           "is_allocation_failure", "make_session", "max_opset", "read_balance_views", "read_config", "read_metadata",
           "require_onnxruntime"]
