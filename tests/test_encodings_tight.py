# Tight (rfbproto "Tight Encoding") and TightPNG ("Tight PNG Encoding"), with
# KasmVNC's WebP and QOI rects: every rect trivnc's encoder writes is decoded by
# trivnc.testing.decode.tight, which was written from the spec, and compared
# pixel for pixel (lossless paths) or by PSNR (JPEG, WebP). Byte layouts the
# spec fixes (compact lengths, fill TPIXELs, palette bits, the gradient
# residuals, ctl bits) are also checked against values worked out here by hand.
from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trivnc.encodings import tight
from trivnc.encodings.tight import (
    MAX_COMPACT_LENGTH,
    QOI_MAX_BYTES_PER_PIXEL,
    TightEncoder,
    TightMethod,
    TightSettings,
    encode_compact_length,
    qoi_bytes_per_pixel,
)
from trivnc.geometry import Rect
from trivnc.rfb.constants import (
    JPEG_QUALITY_TABLE,
    Encoding,
    PseudoEncoding,
    Subsampling,
)
from trivnc.rfb.errors import LocalProtocolError, RemoteProtocolError
from trivnc.rfb.pixelformat import BGR233, BGRX, RGB565, RGBX, PixelFormat
from trivnc.testing.decode import DecodeState, run_on_bytes
from trivnc.testing.decode.tight import decode_tight, read_compact_length
from trivnc.testing.images import psnr

Image = npt.NDArray[np.uint8]

BGRX_BE = PixelFormat(32, 24, True, True, 255, 255, 255, 16, 8, 0)
RGB565_BE = PixelFormat(16, 16, True, True, 31, 63, 31, 11, 5, 0)
FORMATS = {
    "bgrx": BGRX,
    "rgbx": RGBX,
    "bgrx-be": BGRX_BE,
    "rgb565": RGB565,
    "rgb565-be": RGB565_BE,
    "bgr233": BGR233,
}
SIZES = [(1, 1), (7, 3), (15, 17), (63, 65), (100, 37), (300, 200)]


# -- helpers -------------------------------------------------------------------------


def expected(pf: PixelFormat, src: Image) -> Image:
    """What a client in pf holds after a lossless rect: src at pf's precision."""
    return pf.values_to_bgrx(pf.pixel_values(src))


def in_frame(img: Image, dx: int = 3, dy: int = 5) -> Image:
    """img as a strided view into a larger frame, as the scheduler passes it."""
    h, w = img.shape[:2]
    frame = np.full((h + dy + 4, w + dx + 9, 4), 77, np.uint8)
    frame[dy : dy + h, dx : dx + w] = img
    view = frame[dy : dy + h, dx : dx + w]
    assert not view.flags.c_contiguous or h == 1
    return view


def decode(
    payload: list[bytes],
    rect: Rect,
    state: DecodeState,
    fb: Image | None = None,
    *,
    png: bool = False,
) -> Image:
    if fb is None:
        fb = np.zeros((rect.bottom, rect.right, 4), np.uint8)
    run_on_bytes(decode_tight(state, fb, rect, png=png), b"".join(payload))
    return fb[rect.slices()]


def round_trip(
    src: Image,
    pf: PixelFormat,
    method: TightMethod = TightMethod.AUTO,
    settings_: TightSettings | None = None,
) -> tuple[Image, DecodeState, list[bytes]]:
    settings_ = settings_ or TightSettings()
    enc = TightEncoder(settings_)
    payload = enc.encode(src, pf, method)
    state = DecodeState(pf=pf)
    h, w = src.shape[:2]
    out = decode(payload, Rect(0, 0, w, h), state, png=settings_.png_mode)
    return out, state, payload


def bgrx(rgb: tuple[int, int, int]) -> tuple[int, int, int, int]:
    return (rgb[2], rgb[1], rgb[0], 0)


def noise(h: int, w: int, seed: int = 0) -> Image:
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    img[..., 3] = 0
    return img


def photo(h: int, w: int, seed: int = 0) -> Image:
    """Smooth, many colours, some grain: what JPEG and the gradient are for."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 4), np.uint8)
    for c in range(3):
        wave = 128 + 70 * np.sin(x / (13 + 4 * c) + y / 19) + 30 * np.cos(y / (7 + c))
        img[..., c] = np.clip(wave + rng.normal(0, 3, (h, w)), 0, 255).astype(np.uint8)
    return img


def with_colours(h: int, w: int, n: int, seed: int = 0) -> Image:
    """A picture of exactly min(n, h*w) distinct colours. Up to 256 of them
    stay distinct in every test pixel format (BGR233 has 8 reds, 8 greens and
    4 blues); more are distinct in 24-bit formats only."""
    rng = np.random.default_rng(seed)
    blue_step = 64 if n <= 256 else 16
    levels = [
        (r, g, b)
        for r in range(0, 256, 36)
        for g in range(0, 256, 32)
        for b in range(0, 256, blue_step)
    ]
    palette = np.array([bgrx(c) for c in levels[:n]], np.uint8)
    count = min(n, h * w)
    idx = np.concatenate([np.arange(count), rng.integers(0, count, h * w - count)])
    rng.shuffle(idx)
    out: Image = palette[idx].reshape(h, w, 4)
    return out


def image_of(payload: list[bytes], ctl: int = 0x90) -> bytes:
    data = b"".join(payload)
    assert data[0] == ctl
    length = run_on_bytes(read_compact_length(), data[1:4], exact=False)
    head = len(encode_compact_length(length))
    body = data[1 + head :]
    assert len(body) == length
    return body


def jpeg_segments(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(marker, segment body) up to the start of scan."""
    assert data[:2] == b"\xff\xd8"
    pos = 2
    while pos < len(data):
        assert data[pos] == 0xFF
        marker = data[pos + 1]
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        yield marker, data[pos + 4 : pos + 2 + length]
        if marker == 0xDA:
            return
        pos += 2 + length


