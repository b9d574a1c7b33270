"""Which page of a TIFF is read (the full image, not a preview or thumbnail written before
it), and which pages or pictures count as frames of their own."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import tifffile
from PIL import Image

from kpac_cli.images import ImageError, pair_dual_pixel, probe_size, read_image, read_image_codes
from kpac_cli.images.io import _probe_depth

FULL_ICC = b"full-page profile " * 8
PREVIEW_ICC = b"preview profile " * 8


def full_image(shape=(24, 36, 3)) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 65536, shape, dtype=np.uint16)


def make_tag(make: bytes) -> list[tuple]:
    return [(271, "s", 0, make, True)]


def preview_first_tiff(full: np.ndarray, **full_kw) -> bytes:
    """A TIFF whose page 0 is an 8-bit reduced-resolution preview, the full image page 1."""
    preview = np.zeros((full.shape[0] // 4, full.shape[1] // 4, 3), np.uint8)
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        tw.write(preview, photometric="rgb", subfiletype=1, iccprofile=PREVIEW_ICC, extratags=make_tag(b"Preview"))
        tw.write(full, photometric="rgb", **full_kw)
    return buf.getvalue()


def test_the_full_image_is_read_not_a_preview_written_first():
    full = full_image()
    data = preview_first_tiff(full, iccprofile=FULL_ICC, extratags=[*make_tag(b"Full"), (274, "H", 1, 6, True)])
    img, info = read_image(data)
    turned = np.rot90(full, -1)  # Orientation 6 of the full page, applied
    assert img.shape == turned.shape and info.bit_depth == 16
    assert np.array_equal(np.round(img * 65535).astype(np.uint16), turned)
    assert info.frames == 1  # the preview is no image of its own
    assert info.icc_profile == FULL_ICC  # metadata of the page read
    assert b"Full" in info.exif and b"Preview" not in info.exif
    assert info.orientation_applied == 6
    # the header probes (the dual-pixel pairing's among them) see the same page
    assert probe_size(data) == turned.shape[:2]
    assert _probe_depth(data) == (turned.shape[:2], 16)
    codes, depth = read_image_codes(data)
    assert depth == 16 and np.array_equal(codes, turned)


def test_a_full_image_in_a_subifd_of_the_preview_is_read():
    full = full_image()
    preview = (full[::4, ::4] >> 8).astype(np.uint8)
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        tw.write(preview, photometric="rgb", subfiletype=1, subifds=1)
        tw.write(full, photometric="rgb")  # the SubIFD of page 0
    img, info = read_image(buf.getvalue())
    assert info.size == full.shape[:2] and info.bit_depth == 16 and info.frames == 1
    assert np.array_equal(np.round(img * 65535).astype(np.uint16), full)
    assert _probe_depth(buf.getvalue()) == (full.shape[:2], 16)


def test_a_pyramid_reads_its_full_resolution_level():
    full = full_image()
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        tw.write(full, photometric="rgb", subifds=1)
        tw.write(full[::2, ::2], photometric="rgb", subfiletype=1)
    img, info = read_image(buf.getvalue())
    assert info.size == full.shape[:2] and info.frames == 1


def test_a_tiff_holding_only_a_preview_is_read_as_it_is():
    small = full_image((6, 9, 3))
    buf = io.BytesIO()
    tifffile.imwrite(buf, small, photometric="rgb", subfiletype=1)
    img, info = read_image(buf.getvalue())
    assert info.size == (6, 9) and info.frames == 1


def test_later_pages_after_a_preview_are_counted_without_it():
    full = full_image()
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        tw.write(full[::4, ::4], photometric="rgb", subfiletype=1)
        tw.write(full, photometric="rgb")
        tw.write(full[::-1], photometric="rgb")
    img, info = read_image(buf.getvalue())
    assert info.frames == 2 and np.array_equal(np.round(img * 65535).astype(np.uint16), full)


def test_the_pixel_limit_holds_for_the_page_read_not_the_preview():
    full = full_image((40, 60, 3))
    data = preview_first_tiff(full)
    with pytest.raises(ImageError, match=r"too large: 60x40"):
        read_image(data, max_pixels=1000)  # the 10x15 preview fits, the full page does not
    wide = preview_first_tiff(full.astype(np.float64) / 65535)  # 24 bytes a pixel
    with pytest.raises(ImageError, match=r"too large to decode: 60x40"):
        read_image(wide, max_pixels=40 * 60)


def test_a_dual_pixel_view_with_a_preview_pairs_by_its_full_image(tmp_path):
    full = full_image()
    (tmp_path / "left.tif").write_bytes(preview_first_tiff(full))
    tifffile.imwrite(tmp_path / "right.tif", full, photometric="rgb")  # no preview
    (triple,) = pair_dual_pixel(tmp_path / "left.tif", tmp_path / "right.tif")
    assert read_image(triple.left)[1].size == read_image(triple.right)[1].size == full.shape[:2]


def test_a_preview_page_s_exif_is_not_taken_for_the_full_image_s():
    full = full_image()
    data = preview_first_tiff(full)  # only the preview has a Make tag
    _img, info = read_image(data)
    assert b"Preview" not in (info.exif or b"")


def mpo_with_second_picture(mp_type: int) -> bytes:
    """A two-picture MPO (as Pillow writes it) whose second picture has MP Type ``mp_type``."""
    photo = Image.fromarray(np.random.default_rng(3).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    buf = io.BytesIO()
    photo.save(buf, "MPO", save_all=True, append_images=[photo.resize((24, 16))])
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        second = im.mpinfo[0xB002][1]
    entry = struct.pack("<LLLHH", 0, second["Size"], second["DataOffset"], 0, 0)  # Pillow's: type Undefined
    assert data.count(entry) == 1
    return data.replace(entry, struct.pack("<L", mp_type) + entry[4:])


@pytest.mark.parametrize("mp_type,frames", [(0x010001, 1), (0x010002, 1), (0x020002, 2)])
def test_a_camera_jpeg_s_large_thumbnail_is_no_other_frame(mp_type, frames):
    data = mpo_with_second_picture(mp_type)
    img, info = read_image(data)
    assert info.size == (32, 48) and info.frames == frames  # a stereo pair's second view does count


RDF = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">%s</rdf:RDF></x:xmpmeta>'
#: Primary-image XMP of gain-map JPEGs: Ultra HDR's attribute (which Pillow spots itself, and opens
#: the file as a plain JPEG), Adobe's namespace as an element, a GContainer directory alone.
GAIN_MAP_XMP = {
    "ultra-hdr": RDF % b'<rdf:Description xmlns:hdrgm="http://ns.adobe.com/hdr-gain-map/1.0/" hdrgm:Version="1.0"/>',
    "hdrgm-element": RDF % b'<rdf:Description xmlns:hdrgm="http://ns.adobe.com/hdr-gain-map/1.0/">'
    b"<hdrgm:Version>1.0</hdrgm:Version></rdf:Description>",
    "gcontainer": RDF % b'<rdf:Description xmlns:Container="http://ns.google.com/photos/1.0/container/" '
    b'xmlns:Item="http://ns.google.com/photos/1.0/container/item/"><Container:Directory><rdf:Seq>'
    b'<rdf:li rdf:parseType="Resource"><Container:Item Item:Semantic="Primary" Item:Mime="image/jpeg"/></rdf:li>'
    b'<rdf:li rdf:parseType="Resource"><Container:Item Item:Semantic="GainMap" Item:Mime="image/jpeg"/></rdf:li>'
    b"</rdf:Seq></Container:Directory></rdf:Description>",
}


def deblur_notes(info, fmt: str = "jpeg") -> list[str]:
    """What ``kpac deblur`` says of what the output does not keep of an input described by ``info``."""
    from pathlib import Path

    from kpac_cli.engine.batch import Job, OutputOptions, _what_is_not_kept

    return _what_is_not_kept(Job("in", Path("in.jpg"), Path(f"out.{fmt}"), "in.jpg", fmt), info, OutputOptions())


@pytest.mark.parametrize("kind", [*GAIN_MAP_XMP, None])
def test_an_hdr_gain_map_is_no_frame_and_its_loss_is_said(kind):
    # a primary JPEG, its XMP, and an MPF index pointing at the gain map appended after it
    photo = Image.fromarray(np.random.default_rng(5).integers(0, 256, (16, 24, 3), dtype=np.uint8))
    xmp = {} if kind is None else {"xmp": GAIN_MAP_XMP[kind]}
    buf = io.BytesIO()
    photo.save(buf, "MPO", save_all=True, append_images=[Image.new("L", (6, 4), 128)], **xmp)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert im.info["mp"]  # the MP index is there, however Pillow opens the file
    img, info = read_image(buf.getvalue())
    assert img.shape == (16, 24, 3)
    notes = deblur_notes(info)
    said = [n for n in notes if "HDR gain map was dropped" in n]
    if kind is None:  # a plain two-picture MPO: its second picture is a frame
        assert info.frames == 2 and not said and any("first of 2 frames" in n for n in notes)
    else:
        assert info.frames == 1 and len(said) == 1 and "SDR" in said[0]
        assert not any("frames" in n for n in notes)
