"""Inference engine: device and precision choice, exact tiled inference, the Deblurrer API."""

from .batch import JobResult, OutputOptions, deblur_file
from .deblurrer import Deblurrer, EngineOptions, RunStats, tqdm_progress
from .device import resolve_device, resolve_precision
from .tiled import InferenceResult, TiledInference, pad_to_multiple, plan_tiles, receptive_halos, skips_that_fit

__all__ = [
    "Deblurrer",
    "EngineOptions",
    "JobResult",
    "OutputOptions",
    "deblur_file",
    "InferenceResult",
    "RunStats",
    "TiledInference",
    "pad_to_multiple",
    "plan_tiles",
    "receptive_halos",
    "resolve_device",
    "resolve_precision",
    "skips_that_fit",
    "tqdm_progress",
]
