"""``torch.compile`` for the engine: the three stages compiled once per input shape.

The tiled engine calls the network's ``encode``, ``bottleneck`` (or, tiled, ``run_block`` and
``merge``) and ``decode`` separately; each is compiled with static shapes (``dynamic=False``),
which is what lets inductor pick fixed kernels and CUDA graphs apply. With
``TiledInference(static_shapes=True)`` every tile of an image has the same shape, so a photo
costs at most a handful of compilations (the encoder tile, each KPAC block's tile, the merge
tile, the decoder tile; or the whole low-resolution bottleneck) and a folder of same-sized
photos costs them once.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import Tensor

from .device import is_out_of_memory


class CompileFailed(RuntimeError):
    """``torch.compile`` could not build a stage (no C++ compiler for the CPU, no Triton for
    the GPU, ...): every later shape would fail alike, so a batch stops rather than fail each
    photo. The message is one line, the cause's first, with what to do."""

    def __init__(self, cause: BaseException) -> None:
        first = next((line.strip() for line in str(cause).splitlines() if line.strip()), type(cause).__name__)
        super().__init__(f"torch.compile failed: {first}; run without --compile")


class CompiledNetwork:
    """Wraps a ``KPACNet`` with compiled stages (not ``FastKPACNet``: its oneDNN fused ops
    have no shape functions that inductor can trace).

    ``compile_seconds`` accumulates the wall time of calls with an input shape not seen
    before: compilation plus that first run.
    """

    def __init__(self, network: Any, mode: str | None = None) -> None:
        self.network = network
        self.config = network.config
        self.compile_seconds = 0.0
        self._seen: set[tuple] = set()
        self._fns: dict[str, Callable] = {
            name: torch.compile(getattr(network, name), dynamic=False, mode=mode)
            for name in ("encode", "bottleneck", "run_block", "merge", "decode")
        }

    def _call(self, name: str, key: tuple, *args: Any) -> Any:
        fn = self._fns[name]
        if key in self._seen:
            return fn(*args)
        t0 = time.perf_counter()
        try:
            out = fn(*args)
        except Exception as e:  # noqa: BLE001 - an out-of-memory is the engine's to answer (a smaller tile)
            if is_out_of_memory(e):
                raise
            raise CompileFailed(e) from e
        finally:
            self.compile_seconds += time.perf_counter() - t0
        self._seen.add(key)
        return out

    def encode(self, x: Tensor, skip_levels: int | None = None):
        return self._call("encode", ("encode", tuple(x.shape), x.dtype, skip_levels, _autocast(x)), x, skip_levels)

    def bottleneck(self, encoded: Tensor):
        return self._call("bottleneck", ("bottleneck", tuple(encoded.shape), encoded.dtype, _autocast(encoded)), encoded)

    def run_block(self, index: int, x: Tensor, mean: Tensor | None = None):
        key = ("run_block", index, tuple(x.shape), x.dtype, mean is None, _autocast(x))
        return self._call("run_block", key, index, x, mean)

    def merge(self, outs: list[Tensor]):
        return self._call("merge", ("merge", tuple(tuple(o.shape) for o in outs), outs[0].dtype, _autocast(outs[0])), outs)

    def decode(self, features: Tensor, skips: list[Tensor]):
        key = ("decode", tuple(features.shape), tuple(tuple(s.shape) for s in skips), features.dtype, _autocast(features))
        return self._call("decode", key, features, skips)

    def default_reference(self, x: Tensor) -> Tensor:
        return self.network.default_reference(x)


def _autocast(x: Tensor) -> bool:
    """Whether autocast is on for ``x``'s device: a shape key's part, as a graph traced under
    autocast is another (``torch.is_autocast_enabled()`` alone says CUDA's only, so a CPU bf16
    run and its fp32 redo shared keys and the redo's compile went uncounted)."""
    return torch.is_autocast_enabled(x.device.type)
