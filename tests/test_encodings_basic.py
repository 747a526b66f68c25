# The standard encoders (RFC 6143 section 7.7: Raw, CopyRect, RRE, Hextile,
# ZRLE; rfbproto "zlib Encoding") checked three ways:
#   - round trips through the strict decoders of trivnc.testing.decode.basic
#     (written from the spec, not from the encoders), compared pixel for pixel
#     with what the client's pixel format can represent;
#   - known answers worked out by hand from the spec for tiny inputs (CPIXEL
#     bytes, run lengths, Hextile masks and carry-over);
#   - the decoders' own strictness, so that a passing round trip means the
#     encoder obeyed the rules and not merely that both sides agree.
from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trivnc.encodings.base import RectEncoder
from trivnc.encodings.copyrect import COPY_RECT, encode_copyrect
from trivnc.encodings.hextile import HextileEncoder
from trivnc.encodings.raw import RawEncoder
from trivnc.encodings.rre import RREEncoder, subrect_count
from trivnc.encodings.zlibrect import ZlibEncoder
from trivnc.encodings.zrle import ZRLEEncoder, encode_tiles
from trivnc.geometry import Rect
from trivnc.rfb.constants import Encoding, HextileMask
from trivnc.rfb.errors import RemoteProtocolError
from trivnc.rfb.pixelformat import BGR233, BGRX, RGB565, RGBX, PixelFormat
from trivnc.testing.decode import DecodeState, Needs, run_on_bytes
from trivnc.testing.decode.basic import (
    decode_copyrect,
    decode_hextile,
    decode_raw,
    decode_rre,
    decode_zlib,
    decode_zrle,
)

Image = npt.NDArray[np.uint8]
Decoder = Callable[[DecodeState, Image, Rect], Needs[None]]

FORMATS = {
    "bgrx": BGRX,
    "rgbx": RGBX,
    "bgrx-be": PixelFormat(32, 24, True, True, 255, 255, 255, 16, 8, 0),
    "rgb565": RGB565,
    "rgb565-be": PixelFormat(16, 16, True, True, 31, 63, 31, 11, 5, 0),
    "bgr233": BGR233,
    # Colours in the most significant bytes: ZRLE's CPIXEL is the top three.
    "high-bytes": PixelFormat(32, 24, False, True, 255, 255, 255, 24, 16, 8),
    "high-bytes-be": PixelFormat(32, 24, True, True, 255, 255, 255, 24, 16, 8),
    # Depth 30 does not fit three bytes: CPIXEL is the whole PIXEL.
    "depth30": PixelFormat(32, 30, False, True, 1023, 1023, 1023, 20, 10, 0),
}

SIZES = [(1, 1), (15, 17), (16, 16), (63, 65), (64, 64), (100, 37), (130, 70)]  # (w, h)


@dataclass(frozen=True)
class Codec:
    make: Callable[[], RectEncoder]
    decode: Decoder
    encoding: int


CODECS = {
    "raw": Codec(RawEncoder, decode_raw, Encoding.RAW),
    "rre": Codec(RREEncoder, decode_rre, Encoding.RRE),
    "hextile": Codec(HextileEncoder, decode_hextile, Encoding.HEXTILE),
    "zlib": Codec(ZlibEncoder, decode_zlib, Encoding.ZLIB),
    "zrle": Codec(ZRLEEncoder, decode_zrle, Encoding.ZRLE),
}

# mypy checks that every encoder satisfies the RectEncoder protocol.
_ENCODERS: list[RectEncoder] = [
    RawEncoder(),
    RREEncoder(),
    HextileEncoder(),
    ZlibEncoder(),
    ZRLEEncoder(),
]


# -- content ---------------------------------------------------------------------


def solid(rng: np.random.Generator, h: int, w: int) -> Image:
    img = np.empty((h, w, 4), np.uint8)
    img[...] = rng.integers(0, 256, 4, dtype=np.uint8)
    return img


