"""The analytic FLOP count, cross-checked with PyTorch's FlopCounterMode; the bench helpers."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kpac_cli.bench import efficiency_from_times, recommend_tile, time_interleaved
from kpac_cli.model import PAPER_CONFIGS, KPACConfig, build_model
from kpac_cli.model.fast import FastKPACNet
from kpac_cli.model.flops import GROUPS, count_flops, dense_conv_flops, layer_flops

# The numbers of the authors' TensorFlow speed reference (3-level model, 1280x720).
REFERENCE_GROUPS = {
    "encoder": 83_076_710_400,
    "kpac_atrous": 33_177_600_000,
    "kpac_attention": 7_119_366_912,
    "kpac_fusion": 11_943_936_000,
    "decoder": 90_773_913_600,
}


def test_three_level_720p_matches_reference():
    flops = count_flops(KPACConfig(levels=3), 720, 1280)
    assert flops["total"] == 226_091_526_912
    assert {g: flops[g] for g in GROUPS} == REFERENCE_GROUPS


def test_reference_dense_conv():
    assert dense_conv_flops(360, 640) == 38_220_595_200


def test_sizes_round_up_to_the_stride():
    cfg = KPACConfig(levels=3)
    assert count_flops(cfg, 713, 1275) == count_flops(cfg, 720, 1280)
    assert count_flops(KPACConfig(levels=2), 98, 146) == count_flops(KPACConfig(levels=2), 100, 148)


def test_layers_sum_to_groups():
    cfg = PAPER_CONFIGS["dual"]
    layers = layer_flops(cfg, 96, 144)
    flops = count_flops(cfg, 96, 144)
    assert sum(layer.flops for layer in layers) == flops["total"]
    assert layers[0].cin == 6  # dual-pixel input: left and right RGB


def _counted(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, dict]:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops(), counter.get_flop_counts()


@pytest.mark.parametrize("name", list(PAPER_CONFIGS))
def test_flop_counter_mode_agrees_exactly(name):
    """FlopCounterMode counts every aten.convolution as 2 * out_pixels * Cin * Cout * k * k and
    transposed ones at the input size, i.e. the same convention: the totals agree to the FLOP.
    (It ignores the elementwise ops, as the convention does. The authors' TF graph executes
    0.1 % more, 226.32 GFLOP, because TF runs dilated convs through space-to-batch, which pads
    the input to a multiple of the rate; that padding is not the model's arithmetic.)"""
    cfg = PAPER_CONFIGS[name]
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    h, w = 64, 96
    total, per_module = _counted(model, torch.zeros(1, cfg.in_channels, h, w))
    expected = count_flops(cfg, h, w)
    assert total == expected["total"]
    assert per_module["KPACNet.encoder"][torch.ops.aten.convolution] == expected["encoder"]
    blocks = sum(per_module[f"KPACNet.blocks.{i}"][torch.ops.aten.convolution] for i in range(cfg.blocks))
    fuse = sum(per_module[f"KPACNet.blocks.{i}.fuse"][torch.ops.aten.convolution] for i in range(cfg.blocks))
    assert fuse == expected["kpac_fusion"]
    assert blocks == expected["kpac_atrous"] + expected["kpac_attention"] + expected["kpac_fusion"]


def test_fast_path_executes_the_same_flops():
    """The restructured network (with autograd on it runs on plain conv2d) does exactly the
    model's convolution arithmetic: splitting kernels or rows moves FLOPs, never adds any."""
    cfg = KPACConfig(levels=3)
    torch.manual_seed(0)
    fast = FastKPACNet(build_model(cfg).eval())
    with FlopCounterMode(display=False) as counter:
        fast(torch.zeros(1, 3, 64, 96))
    assert counter.get_total_flops() == count_flops(cfg, 64, 96)["total"]


def test_efficiency_is_a_median_of_per_round_ratios():
    # model 100 GFLOP in 1 s; best conv 10 GFLOP in 0.05 s (200 GFLOP/s) -> 0.5 each round
    rep = efficiency_from_times([1.0, 2.0, 1.0], {"a": [0.05, 0.1, 0.05], "b": [0.1, 0.2, 0.1]}, 100 * 10**9, 10 * 10**9)
    assert rep.efficiency == pytest.approx(0.5)
    assert rep.ceiling_backend == "a"
    assert rep.model_seconds == pytest.approx(1.0)


def test_time_interleaved_calls_everything():
    calls = []
    times = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1, repeat={"b": 2})
    assert len(times["a"]) == 3 and len(times["b"]) == 3
    assert calls.count("a") == 4 and calls.count("b") == 1 + 3 * 2


