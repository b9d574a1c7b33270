"""Which way of running the 3-level model is fastest on this CPU, relative to its conv ceiling.

    python benchmarks/engines.py                        # 1280x720, all candidates, 7 rounds
    python benchmarks/engines.py --threads 1 --rounds 9
    python benchmarks/engines.py --only channels_last,fast --no-compile
    python benchmarks/engines.py --cold-compile          # compile times without inductor's caches

Candidates (all fp32, same thread count, random weights):

* ``eager_nchw``, ``channels_last``: the model as written (``kpac_cli.model.network``);
* ``fast``: ``kpac_cli.model.fast.FastKPACNet`` (fused activations, no skip concatenations,
  the narrow last layer as rows), channels_last;
* ``onnxruntime``: the exported graph (``kpac_cli.export``) with full graph optimisation;
* ``compile``, ``compile_freezing``: ``torch.compile`` (inductor), the second with
  ``torch._inductor.config.freezing`` (weights as constants: prepacking, conv+activation
  fusion). Their compile times are printed;
* ``<name>@system`` (only with ``--only``): the same with glibc's default allocator
  behaviour (large blocks are unmapped on free and zero-filled again on the next pass); all
  others run with ``retain_freed_memory()``. The allocator is switched before each timed
  call; switching trims the heap, so the retained candidate that runs next pays some page
  faults too. ``benchmarks/allocator.py`` compares allocators in separate processes.

Every round runs every candidate and the ceiling convolutions once, in a rotated order;
ratios are per round, then the median (see ``kpac_cli.bench``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
if "--cold-compile" in sys.argv:
    # inductor reads these when it first compiles: a fresh cache measures a first-ever compile
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="kpac-inductor-")
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"

import torch  # noqa: E402

from kpac_cli.bench import (  # noqa: E402
    CEILING_SHAPE,
    ceiling_runners,
    efficiency_from_times,
    median,
    model_runner,
    random_model,
    time_interleaved,
)
from kpac_cli.model import KPACConfig  # noqa: E402
from kpac_cli.model.fast import retain_freed_memory  # noqa: E402
from kpac_cli.model.flops import count_flops, dense_conv_flops  # noqa: E402

ALL = ["eager_nchw", "channels_last", "fast", "onnxruntime", "compile", "compile_freezing"]
OPTIONAL = ["channels_last@system", "fast@system"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(ALL + OPTIONAL))
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--cold-compile", action="store_true", help="empty inductor caches, so compile times are first-run times")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.split("x"))
    names = [n for n in (args.only.split(",") if args.only else ALL) if n]
    if args.no_compile:
        names = [n for n in names if not n.startswith("compile")]
    retain_freed_memory(True)
    model = random_model(KPACConfig())
    flops = count_flops(model.config, h, w)["total"]
    ch, cw, cc = CEILING_SHAPE
    conv_flops = dense_conv_flops(ch, cw, cc, cc)
    print(f"size {w}x{h}, {torch.get_num_threads()} threads, torch {torch.__version__}, model {flops / 1e9:.2f} GFLOP, "
          f"loadavg {os.getloadavg()}", flush=True)

    runners, setup = {}, {}
    for name in names:
        base, _, alloc = name.partition("@")
        backend = {"eager_nchw": "eager", "compile_freezing": "compile"}.get(base, base)
        t0 = time.perf_counter()
        if base == "compile_freezing":
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
            try:
                prepared = model_runner(model, backend, h, w)
            finally:
                inductor_config.freezing = False
        else:
            prepared = model_runner(model, backend, h, w)
        if base.startswith("compile"):
            print(f"  {name}: compile + first call {prepared.setup_seconds:.1f} s", flush=True)
        elif base == "onnxruntime":
            print(f"  {name}: export + session {time.perf_counter() - t0:.1f} s", flush=True)
        # "model:" keeps e.g. the onnxruntime model apart from the onnxruntime ceiling conv
        runners[f"model:{name}"] = prepared.run
        setup[f"model:{name}"] = (lambda: retain_freed_memory(False)) if alloc == "system" else (lambda: retain_freed_memory(True))
    ceiling = ceiling_runners("cpu")
    for name in ceiling:
        setup[name] = lambda: retain_freed_memory(True)
    times = time_interleaved({**ceiling, **runners}, rounds=args.rounds, warmup=1, repeat={k: 3 for k in ceiling}, setup=setup)
    retain_freed_memory(True)
    ceil_times = {k: times[k] for k in ceiling}
    print("ceiling (dense 3x3 conv 96->96 at 360x640, retained allocator), median GFLOP/s: "
          + ", ".join(f"{k} {conv_flops / median(v) / 1e9:.0f}" for k, v in ceil_times.items()))
    print(f"{'candidate':24s} {'seconds':>8s} {'GFLOP/s':>8s} {'efficiency':>10s}  per-round ratios")
    for key in runners:
        name = key.removeprefix("model:")
        rep = efficiency_from_times(times[key], ceil_times, flops, conv_flops)
        print(f"{name:24s} {rep.model_seconds:8.3f} {rep.model_gflops_per_s:8.0f} {rep.efficiency:10.3f}  "
              + " ".join(f"{v:.2f}" for v in rep.per_round))
    print(f"loadavg after {os.getloadavg()}")


if __name__ == "__main__":
    main()
