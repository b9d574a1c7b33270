"""The KPAC network (Son et al., ICCV 2021), as the authors' code computes it.

Conventions (all tensors NCHW, float):

* Inputs are scaled to [-1, 1] (``(u8 - 127.5) / 127.5`` for 8-bit images). Single-image
  models take RGB (3 channels); dual-pixel models take ``cat([left, right])`` (6 channels)
  and add their residual to the centre view.
* Height and width must be multiples of ``config.stride`` (4 for 2 levels, 8 for 3). The
  tiled engine (:mod:`kpac_cli.engine`) pads arbitrary images; the network itself refuses
  other sizes rather than silently changing its output.
* Padding follows TensorFlow's 'SAME' rule, so the authors' checkpoints reproduce their
  outputs: symmetric for stride-1 convolutions, bottom/right only for the stride-2 ones.
* The network is split into :meth:`KPACNet.encode`, :meth:`KPACNet.bottleneck` and
  :meth:`KPACNet.decode`, and the bottleneck into :meth:`KPACNet.run_block` and
  :meth:`KPACNet.merge`, so that the engine can run every part tile by tile. The only
  global operation, each block's shape-attention mean of its input, can be given to
  :meth:`KPACNet.run_block` (computed on the whole map first), which keeps tiling exact.

Module registration order equals the creation order of the authors' TensorFlow variables,
so ``model.parameters()`` lines up with their positional checkpoint format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import KPACConfig

LRELU_SLOPE = 0.2  # tf.nn.leaky_relu's default, used by every activation in the authors' code


def lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, LRELU_SLOPE)


def spatial_mean(x: Tensor) -> Tensor:
    """(N, C, 1, 1) mean over height and width: the input of the shape attention."""
    return x.mean(dim=(2, 3), keepdim=True)


def same_conv(cin: int, cout: int, k: int, dilation: int = 1, bias: bool = True) -> nn.Conv2d:
    """Stride-1 convolution with TF 'SAME' padding (symmetric for odd kernels)."""
    return nn.Conv2d(cin, cout, k, padding=dilation * (k - 1) // 2, dilation=dilation, bias=bias)


class StrideTwoConv(nn.Conv2d):
    """3x3 stride-2 convolution with TF 'SAME' padding on even sizes: 0 before, 1 after.

    PyTorch's ``padding=1`` would pad 1/1 and shift the sampling grid by one pixel.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (0, 1, 0, 1)))


def upconv(cin: int, cout: int) -> nn.ConvTranspose2d:
    """4x4 stride-2 transposed convolution, TF 'SAME' with output size 2x the input."""
    return nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1)


class Encoder(nn.Module):
    """c0, c0_2 (f1, full res) -> c2, c2_2 (f2, 1/2) -> c3, c3_2 (f3, 1/4) [-> c4, c4_2 (1/8)]."""

    def __init__(self, cfg: KPACConfig) -> None:
        super().__init__()
        ch = cfg.channels
        self.levels = cfg.levels
        self.c0 = same_conv(cfg.in_channels, ch, 5)
        self.c0_2 = same_conv(ch, ch, 3)
        self.c2 = StrideTwoConv(ch, ch)
        self.c2_2 = same_conv(ch, ch, 3)
        self.c3 = StrideTwoConv(ch, 2 * ch)
        self.c3_2 = same_conv(2 * ch, 2 * ch, 3)
        if cfg.levels == 3:
            self.c4 = StrideTwoConv(2 * ch, 2 * ch)
            self.c4_2 = same_conv(2 * ch, 2 * ch, 3)

    def stages(self) -> list[tuple[nn.Module, nn.Module]]:
        """The (first, second) convolution of each level, full resolution first."""
        names = ["c0", "c2", "c3", "c4"][: self.levels + 1]
        return [(getattr(self, n), getattr(self, n + "_2")) for n in names]

    def forward(self, x: Tensor, skip_levels: int | None = None) -> tuple[list[Tensor], Tensor | None]:
        """Return the skip features (f1, f2[, f3]) and the encoder output.

        With ``skip_levels=k`` only the first k skip features are computed (the tiled
        engine recomputes just the ones it did not keep) and ``None`` is returned in place
        of the encoder output.
        """
        feats = []
        for first, second in self.stages()[: self.levels + 1 if skip_levels is None else skip_levels]:
            x = lrelu(second(lrelu(first(x))))
            feats.append(x)
        if skip_levels is None:
            return feats[:-1], feats[-1]
        return feats, None


