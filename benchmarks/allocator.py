"""How the CPU memory allocator setting changes the model's speed (fresh processes, alternated).

    python benchmarks/allocator.py                         # fast path, 1280x720, 4 alternations
    python benchmarks/allocator.py --path channels_last --threads 1

Settings, each in its own fresh process (some can only be chosen before PyTorch starts):

* ``system``: glibc's defaults. Blocks above the mmap threshold (at most 32 MB) are mapped on
  allocation and unmapped on free, so every pass page-faults and zero-fills its activations.
* ``retain``: ``kpac_cli.model.fast.retain_freed_memory()`` (mallopt: no mmap, no trimming
  below 2 GB): freed activations are reused by the next pass.
* ``thp``: ``THP_MEM_ALLOC_ENABLE=1``, PyTorch's own switch to ask for transparent huge pages
  on large blocks (512x fewer page faults; memory is still returned to the OS).
* ``thp+retain``: both.

Each child times the model and the dense reference conv interleaved (median of its rounds)
and reports the efficiency ratio; the parent alternates the settings and prints medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
SETTINGS = ("system", "retain", "thp", "thp+retain")


def child(setting: str, path: str, width: int, height: int, rounds: int, threads: int) -> None:
    import torch

    from kpac_cli.bench import CEILING_SHAPE, ceiling_runners, efficiency_from_times, model_runner, random_model, time_interleaved
    from kpac_cli.model import KPACConfig
    from kpac_cli.model.fast import retain_freed_memory
    from kpac_cli.model.flops import count_flops, dense_conv_flops

    if threads:
        torch.set_num_threads(threads)
    if "retain" in setting:
        retain_freed_memory()
    model = random_model(KPACConfig())
    ceiling = ceiling_runners("cpu", include_onnx=False)
    run = model_runner(model, path, height, width).run
    times = time_interleaved({**ceiling, "model": run}, rounds, 1, {k: 3 for k in ceiling})
    ch, cw, cc = CEILING_SHAPE
    rep = efficiency_from_times(times["model"], {k: times[k] for k in ceiling}, count_flops(model.config, height, width)["total"],
                                dense_conv_flops(ch, cw, cc, cc))
    import resource

    print(json.dumps({"setting": setting, "seconds": rep.model_seconds, "efficiency": rep.efficiency,
                      "ceiling": rep.ceiling_gflops_per_s, "minflt": resource.getrusage(resource.RUSAGE_SELF).ru_minflt}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", default="fast", choices=("fast", "channels_last", "eager"))
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--alternations", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    if args.child:
        child(args.child, args.path, w, h, args.rounds, args.threads)
        return
    results: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    for i in range(args.alternations):
        order = SETTINGS[i % len(SETTINGS):] + SETTINGS[: i % len(SETTINGS)]
        for setting in order:
            env = dict(os.environ)
            env.pop("THP_MEM_ALLOC_ENABLE", None)
            if "thp" in setting:
                env["THP_MEM_ALLOC_ENABLE"] = "1"
            cmd = [sys.executable, __file__, "--child", setting, "--path", args.path, "--size", args.size,
                   "--rounds", str(args.rounds), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(f"{setting}: failed\n{out.stderr[-1500:]}")
                continue
            results[setting].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"path {args.path}, {args.size}, threads {args.threads or 'default'}, {args.alternations} alternations "
          f"(each a fresh process, {args.rounds} interleaved rounds)")
    print(f"{'setting':12s} {'seconds':>8s} {'efficiency':>10s} {'ceiling GFLOP/s':>16s} {'page faults':>12s}")
    for s, rs in results.items():
        if not rs:
            continue
        med = lambda key: statistics.median(r[key] for r in rs)  # noqa: E731
        print(f"{s:12s} {med('seconds'):8.3f} {med('efficiency'):10.3f} {med('ceiling'):16.0f} {med('minflt'):12.0f}")


if __name__ == "__main__":
    main()