def text(rng: np.random.Generator, h: int, w: int) -> Image:
    """Two colours in glyph-like blobs: dark ink on a light page."""
    ink = rng.random((h // 3 + 1, w // 2 + 1)) < 0.4
    ink = ink.repeat(3, axis=0).repeat(2, axis=1)[:h, :w] & (rng.random((h, w)) < 0.8)
    img = np.empty((h, w, 4), np.uint8)
    img[...] = (250, 248, 245, 0)
    img[ink] = (20, 30, 40, 0)
    return img


def few_colours(rng: np.random.Generator, h: int, w: int) -> Image:
    """UI-like blocks of up to 9 colours."""
    palette = rng.integers(0, 256, (9, 4), dtype=np.uint8)
    cells = rng.integers(0, 9, (h // 5 + 1, w // 7 + 1))
    return palette[cells.repeat(5, axis=0).repeat(7, axis=1)[:h, :w]]


def noise(rng: np.random.Generator, h: int, w: int) -> Image:
    """Photo-like: every pixel differs, pad byte included."""
    return rng.integers(0, 256, (h, w, 4), dtype=np.uint8)


def gradient(rng: np.random.Generator, h: int, w: int) -> Image:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 4), np.uint8)
    img[..., 0] = (xx * 3) % 256
    img[..., 1] = (yy * 2) % 256
    img[..., 2] = ((xx + yy) // 4) % 256
    return img


CONTENT = {
    "solid": solid,
    "text": text,
    "few": few_colours,
    "noise": noise,
    "gradient": gradient,
}


def strided(img: Image, rng: np.random.Generator) -> Image:
    """The same pixels as a view into a larger frame, as encoders get them."""
    h, w = img.shape[:2]
    frame = rng.integers(0, 256, (h + 9, w + 13, 4), dtype=np.uint8)
    frame[4 : 4 + h, 6 : 6 + w] = img
    view = frame[4 : 4 + h, 6 : 6 + w]
    assert not view.flags.c_contiguous or (h == 1 and w == 1)
    return view


def cases(seed: int) -> Iterator[tuple[str, Image]]:
    rng = np.random.default_rng(seed)
    for w, h in SIZES:
        for name, make in CONTENT.items():
            img = make(rng, h, w)
            yield f"{name} {w}x{h}", img
            yield f"{name} {w}x{h} strided", strided(img, rng)


def representable(img: Image, pf: PixelFormat) -> Image:
    """What a client in this format can hold of these pixels."""
    return pf.values_to_bgrx(pf.pixel_values(img))


def encode(encoder: RectEncoder, img: Image, pf: PixelFormat) -> bytes:
    return b"".join(encoder.encode(img, pf))


# -- round trips -------------------------------------------------------------------


@pytest.mark.parametrize("pf_name", list(FORMATS))
@pytest.mark.parametrize("codec_name", list(CODECS))
def test_round_trip_all_sizes_and_contents(codec_name: str, pf_name: str) -> None:
    """Every rect goes through ONE encoder and ONE decode state in sequence,
    as on a connection, so persistent zlib streams are exercised across 70
    rects. Each lands at an offset in a framebuffer full of a sentinel, which
    must be untouched outside the rect."""
    codec, pf = CODECS[codec_name], FORMATS[pf_name]
    encoder = codec.make()
    assert encoder.encoding == codec.encoding
    state = DecodeState(pf=pf)
    fb = np.full((90, 150, 4), 77, np.uint8)
    for label, img in cases(seed=len(codec_name) * 31 + len(pf_name)):
        h, w = img.shape[:2]
        rect = Rect(150 - w, 90 - h, w, h)
        expected = fb.copy()
        expected[rect.slices()] = representable(img, pf)
        run_on_bytes(codec.decode(state, fb, rect), encode(encoder, img, pf))
        assert np.array_equal(fb, expected), label


@pytest.mark.parametrize("codec_name", list(CODECS))
def test_empty_rects(codec_name: str) -> None:
    codec = CODECS[codec_name]
    encoder = codec.make()
    state = DecodeState(pf=BGRX)
    fb = np.zeros((4, 4, 4), np.uint8)
    for h, w in ((0, 3), (3, 0)):
        run_on_bytes(codec.decode(state, fb, Rect(1, 1, w, h)), encode(encoder, fb[:h, :w], BGRX))
    # The stream is still usable afterwards.
    img = noise(np.random.default_rng(0), 4, 4)
    run_on_bytes(codec.decode(state, fb, Rect(0, 0, 4, 4)), encode(encoder, img, BGRX))
    assert np.array_equal(fb, representable(img, BGRX))


@pytest.mark.parametrize("pf_name", ["bgrx", "rgb565", "high-bytes"])
@pytest.mark.parametrize("codec_name", list(CODECS))
def test_encoders_never_write_the_frame(codec_name: str, pf_name: str) -> None:
    """Frames are shared, read-only, between connections and threads. BGRX
    passes through without a copy, so an in-place mask would corrupt it."""
    rng = np.random.default_rng(6)
    frame = np.concatenate([text(rng, 70, 40), noise(rng, 70, 40)], axis=1)
    before = frame.copy()
    frame.flags.writeable = False  # any write raises
    encode(CODECS[codec_name].make(), frame, FORMATS[pf_name])
    encode(CODECS[codec_name].make(), frame[3:50, 5:70], FORMATS[pf_name])
    assert np.array_equal(frame, before)


def desktop(h: int, w: int) -> Image:
    """A small desktop: wallpaper, a window with a gradient title bar, text,
    a toolbar, and a noisy picture, at sizes that leave partial tiles."""
    rng = np.random.default_rng(5)
    img = np.empty((h, w, 4), np.uint8)
    img[...] = (120, 86, 40, 0)
    img[20:300, 30:500] = (236, 236, 236, 0)
    ramp = np.linspace(0, 255, 470).astype(np.uint8)
    img[20:44, 30:500, 0] = ramp
    img[60:290, 40:480] = text(rng, 230, 440)
    img[44:58, 30:500] = few_colours(rng, 14, 470)
    img[100:260, 520:700] = noise(rng, 160, 180)
    return img


@pytest.mark.parametrize("codec_name", ["rre", "hextile", "zrle"])
def test_desktop_frame_round_trip(codec_name: str) -> None:
    """A bigger frame where all tile forms occur next to each other."""
    codec = CODECS[codec_name]
    img = desktop(333, 725)
    fb = np.zeros_like(img)
    run_on_bytes(
        codec.decode(DecodeState(pf=RGBX), fb, Rect(0, 0, 725, 333)),
        encode(codec.make(), img, RGBX),
    )
    assert np.array_equal(fb, representable(img, RGBX))


@st.composite
def small_images(draw: st.DrawFn) -> Image:
    h = draw(st.integers(1, 40))
    w = draw(st.integers(1, 40))
    ncolours = draw(st.sampled_from([1, 2, 3, 5, 17, 200]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (ncolours, 4), dtype=np.uint8)
    # Runs of random lengths, so RLE, subrects and raw all come up.
    index = np.repeat(rng.integers(0, ncolours, h * w), rng.integers(1, 9, h * w))[: h * w]
    return palette[index.reshape(h, w)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    images=st.lists(small_images(), min_size=1, max_size=4),
    codec_name=st.sampled_from(list(CODECS)),
    pf_name=st.sampled_from(list(FORMATS)),
)
def test_random_images_round_trip(images: list[Image], codec_name: str, pf_name: str) -> None:
    codec, pf = CODECS[codec_name], FORMATS[pf_name]
    encoder = codec.make()
    state = DecodeState(pf=pf)
    for img in images:
        h, w = img.shape[:2]
        fb = np.zeros((h, w, 4), np.uint8)
        run_on_bytes(codec.decode(state, fb, Rect(0, 0, w, h)), encode(encoder, img, pf))
        assert np.array_equal(fb, representable(img, pf))


# -- Raw, CopyRect, RRE, zlib: known answers --------------------------------------------


def scale(value: int, cmax: int) -> int:
    """An 8-bit channel in a cmax-deep one, rounded (as test_pixelformat)."""
    return (value * cmax + 127) // 255


def rgb565(r: int, g: int, b: int) -> int:
    return scale(r, 31) << 11 | scale(g, 63) << 5 | scale(b, 31)


def test_raw_known_bytes() -> None:
    img = np.array([[[1, 2, 3, 0], [40, 50, 60, 0]]], np.uint8)  # BGRX
    assert encode(RawEncoder(), img, RGBX) == bytes([3, 2, 1, 0, 60, 50, 40, 0])
    assert encode(RawEncoder(), img, RGB565) == (
        rgb565(3, 2, 1).to_bytes(2, "little") + rgb565(60, 50, 40).to_bytes(2, "little")
    )


def test_copyrect() -> None:
    assert COPY_RECT is Encoding.COPY_RECT
    assert int(COPY_RECT) == 1
    payload = b"".join(encode_copyrect(258, 7))
    assert payload == bytes([1, 2, 0, 7])
    fb = np.arange(6 * 5 * 4, dtype=np.uint8).reshape(5, 6, 4)
    expected = fb.copy()
    expected[1:4, 2:6] = fb[0:3, 1:5]  # overlapping source and destination
    run_on_bytes(
        decode_copyrect(DecodeState(), fb, Rect(2, 1, 4, 3)), b"".join(encode_copyrect(1, 0))
    )
    assert np.array_equal(fb, expected)
    with pytest.raises(ValueError):
        encode_copyrect(65536, 0)
    with pytest.raises(RemoteProtocolError):
        run_on_bytes(decode_copyrect(DecodeState(), fb, Rect(0, 0, 2, 2)), bytes([0, 5, 0, 0]))


def test_rre_background_is_most_common_and_box_is_one_subrect() -> None:
    img = np.zeros((40, 50, 4), np.uint8)
    img[...] = (9, 9, 9, 0)
    img[5:25, 10:30] = (1, 2, 3, 0)  # one box
    payload = encode(RREEncoder(), img, RGBX)
    assert payload == (
        bytes([0, 0, 0, 1, 9, 9, 9, 0])  # one subrect, background
        + bytes([3, 2, 1, 0, 0, 10, 0, 5, 0, 20, 0, 20])  # PIXEL, x, y, w, h
    )
    assert subrect_count(img, RGBX) == 1


def test_rre_subrects_stay_bounded_for_text() -> None:
    """Row runs merged vertically: never more subrects than non-background
    row runs, and identical rows collapse into one subrect."""
    rng = np.random.default_rng(3)
    img = text(rng, 60, 80)
    keys = RGBX.pixel_values(img)
    runs = 1 + np.count_nonzero(keys[:, 1:] != keys[:, :-1], axis=1)
    assert subrect_count(img, RGBX) <= int(runs.sum())
    stripes = np.zeros((30, 40, 4), np.uint8)
    stripes[:, ::4] = 200  # ten vertical lines
    assert subrect_count(stripes, RGBX) == 10


def test_zlib_uses_one_stream_with_sync_flush() -> None:
    encoder = ZlibEncoder()
    img = noise(np.random.default_rng(1), 20, 30)
    chunks = [encode(encoder, img, BGRX) for _ in range(3)]
    for chunk in chunks:
        assert int.from_bytes(chunk[:4], "big") == len(chunk) - 4
        assert chunk.endswith(b"\x00\x00\xff\xff")  # Z_SYNC_FLUSH marker
    # Only the first rect carries the zlib header; the second one alone is
    # not a valid stream, so the client must keep one stream.
    assert chunks[0][4] == 0x78 and chunks[1][4] != 0x78
    with pytest.raises(zlib.error):
        zlib.decompressobj().decompress(chunks[1][4:])
    stream = zlib.decompressobj()
    for chunk in chunks:
        assert stream.decompress(chunk[4:]) == BGRX.encode_pixels(img).tobytes()
    # Noise does not compress on its own; the repeat does, by referring back
    # to the earlier rects in the shared stream.
    assert len(chunks[2]) < len(chunks[0]) // 2


def test_zlib_decoder_rejects_a_rect_that_inflates_too_far() -> None:
    data = zlib.compress(bytes(4 * 4 * 5))  # five pixels' worth for a 2x2 rect
    payload = len(data).to_bytes(4, "big") + data
    with pytest.raises(RemoteProtocolError):
        run_on_bytes(
            decode_zlib(DecodeState(), np.zeros((2, 2, 4), np.uint8), Rect(0, 0, 2, 2)), payload
        )


# -- ZRLE ---------------------------------------------------------------------------


def zrle_tiles(payloads: list[bytes]) -> list[bytes]:
    """Inflate ZRLE payloads the way a client does: one stream for all."""
    stream = zlib.decompressobj()
    out = []
    for payload in payloads:
        assert int.from_bytes(payload[:4], "big") == len(payload) - 4
        out.append(stream.decompress(payload[4:]))
    return out


@pytest.mark.parametrize(
    ("pf_name", "cpixel"),
    [
        # BGRX in memory, little-endian, colours in the low bytes: B, G, R.
        ("bgrx", bytes([0x33, 0x22, 0x11])),
        # RGBX: R, G, B.
        ("rgbx", bytes([0x11, 0x22, 0x33])),
        # Big-endian 0x00RRGGBB: the last three wire bytes.
        ("bgrx-be", bytes([0x11, 0x22, 0x33])),
        # Little-endian 0xRRGGBB00 = wire 00 BB GG RR: the last three.
        ("high-bytes", bytes([0x33, 0x22, 0x11])),
        # Big-endian 0xRRGGBB00 = wire RR GG BB 00: the first three.
        ("high-bytes-be", bytes([0x11, 0x22, 0x33])),
        # Depth 30: all four bytes, channels scaled to 10 bits.
        (
            "depth30",
            (scale(0x11, 1023) << 20 | scale(0x22, 1023) << 10 | scale(0x33, 1023)).to_bytes(
                4, "little"
            ),
        ),
        ("rgb565", rgb565(0x11, 0x22, 0x33).to_bytes(2, "little")),
        ("rgb565-be", rgb565(0x11, 0x22, 0x33).to_bytes(2, "big")),
    ],
)
def test_zrle_cpixel_bytes(pf_name: str, cpixel: bytes) -> None:
    """A solid tile is subencoding 1 then one CPIXEL: this pins down which
    bytes the CPIXEL keeps for each kind of format."""
    img = np.empty((5, 7, 4), np.uint8)
    img[...] = (0x33, 0x22, 0x11, 0xEE)  # B, G, R and a non-zero pad byte
    pf = FORMATS[pf_name]
    assert encode_tiles(img, pf) == bytes([1]) + cpixel
    # And through the persistent stream too.
    assert zrle_tiles([encode(ZRLEEncoder(), img, pf)]) == [bytes([1]) + cpixel]


def test_zrle_subencoding_choices() -> None:
    """Each kind of tile takes the form that the spec makes smallest."""
    rng = np.random.default_rng(4)
    tiles = {
        "solid": solid(rng, 64, 64),
        "text": text(rng, 64, 64),  # two colours, many runs: packed 1 bit
        # 9 colours at random: short runs, so packed 4 bits
        "few": rng.integers(0, 256, (9, 4), dtype=np.uint8)[rng.integers(0, 9, (64, 64))],
        "noise": noise(rng, 64, 64),  # thousands of colours: raw
        "rows": gradient(rng, 64, 64)[:, :1].repeat(64, axis=1),  # a colour per row
        "halves": np.concatenate([solid(rng, 64, 32), solid(rng, 64, 32)], axis=1),
    }
    img = np.concatenate(list(tiles.values()), axis=1)
    seen: list[int] = []
    fb = np.zeros_like(img)
    run_on_bytes(
        decode_zrle(
            DecodeState(pf=RGBX),
            fb,
            Rect(0, 0, img.shape[1], 64),
            on_tile=lambda _r, sub: seen.append(sub),
        ),
        encode(ZRLEEncoder(), img, RGBX),
    )
    assert np.array_equal(fb, representable(img, RGBX))
    ncolours = len(np.unique(RGBX.pixel_values(tiles["few"])))
    assert seen == [
        1,  # solid
        2,  # packed palette of 2
        ncolours,  # packed palette of 9
        0,  # raw
        128,  # plain RLE: 64 runs of 64 in 64 colours beats a 64-entry palette
        128 + 2,  # palette RLE: 128 runs of 32 in 2 colours beats 512 bytes packed
    ]
    assert ncolours == 9


def runs_tile(*runs: tuple[tuple[int, int, int], int]) -> Image:
    """A 64x64 tile of (BGR colour, length) runs in pixel order."""
    img = np.zeros((64 * 64, 4), np.uint8)
    at = 0
    for colour, length in runs:
        img[at : at + length, :3] = colour
        at += length
    assert at == 64 * 64
    return img.reshape(64, 64, 4)


A, B = (1, 2, 3), (4, 5, 6)
CA, CB = bytes([3, 2, 1]), bytes([6, 5, 4])  # their RGBX CPIXELs


def test_zrle_run_lengths_plain_rle() -> None:
    """Run length = 1 + the sum of its bytes, 255 meaning "more follows":
    300 -> [255, 44]; 3796 -> fourteen 255s, then 225. Two long runs cost 23
    bytes as plain RLE and 25 as palette RLE."""
    tile = encode_tiles(runs_tile((A, 300), (B, 3796)), RGBX)
    assert tile == bytes([128]) + CA + bytes([255, 44]) + CB + bytes([255] * 14 + [225])


def test_zrle_run_lengths_palette_rle() -> None:
    """Index with the top bit set, then the length: 3196 -> twelve 255s, 135."""
    tile = encode_tiles(runs_tile((A, 300), (B, 300), (A, 300), (B, 3196)), RGBX)
    assert tile == (
        bytes([128 + 2])
        + CA
        + CB
        + bytes([0 | 128, 255, 44, 1 | 128, 255, 44, 0 | 128, 255, 44])
        + bytes([1 | 128] + [255] * 12 + [135])
    )


def test_zrle_single_pixel_runs_in_palette_rle() -> None:
    """A run of one is the bare index, without the top bit."""
    img = runs_tile((A, 1), (B, 2047), (A, 1), (B, 2047))
    tile = encode_tiles(img, RGBX)
    assert tile[:7] == bytes([130]) + CA + CB
    assert tile[7:] == bytes([0, 1 | 128, 255, 255, 255, 255, 255, 255, 255, 255, 6]) * 2


def test_zrle_packed_rows_are_padded() -> None:
    """Packed indices are MSB first and each row starts on a byte."""
    img = np.zeros((2, 10, 4), np.uint8)
    img[...] = (0, 0, 0, 0)
    img[0, ::2] = (255, 255, 255, 0)  # row 0: 1010101010, row 1: 0000000000
    # A rect only 2x10: packed 1-bit is 2 * 2 bytes against 10 runs.
    payload = encode_tiles(img, RGBX)
    white, black = bytes([255, 255, 255]), bytes([0, 0, 0])
    assert payload == bytes([2]) + white + black + bytes([0b01010101, 0b01000000, 0xFF, 0xC0])


def test_zrle_stream_persists_across_rects() -> None:
    encoder = ZRLEEncoder()
    img = noise(np.random.default_rng(2), 40, 40)
    payloads = [encode(encoder, img, BGRX) for _ in range(3)]
    tiles = zrle_tiles(payloads)
    assert tiles[0] == tiles[1] == tiles[2] == encode_tiles(img, BGRX)
    assert payloads[1][4] != 0x78  # no second zlib header
    assert len(payloads[2]) < len(payloads[0]) // 2


def zrle_payload(tile_stream: bytes) -> bytes:
    data = zlib.compress(tile_stream)
    return len(data).to_bytes(4, "big") + data


@pytest.mark.parametrize(
    "tile_stream",
    [
        bytes([17]),  # unused subencoding
        bytes([129]),  # unused subencoding
        bytes([128, 1, 2, 3, 4]),  # plain RLE run of 5 in a 2x2 tile
        bytes([130, 1, 2, 3, 4, 5, 6, 2, 0, 0, 0]),  # palette index 2 of 2
        bytes([1, 1, 2, 3, 0]),  # a byte after the last tile
        bytes([0, 1, 2]),  # raw tile cut short
    ],
)
def test_zrle_decoder_rejects(tile_stream: bytes) -> None:
    fb = np.zeros((2, 2, 4), np.uint8)
    with pytest.raises(RemoteProtocolError):
        run_on_bytes(
            decode_zrle(DecodeState(pf=RGBX), fb, Rect(0, 0, 2, 2)), zrle_payload(tile_stream)
        )


# -- Hextile --------------------------------------------------------------------------

WHITE = (255, 255, 255, 0)
BLACK = (0, 0, 0, 0)
RED = (0, 0, 255, 0)


def mono_tile(rng: np.random.Generator) -> Image:
    tile = np.empty((16, 16, 4), np.uint8)
    tile[...] = WHITE
    tile[rng.random((16, 16)) < 0.2] = BLACK
    return tile


def hextile_masks(img: Image, pf: PixelFormat = RGBX) -> list[int]:
    """Encode, decode strictly, check the pixels, return the tile masks."""
    h, w = img.shape[:2]
    masks: list[int] = []
    fb = np.zeros_like(img)
    run_on_bytes(
        decode_hextile(
            DecodeState(pf=pf), fb, Rect(0, 0, w, h), on_tile=lambda _r, mask: masks.append(mask)
        ),
        encode(HextileEncoder(), img, pf),
    )
    assert np.array_equal(fb, representable(img, pf))
    return masks


BG, FG, ANY, COLOURED, RAW = (
    HextileMask.BACKGROUND_SPECIFIED,
    HextileMask.FOREGROUND_SPECIFIED,
    HextileMask.ANY_SUBRECTS,
    HextileMask.SUBRECTS_COLOURED,
    HextileMask.RAW,
)


def test_hextile_carry_over_rules() -> None:
    """A row of tiles: mono, raw, mono, coloured, mono, solid, mono, all on a
    white background with black foreground. Expected masks, from rfbproto:
    the first tile specifies bg and fg; after the raw tile both must be sent
    again; the coloured tile keeps the background; after it the foreground
    must be sent again; the solid tile keeps everything; the last mono tile
    gets its foreground through the solid tile."""
    rng = np.random.default_rng(8)
    coloured = mono_tile(rng)
    coloured[3:6, 3:9] = RED
    tiles = [
        mono_tile(rng),
        noise(rng, 16, 16),
        mono_tile(rng),
        coloured,
        mono_tile(rng),
        np.full((16, 16, 4), WHITE, np.uint8),
        mono_tile(rng),
    ]
    masks = hextile_masks(np.concatenate(tiles, axis=1))
    assert masks == [
        BG | FG | ANY,
        RAW,
        BG | FG | ANY,
        ANY | COLOURED,
        FG | ANY,
        0,
        ANY,
    ]


def test_hextile_rects_do_not_share_state() -> None:
    """Every rect starts over: its first non-raw tile specifies the
    background even if the previous rect ended on the same colour."""
    encoder = HextileEncoder()
    img = solid(np.random.default_rng(0), 16, 32)
    first = encode(encoder, img, RGBX)
    second = encode(encoder, img, RGBX)
    assert first == second == bytes([BG]) + bytes(img[0, 0, 2::-1]) + b"\x00" + bytes([0])


def test_hextile_picks_raw_for_noise_and_subrects_for_text() -> None:
    rng = np.random.default_rng(9)
    img = np.concatenate([noise(rng, 16, 16), mono_tile(rng), few_colours(rng, 16, 16)], axis=1)
    masks = hextile_masks(img)
    assert masks[0] == RAW
    assert masks[1] & ANY and not masks[1] & (RAW | COLOURED)
    assert masks[2] & COLOURED


def test_hextile_partial_tiles() -> None:
    """The last column and row of tiles are smaller; 33x18 has 3x2 tiles."""
    rng = np.random.default_rng(10)
    seen: list[Rect] = []
    img = text(rng, 18, 33)
    fb = np.zeros_like(img)
    run_on_bytes(
        decode_hextile(
            DecodeState(pf=BGRX), fb, Rect(0, 0, 33, 18), on_tile=lambda r, _m: seen.append(r)
        ),
        encode(HextileEncoder(), img, BGRX),
    )
    assert [(r.w, r.h) for r in seen] == [(16, 16), (16, 16), (1, 16), (16, 2), (16, 2), (1, 2)]


def hextile_payload(*tiles: bytes) -> bytes:
    return b"".join(tiles)


W4, K4 = bytes([255, 255, 255, 0]), bytes(4)


@pytest.mark.parametrize(
    "payload",
    [
        # A mask bit that Hextile does not define.
        hextile_payload(bytes([BG | 0x20]) + W4, bytes([0]), bytes([0])),
        # First tile without a background.
        hextile_payload(bytes([ANY]) + bytes([1, 0x00, 0x00])),
        # Foreground after a raw tile.
        hextile_payload(
            bytes([BG | FG | ANY]) + W4 + K4 + bytes([1, 0, 0]),
            bytes([RAW]) + W4 * 256,
            bytes([BG | ANY]) + W4 + bytes([1, 0, 0]),
        ),
        # Background after a raw tile.
        hextile_payload(bytes([BG]) + W4, bytes([RAW]) + W4 * 256, bytes([0])),
        # Foreground after a SubrectsColoured tile.
        hextile_payload(
            bytes([BG | FG | ANY]) + W4 + K4 + bytes([1, 0, 0]),
            bytes([ANY | COLOURED]) + bytes([1]) + K4 + bytes([0, 0]),
            bytes([ANY]) + bytes([1, 0, 0]),
        ),
        # ForegroundSpecified together with SubrectsColoured.
        hextile_payload(
            bytes([BG | FG | ANY | COLOURED]) + W4 + K4 + bytes([1]) + K4 + bytes([0, 0])
        ),
        # A subrect past the tile's edge (16x16 tile, x=8, w=9).
        hextile_payload(
            bytes([BG | FG | ANY]) + W4 + K4 + bytes([1, 0x80, 0x80]), bytes([0]), bytes([0])
        ),
    ],
)
def test_hextile_decoder_rejects(payload: bytes) -> None:
    """The rules the round trips rely on are really checked."""
    fb = np.zeros((16, 48, 4), np.uint8)
    with pytest.raises(RemoteProtocolError):
        run_on_bytes(decode_hextile(DecodeState(pf=BGRX), fb, Rect(0, 0, 48, 16)), payload)


def test_hextile_decoder_carries_foreground_through_a_solid_tile() -> None:
    payload = hextile_payload(
        bytes([BG | FG | ANY]) + W4 + K4 + bytes([1, 0x00, 0x00]),
        bytes([0]),  # solid: no subrects, passes the foreground on
        bytes([ANY]) + bytes([1, 0x11, 0x00]),  # x=1, y=1, 1x1 in the foreground
    )
    fb = np.zeros((16, 48, 4), np.uint8)
    run_on_bytes(decode_hextile(DecodeState(pf=BGRX), fb, Rect(0, 0, 48, 16)), payload)
    expected = np.zeros_like(fb)
    expected[...] = (255, 255, 255, 0)
    expected[0, 0] = expected[1, 33] = 0
    assert np.array_equal(fb, expected)
