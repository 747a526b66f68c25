# The numbers of the RFB protocol: RFC 6143 section 8 (IANA registries) and the
# community rfbproto document, plus KasmVNC's extensions (kasmtech/KasmVNC
# common/rfb/encodings.h and msgTypes.h). Ranges of pseudo-encodings are named
# bounds so that code reads `QUALITY_LEVEL_LO <= e <= QUALITY_LEVEL_HI`.
from __future__ import annotations

from enum import Enum, IntEnum, IntFlag


class Dialect(Enum):
    """Standard RFB, or the KasmVNC web client's incompatible variant
    (11-byte PointerEvent, messages 178-191 and 252). AUTO starts standard
    and settles on one of the two from what the client sends first (see
    `trivnc.rfb.connection`, "Dialect detection"); the I/O layer chooses AUTO
    only where a KasmVNC client may connect (the WebSocket)."""

    STANDARD = "standard"
    KASM = "kasm"
    AUTO = "auto"


class ProtocolVersion(IntEnum):
    """The three versions a server may speak (RFC 6143 section 7.1.1)."""

    V3_3 = 3
    V3_7 = 7
    V3_8 = 8


class SecurityType(IntEnum):
    """RFC 6143 section 7.1.2; rfbproto "Security"."""

    INVALID = 0
    NONE = 1
    VNC_AUTH = 2
    TIGHT = 16
    TLS = 18
    VENCRYPT = 19


class VeNCryptSubtype(IntEnum):
    """rfbproto "VeNCrypt": subtypes offered after the 0.2 version exchange."""

    PLAIN = 256
    TLS_NONE = 257
    TLS_VNC = 258
    TLS_PLAIN = 259
    X509_NONE = 260
    X509_VNC = 261
    X509_PLAIN = 262


class SecurityResult(IntEnum):
    OK = 0
    FAILED = 1
    TOO_MANY = 2


class ClientMessage(IntEnum):
    """Client-to-server message types (RFC 6143 section 7.5, rfbproto, KasmVNC)."""

    SET_PIXEL_FORMAT = 0
    SET_ENCODINGS = 2
    FRAMEBUFFER_UPDATE_REQUEST = 3
    KEY_EVENT = 4
    POINTER_EVENT = 5
    CLIENT_CUT_TEXT = 6
    ENABLE_CONTINUOUS_UPDATES = 150
    CLIENT_FENCE = 248
    XVP = 250
    SET_DESKTOP_SIZE = 251
    QEMU = 255
    # KasmVNC web client only (the "kasm" dialect)
    KASM_REQUEST_STATS = 178
    KASM_FRAME_STATS = 179
    KASM_BINARY_CLIPBOARD = 180
    KASM_UPGRADE_TO_UDP = 181
    KASM_SUBSCRIBE_UNIX_RELAY = 182
    KASM_UNIX_RELAY = 183
    KASM_VIDEO_ENCODERS = 184
    KASM_KEEP_ALIVE = 185
    KASM_DIRECT_MOUSE = 188
    KASM_LATENCY = 189
    KASM_NETWORK_STATS = 190
    KASM_SYSTEM_STATS = 191
    KASM_SET_MAX_VIDEO_RESOLUTION = 252


class ServerMessage(IntEnum):
    """Server-to-client message types (RFC 6143 section 7.6, rfbproto, KasmVNC)."""

    FRAMEBUFFER_UPDATE = 0
    SET_COLOUR_MAP_ENTRIES = 1
    BELL = 2
    SERVER_CUT_TEXT = 3
    END_OF_CONTINUOUS_UPDATES = 150
    SERVER_FENCE = 248
    XVP = 250
    KASM_STATS = 178
    KASM_REQUEST_FRAME_STATS = 179
    KASM_BINARY_CLIPBOARD = 180
    KASM_VIDEO_ENCODERS = 184
    KASM_SERVER_DISCONNECT = 186
    KASM_USER_ADDED = 253
    KASM_USER_REMOVED = 254


class Encoding(IntEnum):
    """Rectangle encodings (RFC 6143 section 7.7, rfbproto "Encodings")."""

    RAW = 0
    COPY_RECT = 1
    RRE = 2
    HEXTILE = 5
    ZLIB = 6
    TIGHT = 7
    ZRLE = 16
    TIGHT_PNG = -260


class PseudoEncoding(IntEnum):
    """Single-valued pseudo-encodings (rfbproto "Pseudo-encodings")."""

    DESKTOP_SIZE = -223
    LAST_RECT = -224
    CURSOR = -239
    X_CURSOR = -240
    QEMU_POINTER_MOTION_CHANGE = -257
    QEMU_EXTENDED_KEY_EVENT = -258
    QEMU_LED_STATE = -261
    DESKTOP_NAME = -307
    EXTENDED_DESKTOP_SIZE = -308
    XVP = -309
    FENCE = -312
    CONTINUOUS_UPDATES = -313
    CURSOR_WITH_ALPHA = -314
    EXTENDED_MOUSE_BUTTONS = -316
    TIGHT_WITHOUT_ZLIB = -317
    VMWARE_CURSOR = 0x574D5664
    VMWARE_CURSOR_POSITION = 0x574D5666
    EXTENDED_CLIPBOARD = -0x3F5E1A32  # 0xC0A1E5CE as a signed 32-bit value
    # KasmVNC
    KASM_WEBP = -1024
    KASM_QOI = -1886
    KASM_DISCONNECT_NOTIFY = -1885
    KASM_DIRECT_MOUSE = -1884
    KASM_PREFER_BANDWIDTH = -992
    KASM_MAX_VIDEO_RESOLUTION = -1997
    KASM_STREAMING_MODE_JPEG_WEBP = -1025


