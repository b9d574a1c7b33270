"""Optics-like synthetic defocus: training pairs without the DPDD dataset.

A sharp photo (or a procedural dead-leaves scene) is defocused the way a lens does it:
in linear light, with a disc or polygonal aperture PSF whose radius follows a depth map
through the thin-lens model, occlusion-aware (a defocused foreground spreads over the
background, a sharp foreground keeps its edge), with blooming highlights, sensor noise and,
optionally, the left/right views of a dual-pixel sensor.

Example
-------
>>> import numpy as np
>>> from kpac_cli.synth import SynthSettings, dead_leaves, synthesize
>>> rng = np.random.default_rng(0)
>>> scene, depth = dead_leaves((128, 128), rng, return_depth=True)
>>> pair = synthesize(scene, rng, SynthSettings(max_radius=8, dual_pixel=True), depth)
>>> pair.blurred.shape, pair.left.shape, pair.radius.dtype
((128, 128, 3), (128, 128, 3), dtype('float32'))

Conventions: images ``HxWx3`` float32 in [0, 1], encoded with a power-law tone curve
(``gamma``); depth = distance (positive, larger = farther); signed blur radius in pixels
(positive behind the focal plane, negative in front). See :mod:`kpac_cli.synth.optics`.
"""

from .dataset import dataset_dirs, write_dataset
from .optics import aperture_psf, decode, encode, render_defocus
from .render import SynthSample, SynthSettings, as_float_rgb, defocus_radius, synthesize
from .scenes import dead_leaves, random_depth
from .sources import SKIMAGE_PHOTOS, Source, read_rgb, sharp_sources

__all__ = [
    "SynthSettings",
    "SynthSample",
    "synthesize",
    "dead_leaves",
    "random_depth",
    "defocus_radius",
    "Source",
    "sharp_sources",
    "read_rgb",
    "write_dataset",
    "dataset_dirs",
    "aperture_psf",
    "render_defocus",
    "decode",
    "encode",
    "as_float_rgb",
    "SKIMAGE_PHOTOS",
]
