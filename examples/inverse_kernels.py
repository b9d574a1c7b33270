"""Check the inverse-kernel properties that KPAC is built on (the paper's Sec. 3).

Son, Lee, Cho, Lee, "Single Image Defocus Deblurring Using Kernel-Sharing Parallel Atrous
Convolutions", ICCV 2021. Prints our measured values next to the paper's:

* Eq. 4 / Fig. 1: deblurring with the inverse of a 2x larger blur vs with the 2x
  upsampled inverse kernel (PSNR between the two results; paper: about 50 dB);
* Eq. 5 / Fig. 2: blending two inverse-kernel scales approximates a third (accuracy with
  alpha = 0.5 and with non-negative least-squares weights; paper: 87.4 % / 92.5 %);
* Fig. 4: dilated vs rescaled inverse kernel (PSNR between the results; paper: about 53 dB).

Setup: scikit-image's bundled ``astronaut`` photo (512 x 512 RGB, float in [0, 1]), a disc
PSF of radius 3 px as the base blur, Wiener inverse kernels with SNR = 100, no noise.
PSNR uses a data range of 1 on unclipped results. Runs in a few seconds on one core.

Usage: python examples/inverse_kernels.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from skimage import data

try:
    from kpac_cli.inverse import blend_accuracy, dilation_psnr, scale_equivariance_psnr
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kpac_cli.inverse import blend_accuracy, dilation_psnr, scale_equivariance_psnr

RADIUS = 3.0
SNR = 100.0


def main() -> None:
    t0 = time.perf_counter()
    image = data.astronaut().astype(np.float64) / 255.0

    print(f"image: astronaut {image.shape}, base disc radius {RADIUS:g} px, Wiener SNR {SNR:g}\n")

    print("Eq. 4 / Fig. 1  (k_s)† vs (k†↑s)/s², s = 2: PSNR between the deblurred images")
    print("  paper                                               ~50 dB")
    for method in ("fourier", "lanczos"):
        for blur, what in (("disc", "analytic disc of radius 2r"), ("upsampled", "(k↑2)/4 as in Eq. 4")):
            v = scale_equivariance_psnr(image, RADIUS, 2, SNR, method=method, large_blur=blur)
            print(f"  ours, {method:7s} upsampling, large blur = {what:27s} {v:5.1f} dB")

    print("\nFig. 4  dilated k† vs rescaled (k†↑2)/4 on a 2x blurred image: PSNR between the results")
    print("  paper                                               ~53 dB")
    for method in ("fourier", "lanczos"):
        v = dilation_psnr(image, RADIUS, 2, SNR, method=method)
        print(f"  ours, rescaled with {method:7s}, blur = disc 2r     {v:5.1f} dB")

    print("\nEq. 5 / Fig. 2  blend of two inverse-kernel scales vs the exact inverse of an in-between blur")
    print("  paper: alpha = 0.5 -> 87.4 %,  least-squares weights -> 92.5 %")
    print("  scales (x r)   SNR   scale 1   scale 2   alpha=.5    NNLS   (weights)      PSNR exact/blend/blurred")
    for snr in (SNR, 30.0):
        for s1, s2 in ((1.0, 2.0), (2.0, 3.0), (3.0, 4.0)):
            r = blend_accuracy(image, RADIUS, (s1, s2), (s1 + s2) / 2, snr)
            a1, a2 = r.accuracy_single
            w1, w2 = r.weights_nnls
            print(
                f"  {s1:g},{s2:g} -> {(s1 + s2) / 2:g}   {snr:5g}  {a1:7.1%}  {a2:8.1%}  {r.accuracy_alpha:8.1%}"
                f"  {r.accuracy_nnls:7.1%}   ({w1:.2f}, {w2:.2f})   "
                f"{r.psnr_exact:.2f}/{r.psnr_alpha:.2f}/{r.psnr_blurred:.2f} dB"
            )
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
