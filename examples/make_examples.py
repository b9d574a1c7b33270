"""Regenerate the bundled example photos: scikit-image's sample photos with synthetic,
spatially varying defocus rendered by kpac's synthesis (the code behind `kpac synth`).

    python examples/make_examples.py

Writes examples/photos/NAME.png (defocused, the input of the README's first command) and
examples/sharp/NAME.png (the sharp originals, for `kpac eval --pred ... --target examples/sharp`).
None of these photos is used to train the shipped models. Deterministic (fixed seeds) up to
float rounding: another CPU or thread count may change a few pixels by one code value.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kpac_cli.images import ImageInfo, write_image
from kpac_cli.synth import SynthSettings, sharp_sources, synthesize

HERE = Path(__file__).resolve().parent
PHOTOS = {"astronaut": 7.0, "coffee": 8.0, "motorcycle": 9.0}  # name -> largest blur radius (px)


def main() -> None:
    sources = {s.origin.split(":", 1)[1]: s for s in sharp_sources([], include_skimage=True)}
    for i, (name, radius) in enumerate(PHOTOS.items()):
        sharp, depth = sources[name].load_with_depth()
        sample = synthesize(sharp, np.random.default_rng([7, i]), SynthSettings(max_radius=radius, min_radius=radius * 0.8), depth=depth)
        for folder, image in (("photos", sample.blurred), ("sharp", sample.sharp)):
            info = ImageInfo(path=None, format="png", bit_depth=8, channels=3, alpha=None, icc_profile=None,
                             exif=None, orientation_applied=1, size=image.shape[:2])
            (HERE / folder).mkdir(exist_ok=True)
            write_image(HERE / folder / f"{name}.png", image, info)
        print(f"{name}: {image.shape[1]}x{image.shape[0]}, blur up to {radius:g} px")


if __name__ == "__main__":
    main()
