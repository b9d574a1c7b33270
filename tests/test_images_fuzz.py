"""Property-based tests of kpac_cli.images.

* Any bytes given to ``read_image`` / ``probe_size`` either decode to a valid image or raise
  ``ImageError`` (one line, naming ``<stdin>``) -- never another exception type; when both
  succeed, ``probe_size`` gives the decoded image's size.
* Writing integer-valued images and reading them back is bit-exact for every format/depth.
"""

from __future__ import annotations

import io

import numpy as np
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from kpac_cli.images import ImageError, ImageInfo, probe_size, read_image, write_image

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
MAX_PIXELS = 1 << 20  # mutated headers may claim big sizes: keep memory small


def _seeds() -> list[bytes]:
    rng = np.random.default_rng(7)
    # Smooth content so that every PNG filter type and real JPEG coefficients occur.
    y, x = np.mgrid[0:24, 0:20]
    base = np.stack([x * 10, y * 9, (x + y) * 5], axis=-1) + rng.integers(0, 8, (24, 20, 3))
    rgb8 = np.clip(base, 0, 255).astype(np.uint8)
    rgba16 = (np.dstack([rgb8, rgb8[..., :1]]).astype(np.uint16) * 257) ^ rng.integers(0, 64, (24, 20, 4)).astype(np.uint16)
    seeds = []
    buf = io.BytesIO()
    Image.fromarray(rgb8).save(buf, "PNG")
    seeds.append(buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(rgb8).convert("P").save(buf, "PNG", transparency=3)
    seeds.append(buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(rgb8).save(buf, "JPEG", quality=80, exif=Image.Exif().tobytes())
    seeds.append(buf.getvalue())
    info16 = ImageInfo(None, "png", 16, 4, (rgba16[..., 3] / 65535).astype(np.float32), b"icc" * 9,
                       None, 1, (24, 20))
    seeds.append(write_image(None, (rgba16[..., :3] / 65535).astype(np.float32), info16))
    seeds.append(write_image(None, (rgba16[..., :3] / 65535).astype(np.float32), info16, format="tiff"))
    buf = io.BytesIO()
    tifffile.imwrite(buf, rgb8, photometric="rgb", compression="zlib", predictor=True)
    seeds.append(buf.getvalue())
    buf = io.BytesIO()
    tifffile.imwrite(buf, rgb8[..., 0].astype(np.float32) / 255)
    seeds.append(buf.getvalue())
    # rotated by their orientation (5-8 swap the axes): probe_size must agree with read_image
    rotated = Image.Exif()
    rotated[0x0112] = 6
    buf = io.BytesIO()
    # Pillow strips one "Exif\0\0" prefix and tobytes() adds one: the eXIf chunk holds it twice
    Image.fromarray(rgb8).save(buf, "PNG", exif=b"Exif\x00\x00" * 2 + rotated.tobytes())
    seeds.append(buf.getvalue())
    rotated[0x0112] = 8
    buf = io.BytesIO()
    Image.fromarray(rgb8).save(buf, "JPEG", quality=80, exif=rotated.tobytes())
    seeds.append(buf.getvalue())
    buf = io.BytesIO()
    tifffile.imwrite(buf, rgb8, photometric="rgb", extratags=[(274, "H", 1, 5, True)])
    seeds.append(buf.getvalue())
    return seeds


SEEDS = _seeds()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "zero"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            data = data[: max(1, pos)]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "zero":
            data[pos : pos + 4] = b"\x00" * len(data[pos : pos + 4])
    return bytes(data)


MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"II*\x00", b"MM\x00*", b"II+\x00", b""]


def _check(data: bytes) -> None:
    img = None
    try:
        img, info = read_image(data, max_pixels=MAX_PIXELS)
    except ImageError as exc:
        msg = str(exc)
        assert msg.startswith("<stdin>: ") and "\n" not in msg
    else:
        assert img.dtype == np.float32 and img.ndim == 3 and img.shape[2] == 3
        assert img.flags.c_contiguous and np.isfinite(img).all()
        assert img.min() >= 0.0 and img.max() <= 1.0
        assert info.size == img.shape[:2]
        if info.alpha is not None:
            assert info.alpha.shape == img.shape[:2] and 0 <= info.alpha.min() and info.alpha.max() <= 1
    try:
        h, w = probe_size(data)
    except ImageError:
        pass
    else:
        assert h > 0 and w > 0
        if img is not None:  # the header says what the decoder gives
            assert (h, w) == img.shape[:2]


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data):
    _check(data)


@FUZZ
@given(st.sampled_from(MAGICS), st.binary(max_size=400))
def test_random_bytes_behind_magic(magic, data):
    _check(magic + data)


@FUZZ
@given(mutated())
def test_mutated_valid_files(data):
    _check(data)


def test_seeds_are_valid():
    for s in SEEDS:
        _check(s)
        img, info = read_image(s)
        assert img.shape == ((20, 24, 3) if info.orientation_applied in (5, 6, 7, 8) else (24, 20, 3))
    assert sum(read_image(s)[1].orientation_applied != 1 for s in SEEDS) == 3


@settings(max_examples=60, deadline=None, database=None)
@given(
    st.sampled_from([(8, "png"), (16, "png"), (8, "tiff"), (16, "tiff")]),
    st.sampled_from([1, 2, 3, 4]),
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=9),
    st.integers(0, 2**32 - 1),
)
def test_write_read_bit_exact(depth_fmt, channels, shape, seed):
    bits, fmt = depth_fmt
    maxval = (1 << bits) - 1
    a = np.random.default_rng(seed).integers(0, maxval + 1, (*shape, channels))
    color = a[..., : 1 if channels <= 2 else 3].astype(np.float32) / np.float32(maxval)
    if color.shape[2] == 1:
        color = np.repeat(color, 3, axis=2)
    alpha = (a[..., -1].astype(np.float32) / np.float32(maxval)) if channels in (2, 4) else None
    info = ImageInfo(None, fmt, bits, channels, alpha, None, None, 1, shape)
    img, back = read_image(write_image(None, color, info))
    assert (back.bit_depth, back.channels, back.format) == (bits, channels, fmt)
    assert np.array_equal(img, color)
    if alpha is not None:
        assert np.array_equal(back.alpha, alpha)
