"""Render the README's before/after figure from a bundled example photo.

    python examples/before_after.py [--model kpac-3level] [--photo motorcycle]

Top row: the defocused input (examples/photos), the model's output and the sharp original
(examples/sharp), scaled to fit; bottom row: the same 2x-zoomed crop of each. Writes
examples/before_after.jpg. Deterministic for a given model up to float rounding (another CPU or
thread count may change a few pixels by one code value).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from kpac_cli.engine import Deblurrer
from kpac_cli.images import read_image
from kpac_cli.metrics import psnr

HERE = Path(__file__).resolve().parent
PANEL_WIDTH = 495
CROP = (150, 330, 140, 240)  # y, x, height, width of the zoomed region (motorcycle: the engine)


def _to_pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="kpac-3level")
    ap.add_argument("--photo", default="motorcycle")
    args = ap.parse_args()
    blurred = read_image(HERE / "photos" / f"{args.photo}.png")[0]
    sharp = read_image(HERE / "sharp" / f"{args.photo}.png")[0]
    out = Deblurrer(args.model).deblur(blurred)
    panels = [("input", blurred), (f"{args.model}", out), ("original", sharp)]
    h, w = blurred.shape[:2]
    ph = round(h * PANEL_WIDTH / w)
    y, x, ch, cw = CROP
    zoom_h = round(ch * PANEL_WIDTH / cw)
    canvas = Image.new("RGB", (3 * PANEL_WIDTH + 2 * 1, ph + zoom_h + 1), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, img) in enumerate(panels):
        left = i * (PANEL_WIDTH + 1)
        canvas.paste(_to_pil(img).resize((PANEL_WIDTH, ph), Image.LANCZOS), (left, 0))
        canvas.paste(_to_pil(img[y : y + ch, x : x + cw]).resize((PANEL_WIDTH, zoom_h), Image.NEAREST), (left, ph + 1))
        score = "" if img is sharp else f"  {psnr(np.clip(img, 0, 1), sharp):.2f} dB"
        draw.rectangle((left, 0, left + 8 * (len(label) + len(score)) + 8, 16), fill="black")
        draw.text((left + 4, 2), label + score, fill="white")
        sx, sy = left + x * PANEL_WIDTH / w, y * PANEL_WIDTH / w
        draw.rectangle((sx, sy, sx + cw * PANEL_WIDTH / w, sy + ch * PANEL_WIDTH / w), outline="yellow")
    canvas.save(HERE / "before_after.jpg", quality=90)
    print(f"wrote {HERE / 'before_after.jpg'}")


if __name__ == "__main__":
    main()
