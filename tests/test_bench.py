"""`kpac bench` (kpac_cli.bench, kpac_cli.cli.bench): errors, threads, what the report says it ran."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

import kpac_cli.bench as core
from kpac_cli.cli import app
from kpac_cli.model import KPACConfig

QUICK = ["--size", "32x32", "--rounds", "1", "--warmup", "0", "--configs", "single_2level", "--tiles", "whole",
         "--device", "cpu", "--no-retain-memory"]


def _minimal_report() -> dict:
    return {"machine": {}, "size": [32, 32], "recommended_tile": "whole"}


def _full_report(recommended: str) -> dict:
    """What run_benchmark returns, with made-up figures."""
    return {
        "machine": {"device": "cpu", "cpu": "test CPU", "threads": 1, "torch": torch.__version__}, "size": [64, 32],
        "ceiling": {"gflops_per_s": 100.0, "backend": "torch_nchw", "by_backend": {"torch_nchw": 100.0}},
        "model_flops": 10**9, "backends": {"eager": {"seconds": 0.1, "gflops_per_s": 10.0, "efficiency": 0.1}},
        "efficiency": 0.1, "efficiency_backend": "eager", "efficiency_note": core.EFFICIENCY_NOTE,
        "efficiency_per_round": [0.1, 0.1], "efficiency_spread": 0.0, "efficiency_precision": "fp32", "warnings": [],
        "configs": [{"config": "single_2level", "precision": "fp32", "seconds": 0.1, "megapixels_per_s": 0.02}],
        "tiles": [{"tile": "whole", "effective_tile": None, "seconds": 0.1, "megapixels_per_s": 0.02},
                  {"tile": "256", "effective_tile": 256, "seconds": 0.1, "megapixels_per_s": 0.02}],
        "recommended_tile": recommended,
    }


def test_threads_are_set_for_the_run_and_restored(monkeypatch):
    seen = []
    monkeypatch.setattr(core, "run_benchmark", lambda *a, **k: seen.append(torch.get_num_threads()) or _minimal_report())
    before = torch.get_num_threads()
    wanted = 2 if before != 2 else 1
    res = CliRunner().invoke(app, ["bench", *QUICK, "--threads", str(wanted), "--json", "-q"])
    try:
        assert res.exit_code == 0, res.output
        assert seen == [wanted]
        assert torch.get_num_threads() == before  # process-wide: not left changed
    finally:
        torch.set_num_threads(before)


def test_onnxruntime_backend_without_onnxruntime_is_a_usage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    res = CliRunner().invoke(app, ["bench", *QUICK, "--backends", "onnxruntime", "-q"])
    assert res.exit_code == 2, res.output
    assert res.output.strip() == "error: --backends onnxruntime: onnxruntime is not installed (pip install 'kpac[onnx]')"


def test_a_failing_measurement_is_one_line_naming_it(monkeypatch):
    def fail(*args, **kwargs):
        progress = args[8]
        progress("efficiency (3-level model vs the dense-conv ceiling)")
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n\nSet TORCHDYNAMO_VERBOSE=1 for the internal stack trace")

    monkeypatch.setattr(core, "run_benchmark", fail)
    res = CliRunner().invoke(app, ["bench", *QUICK, "--backends", "compile", "-q"])
    assert res.exit_code == 1
    assert res.output.strip() == ("error: kpac bench failed while measuring efficiency (3-level model vs the dense-conv "
                                  "ceiling): InvalidCxxCompiler: No working C++ compiler found")


def test_report_says_how_many_rounds_each_part_ran(monkeypatch):
    ran: dict[str, int] = {}

    def efficiency(model, height, width, backends, device, rounds, warmup, *a, **k):
        ran["efficiency"] = rounds
        e = core.EfficiencyReport(0.5, 1.0, 1.0, 2.0, "torch_nchw", {"torch_nchw": 2.0}, 10, rounds, [0.5] * rounds)
        return {b: e for b in backends}

    def throughput(configs, height, width, device, precisions, backend, rounds, warmup):
        ran["configs"] = rounds
        return []

    def sweep(model, height, width, tiles, device, precision, rounds, warmup):
        ran["tiles"] = rounds
        return [{"tile": "whole", "effective_tile": None, "seconds": 1.0, "megapixels_per_s": 1.0}]

    monkeypatch.setattr(core, "measure_efficiency", efficiency)
    monkeypatch.setattr(core, "config_throughput", throughput)
    monkeypatch.setattr(core, "tile_sweep", sweep)
    res = CliRunner().invoke(app, ["bench", *QUICK[:2], "--rounds", "7", "--warmup", "2", "--backends", "eager", "--json", "-q"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["rounds"] == ran == {"efficiency": 7, "configs": 3, "tiles": 3}
    assert report["warmup"] == 2


def test_tile_sweep_reports_the_tile_the_engine_ran(monkeypatch):
    # the engine halves a tile that runs out of memory (a GPU's): the row and the
    # recommendation name the tile that ran, as the engine's RunStats say
    from kpac_cli.engine import Deblurrer

    real_run = Deblurrer.run

    def run_out_of_memory_at_256(self, *args, **kwargs):
        out = real_run(self, *args, **kwargs)
        if self.last_stats.tile == 256:
            self.last_stats.tile = 128
            self.last_stats.notes.append("out of memory: tile reduced to 128, skip maps recomputed")
        return out

    monkeypatch.setattr(Deblurrer, "run", run_out_of_memory_at_256)
    model = core.random_model(KPACConfig(levels=2, channels=8))
    rows = {r["tile"]: r for r in core.tile_sweep(model, 96, 320, [256, None], rounds=1, warmup=0)}
    assert rows["256"]["effective_tile"] == 128
    assert rows["256"]["tile_note"] == "ran as 128 (out of memory: tile reduced to 128, skip maps recomputed)"
    assert "tile_note" not in rows["whole"]
    assert core.recommend_tile([dict(rows["256"], seconds=1.0), dict(rows["whole"], seconds=2.0)]) == "128"


@pytest.mark.parametrize("device,first", [("cpu", "fast"), ("cuda", "channels_last")])
def test_auto_backends_start_with_the_path_kpac_deblur_runs_there(monkeypatch, device, first):
    # the throughput table measures the first backend: on a GPU the engine runs the
    # channels_last model, never the CPU's fused path
    import kpac_cli.engine as engine

    seen = []
    monkeypatch.setattr(engine, "resolve_device", lambda name: torch.device(device))
    monkeypatch.setattr(core, "memory_problem", lambda *a: None)  # no GPU here to ask
    monkeypatch.setattr(core, "run_benchmark", lambda *a, **k: seen.append(a[7]) or _minimal_report())
    args = [a if a != "cpu" else device for a in QUICK]
    res = CliRunner().invoke(app, ["bench", *args, "--json", "-q"])
    assert res.exit_code == 0, res.output
    assert seen[0][0] == first and ("fast" in seen[0]) == (device == "cpu")


@pytest.mark.parametrize("recommended,option", [("whole", "--tile 0"), ("256", "--tile 256")])
def test_recommended_tile_is_given_as_the_option_kpac_deblur_takes(monkeypatch, recommended, option):
    """`kpac deblur --tile` takes 0 for the whole image and refuses 'whole'."""
    monkeypatch.setattr(core, "run_benchmark", lambda *a, **k: _full_report(recommended))
    res = CliRunner().invoke(app, ["bench", *QUICK, "--json", "-q"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["recommended_tile"] == recommended and report["recommended_tile_option"] == option
    res = CliRunner().invoke(app, ["bench", *QUICK, "-q"])
    assert res.exit_code == 0, res.output
    assert f"recommended tile: {recommended} (kpac deblur {option}): the smallest" in res.stdout


def test_deblur_takes_the_recommended_tile_options():
    from kpac_cli.cli.bench import deblur_tile_option
    from kpac_cli.cli.common import parse_tile  # what `kpac deblur --tile` accepts

    assert parse_tile("whole") is None  # bench's own name for the whole image is taken too
    for tile, expected in (("whole", None), ("256", 256)):
        assert parse_tile(deblur_tile_option(tile).removeprefix("--tile ")) == expected


def test_onnxruntime_backend_without_onnx_is_left_out_or_refused(monkeypatch):
    """The backend exports the model with onnx: onnxruntime alone does not run it."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setitem(sys.modules, "onnx", None)  # import fails as if not installed
    seen = []
    monkeypatch.setattr(core, "run_benchmark", lambda *a, **k: seen.append(a[7]) or _minimal_report())
    res = CliRunner().invoke(app, ["bench", *QUICK, "--json", "-q"])
    assert res.exit_code == 0, res.output
    assert seen == [["fast", "channels_last"]]
    res = CliRunner().invoke(app, ["bench", *QUICK, "--backends", "fast,onnxruntime", "-q"])
    assert res.exit_code == 2, res.output
    assert res.output.strip() == "error: --backends onnxruntime: onnx is not installed (pip install 'kpac[onnx]')"


