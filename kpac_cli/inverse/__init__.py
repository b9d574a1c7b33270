"""Inverse kernels for defocus deblurring: the ideas of the KPAC paper's Sec. 3, in NumPy.

Son, Lee, Cho, Lee, "Single Image Defocus Deblurring Using Kernel-Sharing Parallel
Atrous Convolutions", ICCV 2021. The network's design rests on three properties of
(Wiener) inverse kernels of defocus blur, which this package lets one check numerically:

* Eq. 4 - scaling a blur by ``s`` scales its inverse kernel by ``s`` with the same
  shape: ``((k↑s) / s²)† ≈ (k†↑s) / s²`` (:func:`scale_equivariance_psnr`);
* Eq. 5 - an inverse kernel of an intermediate size is approximated by a blend of two
  scales (:func:`blend_accuracy`), which is what the per-pixel scale attention does;
* a *dilated* inverse kernel (zeros inserted, as atrous convolution uses) acts on a
  blurred image almost exactly like the rescaled one (:func:`dilation_psnr`, Fig. 4).

:func:`deblur_disc` is the classical baseline the network is compared with: one disc PSF
(radius given or estimated), Wiener deconvolution in linear light with a per-image ``snr``
(:func:`choose_snr`).

Kernels are 2-D float64 arrays centred on ``(h // 2, w // 2)``; images are float
``(H, W)`` or ``(H, W, C)`` arrays, normally in [0, 1]. See :mod:`.kernels` and
:mod:`.deconv` for the conventions of each function. Nothing here needs PyTorch.
"""

from .deconv import DiscDeblurResult, choose_snr, convolve, deblur_disc, estimate_disc_radius, wiener_deconvolve
from .experiments import BlendResult, blend_accuracy, dilation_psnr, scale_equivariance_psnr
from .kernels import (
    centre_crop,
    centre_pad,
    dilate_kernel,
    disc_psf,
    gaussian_psf,
    kernel_to_otf,
    upsample_kernel,
    wiener_inverse,
)

__all__ = [
    "BlendResult",
    "DiscDeblurResult",
    "blend_accuracy",
    "centre_crop",
    "centre_pad",
    "choose_snr",
    "convolve",
    "deblur_disc",
    "dilate_kernel",
    "dilation_psnr",
    "disc_psf",
    "estimate_disc_radius",
    "gaussian_psf",
    "kernel_to_otf",
    "scale_equivariance_psnr",
    "upsample_kernel",
    "wiener_deconvolve",
    "wiener_inverse",
]
