"""Tiled inference equals whole-image inference, for every model variant and tile size."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch

import kpac_cli.engine.deblurrer as engine_deblurrer
import kpac_cli.engine.device as engine_device
import kpac_cli.engine.tiled as tiled
from kpac_cli.engine import Deblurrer, EngineOptions, TiledInference, pad_to_multiple, plan_tiles, receptive_halos, skips_that_fit
from kpac_cli.engine.tiled import skip_bytes, tile_that_runs
from kpac_cli.model import KPACConfig, build_model
from kpac_cli.model.fast import FastKPACNet
from kpac_cli.model.network import spatial_mean

ATOL = 1e-5
VARIANTS = {
    "2level": KPACConfig(levels=2),
    "3level": KPACConfig(levels=3),
    "dual": KPACConfig(levels=3, in_views=2),
    "ablation": KPACConfig(levels=2, blocks=1, kernel_size=3, dilations=(1, 3), shared_kernel=False, shape_attention=False),
}


def _model(cfg: KPACConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():  # non-zero biases, so that zero padding at a wrong place shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def _case(cfg: KPACConfig, height: int, width: int, seed: int):
    """A model with non-zero biases, a random input and reference, and its whole-image output."""
    model = _model(cfg)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(1, cfg.in_channels, height, width, generator=gen) * 2 - 1
    ref = torch.rand(1, 3, height, width, generator=gen) * 2 - 1
    whole = TiledInference(model, torch.device("cpu"), nullcontext, channels_last=False)(x, ref, None).output
    return model, x, ref, whole


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("tile", [128, 136, 200, 256])
def test_tiled_equals_whole(variant, tile):
    cfg = VARIANTS[variant]
    model, x, ref, whole = _case(cfg, 301, 390, seed=1)  # not multiples of 8
    tiled = TiledInference(model, torch.device("cpu"), nullcontext, channels_last=False)(x, ref, tile).output
    assert tiled.shape == (1, 3, 301, 390)
    assert (tiled - whole).abs().max().item() < ATOL


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kept_skip_maps_give_the_same_output_as_recomputed_ones(variant):
    cfg = VARIANTS[variant]
    model, x, ref, whole = _case(cfg, 283, 347, seed=5)
    for kept in range(cfg.levels + 1):
        for channels_last in (False, True):
            engine = TiledInference(model, torch.device("cpu"), nullcontext, channels_last, kept_skips=kept)
            assert (engine(x, ref, 136).output - whole).abs().max().item() < ATOL, (kept, channels_last)
    with pytest.raises(ValueError, match="kept_skips"):
        TiledInference(model, torch.device("cpu"), nullcontext, kept_skips=cfg.levels + 1)


def test_kept_skips_are_planned_deepest_first_within_the_budget():
    cfg = VARIANTS["3level"]
    f1, f2, f3 = skip_bytes(cfg, 3000, 4000)
    assert (f1, f2, f3) == (48 * 3000 * 4000 * 4, 48 * 1500 * 2000 * 4, 96 * 750 * 1000 * 4)
    assert skips_that_fit(cfg, 3000, 4000, f3 - 1) == 0
    assert skips_that_fit(cfg, 3000, 4000, f3 + f2) == 2
    assert skips_that_fit(cfg, 3000, 4000, f1 + f2 + f3) == 3
    assert skips_that_fit(cfg, 3000, 4000, f1 + f2 + f3, itemsize=2) == 3
    d = Deblurrer(_model(cfg), EngineOptions(tile=128, memory_budget=skip_bytes(cfg, 300, 300)[2] + 1))
    d.run(np.random.default_rng(0).random((300, 300, 3), dtype=np.float32))
    assert d.last_stats.tile == 128 and d.last_stats.kept_skips == 1


@pytest.mark.parametrize("variant", ["2level", "3level"])
def test_halo_is_tight_and_needed(variant):
    """One stride less of decoder halo breaks exactness: the halo is computed, not guessed."""
    cfg = VARIANTS[variant]
    engine = TiledInference(_model(cfg), torch.device("cpu"), nullcontext, channels_last=False)
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(2)) * 2 - 1
    whole = engine(x, x, None).output
    exact_error = (engine(x, x, 128).output - whole).abs().max().item()
    enc, dec = receptive_halos(cfg)
    engine.halos = (enc, dec - cfg.stride)
    short_error = (engine(x, x, 128).output - whole).abs().max().item()
    assert exact_error < 1e-6 and short_error > 10 * max(exact_error, 1e-7)


def _small_bottleneck_tiles(monkeypatch, cells: int = 16) -> None:
    """Make the engine tile the low-resolution bottleneck in ``cells``-cell tiles, so that
    small test images exercise it (the real size follows the pixel tile: ``bottleneck_tile``)."""
    monkeypatch.setattr(tiled, "bottleneck_tile", lambda tile, config: cells)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiled_bottleneck_equals_the_whole_map_bottleneck(variant, monkeypatch):
    cfg = VARIANTS[variant]
    model = _model(cfg)
    gen = torch.Generator().manual_seed(3)
    side = 60 * cfg.stride - 5  # a 60x60 map: 4x4 tiles of 16 cells, each widened to less than the map
    x = torch.rand(1, cfg.in_channels, side, side, generator=gen) * 2 - 1
    ref = torch.rand(1, 3, side, side, generator=gen) * 2 - 1
    whole = TiledInference(model, torch.device("cpu"), nullcontext, channels_last=False)(x, ref, None, keep_attention=True)
    _small_bottleneck_tiles(monkeypatch, 16)
    for net, channels_last, static in ((model, False, False), (FastKPACNet(model), True, False), (model, True, True)):
        engine = TiledInference(net, torch.device("cpu"), nullcontext, channels_last, static_shapes=static)
        stages = set()
        result = engine(x, ref, 32 * cfg.stride, lambda stage, done, total: stages.add((stage, total)), keep_attention=True)
        assert ("attention", cfg.blocks * 16) in stages  # it did run in tiles
        assert (result.output - whole.output).abs().max().item() < ATOL, (type(net).__name__, channels_last, static)
        assert len(result.scale_attention) == cfg.blocks
        for a, b in zip(result.scale_attention, whole.scale_attention):
            assert (a is None) == (b is None) == (not cfg.scale_attention)
            assert a is None or (a.shape == b.shape and (a - b).abs().max().item() < ATOL)


def test_a_large_map_never_runs_the_bottleneck_whole(monkeypatch):
    """The KPAC blocks see only widened tiles, so a huge photo's bottleneck memory is bounded."""
    cfg = VARIANTS["2level"]
    model = _model(cfg)
    calls = []
    run_block = model.run_block
    monkeypatch.setattr(model, "bottleneck", lambda encoded: pytest.fail("bottleneck ran on the whole map"))
    monkeypatch.setattr(model, "run_block", lambda i, x, mean=None: calls.append(tuple(x.shape[-2:])) or run_block(i, x, mean))
    _small_bottleneck_tiles(monkeypatch, 24)
    x = torch.rand(1, 3, 400, 480, generator=torch.Generator().manual_seed(4)) * 2 - 1
    TiledInference(model, torch.device("cpu"), nullcontext)(x, x, 128)
    block_halo, merge_halo = tiled.bottleneck_halos(cfg)
    assert len(calls) == cfg.blocks * 5 * 5  # a 100x120 map in 24-cell tiles
    assert max(max(c) for c in calls) <= 24 + 2 * (block_halo + merge_halo)  # the last block feeds the merge


