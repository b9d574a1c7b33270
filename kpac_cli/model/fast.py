"""Fast inference paths for :class:`~kpac_cli.model.KPACNet` (same function, fewer memory passes).

Everything here computes what :mod:`kpac_cli.model.network` computes, up to float rounding
(< 1e-5 in fp32 on the network output; ``tests/test_fast_paths.py``), reading the same
parameters, so checkpoints and the tiled engine work unchanged. Why it is faster on the CPU
(measured on a 2-core AVX-512 machine, 3-level model at 1280x720; see ``benchmarks/``):

* **The last convolution** (``d2_2``: 96 -> 3 channels, 5x5, full resolution) is 6 % of the
  FLOPs but took 20 % of the time: with 3 output channels oneDNN fills 3 of 16 vector lanes.
  It is computed as a 1x5 convolution to ``5 x 3 = 15`` channels (one per kernel row and
  output channel), followed by the sum of five row-shifted 3-channel slices. Same FLOPs, a
  GEMM-friendly shape: ~3x faster for that layer.
* **No skip concatenations**: a 3x3/5x5 convolution of ``cat([u, skip])`` is the convolution
  of ``u`` with the first half of the kernel plus that of ``skip`` with the second half; the
  second is fused into the first as oneDNN's "add" post-op. This saves writing and reading
  the concatenated full-resolution tensor (96 channels at 1280x720 = 354 MB).
* **Activations fused into convolutions** (oneDNN post-ops, ``torch.ops.mkldnn``), and the
  stride-2 'SAME' padding written without a full zero fill.
* In the KPAC block, the five branch outputs are weighted by alpha straight into the fusion
  conv's input buffer, and the shape attention beta (one value per input channel of the
  fusion conv) is folded into the fusion kernel: no stacking, no extra passes.

The oneDNN-specific calls are used for float32 CPU tensors outside autograd, autocast and
``torch.compile``; anywhere else (CUDA, bf16 autocast, training, a compiled module) the same
restructured computation runs on plain ``torch.nn.functional`` ops, which is still exact and
differentiable.

The single largest CPU cost, though, is not arithmetic: the C library's allocator (under
PyTorch's CPU allocator) returns every large tensor to the OS, which zero-fills its pages
again on the next forward pass. :func:`retain_freed_memory` turns that off for the
process (see its docstring).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .network import LRELU_SLOPE, Bottleneck, KPACBlock, KPACNet

_CL = torch.channels_last


# --- primitives --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _fused_ops_available() -> bool:
    """oneDNN's fused-op entry points (``torch.ops.mkldnn``) exist in this PyTorch build."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return all(hasattr(torch.ops.mkldnn, op) for op in ("_convolution_pointwise", "_convolution_transpose_pointwise"))
    except (AttributeError, RuntimeError):
        return False


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # PyTorch < 2.4
        return torch.is_autocast_cpu_enabled()


