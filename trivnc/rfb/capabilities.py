# What a client's SetEncodings list says it can do and wants (RFC 6143 section
# 7.5.2; rfbproto "Encodings" and "Pseudo-encodings"; KasmVNC encodings.h).
#
# Order: the list is a preference order for real encodings. For settings that
# can appear more than once (quality, compression, Kasm knobs), the earliest
# entry wins: KasmVNC's ConnParams::setEncodings walks the list in reverse so
# that earlier entries override later ones, and its web client relies on this
# ("preferBandwidth ... must be last"). We read it the same way.
from __future__ import annotations

from dataclasses import dataclass, field

from .constants import (
    COMPRESS_LEVEL,
    FINE_QUALITY,
    KASM_DYNAMIC_QUALITY_MAX,
    KASM_DYNAMIC_QUALITY_MIN,
    KASM_FRAME_RATE,
    KASM_JPEG_VIDEO_QUALITY,
    KASM_TREAT_LOSSLESS,
    KASM_VIDEO_AREA,
    KASM_VIDEO_OUT_TIME,
    KASM_VIDEO_SCALING,
    KASM_VIDEO_TIME,
    KASM_WEBP_VIDEO_QUALITY,
    QUALITY_LEVEL,
    SUBSAMPLING,
    Encoding,
    PseudoEncoding,
    Subsampling,
    in_range,
)

#: Real (pixel-carrying) encodings trivnc can send, besides Raw.
SUPPORTED_ENCODINGS = frozenset(
    {
        Encoding.RAW,
        Encoding.COPY_RECT,
        Encoding.RRE,
        Encoding.HEXTILE,
        Encoding.ZLIB,
        Encoding.TIGHT,
        Encoding.ZRLE,
        Encoding.TIGHT_PNG,
    }
)


@dataclass(frozen=True)
class KasmSettings:
    """The KasmVNC web client's quality and video knobs (None = not sent)."""

    jpeg_video_quality: int | None = None
    webp_video_quality: int | None = None
    treat_lossless: int | None = None
    prefer_bandwidth: bool = False
    dynamic_quality_min: int | None = None
    dynamic_quality_max: int | None = None
    video_area: int | None = None  # percent of the screen
    video_time: int | None = None  # seconds
    video_out_time: int | None = None  # seconds
    video_scaling: int | None = None
    frame_rate: int | None = None
    max_video_resolution: bool = False
    streaming_mode_jpeg_webp: bool = False