class KPACBlock(nn.Module):
    """Kernel-sharing parallel atrous convolution block (paper Sec. 4, Fig. 5).

    One k x k kernel is applied at every dilation rate (the scaled inverse kernel idea of
    Eq. 4); the branch outputs are weighted per pixel by the scale attention alpha (one
    sigmoid map per rate) and per channel by the shape attention beta (one sigmoid value per
    kernel filter, from the global mean of the input), then fused by a 3x3 convolution.
    """

    def __init__(self, cfg: KPACConfig) -> None:
        super().__init__()
        ch, k, n = cfg.channels, cfg.kernel_size, len(cfg.dilations)
        cin, cb = 2 * ch, ch
        self.dilations = cfg.dilations
        self.kernel_size = k
        self.branch_channels = cb
        # The authors' atrous layer has no bias (checkpoint rows 'dc1/i/filter').
        if cfg.shared_kernel:
            self.kernel = nn.Parameter(torch.empty(cb, cin, k, k))
            nn.init.kaiming_uniform_(self.kernel, a=5**0.5)
            self.kernels = None
        else:
            self.kernel = None
            self.kernels = nn.ParameterList(
                [nn.Parameter(nn.init.kaiming_uniform_(torch.empty(cb, cin, k, k), a=5**0.5)) for _ in range(n)]
            )
        if cfg.scale_attention:
            sa1, sa2 = 2 * ch // 3, ch // 3  # 32 and 16 for the paper's 48 channels
            self.scale = nn.ModuleList(
                [same_conv(cin, sa1, 5, 2), same_conv(sa1, sa1, 5, 2), same_conv(sa1, sa2, 5, 2), same_conv(sa2, sa2, 5, 2)]
            )
            self.scale_out = same_conv(sa2, n, 5)
        else:
            self.scale = self.scale_out = None
        if cfg.shape_attention:
            self.shape_fc1 = nn.Conv2d(cin, ch // 4, 1)
            self.shape_fc2 = nn.Conv2d(ch // 4, cb, 1)
        else:
            self.shape_fc1 = self.shape_fc2 = None
        self.fuse = same_conv(n * cb, cin, 3)

    def branch_kernel(self, i: int) -> Tensor:
        return self.kernel if self.kernels is None else self.kernels[i]

    def scale_attention(self, x: Tensor) -> Tensor | None:
        """alpha: (N, len(dilations), H, W) independent sigmoids (map i <-> dilations[i])."""
        if self.scale is None:
            return None
        a = x
        for conv in self.scale:
            a = lrelu(conv(a))
        return torch.sigmoid(self.scale_out(a))

    def shape_attention(self, x: Tensor, mean: Tensor | None = None) -> Tensor | None:
        """beta: (N, branch_channels, 1, 1) from the global spatial mean of the input
        (``mean``, :func:`spatial_mean` of the whole input, when ``x`` is a crop of it)."""
        if self.shape_fc1 is None:
            return None
        pooled = spatial_mean(x) if mean is None else mean
        return torch.sigmoid(self.shape_fc2(lrelu(self.shape_fc1(pooled))))

    def forward(self, x: Tensor, mean: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Return the block output and alpha (None when scale attention is off).

        ``mean``: :func:`spatial_mean` of the whole input when ``x`` is a crop of it (widened
        by :func:`kpac_cli.engine.tiled.bottleneck_halos`); the crop's own mean otherwise.
        """
        k = self.kernel_size
        branches = torch.stack(
            [
                lrelu(F.conv2d(x, self.branch_kernel(i), padding=d * (k - 1) // 2, dilation=d))
                for i, d in enumerate(self.dilations)
            ],
            dim=1,
        )  # (N, n, cb, H, W); channel c of the concat is branch c // cb, filter c % cb
        alpha = self.scale_attention(x)
        if alpha is not None:
            branches = branches * alpha.unsqueeze(2)  # alpha repeated over each branch's filters
        beta = self.shape_attention(x, mean)
        if beta is not None:
            branches = branches * beta.unsqueeze(1)  # beta tiled over the branches
        y = branches.flatten(1, 2)
        return lrelu(self.fuse(y)), alpha


class Decoder(nn.Module):
    """[d0, d0_2 (+f3)] -> d1, d1_2 (+f2) -> d2, d2_2 (+f1) -> 3-channel residual."""

    def __init__(self, cfg: KPACConfig) -> None:
        super().__init__()
        ch = cfg.channels
        self.levels = cfg.levels
        if cfg.levels == 3:
            self.d0 = upconv(2 * ch, 2 * ch)
            self.d0_2 = same_conv(4 * ch, 2 * ch, 3)
        self.d1 = upconv(2 * ch, ch)
        self.d1_2 = same_conv(2 * ch, ch, 3)
        self.d2 = upconv(ch, ch)
        self.d2_2 = same_conv(2 * ch, 3, 5)

    def forward(self, x: Tensor, skips: list[Tensor]) -> Tensor:
        # Skip concatenations are [upsampled, skip], in that order.
        if self.levels == 3:
            x = lrelu(self.d0_2(torch.cat([lrelu(self.d0(x)), skips[2]], 1)))
        x = lrelu(self.d1_2(torch.cat([lrelu(self.d1(x)), skips[1]], 1)))
        return self.d2_2(torch.cat([lrelu(self.d2(x)), skips[0]], 1))  # no activation


@dataclass
class Bottleneck:
    """What the low-resolution middle of the network produces."""

    features: Tensor  # input of the decoder (after cm_1, cm_2)
    scale_attention: list[Tensor | None]  # alpha of every block


class KPACNet(nn.Module):
    """The whole network: encoder, KPAC blocks, dense concat, decoder, global residual."""

    def __init__(self, config: KPACConfig) -> None:
        super().__init__()
        self.config = config
        ch = config.channels
        self.encoder = Encoder(config)
        self.blocks = nn.ModuleList([KPACBlock(config) for _ in range(config.blocks)])
        self.cm_1 = same_conv((config.blocks + 1) * 2 * ch, 2 * ch, 3)
        self.cm_2 = same_conv(2 * ch, 2 * ch, 3)
        self.decoder = Decoder(config)

    def check_input(self, x: Tensor, reference: Tensor | None = None) -> None:
        cfg = self.config
        for name, value in (("input", x), ("reference", reference)):
            if value is not None and not isinstance(value, Tensor):
                hint = " (a NumPy array: torch.from_numpy(a))" if hasattr(value, "__array__") else ""
                raise TypeError(f"expected a torch.Tensor {name}, got {type(value).__name__}{hint}")
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected input of shape (N, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():  # .float() alone would feed 0-255 values to a [-1, 1] network
            raise ValueError(f"expected a float input in [-1, 1], got {x.dtype} (8-bit images: x / 127.5 - 1)")
        if reference is not None and not reference.is_floating_point():
            raise ValueError(f"expected a float reference in [-1, 1], got {reference.dtype}")
        self._check_dtype(x, reference)
        h, w = x.shape[-2:]
        if h == 0 or w == 0:
            raise ValueError(f"expected an input of shape (N, {cfg.in_channels}, H, W) with H and W > 0, got {tuple(x.shape)}")
        if h % cfg.stride or w % cfg.stride:
            raise ValueError(
                f"height and width must be multiples of {cfg.stride} for a {cfg.levels}-level model, "
                f"got {h}x{w}; use kpac_cli.engine to process images of any size"
            )
        if reference is not None and (reference.shape[0] != x.shape[0] or reference.shape[1] != 3 or reference.shape[-2:] != x.shape[-2:]):
            raise ValueError(f"reference must be (N, 3, {h}, {w}), got {tuple(reference.shape)}")

    def _check_dtype(self, x: Tensor, reference: Tensor | None) -> None:
        """Outside autocast the input (and reference) must be of the parameters' dtype: PyTorch
        would otherwise fail in the first convolution, or silently compute the output in float64."""
        weight = self.encoder.c0.weight
        if _autocast_enabled(x.device.type):
            return
        for name, value in (("input", x), ("reference", reference)):
            if value is not None and value.dtype != weight.dtype:
                raise ValueError(f"the {name} is {value.dtype} but the model's parameters are {weight.dtype}: "
                                 f"convert one ({name}.to({weight.dtype}) or model.to({value.dtype}))")

    def encode(self, x: Tensor, skip_levels: int | None = None) -> tuple[list[Tensor], Tensor | None]:
        return self.encoder(x, skip_levels=skip_levels)

    def bottleneck(self, encoded: Tensor) -> Bottleneck:
        """KPAC blocks, dense concat [encoder output, block outputs...], cm_1, cm_2."""
        outs, alphas = [encoded], []
        for i in range(len(self.blocks)):
            x, alpha = self.run_block(i, outs[-1])
            outs.append(x)
            alphas.append(alpha)
        return Bottleneck(self.merge(outs), alphas)

    def run_block(self, index: int, x: Tensor, mean: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """KPAC block ``index`` on ``x``: (output, alpha); ``mean`` as :meth:`KPACBlock.forward` takes it."""
        return self.blocks[index](x, mean)

    def merge(self, outs: list[Tensor]) -> Tensor:
        """The dense concat [encoder output, block outputs...] through cm_1 and cm_2."""
        return lrelu(self.cm_2(lrelu(self.cm_1(torch.cat(outs, 1)))))

    def decode(self, features: Tensor, skips: list[Tensor]) -> Tensor:
        return self.decoder(features, skips)

    def default_reference(self, x: Tensor) -> Tensor:
        """The image the residual is added to: the input, or for dual-pixel the mean of L and R."""
        return x if self.config.in_views == 1 else 0.5 * (x[:, :3] + x[:, 3:])

    def forward(self, x: Tensor, reference: Tensor | None = None) -> Tensor:
        """Deblur a batch: ``x`` is (N, 3, H, W) RGB, or (N, 6, H, W) ``cat([left, right])`` for a
        dual-pixel model, scaled to [-1, 1] (``(u8 - 127.5) / 127.5``, not [0, 1]), of the
        parameters' dtype and device; H and W multiples of ``config.stride``.

        Returns (N, 3, H, W) RGB in the same [-1, 1] units, unclipped: the residual plus
        ``reference`` ((N, 3, H, W); default: ``x`` itself, or for dual-pixel input the mean of
        the two views). The bare network does no pre-processing: a dual-pixel checkpoint that
        asks for balanced views (provenance ``balance_views``) and images of any size are
        handled by :class:`kpac_cli.engine.Deblurrer`, which takes [0, 1] HxWxC arrays.
        """
        self.check_input(x, reference)
        skips, encoded = self.encode(x)
        residual = self.decode(self.bottleneck(encoded).features, skips)
        return residual + (self.default_reference(x) if reference is None else reference)


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (it mixes dtypes itself)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # PyTorch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def build_model(config: KPACConfig) -> KPACNet:
    """A float32 CPU network of this architecture with fresh random weights (no layer depends on
    train or eval mode); :meth:`KPACNet.forward` states its input and output conventions."""
    if not isinstance(config, KPACConfig):  # a dict of fields would fail later on a missing attribute
        hint = " (a dict of fields: KPACConfig.from_dict(d))" if isinstance(config, dict) else ""
        raise TypeError(f"build_model takes a KPACConfig, got {type(config).__name__}{hint}")
    return KPACNet(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