def _stub_measurements(monkeypatch, efficiencies: dict[str, float]) -> None:
    """run_benchmark with made-up efficiencies per backend and no real timing."""
    def efficiency(model, height, width, backends, device, rounds, warmup, *a, **k):
        return {b: core.EfficiencyReport(efficiencies[b], 1.0, 1.0, 2.0, "torch_nchw", {"torch_nchw": 2.0}, 10, rounds,
                                         [efficiencies[b]] * rounds) for b in backends}

    monkeypatch.setattr(core, "measure_efficiency", efficiency)
    monkeypatch.setattr(core, "config_throughput", lambda *a, **k: [])
    monkeypatch.setattr(core, "tile_sweep", lambda *a, **k: [{"tile": "whole", "effective_tile": None, "seconds": 1.0,
                                                              "megapixels_per_s": 1.0}])


def test_headline_efficiency_is_the_path_kpac_deblur_runs_not_the_fastest_backend(monkeypatch):
    # kpac deblur never runs onnxruntime: its efficiency is a comparison, not the headline
    _stub_measurements(monkeypatch, {"fast": 0.8, "channels_last": 0.6, "onnxruntime": 0.9})
    report = core.run_benchmark(32, 32, "cpu", 1, 0, [None], None, ["channels_last", "onnxruntime", "fast"])
    assert report["efficiency"] == 0.8 and report["efficiency_backend"] == "fast"
    assert report["engine_backend"] == "fast" and report["engine_backend_measured"] is True
    assert report["backends"]["onnxruntime"]["efficiency"] == 0.9  # still listed, for comparison


