"""Does a folder of photos take barely longer than the compute alone?

`kpac deblur` reads the next image and writes the previous one in background threads while
the model runs. This prints, for a folder of 16-bit PNGs (the slowest format to encode):

* compute alone: the model on the already-decoded images,
* serial: read, deblur, write one after the other (what a plain loop would do),
* batch: the engine's batch runner, as the CLI uses it,

and the ratio batch / compute (1.0 = I/O completely hidden). Random weights; speed does not
depend on them.

    python benchmarks/batch_overlap.py [--count 6] [--size 1280x720]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kpac_cli.engine import Deblurrer, EngineOptions
from kpac_cli.engine.batch import OutputOptions, plan_single, run_batch
from kpac_cli.images import ImageInfo, read_image, write_image
from kpac_cli.model import KPACConfig, build_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=6)
    ap.add_argument("--size", default="1280x720")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
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
        d.deblur(read_image(files[0])[0])  # warm-up

        images = [read_image(f)[0] for f in files]
        t0 = time.perf_counter()
        for img in images:
            d.deblur(img)
        compute = time.perf_counter() - t0

        t0 = time.perf_counter()
        for f in files:
            img, inf = read_image(f)
            write_image(out1 / f.name, d.deblur(img), inf)
        serial = time.perf_counter() - t0

        t0 = time.perf_counter()
        results = run_batch(d, plan_single([str(src)], str(out2), False, OutputOptions()), OutputOptions())
        batch = time.perf_counter() - t0
        assert all(r.status == "ok" for r in results)
    print(f"{args.count} x {w}x{h} 16-bit PNG, {torch.get_num_threads()} threads")
    print(f"compute alone {compute:.2f} s | serial read+deblur+write {serial:.2f} s | batch runner {batch:.2f} s")
    print(f"batch / compute = {batch / compute:.3f}   serial / compute = {serial / compute:.3f}")


if __name__ == "__main__":
    main()
