"""Per-operator CPU time of one forward pass of the 3-level model, with each conv's GFLOP/s.

    python benchmarks/profile_layers.py                       # channels_last eager, 1280x720
    python benchmarks/profile_layers.py --path fast --threads 1
    python benchmarks/profile_layers.py --path eager --no-retain

Each operator's time is the minimum over ``--runs`` profiled passes (a busy machine adds
time, never removes it), matched by position in the pass. Convolution FLOPs are computed
from the recorded shapes with the convention of ``kpac_cli.model.flops``, so the GFLOP/s
column shows which layers run far below the machine's dense-conv rate.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from kpac_cli.bench import random_model  # noqa: E402
from kpac_cli.model import KPACConfig  # noqa: E402
from kpac_cli.model.fast import FastKPACNet, retain_freed_memory  # noqa: E402
from kpac_cli.model.flops import count_flops  # noqa: E402

def profile_once(net, x):
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        net(x)
    top = []
    for e in prof.events():
        parent = e.cpu_parent
        # top-level operators only: those whose parent is not itself an operator
        if parent is not None and (parent.name.startswith("aten::") or parent.name.startswith("mkldnn::")):
            continue
        if not (e.name.startswith("aten::") or e.name.startswith("mkldnn::")):
            continue
        top.append((e.name, [list(s) for s in e.input_shapes], e.cpu_time_total / 1e3))
    return top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", choices=("eager", "channels_last", "fast"), default="channels_last")
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-retain", action="store_true", help="keep glibc's default (unmap large frees)")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    if not args.no_retain:
        retain_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.split("x"))
    model = random_model(KPACConfig())
    if w % model.config.stride or h % model.config.stride:  # the bare network takes stride multiples
        ap.error(f"--size: width and height must be multiples of {model.config.stride}")
    x = torch.rand(1, 3, h, w) * 2 - 1
    net = copy.deepcopy(model)
    if args.path != "eager":
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if args.path == "fast":
        net = FastKPACNet(net)
    with torch.inference_mode():
        net(x)
    runs = [profile_once(net, x) for _ in range(args.runs)]
    n = min(len(r) for r in runs)
    rows = []
    for i in range(n):
        name, shapes, _ = runs[0][i]
        ms = min(r[i][2] for r in runs)
        rows.append((name, shapes, ms))
    total = sum(r[2] for r in rows)
    flops_total = count_flops(model.config, h, w)["total"]
    print(f"path={args.path} size={w}x{h} threads={torch.get_num_threads()} retain={not args.no_retain} "
          f"runs={args.runs}: sum of top-level ops {total:.1f} ms (min per op), model {flops_total / 1e9:.2f} GFLOP "
          f"-> {flops_total / total / 1e6:.0f} GFLOP/s")
    agg: dict[tuple, list[float]] = {}
    for name, shapes, ms in rows:
        key = (name, str(shapes[:3]))
        agg.setdefault(key, []).append(ms)
    ranked = sorted(agg.items(), key=lambda kv: -sum(kv[1]))
    print(f"{'ms':>8} {'%':>5} {'calls':>5}  {'GFLOP/s':>7}  op  shapes")
    for (name, shp), ts in ranked[: args.top]:
        shapes = eval(shp)  # noqa: S307 - our own repr of int lists
        fl = _flops(name, shapes)
        rate = f"{fl * len(ts) / sum(ts) / 1e6:7.0f}" if fl else "       "
        print(f"{sum(ts):8.1f} {100 * sum(ts) / total:5.1f} {len(ts):5d}  {rate}  {name.split('::')[-1][:28]:28s} {shp[:90]}")


def _flops(name: str, shapes: list) -> int | None:
    """Analytic FLOPs of a conv call from its input and weight shapes ('same' padding assumed,
    stride 2 when the kernel is applied to an odd padded size)."""
    if "convolution" not in name or len(shapes) < 2:
        return None
    x = shapes[0]
    binary = "pointwise" in name and len(shapes) > 2 and len(shapes[2]) == 4  # (X, other, W, ...)
    w = shapes[2] if binary else shapes[1]
    if len(x) != 4 or len(w) != 4:
        return None
    if "transpose" in name or (name == "aten::_convolution" and w[0] == x[1] and w[2] == 4):
        return 2 * x[2] * x[3] * w[0] * w[1] * w[2] * w[3]
    stride = 2 if (x[2] % 2 == 1 and w[2] == 3 and w[3] == 3) else 1
    if stride == 2:
        ho, wo = (x[2] - 3) // 2 + 1, (x[3] - 3) // 2 + 1
    else:
        ho, wo = x[2], x[3]
    return 2 * ho * wo * w[0] * w[1] * w[2] * w[3]


if __name__ == "__main__":
    main()