@dataclass(frozen=True)
class ClientCapabilities:
    """Everything one SetEncodings message declares."""

    encodings: tuple[int, ...] = ()
    #: Real encodings trivnc supports, in the client's order of preference.
    preferred: tuple[int, ...] = (Encoding.RAW,)
    quality_level: int | None = None
    compress_level: int | None = None
    fine_quality: int | None = None
    subsampling: Subsampling | None = None
    pseudo: frozenset[int] = field(default_factory=frozenset)
    kasm: KasmSettings = field(default_factory=KasmSettings)

    @classmethod
    def from_encodings(cls, encodings: tuple[int, ...]) -> ClientCapabilities:
        quality = compress = fine = None
        subsampling: Subsampling | None = None
        kasm: dict[str, int | bool] = {}
        pseudo = set()
        for e in reversed(encodings):
            if in_range(e, QUALITY_LEVEL):
                quality = e - QUALITY_LEVEL[0]
            elif in_range(e, COMPRESS_LEVEL):
                compress = e - COMPRESS_LEVEL[0]
            elif in_range(e, FINE_QUALITY):
                fine = e - FINE_QUALITY[0]
            elif in_range(e, SUBSAMPLING):
                subsampling = Subsampling(e)
            elif in_range(e, KASM_JPEG_VIDEO_QUALITY):
                kasm["jpeg_video_quality"] = e - KASM_JPEG_VIDEO_QUALITY[0]
            elif in_range(e, KASM_WEBP_VIDEO_QUALITY):
                kasm["webp_video_quality"] = e - KASM_WEBP_VIDEO_QUALITY[0]
            elif in_range(e, KASM_TREAT_LOSSLESS):
                kasm["treat_lossless"] = e - KASM_TREAT_LOSSLESS[0]
            elif in_range(e, KASM_DYNAMIC_QUALITY_MIN):
                kasm["dynamic_quality_min"] = e - KASM_DYNAMIC_QUALITY_MIN[0]
            elif in_range(e, KASM_DYNAMIC_QUALITY_MAX):
                kasm["dynamic_quality_max"] = e - KASM_DYNAMIC_QUALITY_MAX[0]
            elif in_range(e, KASM_VIDEO_AREA):
                kasm["video_area"] = e - KASM_VIDEO_AREA[0] + 1
            elif in_range(e, KASM_VIDEO_TIME):
                kasm["video_time"] = e - KASM_VIDEO_TIME[0]
            elif in_range(e, KASM_VIDEO_OUT_TIME):
                kasm["video_out_time"] = e - KASM_VIDEO_OUT_TIME[0] + 1
            elif in_range(e, KASM_VIDEO_SCALING):
                kasm["video_scaling"] = e - KASM_VIDEO_SCALING[0]
            elif in_range(e, KASM_FRAME_RATE):
                kasm["frame_rate"] = e - KASM_FRAME_RATE[0] + 10
            elif e == PseudoEncoding.KASM_PREFER_BANDWIDTH:
                kasm["prefer_bandwidth"] = True
            elif e == PseudoEncoding.KASM_MAX_VIDEO_RESOLUTION:
                kasm["max_video_resolution"] = True
            elif e == PseudoEncoding.KASM_STREAMING_MODE_JPEG_WEBP:
                kasm["streaming_mode_jpeg_webp"] = True
            else:
                pseudo.add(e)
        seen: list[int] = []
        for e in encodings:
            if e in SUPPORTED_ENCODINGS and e not in seen:
                seen.append(e)
        if Encoding.RAW not in seen:
            seen.append(Encoding.RAW)  # Raw is always allowed (RFC 6143 section 7.5.2)
        return cls(
            encodings=encodings,
            preferred=tuple(seen),
            quality_level=quality,
            compress_level=compress,
            fine_quality=fine,
            subsampling=subsampling,
            pseudo=frozenset(pseudo),
            kasm=KasmSettings(**kasm),  # type: ignore[arg-type]
        )

    def supports(self, encoding: int) -> bool:
        return encoding in self.pseudo or encoding in self.preferred

    @property
    def last_rect(self) -> bool:
        return PseudoEncoding.LAST_RECT in self.pseudo

    @property
    def desktop_size(self) -> bool:
        return PseudoEncoding.DESKTOP_SIZE in self.pseudo

    @property
    def extended_desktop_size(self) -> bool:
        return PseudoEncoding.EXTENDED_DESKTOP_SIZE in self.pseudo

    @property
    def desktop_name(self) -> bool:
        return PseudoEncoding.DESKTOP_NAME in self.pseudo

    @property
    def fence(self) -> bool:
        return PseudoEncoding.FENCE in self.pseudo

    @property
    def continuous_updates(self) -> bool:
        return PseudoEncoding.CONTINUOUS_UPDATES in self.pseudo

    @property
    def extended_clipboard(self) -> bool:
        return PseudoEncoding.EXTENDED_CLIPBOARD in self.pseudo

    @property
    def cursor(self) -> bool:
        return PseudoEncoding.CURSOR in self.pseudo

    @property
    def alpha_cursor(self) -> bool:
        return PseudoEncoding.CURSOR_WITH_ALPHA in self.pseudo

    @property
    def vmware_cursor(self) -> bool:
        return PseudoEncoding.VMWARE_CURSOR in self.pseudo

    @property
    def webp(self) -> bool:
        return PseudoEncoding.KASM_WEBP in self.pseudo

    @property
    def qoi(self) -> bool:
        return PseudoEncoding.KASM_QOI in self.pseudo

    @property
    def is_kasm_client(self) -> bool:
        """The list carries any of KasmVNC's own pseudo-encodings."""
        return any(-2048 <= e <= -770 for e in self.encodings)
