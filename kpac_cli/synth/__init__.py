"""Optics-like synthetic defocus (placeholder, replaced below)."""
from .render import SynthSample, SynthSettings, as_float_rgb, defocus_radius, synthesize
from .scenes import dead_leaves, random_depth