def jpeg_sampling(data: bytes) -> list[tuple[int, int]]:
    """(h, v) sampling factors per component, from SOF0."""
    for marker, body in jpeg_segments(data):
        if marker == 0xC0:
            n = body[5]
            return [(body[6 + 3 * i + 1] >> 4, body[6 + 3 * i + 1] & 15) for i in range(n)]
    raise AssertionError("no SOF0")


def jpeg_luma_table(data: bytes) -> list[int]:
    for marker, body in jpeg_segments(data):
        if marker == 0xDB:
            assert body[0] == 0  # 8-bit precision, table 0
            return list(body[1:65])
    raise AssertionError("no DQT")


# ITU-T T.81 Annex K.1 luminance table, as libjpeg scales it by quality.
ANNEX_K_LUMA = [
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
]  # fmt: skip


def libjpeg_luma(quality: int) -> list[int]:
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return [min(255, max(1, (q * scale + 50) // 100)) for q in ANNEX_K_LUMA]


# -- compact lengths ------------------------------------------------------------------


def test_compact_length_example_from_rfbproto() -> None:
    assert encode_compact_length(10000) == b"\x90\x4e"


@pytest.mark.parametrize(
    ("value", "size"),
    [(0, 1), (1, 1), (127, 1), (128, 2), (16383, 2), (16384, 3), (4194303, 3)],
)
def test_compact_length_round_trips(value: int, size: int) -> None:
    data = encode_compact_length(value)
    assert len(data) == size
    assert run_on_bytes(read_compact_length(), data) == value


@pytest.mark.parametrize("value", [-1, MAX_COMPACT_LENGTH + 1])
def test_compact_length_out_of_range(value: int) -> None:
    with pytest.raises(LocalProtocolError):
        encode_compact_length(value)


@given(st.integers(0, MAX_COMPACT_LENGTH))
def test_compact_length_any_value(value: int) -> None:
    assert run_on_bytes(read_compact_length(), encode_compact_length(value)) == value


# -- lossless round trips, every format and size ---------------------------------------


def content(kind: str, h: int, w: int) -> Image:
    if kind == "fill":
        return np.broadcast_to(np.array(bgrx((200, 100, 7)), np.uint8), (h, w, 4)).copy()
    if kind == "palette2":
        return with_colours(h, w, 2, seed=h * w)
    if kind == "palette17":
        return with_colours(h, w, 17, seed=h + w)
    return photo(h, w, seed=h)


LOSSLESS = [
    ("fill", TightMethod.FILL, "fill"),
    ("palette2", TightMethod.PALETTE, "palette"),
    ("palette17", TightMethod.PALETTE, "palette"),
    ("photo", TightMethod.COPY, "copy"),
    ("photo", TightMethod.GRADIENT, "gradient"),
    ("photo", TightMethod.QOI, "qoi"),
    ("photo", TightMethod.PNG, "png"),
    ("palette17", TightMethod.PNG, "png"),
    ("palette2", TightMethod.PNG, "png"),
    ("fill", TightMethod.PNG, "png"),
    ("fill", TightMethod.PALETTE, "palette"),
    ("palette2", TightMethod.AUTO, None),
    ("palette17", TightMethod.AUTO, None),
    ("photo", TightMethod.AUTO, None),
]


@pytest.mark.parametrize(("kind", "method", "name"), LOSSLESS, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("pf_name", list(FORMATS))
def test_lossless_round_trip(
    pf_name: str, size: tuple[int, int], kind: str, method: TightMethod, name: str | None
) -> None:
    pf = FORMATS[pf_name]
    w, h = size
    if method is TightMethod.GRADIENT and pf.bits_per_pixel == 8:
        pytest.skip("the gradient filter is for 16 and 32 bpp")
    if method is TightMethod.QOI and pf.bits_per_pixel == 8:
        pytest.skip("QOI carries RGB, for 16 and 32 bpp clients")
    src = in_frame(content(kind, h, w))
    config = TightSettings(png_mode=method is TightMethod.PNG, allow_qoi=method is TightMethod.QOI)
    out, state, _ = round_trip(src, pf, method, config)
    assert np.array_equal(out, expected(pf, src))
    if name is not None:
        assert state.tight_kinds == {name: 1}
    assert state.lossy_rects == 0


def test_lossless_keeps_full_precision_in_rgb888() -> None:
    src = noise(9, 13)
    for method in (TightMethod.COPY, TightMethod.GRADIENT):
        out, _, _ = round_trip(src, RGBX, method)
        assert np.array_equal(out[..., :3], src[..., :3])


def test_column_strided_view() -> None:
    """A view whose pixels are not adjacent (every 2nd column) still encodes."""
    big = photo(40, 80)
    view = big[:, ::2]
    for method in (TightMethod.COPY, TightMethod.PALETTE, TightMethod.AUTO):
        src = with_colours(40, 80, 5)[:, ::2] if method is TightMethod.PALETTE else view
        out, _, _ = round_trip(src, BGRX, method)
        assert np.array_equal(out, expected(BGRX, src))
    config = TightSettings(quality_level=9)
    out, _, payload = round_trip(view, BGRX, TightMethod.JPEG, config)
    contiguous = TightEncoder(config).encode(np.ascontiguousarray(view), BGRX, TightMethod.JPEG)
    assert payload == contiguous
    assert psnr(out, view) > 35


def test_pad_byte_is_ignored() -> None:
    """The X byte of BGRX is padding: it must not split colours."""
    src = with_colours(16, 16, 2)
    src[::2, :, 3] = 255
    out, state, _ = round_trip(src, BGRX)
    assert state.tight_kinds == {"palette": 1}
    assert np.array_equal(out[..., :3], src[..., :3])
    solid = np.zeros((8, 8, 4), np.uint8)
    solid[..., 3] = np.arange(64).reshape(8, 8)
    _, state, payload = round_trip(solid, BGRX)
    assert payload == [b"\x80\x00\x00\x00"]


# -- byte layouts worked out from rfbproto --------------------------------------------


def test_fill_is_a_three_byte_rgb_tpixel_for_rgb888() -> None:
    src = np.broadcast_to(np.array(bgrx((1, 2, 3)), np.uint8), (4, 5, 4))
    for pf in (BGRX, RGBX, BGRX_BE):
        assert TightEncoder().encode(src, pf) == [b"\x80\x01\x02\x03"]


def test_fill_is_a_pixel_otherwise() -> None:
    src = np.broadcast_to(np.array(bgrx((255, 0, 255)), np.uint8), (4, 5, 4))
    # RGB565: red 31 << 11 | blue 31 = 0xF81F
    assert TightEncoder().encode(src, RGB565) == [b"\x80\x1f\xf8"]
    assert TightEncoder().encode(src, RGB565_BE) == [b"\x80\xf8\x1f"]


def test_small_mono_rect_is_sent_raw_with_msb_first_padded_rows() -> None:
    a, b = bgrx((10, 20, 30)), bgrx((200, 210, 220))
    src = np.array([[a, b, b], [b, a, a]], np.uint8)  # 3 wide: rows pad to a byte
    payload = b"".join(TightEncoder().encode(src, BGRX))
    # ctl: stream 1, explicit filter, no reset bit (no zlib data); filter 1;
    # 2 colours; TPIXELs; then 2 bytes (< 12: raw), bit set = colour 1.
    assert payload == bytes([0x50, 1, 1, 10, 20, 30, 200, 210, 220, 0b01100000, 0b10000000])


def test_indexed_palette_uses_stream_2_and_one_byte_a_pixel() -> None:
    src = with_colours(8, 8, 5)
    enc = TightEncoder()
    payload = b"".join(enc.encode(src, BGRX, TightMethod.PALETTE))
    assert payload[0] == 0x60 | 0x04  # stream 2, filter follows, reset bit 2
    assert payload[1:3] == bytes([1, 4])
    palette = np.frombuffer(payload[3:18], np.uint8).reshape(5, 3)
    length = run_on_bytes(read_compact_length(), payload[18:20], exact=False)
    head = 18 + len(encode_compact_length(length))
    indices = np.frombuffer(zlib.decompressobj().decompress(payload[head:]), np.uint8)
    assert indices.size == 64
    rebuilt = palette[indices].reshape(8, 8, 3)
    assert np.array_equal(rebuilt, src[..., 2::-1])


def test_gradient_residuals_by_hand() -> None:
    # One row of three RGB pixels: prediction is the left pixel (up is 0).
    row = np.array([[bgrx((10, 200, 0)), bgrx((20, 100, 255)), bgrx((5, 90, 0))]], np.uint8)
    payload = b"".join(TightEncoder().encode(row, BGRX, TightMethod.GRADIENT))
    # 9 bytes < 12: raw. ctl 0x70 = stream 3 + explicit filter; filter 2.
    residuals = [10, 200, 0, 10, (100 - 200) % 256, 255, (5 - 20) % 256, (90 - 100) % 256, 1]
    assert payload == bytes([0x70, 2, *residuals])


def test_gradient_prediction_is_clamped() -> None:
    # R channel: left 200 + up 200 - upleft 10 = 390, clamped to 255;
    # G channel: 0 + 0 - 250 = -250, clamped to 0.
    src = np.array(
        [[bgrx((10, 250, 0)), bgrx((200, 0, 0))], [bgrx((200, 0, 0)), bgrx((250, 7, 0))]],
        np.uint8,
    )
    payload = b"".join(TightEncoder().encode(src, BGRX, TightMethod.GRADIENT))
    assert payload[:2] == bytes([0x70 | 0x08, 2])  # first use of stream 3: reset bit
    length = payload[2]
    residuals = zlib.decompressobj().decompress(payload[3 : 3 + length])
    assert residuals[9:12] == bytes([(250 - 255) % 256, 7, 0])


def test_data_under_12_bytes_is_raw_and_12_is_compressed() -> None:
    enc = TightEncoder()
    eleven = enc.encode(noise(1, 3), BGRX, TightMethod.COPY)  # 9 bytes of RGB
    assert len(b"".join(eleven)) == 1 + 9
    assert eleven[0][0] & 0x0F == 0  # no zlib data, so no reset bit
    twelve = enc.encode(noise(2, 2), BGRX, TightMethod.COPY)
    data = b"".join(twelve)
    assert data[0] & 0x0F != 0  # the first zlib data on its stream
    length = data[1]
    assert len(data) == 2 + length
    assert zlib.decompressobj().decompress(data[2:]) == noise(2, 2)[..., 2::-1].tobytes()


def test_copy_streams_follow_the_content() -> None:
    enc = TightEncoder()
    ui = np.zeros((40, 300, 4), np.uint8)
    ui[..., 0] = np.arange(300) % 256  # 300 colours, every row the same
    ui[..., 1] = np.arange(300) // 256
    assert enc.encode(ui, BGRX)[0][0] & 0x30 == 0x00  # LZ-friendly: stream 0
    assert enc.encode(noise(40, 300), BGRX)[0][0] & 0x30 == 0x30  # photo: stream 3


# -- persistent streams and reset bits ------------------------------------------------


def test_reset_bits_on_first_use_and_after_reset_streams() -> None:
    enc = TightEncoder()
    rgb = noise(16, 16)
    two = with_colours(16, 16, 2)
    ctl = [enc.encode(rgb, BGRX, TightMethod.COPY)[0][0] for _ in range(2)]
    assert ctl == [0x38, 0x30]  # noise is photo-like: stream 3, reset bit 3 first
    assert enc.encode(two, BGRX)[0][0] == 0x50 | 0x02
    assert enc.encode(two, BGRX)[0][0] == 0x50
    enc.reset_streams()
    assert enc.encode(two, BGRX)[0][0] == 0x50 | 0x02
    assert enc.encode(two, BGRX)[0][0] == 0x50
    again = enc.encode(rgb, BGRX, TightMethod.COPY)[0][0]
    assert again & 0x0F == 1 << (again >> 4 & 3)


def test_streams_persist_across_rects() -> None:
    """The second rect on a stream continues the first one's zlib stream: a
    decoder that has not seen the first cannot read it."""
    enc = TightEncoder()
    first = enc.encode(noise(16, 16, 1), BGRX, TightMethod.COPY)
    second = enc.encode(noise(16, 16, 2), BGRX, TightMethod.COPY)
    rect = Rect(0, 0, 16, 16)
    fresh = DecodeState()
    with pytest.raises(RemoteProtocolError):
        decode(second, rect, fresh)
    state = DecodeState()
    decode(first, rect, state)
    assert np.array_equal(decode(second, rect, state), noise(16, 16, 2) & [255, 255, 255, 0])


def test_many_rects_through_one_pair() -> None:
    """Mixed rects, formats of stream use, and a reset half-way, all through
    one encoder and one decoder, into one framebuffer."""
    rng = np.random.default_rng(5)
    frame = photo(120, 160)
    frame[:60, :80] = with_colours(60, 80, 2)
    frame[60:, :80] = with_colours(60, 80, 40)
    frame[:60, 80:] = (9, 8, 7, 0)
    enc = TightEncoder(TightSettings(allow_gradient=True))
    state = DecodeState()
    fb = np.zeros_like(frame)
    quadrants = [Rect(0, 0, 80, 60), Rect(0, 60, 80, 60), Rect(80, 0, 80, 60), Rect(80, 60, 80, 60)]
    rects = [*quadrants, Rect(0, 0, 160, 120)]
    for _ in range(50):
        x, y = int(rng.integers(0, 150)), int(rng.integers(0, 110))
        rects.append(Rect(x, y, int(rng.integers(1, 161 - x)), int(rng.integers(1, 121 - y))))
    for i, rect in enumerate(rects + quadrants):
        if i == 30:
            enc.reset_streams()
        payload = enc.encode(frame[rect.slices()], BGRX)
        run_on_bytes(decode_tight(state, fb, rect, png=False), b"".join(payload))
        assert np.array_equal(fb[rect.slices()], frame[rect.slices()])
    assert set(state.tight_kinds) >= {"palette", "copy", "gradient", "fill"}


def test_a_new_encoder_resets_the_clients_streams() -> None:
    """After a pixel-format change the scheduler replaces the encoder: the new
    one must tell the client to drop its inflaters' history."""
    state = DecodeState()
    rect = Rect(0, 0, 32, 32)
    old = TightEncoder()
    for seed in range(3):
        decode(old.encode(noise(32, 32, seed), BGRX, TightMethod.COPY), rect, state)
    src = noise(32, 32, 9)
    out = decode(TightEncoder().encode(src, BGRX, TightMethod.COPY), rect, state)
    assert np.array_equal(out, src & [255, 255, 255, 0])


def test_no_zlib_variant() -> None:
    """With -317 and compress level 0, basic rects skip zlib: ctl 0xA0 for
    copy, 0xE0 with a filter id; the compact length is still sent."""
    config = TightSettings(no_zlib=True, compress_level=0)
    enc = TightEncoder(config)
    state = DecodeState()
    src = noise(10, 10)
    payload = enc.encode(src, BGRX, TightMethod.COPY)
    data = b"".join(payload)
    assert data[0] == 0xA0
    assert data[1:3] == encode_compact_length(300)
    assert np.array_equal(decode(payload, Rect(0, 0, 10, 10), state), src & [255, 255, 255, 0])
    two = with_colours(10, 10, 2)
    payload = enc.encode(two, BGRX)
    assert payload[0][:2] == b"\xe0\x01"
    assert np.array_equal(decode(payload, Rect(0, 0, 10, 10), state), two)
    assert state.tight_kinds == {"copy": 1, "palette": 1}


def test_compress_level_0_without_no_zlib_uses_stored_zlib() -> None:
    src = noise(10, 10)
    out, _, payload = round_trip(src, BGRX, TightMethod.COPY, TightSettings(compress_level=0))
    assert payload[0][0] & 0xC0 == 0  # basic compression with zlib
    assert np.array_equal(out, src & [255, 255, 255, 0])


def test_tightpng_is_stateless() -> None:
    """No streams, no reset bits: two encoders give the same bytes, so the
    scheduler may share TightPNG rects between clients."""
    config = TightSettings(png_mode=True, quality_level=5)
    frame = photo(64, 64)
    frame[:32] = with_colours(32, 64, 3)
    a, b = TightEncoder(config), TightEncoder(config)
    for rect in (Rect(0, 0, 64, 32), Rect(0, 32, 64, 32), Rect(0, 0, 8, 8)):
        pa, pb = a.encode(frame[rect.slices()], BGRX), b.encode(frame[rect.slices()], BGRX)
        assert pa == pb
        assert pa[0][0] & 0x0F == 0


# -- AUTO's choices -------------------------------------------------------------------


@pytest.mark.parametrize("pf", [BGRX, RGB565, BGR233], ids=["bgrx", "rgb565", "bgr233"])
def test_auto_without_jpeg(pf: PixelFormat) -> None:
    cases = {
        "fill": np.full((20, 30, 4), 9, np.uint8),
        "palette": with_colours(20, 30, 2),
        "copy": noise(40, 60),
    }
    for name, src in cases.items():
        out, state, _ = round_trip(src, pf)
        assert state.tight_kinds == {name: 1}, name
        assert np.array_equal(out, expected(pf, src))
    many = with_colours(20, 30, 30)
    _, state, _ = round_trip(many, pf)
    # At 8 bpp a pixel is a byte already: only the 1-bit palette pays.
    assert state.tight_kinds == ({"copy": 1} if pf.bits_per_pixel == 8 else {"palette": 1})


def test_auto_uses_gradient_only_when_allowed_and_for_photos() -> None:
    src = photo(64, 64)
    _, state, _ = round_trip(src, BGRX, settings_=TightSettings(allow_gradient=True))
    assert state.tight_kinds == {"gradient": 1}
    _, state, _ = round_trip(src, RGB565, settings_=TightSettings(allow_gradient=True))
    assert state.tight_kinds == {"copy": 1}  # TigerVNC misdecodes non-888 gradients
    _, state, _ = round_trip(src, BGRX)
    assert state.tight_kinds == {"copy": 1}


def test_gradient_compresses_photos_better() -> None:
    src = photo(128, 128)
    copy = sum(map(len, TightEncoder().encode(src, BGRX, TightMethod.COPY)))
    grad = sum(map(len, TightEncoder().encode(src, BGRX, TightMethod.GRADIENT)))
    assert grad < copy * 0.9


def test_auto_with_quality() -> None:
    config = TightSettings(quality_level=6)
    _, state, _ = round_trip(photo(64, 64), BGRX, settings_=config)
    assert state.tight_kinds == {"jpeg": 1} and state.lossy_rects == 1
    _, state, _ = round_trip(with_colours(64, 64, 20), BGRX, settings_=config)
    assert state.tight_kinds == {"palette": 1} and state.lossy_rects == 0
    _, state, _ = round_trip(photo(64, 64), BGR233, settings_=config)
    assert state.tight_kinds == {"copy": 1}  # no JPEG at 8 bpp


def test_auto_with_webp_and_qoi() -> None:
    webp = TightSettings(quality_level=6, allow_webp=True)
    _, state, _ = round_trip(photo(64, 64), BGRX, settings_=webp)
    assert state.tight_kinds == {"webp": 1}
    # WebP is lossy: without a quality level the client gets lossless rects.
    _, state, _ = round_trip(photo(64, 64), BGRX, settings_=TightSettings(allow_webp=True))
    assert state.tight_kinds == {"copy": 1}
    # KasmVNC sends every rect that is not solid as QOI; trivnc only the
    # full-colour ones where QOI beats zlib (smooth ones, lossless even when
    # lossy is allowed): photos go lossy when allowed, few colours as a palette.
    y, x = np.mgrid[0:64, 0:64]
    smooth = np.zeros((64, 64, 4), np.uint8)
    smooth[..., 0], smooth[..., 1], smooth[..., 2] = x * 3, y * 3, (x + y) * 2
    for settings_, src, name in (
        (TightSettings(quality_level=6, allow_qoi=True), photo(64, 64), "jpeg"),
        (TightSettings(allow_qoi=True), photo(64, 64), "copy"),
        (TightSettings(allow_qoi=True), smooth, "qoi"),
        (TightSettings(quality_level=6, allow_qoi=True), smooth, "qoi"),
        (TightSettings(quality_level=6, allow_qoi=True), with_colours(8, 8, 2), "palette"),
        (TightSettings(allow_qoi=True), np.zeros((8, 8, 4), np.uint8), "fill"),
    ):
        out, state, _ = round_trip(src, BGRX, settings_=settings_)
        assert state.tight_kinds == {name: 1}
        if name != "jpeg":
            assert np.array_equal(out, src)
    # The estimate QOI is chosen by: 1 byte a pixel for small steps, 4 for noise.
    assert (
        qoi_bytes_per_pixel(smooth) <= QOI_MAX_BYTES_PER_PIXEL < qoi_bytes_per_pixel(photo(64, 64))
    )
    qoi = TightSettings(allow_qoi=True)
    enc = TightEncoder(qoi)
    smooth_qoi = sum(map(len, enc.encode(smooth, BGRX, TightMethod.QOI)))
    smooth_zlib = sum(map(len, TightEncoder().encode(smooth, BGRX, TightMethod.COPY)))
    assert smooth_qoi < smooth_zlib


def test_auto_tightpng() -> None:
    png = TightSettings(png_mode=True)
    for src, name in (
        (np.zeros((8, 8, 4), np.uint8), "fill"),
        (photo(64, 64), "png"),
        (with_colours(64, 64, 9), "png"),
    ):
        out, state, _ = round_trip(src, BGRX, settings_=png)
        assert state.tight_kinds == {name: 1}
        assert np.array_equal(out, src)
    _, state, _ = round_trip(
        photo(64, 64), BGRX, settings_=TightSettings(png_mode=True, quality_level=3)
    )
    assert state.tight_kinds == {"jpeg": 1}


def test_png_kinds() -> None:
    """Palette PNGs for few colours (1 bit for two), RGB for many."""
    cases = ((with_colours(9, 11, 2), 3, 1), (with_colours(9, 11, 40), 3, 8), (noise(9, 40), 2, 8))
    for src, colour_type, depth in cases:
        out, _, payload = round_trip(src, BGRX, settings_=TightSettings(png_mode=True))
        data = image_of(payload, ctl=0xA0)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height, bit_depth, ctype = struct.unpack(">IIBB", data[16:26])
        assert (width, height, ctype, bit_depth) == (src.shape[1], src.shape[0], colour_type, depth)
        assert np.array_equal(out, src)


def test_palette_hash_collision_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # A zero multiplier puts every colour in one bucket.
    monkeypatch.setattr(tight, "_HASH_MULTIPLIERS", (np.uint32(0),))
    src = with_colours(30, 30, 50)
    out, state, _ = round_trip(src, BGRX)
    assert state.tight_kinds == {"palette": 1}
    assert np.array_equal(out, src)


def test_palette_limit() -> None:
    src = with_colours(40, 40, 256)
    _, state, _ = round_trip(src, BGRX)
    assert state.tight_kinds == {"palette": 1}
    src = with_colours(40, 40, 257)
    _, state, _ = round_trip(src, BGRX)
    assert state.tight_kinds == {"copy": 1}
    with pytest.raises(LocalProtocolError):
        TightEncoder().encode(src, BGRX, TightMethod.PALETTE)
    # The 257th colour in one pixel that a sparse sample would miss.
    src = with_colours(128, 128, 256)
    src[0, 1] = bgrx((1, 2, 3))
    out, state, _ = round_trip(src, BGRX)
    assert state.tight_kinds == {"copy": 1}
    assert np.array_equal(out, src)
    with pytest.raises(LocalProtocolError):
        TightEncoder().encode(src, BGRX, TightMethod.PALETTE)


# -- JPEG -----------------------------------------------------------------------------


SUBSAMPLING_FACTORS = {
    Subsampling.S444: (1, 1),
    Subsampling.S422: (2, 1),
    Subsampling.S420: (2, 2),
}


@pytest.mark.parametrize("level", range(10))
def test_jpeg_quality_levels_follow_tigervnc_table(level: int) -> None:
    quality, subsampling = JPEG_QUALITY_TABLE[level]
    src = in_frame(photo(48, 64))
    out, state, payload = round_trip(
        src, BGRX, TightMethod.JPEG, TightSettings(quality_level=level)
    )
    data = image_of(payload)
    assert sorted(jpeg_luma_table(data)) == sorted(libjpeg_luma(quality))
    assert jpeg_sampling(data) == [SUBSAMPLING_FACTORS[subsampling], (1, 1), (1, 1)]
    assert state.lossy_rects == 1 and state.tight_kinds == {"jpeg": 1}
    assert psnr(out, src) > 25


def test_jpeg_quality_orders_psnr_and_size() -> None:
    src = photo(64, 96)
    results = []
    for level in (0, 5, 9):
        out, _, payload = round_trip(
            src, BGRX, TightMethod.JPEG, TightSettings(quality_level=level)
        )
        results.append((psnr(out, src), sum(map(len, payload))))
    assert results[0][0] < results[1][0] < results[2][0]
    assert results[0][1] < results[1][1] < results[2][1]
    assert results[2][0] > 40


def test_fine_quality_and_subsampling_override_the_level() -> None:
    src = photo(32, 32)
    config = TightSettings(quality_level=0, fine_quality=90, subsampling=Subsampling.S444)
    data = image_of(TightEncoder(config).encode(src, BGRX, TightMethod.JPEG))
    assert sorted(jpeg_luma_table(data)) == sorted(libjpeg_luma(90))
    assert jpeg_sampling(data)[0] == (1, 1)
    # Subsampling alone allows JPEG, at libjpeg's default quality 75.
    config = TightSettings(subsampling=Subsampling.S422)
    data = image_of(TightEncoder(config).encode(src, BGRX, TightMethod.JPEG))
    assert sorted(jpeg_luma_table(data)) == sorted(libjpeg_luma(75))
    assert jpeg_sampling(data)[0] == (2, 1)
    gray = TightSettings(quality_level=9, subsampling=Subsampling.GRAY)
    data = image_of(TightEncoder(gray).encode(src, BGRX, TightMethod.JPEG))
    assert len(jpeg_sampling(data)) == 1
    out, _, _ = round_trip(src, BGRX, TightMethod.JPEG, gray)
    assert np.array_equal(out[..., 0], out[..., 2])
    # Greyscale clients get everything as JPEG, even a two-colour rect.
    out, state, _ = round_trip(with_colours(16, 16, 2), BGRX, settings_=gray)
    assert state.tight_kinds == {"jpeg": 1}
    assert np.array_equal(out[..., 0], out[..., 1])


def test_jpeg_parameters() -> None:
    for level, entry in enumerate(JPEG_QUALITY_TABLE):
        assert TightSettings(quality_level=level).jpeg_parameters() == entry
    assert TightSettings(fine_quality=0).jpeg_parameters() == (1, Subsampling.S420)
    assert TightSettings(subsampling=Subsampling.S16X).jpeg_parameters()[1] is Subsampling.S16X
    assert not TightSettings().jpeg_allowed


def test_jpeg_in_rgb565_reaches_the_clients_precision() -> None:
    src = photo(32, 40)
    out, _, _ = round_trip(src, RGB565, TightMethod.JPEG, TightSettings(quality_level=9))
    assert np.array_equal(out, expected(RGB565, out))
    assert psnr(out, expected(RGB565, src)) > 30


# -- WebP, QOI --------------------------------------------------------------------------


def test_webp_is_lossy_vp8_and_follows_the_level() -> None:
    src = photo(64, 64)
    results = []
    for level in (0, 9):
        config = TightSettings(quality_level=level, allow_webp=True)
        out, state, payload = round_trip(src, BGRX, TightMethod.WEBP, config)
        data = image_of(payload, ctl=0xB0)
        assert data[:4] == b"RIFF" and data[8:16] == b"WEBPVP8 "
        assert state.lossy_rects == 1 and state.tight_kinds == {"webp": 1}
        results.append((psnr(out, src), len(data)))
    assert results[0][0] < results[1][0] and results[0][1] < results[1][1]
    assert results[0][0] > 20 and results[1][0] > 35


def test_qoi_header_is_kasmvncs() -> None:
    src = noise(9, 13)
    out, state, payload = round_trip(src, BGRX, TightMethod.QOI, TightSettings(allow_qoi=True))
    data = image_of(payload, ctl=0xC0)
    assert data[:4] == b"qoif" and struct.unpack(">II", data[4:12]) == (13, 9)
    assert data[12:14] == b"\x03\x01"  # 3 channels, linear, as KasmVNC writes it
    assert data[-8:] == b"\x00" * 7 + b"\x01"
    assert np.array_equal(out, src & [255, 255, 255, 0])
    assert state.lossy_rects == 0


# -- refusals ------------------------------------------------------------------------------


def test_refusals() -> None:
    enc = TightEncoder()
    with pytest.raises(LocalProtocolError):
        enc.encode(np.zeros((1, 2049, 4), np.uint8), BGRX)
    enc.encode(np.zeros((1, 2048, 4), np.uint8), BGRX)
    with pytest.raises(LocalProtocolError):
        enc.encode(np.zeros((0, 4, 4), np.uint8), BGRX)
    with pytest.raises(ValueError):
        enc.encode(np.zeros((4, 4, 3), np.uint8), BGRX)
    src = photo(8, 8)
    for method in (
        TightMethod.JPEG,
        TightMethod.WEBP,
        TightMethod.QOI,
        TightMethod.PNG,
        TightMethod.FILL,
    ):
        with pytest.raises(LocalProtocolError):
            enc.encode(src, BGRX, method)
    with pytest.raises(LocalProtocolError):
        enc.encode(src, BGR233, TightMethod.GRADIENT)
    with pytest.raises(LocalProtocolError):
        TightEncoder(TightSettings(quality_level=5)).encode(src, BGR233, TightMethod.JPEG)
    png = TightEncoder(TightSettings(png_mode=True))
    for method in (TightMethod.PALETTE, TightMethod.COPY, TightMethod.GRADIENT):
        with pytest.raises(LocalProtocolError):
            png.encode(src, BGRX, method)


def test_oversized_data_is_refused_before_the_stream_moves() -> None:
    enc = TightEncoder()
    state = DecodeState()
    rect = Rect(0, 0, 16, 16)
    decode(enc.encode(noise(16, 16, 1), BGRX, TightMethod.COPY), rect, state)
    with pytest.raises(LocalProtocolError):
        enc.encode(noise(700, 2048), BGRX, TightMethod.COPY)  # 4.3 MB of RGB
    src = noise(16, 16, 2)
    assert np.array_equal(
        decode(enc.encode(src, BGRX, TightMethod.COPY), rect, state), src & [255, 255, 255, 0]
    )


# -- settings from SetEncodings --------------------------------------------------------------


def test_settings_from_encodings() -> None:
    encs = [Encoding.TIGHT, -32 + 7, -256 + 4, -512 + 66, Subsampling.S422,
            PseudoEncoding.KASM_WEBP, PseudoEncoding.KASM_QOI,
            PseudoEncoding.TIGHT_WITHOUT_ZLIB]  # fmt: skip
    s = TightSettings.from_encodings(encs)
    assert s == TightSettings(
        quality_level=7,
        fine_quality=66,
        subsampling=Subsampling.S422,
        compress_level=4,
        allow_webp=True,
        allow_qoi=True,
        no_zlib=True,
    )
    png = TightSettings.from_encodings(encs, png_mode=True)
    assert png.png_mode and not (png.allow_webp or png.allow_qoi or png.no_zlib)
    assert TightEncoder(png).encoding == Encoding.TIGHT_PNG
    assert TightEncoder(s).encoding == Encoding.TIGHT
    # Nothing sent: compression level 2, no JPEG.
    assert TightSettings.from_encodings([Encoding.TIGHT]) == TightSettings()
    # The earliest of repeated settings wins, as in KasmVNC.
    assert TightSettings.from_encodings([-23, -32]).quality_level == 9


@pytest.mark.parametrize(
    "kwargs",
    [
        {"quality_level": 10},
        {"fine_quality": 101},
        {"compress_level": -1},
        {"png_mode": True, "allow_webp": True},
    ],
)
def test_settings_are_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TightSettings(**kwargs)  # type: ignore[arg-type]


# -- the decoder refuses what the spec forbids -------------------------------------------------


@pytest.mark.parametrize(
    ("data", "png"),
    [
        (bytes([0x50, 1, 0, 1, 2, 3]), False),  # a one-colour palette
        (bytes([0x60, 1, 2, *range(9), 0, 1, 3, 0]), False),  # index 3 of 3 colours (raw)
        (bytes([0xF0]), False),  # invalid compression
        (bytes([0xD0]), False),  # KasmVNC's watermark rect: not sent by trivnc
        (bytes([0xA0, 3, 1, 2, 3]), True),  # not a PNG
        (bytes([0x00, 1, 2, 3]), True),  # basic compression in TightPNG
        (bytes([0x40, 7]), False),  # unknown filter
    ],
)
def test_decoder_refuses(data: bytes, png: bool) -> None:
    fb = np.zeros((2, 2, 4), np.uint8)
    with pytest.raises(RemoteProtocolError):
        run_on_bytes(decode_tight(DecodeState(), fb, Rect(0, 0, 2, 2), png=png), data, exact=False)


def test_decoder_refuses_png_in_tight_and_wrong_sizes() -> None:
    src = photo(8, 8)
    png = TightEncoder(TightSettings(png_mode=True)).encode(src, BGRX, TightMethod.PNG)
    fb = np.zeros((8, 8, 4), np.uint8)
    with pytest.raises(RemoteProtocolError):  # 0xA0 without -317 data layout
        run_on_bytes(decode_tight(DecodeState(), fb, Rect(0, 0, 8, 8), png=False), b"".join(png))
    jpeg = TightEncoder(TightSettings(quality_level=5)).encode(src, BGRX, TightMethod.JPEG)
    with pytest.raises(RemoteProtocolError):
        run_on_bytes(decode_tight(DecodeState(), fb, Rect(0, 0, 8, 7), png=False), b"".join(jpeg))
    with pytest.raises(RemoteProtocolError):
        run_on_bytes(
            decode_tight(
                DecodeState(), np.zeros((1, 2049, 4), np.uint8), Rect(0, 0, 2049, 1), png=False
            ),
            b"\x80\0\0\0",
        )


def test_decoder_refuses_zlib_data_that_inflates_too_far() -> None:
    deflater = zlib.compressobj()
    body = deflater.compress(bytes(13)) + deflater.flush(zlib.Z_SYNC_FLUSH)
    data = bytes([0x01]) + encode_compact_length(len(body)) + body  # 13 bytes for 12 needed
    fb = np.zeros((2, 2, 4), np.uint8)
    with pytest.raises(RemoteProtocolError):
        run_on_bytes(decode_tight(DecodeState(), fb, Rect(0, 0, 2, 2), png=False), data)


# -- property: random small pictures, random methods -----------------------------------------

LOSSLESS_METHODS = [TightMethod.AUTO, TightMethod.COPY, TightMethod.PALETTE, TightMethod.GRADIENT,
                    TightMethod.QOI, TightMethod.PNG]  # fmt: skip


@st.composite
def pictures(draw: st.DrawFn) -> Image:
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    n = draw(st.sampled_from([1, 2, 3, 16, 255, 256, 600]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (n, 4), dtype=np.uint8)
    palette[:, 3] = rng.integers(0, 2, n) * 255  # the pad byte must not matter
    return palette[rng.integers(0, n, (h, w))]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(pictures(), st.sampled_from(LOSSLESS_METHODS)), min_size=1, max_size=5),
    st.sampled_from(list(FORMATS)),
    st.integers(0, 9),
)
def test_random_pictures_round_trip(
    cases: list[tuple[Image, TightMethod]], pf_name: str, compress: int
) -> None:
    pf = FORMATS[pf_name]
    tight_enc = TightEncoder(TightSettings(compress_level=compress, allow_gradient=True))
    png_enc = TightEncoder(TightSettings(png_mode=True))
    state, png_state = DecodeState(pf=pf), DecodeState(pf=pf)
    for src, method in cases:
        h, w = src.shape[:2]
        rect = Rect(0, 0, w, h)
        if method is TightMethod.PNG:
            out = decode(png_enc.encode(src, pf, method), rect, png_state, png=True)
        else:
            use = method
            if method is TightMethod.QOI or (
                method is TightMethod.GRADIENT and pf.bits_per_pixel == 8
            ):
                use = TightMethod.AUTO
            try:
                payload = tight_enc.encode(src, pf, use)
            except LocalProtocolError:
                # The only refusal left: a palette of more than 256 colours.
                assert use is TightMethod.PALETTE
                continue
            out = decode(payload, rect, state)
        assert np.array_equal(out, expected(pf, src))
