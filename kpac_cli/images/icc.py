"""ICC profiles for the colour spaces a photo can be in without carrying a profile of its own.

Two kinds of source say their colour space in another way, and their outputs would otherwise
be written untagged, which every reader takes for sRGB (colours shift: Adobe RGB greens
turn dull, linear light looks dark):

* a camera JPEG shot in Adobe RGB: cameras mark it in EXIF alone (DCF: ColorSpace
  "uncalibrated" with the Interoperability index ``R03``), not with an ICC profile;
* a camera RAW developed in linear light, or into Adobe RGB or ProPhoto primaries
  (:class:`~kpac_cli.images.raw.RawOptions`).

The reader gives such a photo the profile (``ImageInfo.icc_profile``) and every output
carries it. The profiles are small ICC v2 display profiles (matrix and tone curves, as the
colour spaces' own specifications define them: primaries, white point, transfer function),
made here: the primaries' XYZ colorants are adapted to the D50 connection space with the
Bradford transform (ICC.1:2001-04, Annex E), the tone curves are a gamma or the sRGB curve
sampled at 1024 points (as the IEC 61966-2.1 profile does). Descriptions say "compatible
with": the names of Adobe's profiles are Adobe's. A grey photo gets the grey counterpart
(:func:`grey_counterpart`: the tone curve and white point alone), as readers reject an RGB
profile on grey pixels.
"""

from __future__ import annotations

import struct
from functools import cache

import numpy as np

from .base import srgb_decode

#: CIE xy chromaticities of the primaries (red, green, blue) and white point of each colour space.
SRGB_PRIMARIES = ((0.64, 0.33), (0.30, 0.60), (0.15, 0.06))  # IEC 61966-2-1
ADOBE_RGB_PRIMARIES = ((0.64, 0.33), (0.21, 0.71), (0.15, 0.06))  # Adobe RGB (1998) specification
PROPHOTO_PRIMARIES = ((0.7347, 0.2653), (0.1596, 0.8404), (0.0366, 0.0001))  # ROMM RGB, ISO 22028-2
D65 = (0.3127, 0.3290)
D50 = (0.3457, 0.3585)
#: Adobe RGB (1998)'s gamma, 2 + 51/256 (its specification), and ROMM RGB's.
ADOBE_RGB_GAMMA = 563 / 256
PROPHOTO_GAMMA = 1.8

_PCS_WHITE = (0.9642, 1.0, 0.8249)  # the ICC's D50 connection space white
_BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])
_SRGB_CURVE_POINTS = 1024


def _xyz(xy: tuple[float, float]) -> np.ndarray:
    x, y = xy
    return np.array([x / y, 1.0, (1 - x - y) / y])


def colorants(primaries, white) -> np.ndarray:
    """3x3 matrix whose columns are the XYZ of the red, green and blue primaries at full value,
    adapted from ``white`` to the D50 connection space (Bradford): the rXYZ/gXYZ/bXYZ tags.
    Raises ValueError for primaries of no colour space (on one line)."""
    p = np.stack([_xyz(c) for c in primaries], axis=1)
    try:
        scale = np.linalg.solve(p, _xyz(white))  # the primaries' luminances that sum to the white
    except np.linalg.LinAlgError:
        raise ValueError(f"primaries {primaries} span no colour space") from None
    to_white = p * scale
    cone_src, cone_dst = _BRADFORD @ _xyz(white), _BRADFORD @ np.array(_PCS_WHITE)
    adapt = np.linalg.inv(_BRADFORD) @ np.diag(cone_dst / cone_src) @ _BRADFORD
    return adapt @ to_white


def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def _xyz_tag(xyz) -> bytes:
    return b"XYZ " + bytes(4) + b"".join(_s15(float(v)) for v in xyz)