def _compiling() -> bool:
    """Inside a ``torch.compile`` trace (PyTorch >= 2.3 says so; older ones are taken as not)."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def _mkldnn_ok(*tensors: Tensor) -> bool:
    """oneDNN fused ops apply: fp32 CPU tensors, no autograd, no autocast, no ``torch.compile``
    trace (the fused ops' shape functions disagree with their outputs there, and inductor fuses
    the plain ops itself)."""
    if torch.is_grad_enabled() or not torch.backends.mkldnn.enabled or not _fused_ops_available():
        return False
    if _cpu_autocast() or _compiling():
        return False
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _pair(v: int | Sequence[int]) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(u) for u in v]


def conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    padding: int | Sequence[int] = 0,
    stride: int = 1,
    dilation: int = 1,
    lrelu: bool = False,
    add: Tensor | None = None,
) -> Tensor:
    """``[lrelu](conv2d(x, weight, bias) [+ add])``, fused into one oneDNN call where possible."""
    if _mkldnn_ok(x, weight) and (bias is None or _mkldnn_ok(bias)) and (add is None or _mkldnn_ok(add)):
        args = (_pair(padding), _pair(stride), _pair(dilation), 1)
        if add is None:
            attr, scalars = ("leaky_relu", [LRELU_SLOPE]) if lrelu else ("none", [])
            return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, attr, scalars, "")
        # oneDNN's binary post-op takes no leaky ReLU after it: that one runs in place
        y = torch.ops.mkldnn._convolution_pointwise(x, add, weight, bias, *args, "add", 1.0, None, [], "")
        return F.leaky_relu_(y, LRELU_SLOPE) if lrelu else y
    y = F.conv2d(x, weight, bias, stride=stride, padding=tuple(_pair(padding)), dilation=dilation)
    if add is not None:
        y = y + add
    return F.leaky_relu(y, LRELU_SLOPE) if lrelu else y


def conv_transpose(x: Tensor, weight: Tensor, bias: Tensor | None, lrelu: bool = True) -> Tensor:
    """4x4 stride-2 transposed conv with padding 1 (the decoder's upsampling), activation fused."""
    if _mkldnn_ok(x, weight) and (bias is None or _mkldnn_ok(bias)):
        attr, scalars = ("leaky_relu", [LRELU_SLOPE]) if lrelu else ("none", [])
        return torch.ops.mkldnn._convolution_transpose_pointwise(x, weight, bias, [1, 1], [0, 0], [2, 2], [1, 1], 1, attr, scalars, "")
    y = F.conv_transpose2d(x, weight, bias, stride=2, padding=1)
    return F.leaky_relu(y, LRELU_SLOPE) if lrelu else y


def pad_bottom_right(x: Tensor) -> Tensor:
    """``F.pad(x, (0, 1, 0, 1))`` (TF 'SAME' for a 3x3 stride-2 conv on even sizes), zeroing
    only the new row and column instead of filling the whole output first."""
    if torch.is_grad_enabled() and x.requires_grad:
        return F.pad(x, (0, 1, 0, 1))
    n, c, h, w = x.shape
    fmt = _CL if x.is_contiguous(memory_format=_CL) and not x.is_contiguous() else torch.contiguous_format
    out = torch.empty((n, c, h + 1, w + 1), dtype=x.dtype, device=x.device, memory_format=fmt)
    out[:, :, :h, :w] = x
    out[:, :, h, :] = 0
    out[:, :, :h, w] = 0
    return out


def stride2_conv(x: Tensor, layer: nn.Conv2d) -> Tensor:
    """The encoder's StrideTwoConv followed by its leaky ReLU."""
    return conv(pad_bottom_right(x), layer.weight, layer.bias, 0, stride=2, lrelu=True)


def same_conv_lrelu(x: Tensor, layer: nn.Conv2d, lrelu: bool = True, add: Tensor | None = None) -> Tensor:
    return conv(x, layer.weight, layer.bias, _pair(layer.padding), 1, layer.dilation[0], lrelu, add)


def concat_conv(parts: Sequence[Tensor], layer: nn.Conv2d, lrelu: bool = True) -> Tensor:
    """``layer(torch.cat(parts, 1))`` without building the concatenation.

    The kernel is split along its input channels; every part but the first is convolved
    (without bias) and accumulated, the first one's convolution adds the running sum as a
    fused post-op.
    """
    w, b, pad = layer.weight, layer.bias, _pair(layer.padding)
    offsets = [0]
    for p in parts:
        offsets.append(offsets[-1] + p.shape[1])
    if offsets[-1] != w.shape[1]:
        raise ValueError(f"parts have {offsets[-1]} channels, {layer} expects {w.shape[1]}")
    acc = None
    for i in range(len(parts) - 1, 0, -1):
        acc = conv(parts[i], w[:, offsets[i] : offsets[i + 1]], None, pad, add=acc)
    return conv(parts[0], w[:, : offsets[1]], b, pad, lrelu=lrelu, add=acc)


def narrow_output_conv(parts: Sequence[Tensor], layer: nn.Conv2d) -> Tensor:
    """``layer(cat(parts))`` for a layer with few output channels and a k x k kernel (``d2_2``).

    Computed as a 1 x k convolution to ``k * C_out`` channels, channel ``dy * C_out + c``
    holding kernel row ``dy`` of output channel ``c``, then ``y[c, i] = b[c] + sum_dy
    z[dy * C_out + c, i + dy - k // 2]`` (rows outside the image contribute zero, as 'same'
    zero padding does). Same FLOPs; a wide GEMM instead of a 3-lane one.
    """
    w, b = layer.weight, layer.bias
    cout, _, k, _ = w.shape
    r = k // 2
    # (cout, cin, k, k) -> (k * cout, cin, 1, k), row dy of output channel c at dy * cout + c
    w_rows = w.permute(2, 0, 1, 3).reshape(k * cout, w.shape[1], 1, k)
    if parts[0].is_contiguous(memory_format=_CL) and not parts[0].is_contiguous():
        w_rows = w_rows.contiguous(memory_format=_CL)
    else:
        w_rows = w_rows.contiguous()
    offsets = [0]
    for p in parts:
        offsets.append(offsets[-1] + p.shape[1])
    acc = None
    for i in range(len(parts) - 1, -1, -1):
        acc = conv(parts[i], w_rows[:, offsets[i] : offsets[i + 1]], None, (0, r), add=acc)
    z = acc  # (n, k * cout, h, w)
    n, _, h, wd = z.shape
    zt = z.permute(0, 2, 3, 1).unflatten(3, (k, cout))  # (n, h, w, k, cout): a view for NHWC z
    if b is not None:
        y = b.to(z.dtype).expand(n, h, wd, cout).clone()
    else:
        y = z.new_zeros(n, h, wd, cout)
    for dy in range(k):
        lo, hi = max(0, r - dy), min(h, h + r - dy)
        if hi > lo:
            y[:, lo:hi] += zt[:, lo + dy - r : hi + dy - r, :, dy]
    return y.permute(0, 3, 1, 2)  # (n, cout, h, w), channels_last in memory


# --- the KPAC block ------------------------------------------------------------------------------
def _scale_attention(block: KPACBlock, x: Tensor) -> Tensor | None:
    if block.scale is None:
        return None
    a = x
    for layer in block.scale:
        a = same_conv_lrelu(a, layer)
    return torch.sigmoid(same_conv_lrelu(a, block.scale_out, lrelu=False))


def kpac_block_forward(block: KPACBlock, x: Tensor, mean: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """:meth:`KPACBlock.forward`, restructured (see the module docstring); returns (y, alpha).

    The five dilated branches stay five convolutions: the fused alternatives (one conv with
    a zero-inserted 21x21 kernel, space-to-batch, one im2col GEMM) were all slower here
    (``benchmarks/kpac_formulations.py``), since each branch is already a large dense conv.
    """
    k, cb, dil = block.kernel_size, block.branch_channels, block.dilations
    n_br = len(dil)
    alpha = _scale_attention(block, x)
    beta = block.shape_attention(x, mean)  # (N, cb, 1, 1); tiny
    inplace = not torch.is_grad_enabled()
    fmt = _CL if x.is_contiguous(memory_format=_CL) and not x.is_contiguous() else torch.contiguous_format
    branches = []
    if inplace:
        n, _, h, w = x.shape
        buf = torch.empty((n, n_br * cb, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
    for i, d in enumerate(dil):
        br = conv(x, block.branch_kernel(i), None, d * (k - 1) // 2, dilation=d, lrelu=True)
        if inplace:
            out = buf[:, i * cb : (i + 1) * cb]
            if alpha is not None:
                torch.mul(br, alpha[:, i : i + 1].to(br.dtype), out=out)
            else:
                out.copy_(br)
        else:
            branches.append(br * alpha[:, i : i + 1] if alpha is not None else br)
    y = buf if inplace else torch.cat(branches, 1)
    weight = block.fuse.weight
    if beta is not None:
        if beta.shape[0] == 1:
            # fuse(y * beta_tiled) == conv(y, W * beta_tiled[input channel]): fold into the kernel
            weight = weight * beta.reshape(1, cb, 1, 1).repeat(1, n_br, 1, 1).to(weight.dtype)
            if fmt is _CL:
                weight = weight.contiguous(memory_format=_CL)
        else:  # one beta per sample: no shared kernel to fold into
            y = y * beta.repeat(1, n_br, 1, 1).to(y.dtype)
    out = conv(y, weight, block.fuse.bias, _pair(block.fuse.padding), lrelu=True)
    return out, alpha


# --- the network ----------------------------------------------------------------------------------
def fast_encode(model: KPACNet, x: Tensor, skip_levels: int | None = None) -> tuple[list[Tensor], Tensor | None]:
    """:meth:`KPACNet.encode`, fused."""
    stages = model.encoder.stages()
    feats = []
    for i, (first, second) in enumerate(stages[: len(stages) if skip_levels is None else skip_levels]):
        x = same_conv_lrelu(same_conv_lrelu(x, first) if i == 0 else stride2_conv(x, first), second)
        feats.append(x)
    if skip_levels is None:
        return feats[:-1], feats[-1]
    return feats, None


def fast_bottleneck(model: KPACNet, encoded: Tensor) -> Bottleneck:
    """:meth:`KPACNet.bottleneck`, fused (the dense concat feeds cm_1 without being built)."""
    outs, alphas = [encoded], []
    for block in model.blocks:
        x, alpha = kpac_block_forward(block, outs[-1])
        outs.append(x)
        alphas.append(alpha)
    return Bottleneck(fast_merge(model, outs), alphas)


def fast_merge(model: KPACNet, outs: list[Tensor]) -> Tensor:
    """:meth:`KPACNet.merge`, fused (the dense concat feeds cm_1 without being built)."""
    return same_conv_lrelu(concat_conv(outs, model.cm_1), model.cm_2)


def fast_decode(model: KPACNet, features: Tensor, skips: list[Tensor]) -> Tensor:
    """:meth:`KPACNet.decode`, fused: no skip concatenations, narrow last layer as rows."""
    d = model.decoder
    x = features
    if d.levels == 3:
        x = concat_conv([conv_transpose(x, d.d0.weight, d.d0.bias), skips[2]], d.d0_2)
    x = concat_conv([conv_transpose(x, d.d1.weight, d.d1.bias), skips[1]], d.d1_2)
    return narrow_output_conv([conv_transpose(x, d.d2.weight, d.d2.bias), skips[0]], d.d2_2)


class FastKPACNet(nn.Module):
    """A drop-in view of a :class:`KPACNet` that runs the fast paths above.

    Shares the wrapped model's parameters (nothing is copied or cached, so loading new
    weights into the model is seen at once) and has its interface (``config``, ``encode``,
    ``bottleneck``, ``run_block``, ``merge``, ``decode``, ``default_reference``, ``forward``),
    so the tiled engine can run it unchanged.
    """

    def __init__(self, model: KPACNet) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def __getattr__(self, name: str):
        # anything else (blocks, encoder, ...) is the wrapped model's, so callers that reach
        # into the network keep working
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def check_input(self, x: Tensor, reference: Tensor | None = None) -> None:
        self.model.check_input(x, reference)

    def encode(self, x: Tensor, skip_levels: int | None = None) -> tuple[list[Tensor], Tensor | None]:
        return fast_encode(self.model, x, skip_levels)

    def bottleneck(self, encoded: Tensor) -> Bottleneck:
        return fast_bottleneck(self.model, encoded)

    def run_block(self, index: int, x: Tensor, mean: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        return kpac_block_forward(self.model.blocks[index], x, mean)

    def merge(self, outs: list[Tensor]) -> Tensor:
        return fast_merge(self.model, outs)

    def decode(self, features: Tensor, skips: list[Tensor]) -> Tensor:
        return fast_decode(self.model, features, skips)

    def default_reference(self, x: Tensor) -> Tensor:
        return self.model.default_reference(x)

    def forward(self, x: Tensor, reference: Tensor | None = None) -> Tensor:
        self.check_input(x, reference)
        skips, encoded = self.encode(x)
        residual = self.decode(self.bottleneck(encoded).features, skips)
        return residual + (self.default_reference(x) if reference is None else reference)


# --- the allocator ---------------------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers


def retain_freed_memory(enable: bool = True) -> bool:
    """Keep freed memory in the process instead of returning it to the OS (glibc only).

    glibc serves large allocations (above a threshold of at most 32 MB) with their own
    ``mmap`` and unmaps them on free; the next forward pass then page-faults and zero-fills
    all of its activations again (~2 GB per 1280x720 pass). Measured on a 2-core VM, that is
    30-45 % of the model's CPU time (fast path, 1 thread: 1.35 -> 0.96 s; channels_last eager:
    1.95 -> 1.21 s). With ``enable`` the allocator serves large blocks from its heap and
    trims it only above 2 GB of free space at the top. The cost is memory: heap
    fragmentation raises peak RSS (1280x720 whole image: 1.4 vs 1.1 GB; 6000x4000 with the
    default 696-pixel tiles: 3.2 vs 1.9 GiB), and memory is returned only at exit.
    ``enable=False`` restores glibc's defaults.

    Process-wide, so the library never calls it by itself: the CLI (or an application)
    opts in. Returns False where it does not apply (not Linux/glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if enable:
        ok = mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    else:
        ok = mallopt(_M_MMAP_MAX, 65536) and mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        try:
            libc.malloc_trim(0)
        except AttributeError:
            pass
    return bool(ok)


__all__ = [
    "FastKPACNet",
    "concat_conv",
    "conv",
    "conv_transpose",
    "fast_bottleneck",
    "fast_decode",
    "fast_encode",
    "fast_merge",
    "kpac_block_forward",
    "narrow_output_conv",
    "pad_bottom_right",
    "retain_freed_memory",
]
