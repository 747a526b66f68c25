"""Pixel-format conversion from the internal BGRX frame, checked against a
per-pixel reference written from RFC 6143 section 7.4."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trivnc.rfb.errors import RemoteProtocolError
from trivnc.rfb.pixelformat import BGR233, BGRX, RGB565, RGBX, PixelFormat

FORMATS = [
    BGRX,
    RGBX,
    RGB565,
    BGR233,
    PixelFormat(32, 24, True, True, 255, 255, 255, 16, 8, 0),
    PixelFormat(32, 24, False, True, 255, 255, 255, 24, 16, 8),  # colours in the high bytes
    PixelFormat(16, 15, True, True, 31, 31, 31, 10, 5, 0),
    PixelFormat(32, 30, False, True, 1023, 1023, 1023, 20, 10, 0),
]


def reference_pixel(pf: PixelFormat, b: int, g: int, r: int) -> bytes:
    def scale(v: int, cmax: int) -> int:
        return (v * cmax + 127) // 255

    value = (
        scale(r, pf.red_max) << pf.red_shift
        | scale(g, pf.green_max) << pf.green_shift
        | scale(b, pf.blue_max) << pf.blue_shift
    )
    return value.to_bytes(pf.bytes_per_pixel, "big" if pf.big_endian else "little")


@pytest.mark.parametrize("pf", FORMATS, ids=str)
def test_encode_matches_reference(pf: PixelFormat) -> None:
    rng = np.random.default_rng(1)
    bgrx = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    bgrx[..., 3] = 0
    wire = pf.encode_pixels(bgrx).tobytes()
    expected = b"".join(
        reference_pixel(pf, *map(int, bgrx[y, x, :3])) for y in range(5) for x in range(7)
    )
    assert wire == expected


@pytest.mark.parametrize("pf", FORMATS, ids=str)
def test_round_trip_is_exact_at_the_formats_precision(pf: PixelFormat) -> None:
    rng = np.random.default_rng(2)
    bgrx = rng.integers(0, 256, (9, 4, 4), dtype=np.uint8)
    wire = pf.encode_pixels(bgrx)
    back = pf.decode_pixels(wire.tobytes(), 9, 4)
    assert np.array_equal(back, pf.values_to_bgrx(pf.pixel_values(bgrx)))
    if pf.red_max == pf.green_max == pf.blue_max == 255:
        assert np.array_equal(back[..., :3], bgrx[..., :3])


def test_strided_views_convert() -> None:
    frame = np.random.default_rng(3).integers(0, 256, (40, 50, 4), dtype=np.uint8)
    view = frame[5:20, 7:30]
    for pf in FORMATS:
        assert np.array_equal(pf.encode_pixels(view), pf.encode_pixels(view.copy()))


@pytest.mark.parametrize(
    "fields",
    [
        (24, 24, 0, 1, 255, 255, 255, 16, 8, 0),  # 24 bpp is not a wire format
        (8, 8, 0, 0, 7, 7, 3, 0, 3, 6),  # colour map
        (16, 16, 0, 1, 30, 63, 31, 11, 5, 0),  # max not 2**n - 1
        (16, 16, 0, 1, 31, 63, 31, 12, 5, 0),  # red overflows 16 bits
    ],
)
def test_invalid_formats_refused(fields: tuple[int, ...]) -> None:
    bpp, depth, be, tc, rm, gm, bm, rs, gs, bs = fields
    with pytest.raises(RemoteProtocolError):
        PixelFormat(bpp, depth, bool(be), bool(tc), rm, gm, bm, rs, gs, bs)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=16, max_size=16))
def test_unpack_never_raises_anything_else(data: bytes) -> None:
    try:
        pf = PixelFormat.unpack(data)
    except RemoteProtocolError:
        return
    assert PixelFormat.unpack(pf.pack()) == pf