def test_headline_without_the_engine_path_says_it_was_not_measured(monkeypatch):
    _stub_measurements(monkeypatch, {"eager": 0.4, "channels_last": 0.9})
    report = core.run_benchmark(32, 32, "cpu", 1, 0, [None], None, ["eager", "channels_last"])
    assert report["efficiency"] == 0.4 and report["efficiency_backend"] == "eager"  # the first given
    assert report["engine_backend"] == "fast" and report["engine_backend_measured"] is False
    res = CliRunner().invoke(app, ["bench", *QUICK, "--backends", "eager,channels_last", "-q"])
    assert res.exit_code == 0, res.output
    assert "efficiency 0.40 (eager; kpac deblur runs fast on cpu, not measured: add it to --backends)" in res.stdout


def test_printed_headline_names_kpac_deblurs_path(monkeypatch):
    _stub_measurements(monkeypatch, {"fast": 0.8, "channels_last": 0.95})
    res = CliRunner().invoke(app, ["bench", *QUICK, "--backends", "channels_last,fast", "-q"])
    assert res.exit_code == 0, res.output
    assert "efficiency 0.80 (fast: what kpac deblur runs on cpu)" in res.stdout
    res = CliRunner().invoke(app, ["bench", *QUICK, "--backends", "channels_last,fast", "--json", "-q"])
    assert json.loads(res.stdout)["efficiency"] == 0.8


@pytest.mark.parametrize("device,engine", [("cpu", "fast"), ("cuda", "channels_last"), ("mps", "channels_last")])
def test_engine_backend_is_what_the_deblurrer_runs(device, engine):
    from kpac_cli.engine.deblurrer import FastKPACNet

    assert core.engine_backend(device) == engine
    if device == "cpu":  # the engine's CPU network is the fused path the "fast" backend times
        from kpac_cli.engine import Deblurrer, EngineOptions

        d = Deblurrer(core.random_model(KPACConfig(levels=2, channels=8)), EngineOptions(device="cpu"))
        assert isinstance(d.network, FastKPACNet)


def test_a_size_past_the_free_memory_is_one_usage_error_before_measuring(monkeypatch):
    # the efficiency and throughput runs are untiled: past the free memory the OS kills the
    # process (or it swaps for minutes), so the size is refused up front
    import kpac_cli.engine.device as device

    monkeypatch.setattr(device, "available_memory", lambda dev: 4 * 2**30)
    _stub_measurements(monkeypatch, {"fast": 0.5})  # nothing of that size is ever allocated here
    with pytest.raises(MemoryError, match="needs about"):  # the API refuses it too, before measuring
        core.run_benchmark(4000, 6000, "cpu", 1, 0, [None], None, ["fast"])
    ran = []
    monkeypatch.setattr(core, "run_benchmark", lambda *a, **k: ran.append(a) or _minimal_report())
    res = CliRunner().invoke(app, ["bench", *QUICK, "--size", "6000x4000", "-q"])
    assert res.exit_code == 2, res.output
    assert ran == []
    need = core.whole_image_bytes([KPACConfig()], 4000, 6000) / 2**30
    assert res.output.strip() == (f"error: --size: measuring 6000x4000 runs the whole image untiled, which needs about "
                                  f"{need:.1f} GiB; 4.0 GiB is free on cpu: use a smaller size (kpac deblur tiles large photos)")
    res = CliRunner().invoke(app, ["bench", *QUICK, "--size", "1280x720", "--json", "-q"])  # ~1 GiB: fits
    assert res.exit_code == 0, res.output
    assert len(ran) == 1


