"""Training throughput on this machine's CPU: model steps/s and whether data keeps up.

Measures, for the paper's 3-level single-image KPAC (48 channels):

* full training iterations (forward, L1 loss, backward, Adam step) per second at 256x256
  and 512x512 crops, batch 4 and batch 1;
* at 256x256, batch 4, the four memory-layout and precision pairs `kpac train` can use on a
  CPU (NCHW or channels_last, fp32 or bf16 autocast), and which of them `--precision auto`
  picks here (bf16 only on CPUs with AMX or AVX512-BF16);
* on-the-fly synthetic pair rendering (``kpac_cli.synth`` through the training dataset,
  crop + blur margin, one process) in samples/s at the same crop sizes, and the number of
  DataLoader workers it would take to keep the model fed;
* the cost of a DPDD-style sample from cached images (crop, flip, noise) and of decoding
  one 1680x1120 16-bit PNG (what an uncached DPDD sample costs).

Usage: python benchmarks/train_throughput.py [--threads N] [--steps N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kpac_cli.engine.device import autocast, cpu_has_fast_bf16  # noqa: E402
from kpac_cli.model import KPACConfig, build_model  # noqa: E402
from kpac_cli.train.loop import resolve_precision  # noqa: E402
from kpac_cli.train import data as D  # noqa: E402


def time_steps(cfg: KPACConfig, batch: int, crop: int, steps: int, channels_last: bool = False,
               dtype: torch.dtype = torch.float32) -> float:
    """Seconds per training iteration (after one warm-up iteration)."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.99))
    x = torch.rand(batch, 3, crop, crop) * 2 - 1
    y = torch.rand(batch, 3, crop, crop) * 2 - 1
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with autocast(torch.device("cpu"), dtype):
            out = model(x)
        loss = (out.float() - y).abs().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def time_synthesis(crop: int, samples: int) -> float:
    """Seconds per synthetic training sample in one process."""
    from kpac_cli.synth import SynthSettings, sharp_sources

    side = crop + 2 * 14 + 64
    srcs = sharp_sources([], include_skimage=True, procedural=2, procedural_size=(side, side))
    ds = D.SyntheticDataset(srcs, SynthSettings(), seed=0)
    for i in range(len(srcs)):  # decode the sources once, as a worker's cache would
        ds.source(i)
    ds[(0, crop)]
    t0 = time.perf_counter()
    for k in range(1, samples + 1):
        ds[(k, crop)]
    return (time.perf_counter() - t0) / samples


def time_cached_sample(crop: int, samples: int) -> float:
    """Seconds per sample cropped from cached 1680x1120 8-bit pairs (DPDD-like)."""
    rng = np.random.default_rng(0)
    store = D.PairStore([], 8)
    store._cache = [{"source": rng.integers(0, 255, (1120, 1680, 3), dtype=np.uint8),
                     "target": rng.integers(0, 255, (1120, 1680, 3), dtype=np.uint8)} for _ in range(2)]
    store.pairs = [None, None]  # type: ignore[list-item]
    ds = D.PairedDataset(store, seed=0)
    t0 = time.perf_counter()
    for k in range(samples):
        ds[(k, crop)]
    return (time.perf_counter() - t0) / samples


def time_png16_decode() -> float:
    """Seconds to decode one 1680x1120 16-bit RGB PNG (DPDD's format) at full bit depth."""
    import struct
    import tempfile
    import zlib

    rng = np.random.default_rng(0)
    img = (np.clip(np.cumsum(rng.normal(0, 300, (1120, 1680, 3)), axis=1) + 30000, 0, 65535)).astype(">u2")
    raw = np.zeros((1120, 1 + 1680 * 6), np.uint8)
    raw[:, 1:] = img.reshape(1120, -1).view(np.uint8)

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1680, 1120, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))
    from kpac_cli.images import read_image_codes

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.png"
        p.write_bytes(data)
        read_image_codes(p)
        t0 = time.perf_counter()
        for _ in range(3):
            read_image_codes(p)
        return (time.perf_counter() - t0) / 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--steps", type=int, default=2, help="timed iterations per setting")
    ap.add_argument("--samples", type=int, default=12, help="timed synthetic samples per crop size")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = KPACConfig()  # the paper's 3-level single-image network
    rows = []
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; 3-level KPAC, 48 channels", file=sys.stderr)
    for crop in (256, 512):
        synth_s = time_synthesis(crop, args.samples)
        cached_s = time_cached_sample(crop, 20)
        for batch in (4, 1):
            step_s = time_steps(cfg, batch, crop, args.steps)
            row = {
                "crop": crop, "batch": batch, "it_per_s": 1 / step_s, "step_s": step_s,
                "synth_sample_s": synth_s, "synth_batch_s": synth_s * batch,
                "workers_to_keep_up": synth_s * batch / step_s,
                "cached_dpdd_sample_s": cached_s,
            }
            rows.append(row)
            print(f"crop {crop:3d} batch {batch}: {row['it_per_s']:.3f} it/s ({step_s:.2f} s/it); "
                  f"synthesis {synth_s:.3f} s/sample -> {row['synth_batch_s']:.2f} s/batch in one process "
                  f"(~{row['workers_to_keep_up']:.2f} workers keep up); cached DPDD crop {cached_s * 1e3:.1f} ms/sample",
                  file=sys.stderr)
    auto = resolve_precision("auto", torch.device("cpu"))
    print(f"crop 256 batch 4 by layout and precision (CPU with hardware bf16: {cpu_has_fast_bf16()}; "
          f"--precision auto picks {str(auto).replace('torch.', '')}):", file=sys.stderr)
    layouts = []
    for dtype in (torch.float32, torch.bfloat16):
        for channels_last in (False, True):
            step_s = time_steps(cfg, 4, 256, args.steps, channels_last, dtype)
            name = str(dtype).replace("torch.", "")
            layouts.append({"precision": name, "channels_last": channels_last, "it_per_s": 1 / step_s})
            print(f"  {name:8s} {'channels_last' if channels_last else 'NCHW':13s} {1 / step_s:.3f} it/s "
                  f"({layouts[-1]['it_per_s'] / layouts[0]['it_per_s']:.2f}x fp32 NCHW)", file=sys.stderr)
    png_s = time_png16_decode()
    print(f"decode one 1680x1120 16-bit PNG: {png_s:.3f} s", file=sys.stderr)
    if args.json:
        print(json.dumps({"rows": rows, "layouts": layouts, "png16_decode_s": png_s, "threads": torch.get_num_threads(),
                          "hardware_bf16": cpu_has_fast_bf16()}))


if __name__ == "__main__":
    main()