def test_the_low_resolution_maps_a_tiled_run_holds_are_those_the_planner_counts(monkeypatch):
    """The memory planner leaves room for the maps a tiled run keeps whole
    (``low_resolution_bytes``): every map on the low-resolution grid the run makes is counted."""
    cfg = VARIANTS["2level"]
    model, made = _model(cfg), []
    empty_map = TiledInference._empty_map
    monkeypatch.setattr(TiledInference, "_empty_map", lambda self, like, h, w: made.append(empty_map(self, like, h, w)) or made[-1])
    _small_bottleneck_tiles(monkeypatch, 24)
    height, width = 403, 477  # padded to 404 x 480: the maps are 101 x 120 cells
    x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(5)) * 2 - 1
    TiledInference(model, torch.device("cpu"), nullcontext, kept_skips=cfg.levels)(x, x, 128)
    low = [m for m in made if tuple(m.shape[-2:]) == (101, 120)]
    assert len(low) == cfg.blocks + 1 and all(m.shape[1] == 2 * cfg.channels for m in low)
    assert sum(m.numel() * m.element_size() for m in low) == tiled.low_resolution_bytes(cfg, height, width)


def test_a_large_photo_s_own_memory_is_left_out_of_the_planned_pools(monkeypatch):
    """In a 4 GiB container a 24-megapixel photo's float copies and a 2-level model's
    low-resolution maps take 2.3 GiB: pools planned from the whole 4 GiB (a quarter each)
    put the run over the limit, where the process is killed rather than told."""
    gib = 1 << 30
    monkeypatch.setattr(engine_deblurrer, "available_memory", lambda device: 4 * gib)
    cfg = KPACConfig(levels=2)
    d = Deblurrer(build_model(cfg), EngineOptions(device="cpu"))
    height, width = 4000, 6000
    resident = d.resident_bytes(height, width)
    # the caller's image, the network input, the output (a single image is its own reference)
    assert resident == tiled.low_resolution_bytes(cfg, height, width) + 3 * 3 * 4 * height * width
    assert d.resident_bytes(height + 1, width) > resident + 3 * 4 * height * width  # a padded input too
    tile, kept = d.plan_tile(height, width), d.plan_kept_skips(height, width, torch.float32)
    widened = tile + 2 * max(receptive_halos(cfg))
    planned = widened**2 * d.bytes_per_pixel() + sum(skip_bytes(cfg, height, width)[cfg.levels - kept :])
    assert planned + resident <= 4 * gib - (4 * gib - resident) // 2  # the pools take half of what is left
    assert d.memory_budget() == gib  # the budget without a photo: 2 pools of it and the photo exceed 4 GiB
    assert 2 * d.memory_budget() + resident > 4 * gib
    assert d.memory_budget(720, 1280) > 2 * d.memory_budget(height, width)  # a small photo leaves room


