"""HDR gain-map JPEGs (Android Ultra HDR, Adobe, Apple, ISO 21496-1): read as the single photo they
are, the gain map said to be dropped only when the file holds one, and no output's XMP declaring
a gain map (or a motion photo's video) that it does not hold."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from kpac_cli.images import read_image, write_image
from kpac_cli.images.metadata import declares_gain_map, without_secondary_media

XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
ISO_URN = b"urn:iso:std:iso:ts:21496:-1\x00"
RDF = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       b"%s</rdf:RDF></x:xmpmeta>")
#: What the primary picture of an Ultra HDR photo says (the spec's example), with a caption beside it.
ULTRA_HDR_PRIMARY = RDF % (
    b'<rdf:Description xmlns:Container="http://ns.google.com/photos/1.0/container/"\n'
    b' xmlns:Item="http://ns.google.com/photos/1.0/container/item/"\n'
    b' xmlns:hdrgm="http://ns.adobe.com/hdr-gain-map/1.0/"\n'
    b' hdrgm:Version="1.0">\n'
    b"<Container:Directory><rdf:Seq>\n"
    b'<rdf:li rdf:parseType="Resource"><Container:Item Item:Semantic="Primary" Item:Mime="image/jpeg"/></rdf:li>\n'
    b'<rdf:li rdf:parseType="Resource"><Container:Item Item:Semantic="GainMap" Item:Mime="image/jpeg" '
    b'Item:Length="1000"/></rdf:li>\n'
    b"</rdf:Seq></Container:Directory></rdf:Description>\n"
    b'<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:subject><rdf:Bag>'
    b"<rdf:li>GainMap</rdf:li><rdf:li>harbour</rdf:li></rdf:Bag></dc:subject></rdf:Description>"
)
#: ULTRA_HDR_PRIMARY as it must be written without the gain map: the rest byte for byte.
ULTRA_HDR_PRIMARY_WITHOUT = RDF % (
    b'<rdf:Description xmlns:Container="http://ns.google.com/photos/1.0/container/"\n'
    b' xmlns:Item="http://ns.google.com/photos/1.0/container/item/"\n\n>\n'  # one blank went with each attribute
    b"<Container:Directory><rdf:Seq>\n"
    b'<rdf:li rdf:parseType="Resource"><Container:Item Item:Semantic="Primary" Item:Mime="image/jpeg"/></rdf:li>\n'
    b"\n"
    b"</rdf:Seq></Container:Directory></rdf:Description>\n"
    b'<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:subject><rdf:Bag>'
    b"<rdf:li>GainMap</rdf:li><rdf:li>harbour</rdf:li></rdf:Bag></dc:subject></rdf:Description>"
)
#: The gain map picture's own XMP: Adobe's / Ultra HDR's, and Apple's (iPhone JPEGs).
ADOBE_GAIN_MAP = RDF % (b'<rdf:Description xmlns:hdrgm="http://ns.adobe.com/hdr-gain-map/1.0/" hdrgm:Version="1.0" '
                        b'hdrgm:GainMapMax="2.3" hdrgm:HDRCapacityMax="2.3"/>')
APPLE_GAIN_MAP = RDF % (
    b'<rdf:Description rdf:about="" xmlns:HDRGainMap="http://ns.apple.com/HDRGainMap/1.0/" '
    b'xmlns:apdi="http://ns.apple.com/pixeldatainfo/1.0/">'
    b"<HDRGainMap:HDRGainMapVersion>131072</HDRGainMap:HDRGainMapVersion>"
    b"<apdi:AuxiliaryImageType>urn:com:apple:photo:2020:aux:hdrgainmap</apdi:AuxiliaryImageType></rdf:Description>"
)

PHOTO = np.random.default_rng(11).integers(0, 256, (32, 48, 3), dtype=np.uint8)


def segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def xmp_segment(xmp: bytes) -> bytes:
    return segment(0xE1, XMP_HEADER + xmp)


def iso_segment(metadata: bytes = b"") -> bytes:
    """ISO 21496-1 APP2: the version (minimum and writer's, 0) then, in a gain map, the metadata."""
    return segment(0xE2, ISO_URN + bytes(4) + metadata)


def jpeg(pixels: np.ndarray, segments=()) -> bytes:
    """A JPEG as Pillow writes it, with ``segments`` added after its own header segments."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    pos = 2
    while data[pos + 1] in range(0xE0, 0xF0):
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
    return data[:pos] + b"".join(segments) + data[pos:]


def mp_index(pictures: list[tuple[int, int, int]], endian: str) -> bytes:
    """An MPF APP2 payload listing ``(attribute, size, offset)`` pictures (CIPA DC-007)."""
    header = (b"II*\x00" if endian == "<" else b"MM\x00*") + struct.pack(endian + "I", 8)
    table_at = 8 + 2 + 3 * 12 + 4
    directory = struct.pack(endian + "H", 3)
    directory += struct.pack(endian + "HHI", 0xB000, 7, 4) + b"0100"  # MPFVersion
    directory += struct.pack(endian + "HHII", 0xB001, 4, 1, len(pictures))  # NumberOfImages
    directory += struct.pack(endian + "HHII", 0xB002, 7, 16 * len(pictures), table_at)  # MPEntry
    directory += struct.pack(endian + "I", 0)
    table = b"".join(struct.pack(endian + "IIIHH", attribute, size, offset, 0, 0) for attribute, size, offset in pictures)
    return b"MPF\x00" + header + directory + table


def multi_picture_jpeg(primary_segments=(), others=(), endian: str = "<") -> bytes:
    """A photo as phones write one: the primary JPEG with an MP index (MPF APP2) listing the
    ``others`` (``(MP type, JPEG bytes)``) appended after it."""

    def primary(offsets: list[int], size: int) -> bytes:
        listed = [(0x20030000, size, 0)] + [(mp_type, len(data), at) for (mp_type, data), at in zip(others, offsets)]
        return jpeg(PHOTO, [*primary_segments, segment(0xE2, mp_index(listed, endian))])

    size = len(primary([0] * len(others), 0))  # offsets do not change the length
    index_start = primary([0] * len(others), 0).index(b"MPF\x00") + 4  # offsets count from here
    offsets, at = [], size
    for _mp_type, data in others:
        offsets.append(at - index_start)
        at += len(data)
    first = primary(offsets, size)
    assert len(first) == size
    return first + b"".join(data for _mp_type, data in others)


def gain_map_picture(segments=()) -> tuple[int, bytes]:
    return 0, jpeg(np.full((8, 12), 140, np.uint8), segments)  # MP type Undefined, as Ultra HDR writes it


def primary_pixels() -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg(PHOTO))))


def deblur_notes(info) -> list[str]:
    """What ``kpac deblur`` says of what a JPEG output does not keep of an input described by ``info``."""
    from kpac_cli.engine.batch import Job, OutputOptions, _what_is_not_kept

    return _what_is_not_kept(Job("in", Path("in.jpg"), Path("out.jpg"), "in.jpg", "jpeg"), info, OutputOptions())


GAIN_MAP_JPEGS = {
    # ISO 21496-1 alone (libultrahdr 1.1+): the version in the primary, the metadata in the gain map
    "iso": lambda endian: multi_picture_jpeg([iso_segment()], [gain_map_picture([iso_segment(b"\x01" * 40)])], endian),
    "iso-in-gain-map-only": lambda endian: multi_picture_jpeg([], [gain_map_picture([iso_segment(b"\x01" * 40)])], endian),
    # Apple: the gain map picture's XMP alone says what it is
    "apple": lambda endian: multi_picture_jpeg([], [gain_map_picture([xmp_segment(APPLE_GAIN_MAP)])], endian),
    # Adobe: the gain map picture's hdrgm XMP alone
    "adobe": lambda endian: multi_picture_jpeg([], [gain_map_picture([xmp_segment(ADOBE_GAIN_MAP)])], endian),
    # Ultra HDR with both forms (Pillow opens it as a plain JPEG), a large thumbnail beside it
    "ultra-hdr": lambda endian: multi_picture_jpeg(
        [xmp_segment(ULTRA_HDR_PRIMARY), iso_segment()],
        [gain_map_picture([xmp_segment(ADOBE_GAIN_MAP), iso_segment(b"\x01" * 40)]),
         (0x010001, jpeg(PHOTO[::2, ::2].copy()))],
        endian,
    ),
}


@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize("kind", GAIN_MAP_JPEGS)
def test_a_gain_map_jpeg_reads_as_the_one_photo_it_is(kind, endian):
    data = GAIN_MAP_JPEGS[kind](endian)
    img, info = read_image(data)
    assert info.frames == 1 and info.hdr_gain_map_dropped
    assert np.array_equal(np.round(img * 255).astype(np.uint8), primary_pixels())  # the SDR picture
    notes = deblur_notes(info)
    assert any("HDR gain map was dropped" in n for n in notes)
    assert not any("frames" in n for n in notes)


def test_other_pictures_beside_a_gain_map_are_still_frames():
    second_view = (0x020002, jpeg(PHOTO[:, ::-1].copy()))  # a stereo pair's other view
    data = multi_picture_jpeg([], [second_view, gain_map_picture([iso_segment(b"\x01" * 40)])])
    _img, info = read_image(data)
    assert info.frames == 2 and info.hdr_gain_map_dropped


def apple_auxiliary(kind: bytes) -> tuple[int, bytes]:
    """An auxiliary picture of an iPhone JPEG (a depth map, a matte), as its XMP describes it."""
    xmp = RDF % (b'<rdf:Description rdf:about="" xmlns:apdi="http://ns.apple.com/pixeldatainfo/1.0/">'
                 b"<apdi:AuxiliaryImageType>%s</apdi:AuxiliaryImageType></rdf:Description>" % kind)
    return 0, jpeg(np.full((8, 12), 90, np.uint8), [xmp_segment(xmp)])


def test_an_iphone_portrait_s_depth_and_matte_are_no_frames():
    data = multi_picture_jpeg([], [gain_map_picture([xmp_segment(APPLE_GAIN_MAP)]), apple_auxiliary(b"disparity"),
                                   apple_auxiliary(b"urn:com:apple:photo:2018:aux:portraiteffectsmatte")])
    _img, info = read_image(data)
    assert info.frames == 1 and info.hdr_gain_map_dropped
    assert not any("frames" in n for n in deblur_notes(info))


def test_a_picture_of_no_declared_kind_is_a_frame():
    data = multi_picture_jpeg([], [gain_map_picture()])  # nothing says it is a gain map
    _img, info = read_image(data)
    assert info.frames == 2 and not info.hdr_gain_map_dropped


def test_a_gain_map_declared_but_not_held_is_not_said_to_be_dropped():
    # kpac's output of an HDR photo before it removed the declaration: the XMP alone, no MP index
    data = jpeg(PHOTO, [xmp_segment(ULTRA_HDR_PRIMARY)])
    _img, info = read_image(data)
    assert info.frames == 1 and not info.hdr_gain_map_dropped
    assert not any("gain map" in n for n in deblur_notes(info))


@pytest.mark.parametrize("ext", ["jpg", "png", "tif"])
def test_outputs_do_not_declare_the_gain_map_they_do_not_hold(tmp_path, ext):
    img, info = read_image(GAIN_MAP_JPEGS["ultra-hdr"]("<"))
    assert info.xmp == ULTRA_HDR_PRIMARY  # read as it is
    out = tmp_path / f"out.{ext}"
    write_image(out, img, info)
    if ext == "tif":  # the packet as stored (tag 700), not only as read back
        with tifffile.TiffFile(out) as tif:
            assert tif.pages.first.tags[700].value == ULTRA_HDR_PRIMARY_WITHOUT
    again, info2 = read_image(out)
    assert info2.xmp == ULTRA_HDR_PRIMARY_WITHOUT  # the rest of the XMP byte for byte
    assert not declares_gain_map(info2.xmp)
    assert info2.frames == 1 and not info2.hdr_gain_map_dropped
    if ext == "jpg":  # nor a gain map segment of another kind
        assert ISO_URN not in out.read_bytes() and b"MPF\x00" not in out.read_bytes()


@pytest.mark.parametrize(
    "xmp,kept",
    [
        # the attribute form under another prefix, in single quotes
        (RDF % b"<rdf:Description xmlns:gm='http://ns.adobe.com/hdr-gain-map/1.0/' gm:Version='1.0' rdf:about=''/>",
         RDF % b"<rdf:Description rdf:about=''/>"),
        # the element forms, a self-closed one, and a property of another namespace between them
        (RDF % b'<rdf:Description xmlns:hdrgm="http://ns.adobe.com/hdr-gain-map/1.0/" '
               b'xmlns:tiff="http://ns.adobe.com/tiff/1.0/"><hdrgm:Version>1.0</hdrgm:Version>'
               b"<tiff:Make>Pixel</tiff:Make><hdrgm:GainMapMin><rdf:Seq><rdf:li>0</rdf:li></rdf:Seq></hdrgm:GainMapMin>"
               b'<hdrgm:BaseRenditionIsHDR rdf:resource=""/></rdf:Description>',
         RDF % b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/"><tiff:Make>Pixel</tiff:Make></rdf:Description>'),
        # Apple's namespace
        (APPLE_GAIN_MAP,
         RDF % b'<rdf:Description rdf:about="" xmlns:apdi="http://ns.apple.com/pixeldatainfo/1.0/">'
               b"<apdi:AuxiliaryImageType>urn:com:apple:photo:2020:aux:hdrgainmap</apdi:AuxiliaryImageType></rdf:Description>"),
        # a GContainer item whose semantic is an element
        (RDF % b"<Container:Directory><rdf:Seq><rdf:li><Container:Item><Item:Semantic>Primary</Item:Semantic></Container:Item>"
               b"</rdf:li><rdf:li><Container:Item><Item:Semantic>GainMap</Item:Semantic></Container:Item></rdf:li>"
               b"</rdf:Seq></Container:Directory>",
         RDF % b"<Container:Directory><rdf:Seq><rdf:li><Container:Item><Item:Semantic>Primary</Item:Semantic></Container:Item>"
               b"</rdf:li></rdf:Seq></Container:Directory>"),
    ],
)
def test_without_secondary_media_removes_the_declaration_and_nothing_else(xmp, kept):
    assert declares_gain_map(xmp)
    assert without_secondary_media(xmp) == kept
    assert not declares_gain_map(kept)


def test_a_motion_photo_s_video_is_not_declared_by_outputs(tmp_path):
    # a Pixel motion photo: the video is appended after the JPEG, found by the directory's Item:Length
    motion = RDF % (
        b'<rdf:Description xmlns:GCamera="http://ns.google.com/photos/1.0/camera/" '
        b'xmlns:Container="http://ns.google.com/photos/1.0/container/" '
        b'xmlns:Item="http://ns.google.com/photos/1.0/container/item/" GCamera:MotionPhoto="1" '
        b'GCamera:MotionPhotoVersion="1" GCamera:MotionPhotoPresentationTimestampUs="968644" GCamera:SpecialTypeID="p">'
        b'<Container:Directory><rdf:Seq><rdf:li rdf:parseType="Resource"><Container:Item Item:Mime="image/jpeg" '
        b'Item:Semantic="Primary" Item:Length="0" Item:Padding="0"/></rdf:li><rdf:li rdf:parseType="Resource">'
        b'<Container:Item Item:Mime="video/mp4" Item:Semantic="MotionPhoto" Item:Length="2337"/></rdf:li>'
        b"</rdf:Seq></Container:Directory></rdf:Description>"
    )
    kept = RDF % (
        b'<rdf:Description xmlns:GCamera="http://ns.google.com/photos/1.0/camera/" '
        b'xmlns:Container="http://ns.google.com/photos/1.0/container/" '
        b'xmlns:Item="http://ns.google.com/photos/1.0/container/item/" GCamera:SpecialTypeID="p">'
        b'<Container:Directory><rdf:Seq><rdf:li rdf:parseType="Resource"><Container:Item Item:Mime="image/jpeg" '
        b'Item:Semantic="Primary" Item:Length="0" Item:Padding="0"/></rdf:li>'
        b"</rdf:Seq></Container:Directory></rdf:Description>"
    )
    video = b"\x00\x00\x00\x18ftypmp42" + bytes(2325)
    img, info = read_image(jpeg(PHOTO, [xmp_segment(motion)]) + video)
    assert info.xmp == motion and info.motion_photo_dropped and not info.hdr_gain_map_dropped
    assert deblur_notes(info) == ["the motion photo's video was dropped: the output is the still picture"]
    write_image(tmp_path / "out.jpg", img, info)
    again = read_image(tmp_path / "out.jpg")[1]
    assert again.xmp == kept and not again.motion_photo_dropped and deblur_notes(again) == []


def test_without_secondary_media_leaves_other_packets_as_they_are():
    plain = RDF % (b'<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:subject><rdf:Bag>'
                   b"<rdf:li>GainMap</rdf:li></rdf:Bag></dc:subject></rdf:Description>")
    assert not declares_gain_map(plain)
    assert without_secondary_media(plain) is plain


def test_without_secondary_media_takes_linear_time_on_hostile_packets():
    # unclosed elements and items made each start scan to the packet's end: a 60 kB packet took
    # seconds, the megabytes a TIFF or PNG may carry would never finish
    code = (
        "from kpac_cli.images.metadata import without_secondary_media as w\n"
        "ns = b'xmlns:hdrgm=\"http://ns.adobe.com/hdr-gain-map/1.0/\" '\n"
        "w(ns + b'<hdrgm:a>' * 250_000)\n"
        "w(b'Semantic <rdf:li>' + b\":Semantic='X' \" * 150_000)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_outputs_do_not_point_to_extended_xmp_they_do_not_hold(tmp_path):
    # a portrait from a Pixel: the depth map and the original picture are in extended XMP
    # segments, which no output holds; the main packet's pointer and descriptions must go
    portrait = RDF % (
        b'<rdf:Description rdf:about="" xmlns:xmpNote="http://ns.adobe.com/xmp/note/" '
        b'xmlns:GDepth="http://ns.google.com/photos/1.0/depthmap/" xmlns:GImage="http://ns.google.com/photos/1.0/image/" '
        b'xmlns:dc="http://purl.org/dc/elements/1.1/" xmpNote:HasExtendedXMP="7F4A2C1E9B3D5F60718293A4B5C6D7E8" '
        b'GDepth:Format="RangeInverse" GDepth:Near="0.5" GDepth:Far="4.2" GDepth:Mime="image/jpeg" '
        b'GImage:Mime="image/jpeg"><dc:title>harbour</dc:title></rdf:Description>'
    )
    kept = RDF % (b'<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/">'
                  b"<dc:title>harbour</dc:title></rdf:Description>")
    img, info = read_image(jpeg(PHOTO, [xmp_segment(portrait)]))
    write_image(tmp_path / "out.png", img, info)
    assert read_image(tmp_path / "out.png")[1].xmp == kept


@pytest.mark.parametrize("xmp, said", [
    (b'<rdf:Description GCamera:MotionPhoto="1"/>', True),
    (b"<GCamera:MicroVideo>1</GCamera:MicroVideo>", True),  # the older form, as an element
    (b'<Container:Item Item:Semantic="MotionPhoto" Item:Mime="video/mp4"/>', True),
    (b'<rdf:Description GCamera:MotionPhoto="0"/>', False),  # a still, said so
    (b"<dc:title>MotionPhoto 1</dc:title>", False),
])
def test_a_motion_photo_is_told_by_its_xmp(xmp, said):
    from kpac_cli.images.metadata import declares_motion_photo

    assert declares_motion_photo(xmp) is said


def test_outputs_xmp_says_the_size_written(tmp_path):
    # turned upright on read, the photo is 32 wide and 48 high; its XMP said the stored 48 x 32
    stored = RDF % (b'<rdf:Description xmlns:exif="http://ns.adobe.com/exif/1.0/" xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
                    b'exif:PixelXDimension="48" exif:PixelYDimension="32" tiff:Orientation="6">'
                    b"<tiff:ImageWidth>48</tiff:ImageWidth><tiff:ImageLength> 32 </tiff:ImageLength></rdf:Description>")
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(PHOTO).save(buf, "JPEG", quality=95, exif=exif.tobytes(), xmp=stored)
    img, info = read_image(buf.getvalue())
    assert img.shape[:2] == (48, 32)
    write_image(tmp_path / "out.png", img, info)
    assert read_image(tmp_path / "out.png")[1].xmp == RDF % (
        b'<rdf:Description xmlns:exif="http://ns.adobe.com/exif/1.0/" xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
        b'exif:PixelXDimension="32" exif:PixelYDimension="48" tiff:Orientation="1">'
        b"<tiff:ImageWidth>32</tiff:ImageWidth><tiff:ImageLength> 48 </tiff:ImageLength></rdf:Description>")
