"""Analytic FLOP count of a KPAC network, per layer and per group.

Convention (the one used for the authors' TensorFlow speed reference, so rates compare):

* a convolution costs ``2 * H_out * W_out * C_in * C_out * k * k`` (one multiply and one add
  per weight per output pixel); dilation does not change the count, and the five
  shared-kernel atrous branches of a KPAC block are counted as five full convolutions;
* a transposed convolution costs ``2 * H_in * W_in * C_in * C_out * k * k`` (each input
  pixel scatters a ``k x k x C_out`` patch);
* the shape-attention 1x1 convolutions on the pooled 1x1 map are counted (negligible);
* biases, activations, pooling, the attention products and concatenations are not counted.

This is also what :class:`torch.utils.flop_counter.FlopCounterMode` counts for the
reference forward pass (``tests/test_flops.py`` checks that they agree exactly), so a rate
computed from it is "useful" FLOP/s: a faster formulation that executes more arithmetic
(e.g. zero-padded kernels) is still charged only these FLOPs.

Sizes are those the network runs on: a height or width that is not a multiple of the
encoder stride is rounded up to one, as the engine pads it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import KPACConfig

#: Group names, in network order. ``total`` is added to the dict :func:`count_flops` returns.
GROUPS = ("encoder", "kpac_atrous", "kpac_attention", "kpac_fusion", "decoder")


@dataclass(frozen=True)
class LayerFlops:
    """One convolution: its name (as in the module tree), group, and analytic FLOPs."""

    name: str
    group: str
    flops: int
    cin: int
    cout: int
    kernel: int
    height: int  # output height (input height for transposed convolutions)
    width: int


def _conv(name: str, group: str, h: int, w: int, cin: int, cout: int, k: int) -> LayerFlops:
    return LayerFlops(name, group, 2 * h * w * cin * cout * k * k, cin, cout, k, h, w)


def layer_flops(config: KPACConfig, height: int, width: int) -> list[LayerFlops]:
    """Every convolution of the network with its FLOPs for a ``height x width`` input."""
    s = config.stride
    h, w = -(-height // s) * s, -(-width // s) * s
    ch, k, n = config.channels, config.kernel_size, len(config.dilations)
    layers: list[LayerFlops] = []

    # encoder: full, 1/2, 1/4 [, 1/8] resolution
    layers.append(_conv("encoder.c0", "encoder", h, w, config.in_channels, ch, 5))
    layers.append(_conv("encoder.c0_2", "encoder", h, w, ch, ch, 3))
    widths = [(ch, ch), (ch, 2 * ch)] + ([(2 * ch, 2 * ch)] if config.levels == 3 else [])
    for i, (cin, cout) in enumerate(widths):
        hl, wl = h >> (i + 1), w >> (i + 1)
        name = f"encoder.c{i + 2}"
        layers.append(_conv(name, "encoder", hl, wl, cin, cout, 3))  # stride 2: counted at the output size
        layers.append(_conv(name + "_2", "encoder", hl, wl, cout, cout, 3))

    # KPAC blocks at 1/stride
    hb, wb, cb, cin = h // s, w // s, ch, 2 * ch
    for b in range(config.blocks):
        p = f"blocks.{b}"
        for i, d in enumerate(config.dilations):
            layers.append(_conv(f"{p}.atrous[d={d}]", "kpac_atrous", hb, wb, cin, cb, k))
        if config.scale_attention:
            sa1, sa2 = 2 * ch // 3, ch // 3
            for j, (ci, co) in enumerate([(cin, sa1), (sa1, sa1), (sa1, sa2), (sa2, sa2)]):
                layers.append(_conv(f"{p}.scale.{j}", "kpac_attention", hb, wb, ci, co, 5))
            layers.append(_conv(f"{p}.scale_out", "kpac_attention", hb, wb, sa2, n, 5))
        if config.shape_attention:
            layers.append(_conv(f"{p}.shape_fc1", "kpac_attention", 1, 1, cin, ch // 4, 1))
            layers.append(_conv(f"{p}.shape_fc2", "kpac_attention", 1, 1, ch // 4, cb, 1))
        layers.append(_conv(f"{p}.fuse", "kpac_fusion", hb, wb, n * cb, cin, 3))

    # dense concat + decoder
    layers.append(_conv("cm_1", "decoder", hb, wb, (config.blocks + 1) * 2 * ch, 2 * ch, 3))
    layers.append(_conv("cm_2", "decoder", hb, wb, 2 * ch, 2 * ch, 3))
    if config.levels == 3:
        layers.append(_conv("decoder.d0", "decoder", h // 8, w // 8, 2 * ch, 2 * ch, 4))  # transposed: input size
        layers.append(_conv("decoder.d0_2", "decoder", h // 4, w // 4, 4 * ch, 2 * ch, 3))
    layers.append(_conv("decoder.d1", "decoder", h // 4, w // 4, 2 * ch, ch, 4))
    layers.append(_conv("decoder.d1_2", "decoder", h // 2, w // 2, 2 * ch, ch, 3))
    layers.append(_conv("decoder.d2", "decoder", h // 2, w // 2, ch, ch, 4))
    layers.append(_conv("decoder.d2_2", "decoder", h, w, 2 * ch, 3, 5))
    return layers


def count_flops(config: KPACConfig, height: int, width: int) -> dict[str, int]:
    """FLOPs per group (:data:`GROUPS`) and their ``total`` for one ``height x width`` image.

    >>> count_flops(KPACConfig(levels=3), 720, 1280)["total"]
    226091526912
    """
    out = {g: 0 for g in GROUPS}
    for layer in layer_flops(config, height, width):
        out[layer.group] += layer.flops
    out["total"] = sum(out[g] for g in GROUPS)
    return out


def dense_conv_flops(height: int, width: int, cin: int = 96, cout: int = 96, k: int = 3) -> int:
    """FLOPs of the reference dense ``k x k`` 'same' convolution used for the machine's ceiling."""
    return 2 * height * width * cin * cout * k * k