def _curve_tag(curve: float | str) -> bytes:
    """curveType: a gamma (1.0 is the identity, no entries), or ``"srgb"``: IEC 61966-2-1's curve."""
    if curve == "srgb":
        table = np.round(srgb_decode(np.linspace(0.0, 1.0, _SRGB_CURVE_POINTS)) * 65535).astype(">u2")
        return b"curv" + bytes(4) + struct.pack(">I", len(table)) + table.tobytes()
    if curve == 1.0:
        return b"curv" + bytes(4) + struct.pack(">I", 0)
    return b"curv" + bytes(4) + struct.pack(">IH", 1, round(float(curve) * 256)) + bytes(2)  # u8Fixed8, padded


def _description_tag(text: str) -> bytes:
    """textDescriptionType (ICC v2): the ASCII description, no Unicode or ScriptCode one."""
    ascii_text = text.encode("ascii") + b"\0"
    return b"desc" + bytes(4) + struct.pack(">I", len(ascii_text)) + ascii_text + bytes(4 + 4 + 2 + 1 + 67)


def _text_tag(text: str) -> bytes:
    return b"text" + bytes(4) + text.encode("ascii") + b"\0"


_COPYRIGHT = _text_tag("No copyright, use freely")


def rgb_profile(description: str, primaries, white, curve: float | str) -> bytes:
    """An ICC v2 RGB display profile (matrix/TRC) of the colour space given by the xy
    chromaticities of its ``primaries`` and ``white`` point and its tone ``curve`` (a gamma,
    or ``"srgb"``). Deterministic: the same arguments give the same bytes. Raises ValueError
    for primaries of no colour space (:func:`colorants`)."""
    white_tag = _xyz_tag(_xyz(white) if white != D50 else _PCS_WHITE)
    return _matrix_profile(_description_tag(description), white_tag, colorants(primaries, white), _curve_tag(curve))


def _matrix_profile(description: bytes, white: bytes, matrix: np.ndarray, trc: bytes) -> bytes:
    """An ICC v2 RGB matrix/TRC profile from the data of its tags: ``desc``, ``wtpt``, the
    colorant ``matrix`` (:func:`colorants`) and one tone curve for the three channels."""
    return _profile(b"RGB ", [
        (b"desc", description),
        (b"cprt", _COPYRIGHT),
        (b"wtpt", white),
        (b"rXYZ", _xyz_tag(matrix[:, 0])),
        (b"gXYZ", _xyz_tag(matrix[:, 1])),
        (b"bXYZ", _xyz_tag(matrix[:, 2])),
        (b"rTRC", trc),
        (b"gTRC", trc),  # the three curves share their data, as in most matrix profiles
        (b"bTRC", trc),
    ])


def grey_counterpart(profile: bytes | None) -> bytes | None:
    """The grey display profile (a tone curve alone, ``kTRC``) of the colour space of a
    matrix/TRC RGB ``profile`` (one :func:`rgb_profile` makes): its description, white point
    and red tone curve. A grey photo needs it: readers reject an RGB profile on grey pixels
    (littleCMS, the PNG specification), and would show them as sRGB. None where ``profile``
    is none or not such a profile."""
    tags = _tags_of(profile) if profile is not None and profile[16:20] == b"RGB " else {}
    if not all(signature in tags for signature in (b"desc", b"wtpt", b"rTRC")):
        return None
    return _profile(b"GRAY", [(b"desc", tags[b"desc"]), (b"cprt", _COPYRIGHT), (b"wtpt", tags[b"wtpt"]),
                              (b"kTRC", tags[b"rTRC"])])


