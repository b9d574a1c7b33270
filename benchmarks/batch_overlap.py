"""Does a folder of photos take barely longer than the compute alone?

`kpac deblur` reads the next image and writes the previous one in background threads while
the model runs. This prints, for a folder of 16-bit PNGs (the slowest format to encode):

* compute alone: the model on the already-decoded images,
* serial: read, deblur, write one after the other (what a plain loop would do),
* batch: the engine's batch runner, as the CLI uses it,

and the ratio batch / compute (1.0 = I/O completely hidden). The three run interleaved,
``--rounds`` times in a rotated order (see ``kpac_cli.bench.time_interleaved``), after one
untimed warm-up each; the ratios are per round, then the median, so a burst of other work
slows both sides of a ratio instead of biasing it. Random weights; speed does not depend on
them.

    python benchmarks/batch_overlap.py [--count 6] [--size 1280x720] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kpac_cli.bench import median, time_interleaved
from kpac_cli.engine import Deblurrer, EngineOptions
from kpac_cli.engine.batch import OutputOptions, plan_single, run_batch
from kpac_cli.images import ImageInfo, read_image, write_image
from kpac_cli.model import KPACConfig, build_model


def _size(text: str) -> tuple[int, int]:
    """'1280x720' -> (1280, 720), as argparse's type (a bad value is a usage message)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WxH, e.g. 1280x720, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return w, h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=6, help="photos in the folder")
    ap.add_argument("--size", type=_size, default=(1280, 720), help="WxH of each photo")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds, each running all three once")
    args = ap.parse_args()
    if args.count < 1 or args.rounds < 1:
        ap.error("--count and --rounds must be at least 1")
    w, h = args.size
    torch.manual_seed(0)
    d = Deblurrer(build_model(KPACConfig()), EngineOptions(device="cpu", precision="fp32"))
    with tempfile.TemporaryDirectory() as tmp:
        src, out1, out2 = Path(tmp, "in"), Path(tmp, "serial"), Path(tmp, "batch")
        src.mkdir(), out1.mkdir()
        rng = np.random.default_rng(0)
        info = ImageInfo(path=None, format="png", bit_depth=16, channels=3, alpha=None, icc_profile=None, exif=None, orientation_applied=1, size=(h, w))
        for i in range(args.count):
            write_image(src / f"{i}.png", rng.random((h, w, 3), dtype=np.float32), info)
        files = sorted(src.iterdir())
        images = [read_image(f)[0] for f in files]

        def compute() -> None:
            for img in images:
                d.deblur(img)

        def serial() -> None:
            for f in files:
                img, inf = read_image(f)
                write_image(out1 / f.name, d.deblur(img), inf)

        outputs = OutputOptions(overwrite=True)  # every round writes the same files again

        def batch() -> None:
            results = run_batch(d, plan_single([str(src)], str(out2), False, outputs), outputs)
            assert all(r.status == "ok" for r in results), [r.status for r in results]

        times = time_interleaved({"compute": compute, "serial": serial, "batch": batch}, args.rounds, warmup=1)
    per_round = {name: [t / c for t, c in zip(times[name], times["compute"])] for name in ("serial", "batch")}
    print(f"{args.count} x {w}x{h} 16-bit PNG, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds "
          "(medians)")
    print(f"compute alone {median(times['compute']):.2f} s | serial read+deblur+write {median(times['serial']):.2f} s | "
          f"batch runner {median(times['batch']):.2f} s")
    for name in ("batch", "serial"):
        rounds = " ".join(f"{r:.3f}" for r in per_round[name])
        print(f"{name} / compute = {median(per_round[name]):.3f}  (rounds: {rounds})")


if __name__ == "__main__":
    main()
