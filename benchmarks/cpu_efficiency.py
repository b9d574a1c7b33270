"""CPU targets as ratios: efficiency, tiling overhead, peak memory of a 24-megapixel image.

    python benchmarks/cpu_efficiency.py                  # everything (several minutes on 2 cores)
    python benchmarks/cpu_efficiency.py --skip-rss --rounds 9

Prints:

1. **efficiency** = (226.09 GFLOP / 3-level model time at 1280x720) / best dense 3x3 conv
   rate (96 -> 96 on 360x640, PyTorch NCHW / channels_last / onnxruntime, same threads),
   interleaved in one process, median of per-round ratios. For ``FastKPACNet`` (what the
   engine runs on the CPU) and the plain ``KPACNet`` (channels_last), both with
   ``retain_freed_memory()``; ``benchmarks/allocator.py`` compares allocator settings.
2. **tiling overhead** = time(tile=512) / time(whole image) - 1, 3-level, on a 12-megapixel
   image (4000x3000) through ``Deblurrer`` (the real engine path), interleaved: with every
   skip map recomputed in the decoder pass, with the default memory budget, and with every
   skip map kept from the encoder pass. When the whole image does not fit comfortably
   (estimated peak above half of the available memory) the largest 4:3 image that does is
   used instead, and the script says so.
3. **peak RSS** of deblurring a 6000x4000 image with the default tiling (``tile="auto"``) in
   a fresh subprocess, read with ``getrusage(RUSAGE_CHILDREN).ru_maxrss``; also as bytes per
   pixel and as a multiple of the float32 image itself.

Random weights (``build_model(KPACConfig())``): speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def _child_deblur(variant: str, width: int, height: int, tile: str) -> None:
    """Run in a fresh process: deblur one random image, print a JSON line with what happened.

    ``variant`` is ``<path>-<allocator>[-2level]``: path ``engine`` (KPACNet, as the engine runs
    it) or ``fast`` (FastKPACNet); allocator ``system`` (glibc defaults), ``retain``
    (``retain_freed_memory()``) or ``thp`` (PyTorch's transparent-huge-page allocations); the
    3-level model unless ``-2level`` is added.
    """
    import numpy as np
    import torch  # noqa: F401

    from kpac_cli.bench import random_model
    from kpac_cli.engine import Deblurrer, EngineOptions
    from kpac_cli.model import KPACConfig
    from kpac_cli.model.fast import FastKPACNet, retain_freed_memory

    path, allocator, *model_name = variant.split("-")
    if allocator == "retain":
        retain_freed_memory()
    model = random_model(KPACConfig(levels=2 if model_name == ["2level"] else 3))
    fast = path == "fast"
    if fast:
        model = FastKPACNet(model)
    image = np.random.default_rng(0).random((height, width, 3), dtype=np.float32)
    tile_opt = "auto" if tile == "auto" else (None if tile == "whole" else int(tile))
    d = Deblurrer(model, EngineOptions(device="cpu", tile=tile_opt))
    t0 = time.perf_counter()
    d.run(image)
    print(json.dumps({"variant": variant, "seconds": time.perf_counter() - t0, "tile": d.last_stats.tile,
                      "self_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def _probe(args: list[str]) -> None:
    """Run the child and report its peak RSS as the OS accounts it for children."""
    env = dict(os.environ)
    if args[0].split("-")[1] == "thp":
        env["THP_MEM_ALLOC_ENABLE"] = "1"  # read by PyTorch at its first allocation: set before it starts
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(json.dumps({"error": out.stderr[-2000:]}))
        return
    record = json.loads(out.stdout.strip().splitlines()[-1])
    record["children_maxrss_kb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps(record))


def peak_rss(variant: str, width: int, height: int, tile: str = "auto") -> dict:
    """Peak RSS of a fresh process deblurring a ``width x height`` image (via a probe process,
    so every measurement has a RUSAGE_CHILDREN of its own)."""
    out = subprocess.run([sys.executable, __file__, "--probe", variant, str(width), str(height), tile],
                         capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    if not lines:
        return {"error": out.stderr[-2000:]}
    return json.loads(lines[-1])


def available_memory() -> int:
    from kpac_cli.engine.device import available_memory as avail
    import torch

    return avail(torch.device("cpu"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tile-rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--skip-efficiency", action="store_true")
    ap.add_argument("--skip-tiling", action="store_true")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--rss-variants", default="engine-system,engine-retain,engine-thp,fast-system,fast-retain,fast-thp",
                    help="<engine|fast>-<system|retain|thp>[-2level], comma-separated (default model: 3-level)")
    ap.add_argument("--child", nargs=4, metavar=("VARIANT", "W", "H", "TILE"), help=argparse.SUPPRESS)
    ap.add_argument("--probe", nargs=4, metavar=("VARIANT", "W", "H", "TILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        v, w, h, t = args.child
        _child_deblur(v, int(w), int(h), t)
        return
    if args.probe:
        _probe(args.probe)
        return

    import numpy as np
    import torch

    from kpac_cli.bench import (CEILING_SHAPE, ceiling_runners, efficiency_from_times, median, model_runner,
                                random_model, time_interleaved)
    from kpac_cli.engine import Deblurrer, EngineOptions
    from kpac_cli.model import KPACConfig
    from kpac_cli.model.fast import FastKPACNet, retain_freed_memory
    from kpac_cli.model.flops import count_flops, dense_conv_flops

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, torch {torch.__version__}, loadavg {os.getloadavg()}",
          flush=True)
    model = random_model(KPACConfig())

    # 1. efficiency -------------------------------------------------------------------------
    if not args.skip_efficiency:
        h, w = 720, 1280
        flops = count_flops(model.config, h, w)["total"]
        ch, cw, cc = CEILING_SHAPE
        conv_flops = dense_conv_flops(ch, cw, cc, cc)
        ceiling = ceiling_runners("cpu")
        runners = {
            "plain KPACNet (channels_last)": model_runner(model, "channels_last", h, w).run,
            "fast (the engine's CPU path)": model_runner(model, "fast", h, w).run,
        }
        retain_freed_memory(True)
        times = time_interleaved({**ceiling, **runners}, args.rounds, 1, {k: 3 for k in ceiling})
        ceil = {k: times[k] for k in ceiling}
        print(f"\n1. efficiency at 1280x720 ({flops / 1e9:.2f} GFLOP), {args.rounds} interleaved rounds")
        print("   ceiling GFLOP/s (median): " + ", ".join(f"{k} {conv_flops / median(v) / 1e9:.0f}" for k, v in ceil.items()))
        for name in runners:
            rep = efficiency_from_times(times[name], ceil, flops, conv_flops)
            print(f"   {name:38s} {rep.model_seconds:6.3f} s  {rep.model_gflops_per_s:5.0f} GFLOP/s  "
                  f"efficiency {rep.efficiency:.3f}  (rounds: {' '.join(f'{v:.2f}' for v in rep.per_round)})", flush=True)

    # 2. tiling overhead ------------------------------------------------------------------------
    if not args.skip_tiling:
        retain_freed_memory(True)
        w, h = 4000, 3000
        base = peak_rss("fast-retain", 64, 64, "whole")["children_maxrss_kb"]
        per_px = {}
        for variant in ("fast-retain", "engine-retain"):
            probe = peak_rss(variant, 1280, 720, "whole")
            per_px[variant] = max(1.0, (probe["children_maxrss_kb"] - base) * 1024 / (1280 * 720))
        worst = max(per_px.values())
        avail = available_memory()
        need = worst * w * h
        print(f"\n2. tiling overhead: a whole-image pass needs ~{per_px['fast-retain']:.0f} B/pixel (fast path) and "
              f"~{per_px['engine-retain']:.0f} B/pixel (engine's current path), measured at 1280x720; {w}x{h} would need "
              f"~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available", flush=True)
        if need > avail / 2:
            px = avail / 2 / worst
            w = int(math.sqrt(px * 4 / 3)) // 8 * 8
            h = w * 3 // 4 // 8 * 8
            print(f"   -> does not fit comfortably (more than half of the available memory); measuring on {w}x{h} "
                  f"({w * h / 1e6:.1f} MP) instead. Once an image spans several tiles the overhead depends on the tile "
                  f"and halo sizes, not on the image size.")
        image = np.random.default_rng(0).random((h, w, 3), dtype=np.float32)
        from kpac_cli.engine import receptive_halos
        from kpac_cli.engine.tiled import skip_bytes

        all_skips = sum(skip_bytes(model.config, h, w))
        engines = {
            "whole": Deblurrer(model, EngineOptions(device="cpu", tile=None)),
            "tile 512, skips recomputed": Deblurrer(model, EngineOptions(device="cpu", tile=512, memory_budget=0)),
            "tile 512, default budget": Deblurrer(model, EngineOptions(device="cpu", tile=512)),
            "tile 512, all skips kept": Deblurrer(model, EngineOptions(device="cpu", tile=512, memory_budget=all_skips)),
        }
        kept = {}

        def runner(name):
            def run():
                engines[name].run(image)
                kept[name] = engines[name].last_stats.kept_skips
            return run

        times = time_interleaved({name: runner(name) for name in engines}, args.tile_rounds, 1)
        enc, dec = receptive_halos(model.config)
        print(f"   engine path (FastKPACNet on the CPU), halos {enc}/{dec} px, {args.tile_rounds} interleaved rounds; "
              f"whole image {median(times['whole']):.2f} s")
        for name in list(engines)[1:]:
            ratios = [a / b for a, b in zip(times[name], times["whole"])]
            print(f"   {name:28s} {median(times[name]):6.2f} s, {kept[name]} of {model.config.levels} skip maps kept "
                  f"({sum(skip_bytes(model.config, h, w)[model.config.levels - kept[name]:]) / 2**20:.0f} MiB): "
                  f"overhead {median(ratios) - 1:+.1%} (rounds {' '.join(f'{r - 1:+.0%}' for r in ratios)})", flush=True)
        del engines

    # 3. peak RSS ------------------------------------------------------------------------------------
    if not args.skip_rss:
        w, h = 6000, 4000
        img_bytes = w * h * 3 * 4
        print(f"\n3. peak RSS, {w}x{h} ({w * h / 1e6:.0f} MP), default tiling, fresh subprocess "
              f"(float32 image = {img_bytes / 2**20:.0f} MiB)", flush=True)
        for variant in args.rss_variants.split(","):
            r = peak_rss(variant, w, h, "auto")
            if "error" in r:
                print(f"   {variant}: failed: {r['error']}")
                continue
            rss = r["children_maxrss_kb"] * 1024
            print(f"   {variant:14s} peak RSS {rss / 2**30:.2f} GiB = {rss / (w * h):.0f} B/pixel = "
                  f"{rss / img_bytes:.1f}x the float32 image; tile {r['tile']}, {r['seconds']:.1f} s", flush=True)
    print(f"\nloadavg after {os.getloadavg()}")


if __name__ == "__main__":
    main()
