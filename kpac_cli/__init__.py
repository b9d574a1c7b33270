"""kpac: single-image and dual-pixel defocus deblurring with KPAC networks."""

__version__ = "0.1.0"
