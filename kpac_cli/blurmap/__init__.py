"""Blur detection and blur-size maps from a KPAC model's scale attention.

A KPAC block weighs its atrous branches (dilations 1..5) per pixel with sigmoid *scale
attention* maps. The paper (Son et al., ICCV 2021, Fig. 6 and 8, Appendix F) observes that
the dilation-1 map of the first block marks blurred regions of almost any blur size, and the
dilation-5 map only large blur, and scores the former as a blur detector on the CUHK data set
(F-measure 0.832, accuracy 78.4%).

>>> from kpac_cli.engine import Deblurrer
>>> from kpac_cli.blurmap import attention_maps, score_detection
>>> maps = attention_maps(Deblurrer("kpac-3level"), image)        # doctest: +SKIP
>>> detect = maps.detection(block=1, dilation=1)                 # H x W, high = blurred  # doctest: +SKIP
>>> size = maps.defocus(block=1)                                  # weighted mean dilation  # doctest: +SKIP

What the numbers mean
---------------------
* Maps are the attention weights themselves, in [0, 1], resampled to the image grid
  (:mod:`.maps` states the geometry). Their polarity is a property of the trained weights,
  not of the architecture. The default, :data:`BLUR_POLARITY` = "blurred" (high weight =
  blurred), is the paper's reading: it scores the map as a blur detector against masks that
  are white where blurred. Short training runs of small models on synthetic defocus pointed
  the same way (where their attention varied at all, it was higher on the most blurred
  regions) but were too short to be conclusive; the test suite checks the shipped model on
  a synthetic photo with a known blur map. A checkpoint whose attention is high on *sharp*
  regions declares ``"blurmap_polarity": "sharp"`` in its provenance (honoured by
  :meth:`AttentionMaps.detection`), and ``invert`` flips the map by hand.
* :func:`defocus_map` is the attention-weighted mean dilation, a relative blur-size
  indicator in dilation units, not a calibrated radius.
* :mod:`.scoring` states the scoring conventions (masks 255 = blurred, F-measure with
  beta^2 = 0.3, AUC by the rank statistic).

This package does not import typer or rich.
"""

from .maps import (
    BLUR_POLARITY,
    POLARITIES,
    AttentionMaps,
    attention_maps,
    blur_mask,
    defocus_map,
    maps_from_attention,
    model_polarity,
    resample_to_image,
)
from .render import (
    KINDS,
    MARK_KEY,
    apply_colormap,
    blurmap_kind,
    contact_sheet,
    encode_map,
    encode_mask,
    encode_rgb,
    overlay,
    save_blurmaps,
    write_file,
)
from .scoring import F_BETA2, PAPER_CUHK, DetectionScores, band_means, band_radius_map, f_measure, mask_from_image, roc_auc, score_detection, summarize

__all__ = [
    "AttentionMaps",
    "BLUR_POLARITY",
    "band_means",
    "band_radius_map",
    "DetectionScores",
    "POLARITIES",
    "F_BETA2",
    "KINDS",
    "MARK_KEY",
    "PAPER_CUHK",
    "apply_colormap",
    "attention_maps",
    "blurmap_kind",
    "blur_mask",
    "contact_sheet",
    "defocus_map",
    "encode_map",
    "encode_mask",
    "encode_rgb",
    "f_measure",
    "maps_from_attention",
    "mask_from_image",
    "model_polarity",
    "overlay",
    "resample_to_image",
    "roc_auc",
    "save_blurmaps",
    "score_detection",
    "summarize",
    "write_file",
]
