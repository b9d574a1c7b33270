"""Ways to compute the KPAC block's five shared-kernel dilated convolutions, timed interleaved.

    python benchmarks/kpac_formulations.py                 # the 3-level block at 1280x720 (90x160)
    python benchmarks/kpac_formulations.py --threads 1 --rounds 9

The block input is (1, 96, 90, 160), the kernel (48, 96, 5, 5), dilations 1..5 (33.18/2 =
16.6 GFLOP per block by the analytic convention). Candidates for the branch outputs
``lrelu(conv(x, W, dilation=d))`` stacked as (1, 5, 48, H, W):

* ``five_convs``: five dilated convolutions (the reference), and ``five_convs_fused`` with
  the activation fused (oneDNN post-op);
* ``zero_inserted_21x21``: one convolution to 5 x 48 channels with each branch's kernel
  dilated into a 21x21 kernel of zeros: 17.6x the FLOPs;
* ``space_to_batch``: per dilation, the input split into d*d phase images (batch axis) and
  one dense 5x5 conv on them (TF's implementation of atrous convolution);
* ``mosaic``: all phase images of all dilations laid out, with 2-pixel zero moats, on one
  canvas, then ONE dense 5x5 convolution for all five branches (+23 % pixels);
* ``im2col_gemm``: the five unfolded inputs concatenated, one GEMM with the shared kernel.

and for the whole block: ``block_reference`` (``KPACBlock.forward``) vs ``block_fast``
(``kpac_cli.model.fast.kpac_block_forward``: alpha applied into the fusion input, beta
folded into the fusion kernel).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kpac_cli.bench import median, random_model, time_interleaved  # noqa: E402
from kpac_cli.model import KPACConfig  # noqa: E402
from kpac_cli.model.fast import conv, kpac_block_forward, retain_freed_memory  # noqa: E402

CL = torch.channels_last
SLOPE = 0.2


def space_to_batch(x: torch.Tensor, d: int) -> torch.Tensor:
    """(1, C, H, W) -> (d*d, C, ceil(H/d), ceil(W/d)), phase (py, px) at batch py*d+px."""
    _, c, h, w = x.shape
    hp, wp = -(-h // d) * d, -(-w // d) * d
    x = F.pad(x, (0, wp - w, 0, hp - h))
    return x.reshape(1, c, hp // d, d, wp // d, d).permute(0, 3, 5, 1, 2, 4).reshape(d * d, c, hp // d, wp // d)


def batch_to_space(y: torch.Tensor, d: int, h: int, w: int) -> torch.Tensor:
    _, c, hh, ww = y.shape
    return y.reshape(1, d, d, c, hh, ww).permute(0, 3, 4, 1, 5, 2).reshape(1, c, hh * d, ww * d)[..., :h, :w]


class Mosaic:
    """One canvas holding every phase image of every dilation, separated by zero moats."""

    def __init__(self, h: int, w: int, dilations, r: int) -> None:
        self.h, self.w, self.dil, self.r = h, w, dilations, r
        self.slots = []  # (d, y0, x0, sub_h, sub_w) per dilation: a d x d grid of cells
        y = 0
        width = 0
        for d in dilations:
            sh, sw = -(-h // d), -(-w // d)
            cell_h, cell_w = sh + 2 * r, sw + 2 * r
            self.slots.append((d, y, sh, sw, cell_h, cell_w))
            y += d * cell_h
            width = max(width, d * cell_w)
        self.canvas_hw = (y, width)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        canvas = x.new_zeros((1, c) + self.canvas_hw)
        for d, y0, sh, sw, ch, cw in self.slots:
            phases = space_to_batch(x, d)  # (d*d, C, sh, sw)
            grid = F.pad(phases, (self.r, self.r, self.r, self.r))  # moats
            grid = grid.reshape(d, d, c, ch, cw).permute(2, 0, 3, 1, 4).reshape(c, d * ch, d * cw)
            canvas[0, :, y0 : y0 + d * ch, : d * cw] = grid
        return canvas.contiguous(memory_format=CL)

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        """Output of the 'valid' conv on the canvas (offset r) -> (1, n, C, H, W) branches."""
        c = y.shape[1]
        y = F.pad(y, (0, 2 * self.r, 0, 2 * self.r))  # back to canvas size: cell origins line up
        outs = []
        for d, y0, sh, sw, ch, cw in self.slots:
            grid = y[0, :, y0 : y0 + d * ch, : d * cw].reshape(c, d, ch, d, cw).permute(1, 3, 0, 2, 4)
            phases = grid[..., : sh, : sw].reshape(d * d, c, sh, sw)  # 'valid' output of each cell
            outs.append(batch_to_space(phases, d, self.h, self.w))
        return torch.stack(outs, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="160x90", help="block resolution WxH (1/8 of the image)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--skip-zero-inserted", action="store_true", help="it takes ~1 s per call")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    retain_freed_memory()
    w, h = (int(v) for v in args.size.split("x"))
    model = random_model(KPACConfig()).to(memory_format=CL)
    block = model.blocks[0]
    with torch.no_grad():
        block.kernel.mul_(1.0)
    x = (torch.randn(1, 96, h, w) * 0.5).contiguous(memory_format=CL)
    weight = block.kernel.detach()
    dil = block.dilations
    k = block.kernel_size
    r = k // 2

    def five_convs():
        return torch.stack([F.leaky_relu(F.conv2d(x, weight, padding=d * r, dilation=d), SLOPE) for d in dil], 1)

    def five_convs_fused():
        return torch.stack([conv(x, weight, None, d * r, dilation=d, lrelu=True) for d in dil], 1)

    big = torch.zeros(len(dil) * 48, 96, 2 * r * max(dil) + 1, 2 * r * max(dil) + 1)
    c0 = r * max(dil)
    for i, d in enumerate(dil):
        big[i * 48 : (i + 1) * 48, :, c0 - r * d : c0 + r * d + 1 : d, c0 - r * d : c0 + r * d + 1 : d] = weight
    big = big.contiguous(memory_format=CL)

    def zero_inserted():
        return F.leaky_relu(F.conv2d(x, big, padding=c0), SLOPE).unflatten(1, (len(dil), 48))

    def s2b():
        outs = []
        for d in dil:
            y = F.conv2d(space_to_batch(x, d).contiguous(memory_format=CL), weight, padding=r)
            outs.append(F.leaky_relu(batch_to_space(y, d, h, w), SLOPE))
        return torch.stack(outs, 1)

    mosaic = Mosaic(h, w, dil, r)

    def mosaic_run():
        y = F.conv2d(mosaic.pack(x), weight)  # 'valid': the moats are the zero padding
        return F.leaky_relu(mosaic.unpack(y), SLOPE)

    wmat = weight.reshape(48, -1)

    def im2col():
        cols = torch.cat([F.unfold(x, k, dilation=d, padding=d * r) for d in dil], 2)  # (1, C*k*k, n*HW)
        y = wmat @ cols[0]
        return F.leaky_relu(y.reshape(48, len(dil), h, w).permute(1, 0, 2, 3), SLOPE)[None]

    def block_reference():
        return block(x)[0]

    def block_fast():
        return kpac_block_forward(block, x)[0]

    cands = {"five_convs": five_convs, "five_convs_fused": five_convs_fused, "space_to_batch": s2b,
             "mosaic": mosaic_run, "im2col_gemm": im2col}
    if not args.skip_zero_inserted:
        cands["zero_inserted_21x21"] = zero_inserted
    with torch.inference_mode():
        ref = five_convs()
        print(f"block input {w}x{h}, {torch.get_num_threads()} threads; max abs diff vs five_convs:")
        for name, fn in cands.items():
            print(f"  {name:22s} {(fn() - ref).abs().max().item():.1e}")
        yb = block_reference()
        print(f"  {'block_fast':22s} {(block_fast() - yb).abs().max().item():.1e} (vs block_reference)")
        mh, mw = mosaic.canvas_hw
        print(f"  mosaic canvas {mw}x{mh} = {mh * mw / (len(dil) * h * w):.2f}x the five branches' pixels")
        times = time_interleaved({**cands, "block_reference": block_reference, "block_fast": block_fast},
                                 rounds=args.rounds, warmup=1)
    branch_flops = 2 * h * w * 96 * 48 * k * k * len(dil)
    base = median(times["five_convs"])
    print(f"{'candidate':22s} {'ms':>8s} {'GFLOP/s*':>9s} {'vs five_convs':>13s}   (*useful FLOPs: {branch_flops / 1e9:.2f} GFLOP)")
    for name in cands:
        t = median(times[name])
        print(f"{name:22s} {t * 1e3:8.1f} {branch_flops / t / 1e9:9.0f} {base / t:12.2f}x")
    tb, tf = median(times["block_reference"]), median(times["block_fast"])
    ratios = [a / b for a, b in zip(times["block_reference"], times["block_fast"])]
    print(f"whole block: reference {tb * 1e3:.1f} ms, fast {tf * 1e3:.1f} ms, speed-up {median(ratios):.2f}x (median per round)")


if __name__ == "__main__":
    main()