def test_recommend_tile_prefers_smaller_within_tolerance():
    rows = [{"tile": "256", "seconds": 1.3}, {"tile": "512", "seconds": 1.04}, {"tile": "whole", "seconds": 1.0}]
    assert recommend_tile(rows) == "512"
    assert recommend_tile(rows, tolerance=0.0) == "whole"


def test_recommend_tile_ranks_the_tile_that_ran():
    # a requested 64 that the engine ran as the whole image is no 64 px recommendation
    rows = [{"tile": "64", "effective_tile": None, "seconds": 1.0}, {"tile": "whole", "effective_tile": None, "seconds": 1.02}]
    assert recommend_tile(rows) == "whole"
    rows = [{"tile": "100", "effective_tile": 128, "seconds": 1.01}, {"tile": "whole", "effective_tile": None, "seconds": 1.0}]
    assert recommend_tile(rows) == "128"


def test_tile_sweep_says_which_tile_ran():
    from kpac_cli.bench import random_model, tile_sweep

    model = random_model(KPACConfig(levels=2, channels=8))
    rows = {r["tile"]: r for r in tile_sweep(model, 96, 320, [64, 300, 512, 300, None], rounds=1, warmup=0)}
    assert list(rows) == ["64", "300", "512", "whole"]  # asked twice, one row
    assert rows["64"]["effective_tile"] == 128 and "128 px minimum" in rows["64"]["tile_note"]
    assert rows["300"]["effective_tile"] == 300 and "tile_note" not in rows["300"]
    assert rows["512"]["effective_tile"] is None and "whole image" in rows["512"]["tile_note"]
    assert "tile_note" not in rows["whole"]


@pytest.mark.parametrize("args", [["--threads", "0"], ["--rounds", "0"], ["--warmup", "-1"], ["--size", "0x5"], ["--tiles", "64,-3"]])
def test_bench_usage_errors_are_one_line_naming_the_flag(args):
    from typer.testing import CliRunner

    from kpac_cli.cli import app

    res = CliRunner().invoke(app, ["bench", *args])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [res.output.strip()] and res.output.startswith(f"error: {args[0]}")


def test_bench_cli_json(tmp_path):
    from typer.testing import CliRunner

    from kpac_cli.cli import app


    res = CliRunner().invoke(app, [
        "bench", "--size", "96x64", "--rounds", "1", "--warmup", "0", "--configs", "single_2level",
        "--tiles", "32,whole", "--backends", "channels_last,fast", "--json", "--quiet", "--no-retain-memory",
    ])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["efficiency"] > 0
    assert set(report["backends"]) == {"channels_last", "fast"}
    assert {"torch_nchw", "torch_channels_last"} <= set(report["ceiling"]["by_backend"])
    # 32 px is raised to the engine's 128 px minimum, which covers a 96x64 image: it ran whole
    assert report["tiles"][0]["effective_tile"] is None and "whole image" in report["tiles"][0]["tile_note"]
    assert report["recommended_tile"] == "whole"
    # the efficiency is reported as measured, with what it means and its per-round spread
    assert "not a hardware bound" in report["efficiency_note"] and len(report["efficiency_per_round"]) == 1
    assert [r["precision"] for r in report["configs"]][0] == "fp32"