def _live_image_bytes(smallest: int) -> int:
    """Bytes of the arrays and tensors alive now that hold at least ``smallest`` bytes, each
    buffer counted once (a NumPy view of a tensor, or a tensor of an array, shares it)."""
    import gc

    gc.collect()
    buffers: dict[int, int] = {}
    for obj in gc.get_objects():
        kind = type(obj)  # not isinstance: it would ask deprecated objects for their __class__, which warns
        if issubclass(kind, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            buffers[storage.data_ptr()] = storage.nbytes()
        elif issubclass(kind, np.ndarray) and obj.base is None:
            buffers[obj.ctypes.data] = obj.nbytes
    return sum(size for size in buffers.values() if size >= smallest)


@pytest.mark.parametrize("views", [1, 2])
def test_a_self_ensemble_s_copies_are_counted_in_the_photo_s_own_memory(views, monkeypatch):
    """While a self-ensemble's later passes run, the flipped input (and a dual-pixel model's
    flipped reference) and the sum of the passes so far are held besides the planned pools:
    the planner leaves room for them, as it does for the photo's other copies."""
    height, width = 64, 80  # a multiple of the stride: no padded copies
    held: list[int] = []
    engine_call = TiledInference.__call__
    monkeypatch.setattr(TiledInference, "__call__",
                        lambda self, *args, **kwargs: held.append(_live_image_bytes(4 * height * width)) or engine_call(self, *args, **kwargs))
    model = _model(KPACConfig(levels=2, channels=8, blocks=1, in_views=views))
    photo = np.random.default_rng(0).random((height, width, 3 * views), dtype=np.float32)
    single, ensemble = (Deblurrer(model, EngineOptions(device="cpu", tile=None, ensemble=n)) for n in (1, 4))
    single.deblur(photo)
    ensemble.deblur(photo)
    first, later = held[0], max(held[2:])
    assert held[1] == first  # the ensemble's first pass holds what a single pass does
    assert later > first
    assert ensemble.resident_bytes(height, width) - single.resident_bytes(height, width) >= later - first


def _reach(output: torch.Tensor, inputs: list[torch.Tensor], cell: int) -> int:
    """How many cells, along either axis, output cell (cell, cell) reads its inputs: the
    extent of the non-zero gradient (float64, so that no path's tiny product rounds to zero)."""
    grads = torch.autograd.grad(output[..., cell, cell].sum(), inputs)
    rows = torch.cat([g.abs().sum(dim=(0, 1, 3)) for g in grads]).nonzero().flatten() % inputs[0].shape[2]
    cols = torch.cat([g.abs().sum(dim=(0, 1, 2)) for g in grads]).nonzero().flatten() % inputs[0].shape[3]
    return max(cell - rows.min().item(), rows.max().item() - cell, cell - cols.min().item(), cols.max().item() - cell)


@pytest.mark.parametrize("cfg", [VARIANTS["3level"], VARIANTS["ablation"], KPACConfig(levels=2, scale_attention=False)])
def test_bottleneck_halos_are_the_receptive_fields(cfg):
    """A block's and the merge's halos are exactly how far one output cell reads (given the
    shape-attention mean, which the engine computes on the whole map first)."""
    model = _model(cfg).double()
    gen = torch.Generator().manual_seed(9)
    x = (torch.rand(1, 2 * cfg.channels, 64, 64, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_()
    y, _ = model.run_block(0, x, spatial_mean(x).detach())
    outs = [torch.rand(1, 2 * cfg.channels, 64, 64, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(cfg.blocks + 1)]
    assert (_reach(y, [x], 32), _reach(model.merge(outs), outs, 32)) == tiled.bottleneck_halos(cfg)


@pytest.mark.parametrize("tile", [40.0, np.float32(40), np.int64(40)])
def test_tile_given_as_a_float_or_numpy_number_runs_as_that_tile(tile):
    cfg = KPACConfig(levels=2, channels=8)
    model, x, ref, whole = _case(cfg, 50, 70, seed=3)
    engine = TiledInference(model, torch.device("cpu"), nullcontext, channels_last=False)
    assert (engine(x, ref, tile).output - whole).abs().max().item() < ATOL
    assert tile_that_runs(tile, 50, 70, cfg.stride) == 40 and type(tile_that_runs(tile, 50, 70, cfg.stride)) is int


def test_tile_zero_is_the_whole_image_as_in_engine_options():
    """0 means the whole image (EngineOptions' convention), not the smallest tile (one stride)."""
    cfg = KPACConfig(levels=2, channels=8)
    model, x, ref, whole = _case(cfg, 50, 70, seed=3)
    encoded = []

    def encode_spy(t, skip_levels=None):
        encoded.append(tuple(t.shape))
        return type(model).encode(model, t, skip_levels)

    model.encode = encode_spy
    engine = TiledInference(model, torch.device("cpu"), nullcontext, channels_last=False)
    assert torch.equal(engine(x, ref, 0).output, whole)
    assert encoded == [(1, 3, 52, 72)]  # one pass over the padded image, not tiles of 4 pixels
    assert tile_that_runs(0, 50, 70, cfg.stride) is None
    with pytest.raises(ValueError, match="tile must be a positive size"):
        tile_that_runs(-8, 50, 70, cfg.stride)


def test_reference_of_another_size_is_refused():
    cfg = KPACConfig(levels=2, channels=8)
    model, x, ref, _ = _case(cfg, 50, 70, seed=3)
    engine = TiledInference(model, torch.device("cpu"), nullcontext, channels_last=False)
    for bad in (ref[..., :49, :], ref[..., :1, :1], torch.cat([ref, ref], 1)):
        with pytest.raises(ValueError, match=r"reference must be \(1, 3, 50, 70\)"):
            engine(x, bad, None)


def test_padding_handles_tiny_images():
    x = torch.rand(1, 3, 1, 1)
    p = pad_to_multiple(x, 8)
    assert p.shape[-2:] == (8, 8) and torch.all(p == x[0, :, 0, 0].view(1, 3, 1, 1))


@pytest.mark.parametrize("size", [(1, 1), (7, 13), (64, 64), (129, 77)])
def test_any_size_is_accepted_and_cropped_back(size):
    d = Deblurrer(_model(VARIANTS["3level"]), EngineOptions(tile=None, channels_last=False))
    img = np.random.default_rng(0).random(size + (3,), dtype=np.float32)
    out = d.deblur(img)
    assert out.shape == size + (3,) and out.dtype == np.float32
    assert 0 <= out.min() and out.max() <= 1


def test_channels_last_and_auto_tile_match_reference_path():
    model = _model(VARIANTS["3level"])
    img = np.random.default_rng(3).random((150, 230, 3), dtype=np.float32)
    ref = Deblurrer(model, EngineOptions(tile=None, channels_last=False)).deblur(img)
    fast = Deblurrer(model, EngineOptions(tile=128, channels_last=True)).deblur(img)
    auto = Deblurrer(model, EngineOptions(tile="auto", memory_budget=40 << 20)).deblur(img)
    assert np.abs(fast - ref).max() < ATOL and np.abs(auto - ref).max() < ATOL


def test_auto_tile_plans_from_the_budget():
    d = Deblurrer(_model(VARIANTS["3level"]), EngineOptions(tile="auto", memory_budget=256 << 20))
    assert d.plan_tile(100, 100) is None  # fits: whole image, no recomputation
    t = d.plan_tile(4000, 6000)
    assert t is not None and t % 8 == 0 and t >= 128
    halo = max(receptive_halos(d.config))
    assert (t + 2 * halo) ** 2 * d.bytes_per_pixel() <= 256 << 20


def test_out_of_memory_halves_the_tile(monkeypatch):
    model = _model(VARIANTS["2level"])
    d = Deblurrer(model, EngineOptions(tile=512, channels_last=False))
    img = np.random.default_rng(4).random((300, 300, 3), dtype=np.float32)
    expected = Deblurrer(model, EngineOptions(tile=None, channels_last=False)).deblur(img)
    real_encode = d.network.encode

    def encode_failing_on_big_tiles(x, skip_levels=None):
        if x.shape[-1] > 200:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return real_encode(x, skip_levels=skip_levels)

    monkeypatch.setattr(d.network, "encode", encode_failing_on_big_tiles)
    out = d.deblur(img)
    # 512 covers the image, so it ran whole; halving starts from the image's side, not from 512
    stride = d.config.stride
    assert d.last_stats.tile_reductions == 1 and d.last_stats.tile == 150 // stride * stride and d.last_stats.kept_skips == 0
    assert np.abs(out - expected).max() < ATOL

    def encode_always_failing(x, skip_levels=None):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    monkeypatch.setattr(d.network, "encode", encode_always_failing)
    with pytest.raises(MemoryError, match="the whole 100x90 image \\(too small to tile\\)"):
        d.deblur(img[:90, :100])
    with pytest.raises(MemoryError, match="even with 128px tiles"):
        d.deblur(img)


def test_run_stats_name_the_tile_that_ran():
    model = _model(VARIANTS["2level"])
    img = np.random.default_rng(5).random((150, 290, 3), dtype=np.float32)
    for tile, ran in ((130, 128), (50, 128), (1000, None), (296, None), (288, 288), (None, None)):
        d = Deblurrer(model, EngineOptions(tile=tile, channels_last=False))
        d.deblur(img)
        assert d.last_stats.tile == ran, tile


def test_a_bare_network_is_copied_not_changed():
    model = _model(VARIANTS["2level"]).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = Deblurrer(model, EngineOptions(channels_last=True))
    assert model.training and not d.model.training
    assert all(v.is_contiguous() for v in model.parameters())  # not turned channels_last
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bf16_on_cpu_is_close_to_fp32():
    """How far bf16 autocast on the CPU is from fp32 (reported as PSNR between the outputs)."""
    model = _model(VARIANTS["3level"])
    img = np.random.default_rng(5).random((128, 160, 3), dtype=np.float32)
    a = Deblurrer(model, EngineOptions(tile=None)).deblur(img)
    b = Deblurrer(model, EngineOptions(tile=None, precision="bf16")).deblur(img)
    psnr = 10 * np.log10(1.0 / np.mean((a - b) ** 2))
    print(f"bf16 vs fp32 on CPU: PSNR {psnr:.1f} dB")
    assert psnr > 40


def test_half_precision_overflow_falls_back_to_fp32(monkeypatch):
    """Non-finite values from a half-precision run never reach the photo: the image is redone in fp32."""
    model = _model(VARIANTS["2level"])
    img = np.random.default_rng(6).random((40, 40, 3), dtype=np.float32)
    expected = Deblurrer(model, EngineOptions(tile=None, channels_last=False)).deblur(img)
    d = Deblurrer(model, EngineOptions(tile=None, precision="bf16", channels_last=False))
    real_decode = d.network.decode

    def decode_overflowing_in_half(features, skips):
        out = real_decode(features, skips)
        return out * float("inf") if torch.is_autocast_enabled("cpu") else out

    monkeypatch.setattr(d.network, "decode", decode_overflowing_in_half)
    out = d.deblur(img)
    assert d.last_stats.fell_back_to_fp32 and d.last_stats.precision == "fp32"
    assert np.isfinite(out).all() and np.abs(out - expected).max() < ATOL


def test_fallback_in_a_later_ensemble_pass_says_which(monkeypatch):
    """A self-ensemble whose third pass overflows in half precision: that pass and the rest are
    run in fp32, the passes before are kept, and the note says so."""
    model = _model(VARIANTS["2level"])
    img = np.random.default_rng(6).random((40, 40, 3), dtype=np.float32)
    expected = Deblurrer(model, EngineOptions(tile=None, channels_last=False, ensemble=4)).deblur(img)
    d = Deblurrer(model, EngineOptions(tile=None, precision="bf16", channels_last=False, ensemble=4))
    real_decode = d.network.decode
    half_calls = []

    def third_half_pass_overflows(features, skips):
        out = real_decode(features, skips)
        if torch.is_autocast_enabled("cpu"):
            half_calls.append(1)
            return out * float("inf") if len(half_calls) == 3 else out
        return out

    monkeypatch.setattr(d.network, "decode", third_half_pass_overflows)
    out = d.deblur(img)
    assert len(half_calls) == 3  # passes 1 and 2 in bf16, pass 3 tried in bf16, then fp32 on
    assert d.last_stats.fell_back_to_fp32 and d.last_stats.precision == "fp32"
    assert d.last_stats.notes == ["non-finite values in bf16: redone in fp32 (self-ensemble pass 3 of 4; the passes before it kept)"]
    assert np.isfinite(out).all() and np.abs(out - expected).max() < 0.02  # two of four passes in bf16


@pytest.mark.parametrize("height,width,tile,halo", [(304, 392, 128, 24), (96, 392, 128, 24), (512, 512, 200, 16), (40, 40, 8, 24)])
def test_static_tile_plans_read_one_shape_and_cover_every_halo(height, width, tile, halo):
    static, plain = plan_tiles(height, width, tile, halo, static=True), plan_tiles(height, width, tile, halo)
    assert [(t.y0, t.y1, t.x0, t.x1) for t in static] == [(t.y0, t.y1, t.x0, t.x1) for t in plain]
    assert len({(t.iy1 - t.iy0, t.ix1 - t.ix0) for t in static}) == 1
    for s, p in zip(static, plain):  # reads at least what the tile needs, inside the image
        assert 0 <= s.iy0 <= p.iy0 and p.iy1 <= s.iy1 <= height and 0 <= s.ix0 <= p.ix0 and p.ix1 <= s.ix1 <= width


@pytest.mark.parametrize("variant", ["3level", "dual"])
def test_static_tile_shapes_give_the_same_output(variant):
    cfg = VARIANTS[variant]
    model, x, ref, whole = _case(cfg, 250, 333, seed=6)
    for kept in (0, cfg.levels):
        engine = TiledInference(model, torch.device("cpu"), nullcontext, True, kept_skips=kept, static_shapes=True)
        assert (engine(x, ref, 128).output - whole).abs().max().item() < ATOL


@pytest.mark.slow
def test_compiled_engine_matches_and_reports_its_compile_time():
    model = _model(KPACConfig(levels=2, channels=8))
    img = np.random.default_rng(7).random((150, 230, 3), dtype=np.float32)
    expected = Deblurrer(model, EngineOptions(tile=None)).deblur(img)
    d = Deblurrer(model, EngineOptions(tile=64, compile=True))
    first = d.deblur(img)
    assert d.last_stats.compile_seconds > 0 and np.abs(first - expected).max() < ATOL
    second = d.deblur(img)  # same shapes: nothing new to compile
    assert d.last_stats.compile_seconds == 0 and np.array_equal(first, second)


def _fake_cgroups(tmp_path, monkeypatch, own: str, groups: dict[str, dict[str, str]]):
    """A cgroup tree under tmp_path (folder -> file -> text) and /proc/self/cgroup naming ``own``."""
    root = tmp_path / "cgroup"
    for folder, files in groups.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (root / folder / name).write_text(text)
    own_file = tmp_path / "self_cgroup"
    own_file.write_text(own)
    monkeypatch.setattr(engine_device, "CGROUP_ROOT", root)
    monkeypatch.setattr(engine_device, "_PROC_SELF_CGROUP", own_file)


def test_a_container_memory_limit_bounds_the_ram_the_engine_plans_for(tmp_path, monkeypatch):
    """Inside a container MemAvailable is the host's; the cgroup's limit is what is left, and
    exceeding it gets the process killed, not an error the engine could retry."""
    gib = 1 << 30
    monkeypatch.setattr(engine_device, "_system_available_ram", lambda: 64 * gib)
    stat = "anon 1\ninactive_file 268435456\nactive_file 5\n"
    _fake_cgroups(tmp_path, monkeypatch, "0::/docker/abc\n", {
        "": {"memory.max": "max", "memory.current": str(9 * gib)},
        "docker": {"memory.max": "max"},
        "docker/abc": {"memory.max": str(2 * gib), "memory.current": str(gib + gib // 2), "memory.stat": stat},
    })
    assert engine_device.available_ram() == gib // 2 + gib // 4  # limit - usage + reclaimable page cache
    d = Deblurrer(_model(VARIANTS["3level"]), EngineOptions(device="cpu"))
    assert d.memory_budget() == (gib // 2 + gib // 4) // 4
    # a parent's tighter limit applies to its children
    (tmp_path / "cgroup" / "docker" / "memory.max").write_text(str(gib))
    (tmp_path / "cgroup" / "docker" / "memory.current").write_text(str(gib - 100 * 2**20))
    assert engine_device.available_ram() == 100 * 2**20


def test_cgroup_v1_limits_count_and_no_limit_leaves_memavailable(tmp_path, monkeypatch):
    gib = 1 << 30
    monkeypatch.setattr(engine_device, "_system_available_ram", lambda: 64 * gib)
    _fake_cgroups(tmp_path, monkeypatch, "4:memory:/docker/abc\n0::/\n", {
        "memory": {"memory.limit_in_bytes": str(3 * gib), "memory.usage_in_bytes": str(gib),
                   "memory.stat": "cache 9\ninactive_file 1024\ntotal_inactive_file 4096\n"},
    })
    # the container's group is mounted as the root; v1's usage and total_ figures count its children
    assert engine_device.available_ram() == 2 * gib + 4096
    (tmp_path / "cgroup" / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712")
    assert engine_device.available_ram() == 64 * gib
    _fake_cgroups(tmp_path / "none", monkeypatch, "0::/\n", {"": {}})
    assert engine_device.available_ram() == 64 * gib


def test_gpu_memory_cached_by_pytorch_counts_as_available(monkeypatch):
    """mem_get_info counts PyTorch's cache as taken: a second photo would be planned for what the
    first left cached, with smaller tiles than the first although the memory is there."""
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (gib, 8 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 5 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: gib)
    assert engine_device.available_memory(torch.device("cuda")) == 5 * gib


def test_engine_options_spell_every_tile_one_way():
    # "00" ran 128 px tiles where 0 means the whole image; np.float32(256) was refused, 256.0 taken
    assert EngineOptions(tile="00").tile is None and EngineOptions(tile=0).tile is None
    assert EngineOptions(tile="whole").tile is None and EngineOptions(tile=None).tile is None
    for size in (256, 256.0, "256", np.float32(256), np.int64(256)):
        assert EngineOptions(tile=size).tile == 256 and type(EngineOptions(tile=size).tile) is int
    assert EngineOptions(tile="auto").tile == "auto"
    for bad in (-1, 12.5, True, "big", "-5"):
        with pytest.raises(ValueError, match="tile must be"):
            EngineOptions(tile=bad)
    d = Deblurrer(build_model(KPACConfig(levels=2, channels=8)), EngineOptions(tile="00"))
    assert d.plan_tile(1000, 1000) is None


def test_the_auto_tile_keeps_every_tensor_under_2_to_the_31_elements():
    # a budget that holds a 150-megapixel image whole (a GPU with lots of free memory): the
    # decoder's 2 x channels full-resolution concatenation would pass 2**31 elements
    d = Deblurrer(build_model(KPACConfig(levels=3, channels=48)), EngineOptions(memory_budget=1 << 50))
    assert d.plan_tile(4000, 5000) is None  # 20 MP x 96 values: 1.9e9 elements, whole
    tile = d.plan_tile(4000, 6000)  # 24 MP x 96 values: 2.3e9 elements
    halo = max(receptive_halos(d.config))
    assert tile is not None and tile % d.config.stride == 0 and (tile + 2 * halo) ** 2 * 96 < 2**31
    assert tile > 4000  # as large as that allows: a few tiles, not many
