"""Every fast path computes the reference network's function (fp32, within 1e-5).

The reference is the plain NCHW eager model of ``kpac_cli.model.network``. Weights are
random with non-zero biases (a zero bias would hide a dropped or doubled bias term).
No timing is asserted here; speed is measured by ``kpac bench`` and ``benchmarks/``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kpac_cli.engine import TiledInference
from kpac_cli.model import PAPER_CONFIGS, KPACConfig, build_model
from kpac_cli.model.fast import (
    FastKPACNet,
    concat_conv,
    kpac_block_forward,
    narrow_output_conv,
    pad_bottom_right,
    retain_freed_memory,
)

ATOL = 1e-5
H, W = 64, 96
CL = torch.channels_last


def make_model(cfg: KPACConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # biases
                p.normal_(0.0, 0.1)
    return model


def make_input(cfg: KPACConfig, n: int = 1, h: int = H, w: int = W, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, cfg.in_channels, h, w, generator=g) * 2 - 1


CONFIGS = {
    **PAPER_CONFIGS,
    "unshared_no_scale": KPACConfig(shared_kernel=False, scale_attention=False),
    "no_shape_3_blocks": KPACConfig(levels=2, shape_attention=False, blocks=3, channels=24),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request):
    cfg = CONFIGS[request.param]
    model = make_model(cfg)
    x = make_input(cfg)
    with torch.inference_mode():
        expected = model(x)
    return model, x, expected


def test_channels_last(case):
    model, x, expected = case
    net = copy.deepcopy(model).to(memory_format=CL)
    with torch.inference_mode():
        got = net(x.contiguous(memory_format=CL))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fast_inference(case, layout):
    """Inference mode: the oneDNN fused-op path (on a CPU with oneDNN)."""
    model, x, expected = case
    net = copy.deepcopy(model)
    if layout == "channels_last":
        net, x = net.to(memory_format=CL), x.contiguous(memory_format=CL)
    with torch.inference_mode():
        got = FastKPACNet(net)(x)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_fast_with_autograd(case):
    """With autograd on, the same restructuring runs on plain ops and stays differentiable."""
    model, x, expected = case
    got = FastKPACNet(model)(x)
    torch.testing.assert_close(got.detach(), expected, atol=ATOL, rtol=0)
    got.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)


def test_fast_in_the_tiled_engine():
    """FastKPACNet is a drop-in model for the exact tiled engine."""
    cfg = PAPER_CONFIGS["single_3level"]
    model = make_model(cfg).to(memory_format=CL)
    x = make_input(cfg, h=100, w=148)  # not a multiple of the stride: the engine pads
    engine_ref = TiledInference(model, torch.device("cpu"), torch.no_grad, channels_last=True)
    engine_fast = TiledInference(FastKPACNet(model), torch.device("cpu"), torch.no_grad, channels_last=True)
    whole = engine_ref(x, x, None).output
    torch.testing.assert_close(engine_fast(x, x, None).output, whole, atol=ATOL, rtol=0)
    torch.testing.assert_close(engine_fast(x, x, 32).output, whole, atol=ATOL, rtol=0)


def test_batch_of_two_keeps_per_sample_shape_attention():
    cfg = PAPER_CONFIGS["single_3level"]
    model = make_model(cfg)
    x = make_input(cfg, n=2)
    with torch.inference_mode():
        torch.testing.assert_close(FastKPACNet(model)(x), model(x), atol=ATOL, rtol=0)


def reference_block(block, x):
    """KPACBlock as the paper and the authors' code state it, written out here so that the
    comparison stays independent of how KPACBlock.forward is implemented."""
    k = block.kernel_size
    branches = torch.stack(
        [F.leaky_relu(F.conv2d(x, block.branch_kernel(i), padding=d * (k - 1) // 2, dilation=d), 0.2)
         for i, d in enumerate(block.dilations)], dim=1)
    alpha = block.scale_attention(x)
    if alpha is not None:
        branches = branches * alpha.unsqueeze(2)
    beta = block.shape_attention(x)
    if beta is not None:
        branches = branches * beta.unsqueeze(1)
    return F.leaky_relu(block.fuse(branches.flatten(1, 2)), 0.2), alpha


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("name", ["single_3level", "unshared_no_scale", "no_shape_3_blocks"])
def test_kpac_block_and_alpha(grad, name):
    cfg = CONFIGS[name]
    block = make_model(cfg).blocks[0]
    x = torch.randn(1, 4 * cfg.channels // 2, 12, 20).contiguous(memory_format=CL)
    with torch.set_grad_enabled(grad):
        y_ref, a_ref = reference_block(block, x)
        y, a = kpac_block_forward(block, x)
        y_mod, _ = block(x)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(y_mod, y_ref, atol=ATOL, rtol=0)
    if a_ref is None:
        assert a is None
    else:
        torch.testing.assert_close(a, a_ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_split_convolutions(layout):
    torch.manual_seed(3)
    a, s = torch.randn(1, 48, 20, 28), torch.randn(1, 48, 20, 28)
    layer3 = torch.nn.Conv2d(96, 48, 3, padding=1)
    layer5 = torch.nn.Conv2d(96, 3, 5, padding=2)
    if layout == "channels_last":
        a, s = a.contiguous(memory_format=CL), s.contiguous(memory_format=CL)
        layer3, layer5 = layer3.to(memory_format=CL), layer5.to(memory_format=CL)
    cat = torch.cat([a, s], 1)
    with torch.inference_mode():
        torch.testing.assert_close(concat_conv([a, s], layer3), F.leaky_relu(layer3(cat), 0.2), atol=ATOL, rtol=0)
        torch.testing.assert_close(narrow_output_conv([a, s], layer5), layer5(cat), atol=ATOL, rtol=0)


def test_pad_bottom_right():
    x = torch.randn(1, 5, 6, 8).contiguous(memory_format=CL)
    with torch.inference_mode():
        y = pad_bottom_right(x)
    torch.testing.assert_close(y, F.pad(x, (0, 1, 0, 1)), atol=0, rtol=0)
    assert y.is_contiguous(memory_format=CL)


def test_retain_freed_memory_is_reversible():
    # glibc-only; elsewhere it reports False and changes nothing
    on = retain_freed_memory(True)
    off = retain_freed_memory(False)
    assert on == off


@pytest.mark.slow
def test_torch_compile():
    """torch.compile (inductor, CPU: needs a C++ compiler; ~1 min here)."""
    cfg = PAPER_CONFIGS["single_3level"]
    model = make_model(cfg)
    x = make_input(cfg)
    with torch.inference_mode():
        expected = model(x)
    try:
        compiled = torch.compile(copy.deepcopy(model), dynamic=False)
        with torch.inference_mode():
            got = compiled(x)
    except Exception as e:  # noqa: BLE001 - no compiler toolchain is a skip, not a failure
        pytest.skip(f"torch.compile unavailable here: {type(e).__name__}: {e}")
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_oneDNN_fused_ops_stay_out_of_torch_compile_traces(monkeypatch):
    # inductor traces them with shape functions that disagree with their outputs (a crash):
    # a compiled FastKPACNet runs the plain ops, which inductor fuses itself
    from kpac_cli.model import fast

    if not fast._fused_ops_available():
        pytest.skip("this PyTorch build has no oneDNN fused ops")
    x = torch.zeros(1, 3, 8, 8)
    with torch.no_grad():
        assert fast._mkldnn_ok(x)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not fast._mkldnn_ok(x)


def test_compiled_shape_keys_tell_cpu_autocast_apart():
    """A graph traced under autocast is another graph: the compiled network's shape keys say
    whether autocast is on for the tensor's own device (CPU bf16 too, not CUDA's alone), so a
    CPU bf16 pass and its fp32 redo are two compilations, each counted."""
    from kpac_cli.engine.compiled import _autocast

    x = torch.zeros(1)
    assert not _autocast(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _autocast(x)