def rgb_counterpart(profile: bytes | None) -> bytes | None:
    """An RGB matrix/TRC profile that shows greys as the grey display ``profile`` (``kTRC``)
    does: its white point and tone curve, with sRGB's primaries (a grey photo has no colours,
    so colours drawn over it - a blur map's overlay - are taken as sRGB's). A grey photo's
    profile does not fit RGB pixels; readers drop it there. None where ``profile`` is none or
    not such a profile; ``profile`` itself where it is an RGB one already."""
    if profile is not None and profile[16:20] == b"RGB ":
        return profile
    tags = _tags_of(profile) if profile is not None and profile[16:20] == b"GRAY" else {}
    if not all(signature in tags for signature in (b"wtpt", b"kTRC")) or tags[b"kTRC"][:4] != b"curv":
        return None  # a parametric curve (ICC v4) is no tag of a v2 profile
    return _matrix_profile(_description_tag("Grey tone curve, sRGB primaries"), tags[b"wtpt"],
                           colorants(SRGB_PRIMARIES, D65), tags[b"kTRC"])


def _tags_of(profile: bytes) -> dict[bytes, bytes]:
    """The tag data of an ICC profile by signature (those whose bounds lie in the profile)."""
    if len(profile) < 132:
        return {}
    (count,) = struct.unpack(">I", profile[128:132])
    tags = {}
    for i in range(min(count, (len(profile) - 132) // 12)):
        signature, offset, size = struct.unpack(">4sII", profile[132 + 12 * i : 144 + 12 * i])
        if offset + size <= len(profile):
            tags[signature] = profile[offset : offset + size]
    return tags


def _profile(colour_space: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    """An ICC v2 display profile of ``colour_space`` (``b"RGB "``, ``b"GRAY"``) holding ``tags``
    (``(signature, data)``); tags with the same data share it."""
    table_size = 4 + 12 * len(tags)
    offset = 128 + table_size
    entries, data, placed = [], b"", {}
    for signature, body in tags:
        if body not in placed:
            placed[body] = offset + len(data)
            data += body + bytes(-len(body) % 4)  # each tag starts on a 4-byte boundary
        entries.append(struct.pack(">4sII", signature, placed[body], len(body)))
    size = 128 + table_size + len(data)
    header = (
        struct.pack(">I4sI4s4s4s", size, b"\0\0\0\0", 0x02100000, b"mntr", colour_space, b"XYZ ")
        + struct.pack(">6H", 2000, 1, 1, 0, 0, 0)  # a fixed date: same bytes on every run
        + b"acsp" + bytes(4 + 4 + 4 + 4 + 8) + struct.pack(">I", 0)  # platform, flags, maker, model, attributes, perceptual
        + b"".join(_s15(v) for v in _PCS_WHITE)
        + bytes(4 + 16 + 28)  # creator, profile ID (none in v2), reserved
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + b"".join(entries) + data


@cache
def adobe_rgb() -> bytes:
    """A profile of the Adobe RGB (1998) colour space."""
    return rgb_profile("Compatible with Adobe RGB (1998)", ADOBE_RGB_PRIMARIES, D65, ADOBE_RGB_GAMMA)


@cache
def developed_raw(primaries: str, curve: str) -> bytes | None:
    """The profile of a RAW developed into ``primaries`` (``RawOptions.output_colorspace``: srgb,
    adobe, prophoto; raw: the camera's own, which no profile describes) with tone ``curve``
    (``RawOptions.gamma``: srgb or linear). None for plain sRGB (untagged means sRGB) and for
    the camera's own colour space."""
    spaces = {"srgb": (SRGB_PRIMARIES, D65, "sRGB"), "adobe": (ADOBE_RGB_PRIMARIES, D65, "Adobe RGB (1998)"),
              "prophoto": (PROPHOTO_PRIMARIES, D50, "ProPhoto RGB")}
    if primaries not in spaces or (primaries, curve) == ("srgb", "srgb"):
        return None
    chosen, white, name = spaces[primaries]
    if curve == "linear":
        return rgb_profile(f"{name} primaries, linear", chosen, white, 1.0)
    return rgb_profile(f"{name} primaries, sRGB tone curve", chosen, white, "srgb")


__all__ = ["adobe_rgb", "colorants", "developed_raw", "grey_counterpart", "rgb_counterpart", "rgb_profile"]