def test_whole_image_bytes_are_what_the_engine_plans_for_the_widest_config():
    from kpac_cli.engine import Deblurrer, EngineOptions

    narrow, wide = KPACConfig(levels=2, channels=8), KPACConfig(levels=2, channels=16)
    per_pixel = Deblurrer(core.random_model(wide), EngineOptions(device="cpu")).bytes_per_pixel()
    # 100 x 30 padded to the stride (4): 100 x 32
    assert core.whole_image_bytes([narrow, wide], 100, 30) == per_pixel * 100 * 32


def _stub_rounds(monkeypatch, per_round: list[float]) -> None:
    """run_benchmark whose efficiency rounds came out as ``per_round``."""
    _stub_measurements(monkeypatch, {})

    def efficiency(model, height, width, backends, device, rounds, warmup, *a, **k):
        e = core.EfficiencyReport(core.median(per_round), 1.0, 1.0, 2.0, "torch_nchw", {"torch_nchw": 2.0}, 10,
                                  len(per_round), per_round)
        return {b: e for b in backends}

    monkeypatch.setattr(core, "measure_efficiency", efficiency)


def test_rounds_that_scatter_are_reported_as_a_busy_machine(monkeypatch):
    _stub_rounds(monkeypatch, [0.5, 0.8, 0.45])
    monkeypatch.setattr(core, "_loadavg", lambda: [3.5, 2.0, 1.0])
    report = core.run_benchmark(32, 32, "cpu", 3, 0, [None], None, ["fast"])
    assert report["efficiency_spread"] == pytest.approx(0.7)  # (0.8 - 0.45) / 0.5
    [warning] = report["warnings"]
    assert warning.startswith(f"the efficiency's rounds spread by 70% of their median (more than 20%); "
                              f"load average 3.5 on {report['machine']['cpu_count']} CPUs at the start")
    res = CliRunner().invoke(app, ["bench", *QUICK, "--backends", "fast", "-q"])
    assert res.exit_code == 0, res.output
    assert "the median of 3 rounds, which spread by 70% of it" in res.stdout
    assert "warning: the efficiency's rounds spread by 70%" in res.stdout
    assert json.loads(CliRunner().invoke(app, ["bench", *QUICK, "--backends", "fast", "--json", "-q"]).stdout)["warnings"]


def test_rounds_that_agree_carry_no_warning(monkeypatch):
    _stub_rounds(monkeypatch, [0.50, 0.52, 0.49])
    report = core.run_benchmark(32, 32, "cpu", 3, 0, [None], None, ["fast"])
    assert report["warnings"] == [] and report["efficiency_spread"] == pytest.approx(0.06)
    _stub_rounds(monkeypatch, [0.5])
    report = core.run_benchmark(32, 32, "cpu", 1, 0, [None], None, ["fast"])
    assert report["warnings"] == [] and report["efficiency_spread"] is None
    res = CliRunner().invoke(app, ["bench", *QUICK, "--backends", "fast", "-q"])
    assert "the median of 1 round (no spread with one round)" in res.stdout and "warning" not in res.stdout


def test_tile_sweep_runs_in_the_precision_kpac_deblur_runs_on_the_device(monkeypatch):
    # on CUDA kpac deblur runs fp16 by default: an fp32 sweep would recommend a tile for a run it never makes
    import kpac_cli.engine as engine

    _stub_measurements(monkeypatch, {"channels_last": 0.5})
    swept = []
    monkeypatch.setattr(core, "tile_sweep", lambda model, h, w, tiles, device, precision, *a: swept.append(precision) or
                        [{"tile": "whole", "effective_tile": None, "seconds": 1.0, "megapixels_per_s": 1.0}])
    monkeypatch.setattr(engine, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(core, "memory_problem", lambda *a: None)  # no GPU here to ask
    monkeypatch.setattr(core, "machine_info", lambda dev: {"device": "cuda", "gpu": "test GPU", "threads": 1,
                                                           "torch": torch.__version__, "loadavg": None, "cpu_count": 2})
    report = core.run_benchmark(32, 32, "cuda", 1, 0, [None], None, ["channels_last"])
    assert swept == ["fp16"] and report["tiles_precision"] == report["engine_precision"] == "fp16"
    assert report["efficiency_precision"] == "fp32"
    from kpac_cli.cli.bench import _headline_text

    assert _headline_text(report) == ("channels_last: kpac deblur's path on cuda, which it runs in fp16 by default "
                                      "(see the throughput table)")
    assert core.engine_precision("cpu") == "fp32"