# Ranges of pseudo-encodings: (lowest value, highest value), both inclusive.
QUALITY_LEVEL = (-32, -23)  # level = value + 32
COMPRESS_LEVEL = (-256, -247)  # level = value + 256
FINE_QUALITY = (-512, -412)  # TurboVNC: quality = value + 512
SUBSAMPLING = (-768, -763)  # TurboVNC: see Subsampling
KASM_JPEG_VIDEO_QUALITY = (-1023, -1014)  # level = value + 1023
KASM_WEBP_VIDEO_QUALITY = (-1013, -1004)
KASM_TREAT_LOSSLESS = (-1003, -993)  # level 0..10
KASM_DYNAMIC_QUALITY_MIN = (-991, -982)
KASM_DYNAMIC_QUALITY_MAX = (-981, -972)
KASM_VIDEO_AREA = (-971, -871)  # percent = value + 972
KASM_VIDEO_TIME = (-870, -770)  # value + 870
KASM_FRAME_RATE = (-2048, -1998)  # fps = value + 2058
KASM_VIDEO_SCALING = (-1996, -1987)
KASM_VIDEO_OUT_TIME = (-1986, -1887)  # value + 1987
KASM_SETTINGS = (-2048, -770)  # any Kasm pseudo-encoding falls in here


def in_range(value: int, bounds: tuple[int, int]) -> bool:
    return bounds[0] <= value <= bounds[1]


class Subsampling(IntEnum):
    """TurboVNC subsampling pseudo-encodings and the chroma they mean."""

    S444 = -768  # "1X"
    S420 = -767  # "4X"
    S422 = -766  # "2X"
    GRAY = -765
    S8X = -764
    S16X = -763


class TightControl(IntEnum):
    """High nibble of the Tight compression-control byte (rfbproto "Tight Encoding")."""

    FILL = 0x80
    JPEG = 0x90
    PNG = 0xA0  # TightPNG only; with -317 in Tight it means basic without zlib
    WEBP = 0xB0  # KasmVNC
    QOI = 0xC0  # KasmVNC


class TightFilter(IntEnum):
    COPY = 0
    PALETTE = 1
    GRADIENT = 2


class FenceFlags(IntFlag):
    """rfbproto "ClientFence"."""

    BLOCK_BEFORE = 1 << 0
    BLOCK_AFTER = 1 << 1
    SYNC_NEXT = 1 << 2
    REQUEST = 1 << 31


FENCE_KNOWN = FenceFlags.BLOCK_BEFORE | FenceFlags.BLOCK_AFTER | FenceFlags.SYNC_NEXT


class ClipboardFlags(IntFlag):
    """rfbproto "Extended Clipboard Pseudo-Encoding": formats and actions."""

    TEXT = 1 << 0
    RTF = 1 << 1
    HTML = 1 << 2
    DIB = 1 << 3
    FILES = 1 << 4
    CAPS = 1 << 24
    REQUEST = 1 << 25
    PEEK = 1 << 26
    NOTIFY = 1 << 27
    PROVIDE = 1 << 28


CLIPBOARD_FORMATS = 0xFFFF
CLIPBOARD_ACTIONS = 0x1F000000


class DesktopSizeReason(IntEnum):
    SERVER = 0
    THIS_CLIENT = 1
    OTHER_CLIENT = 2


class DesktopSizeStatus(IntEnum):
    OK = 0
    PROHIBITED = 1
    OUT_OF_RESOURCES = 2
    INVALID_LAYOUT = 3


class XvpCode(IntEnum):
    FAIL = 0
    INIT = 1
    SHUTDOWN = 2
    REBOOT = 3
    RESET = 4


class HextileMask(IntFlag):
    RAW = 1
    BACKGROUND_SPECIFIED = 2
    FOREGROUND_SPECIFIED = 4
    ANY_SUBRECTS = 8
    SUBRECTS_COLOURED = 16


# JPEG quality levels 0..9 -> (libjpeg quality, subsampling), as TigerVNC's and
# KasmVNC's TightJPEGEncoder.cxx conf[] table maps them, so a level means the
# same on trivnc as on those servers.
JPEG_QUALITY_TABLE: tuple[tuple[int, Subsampling], ...] = (
    (15, Subsampling.S420),
    (29, Subsampling.S420),
    (41, Subsampling.S420),
    (42, Subsampling.S422),
    (62, Subsampling.S422),
    (77, Subsampling.S422),
    (79, Subsampling.S444),
    (86, Subsampling.S444),
    (92, Subsampling.S444),
    (100, Subsampling.S444),
)

# KasmVNC TightWEBPEncoder.cxx conf[]: level 0..9 -> WebP quality (method 0).
WEBP_QUALITY_TABLE: tuple[int, ...] = (5, 24, 30, 37, 42, 65, 78, 85, 88, 100)
