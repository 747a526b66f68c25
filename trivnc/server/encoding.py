# The encoding scheduler: turns a session's damaged rects into encoded rects.
# It picks the encoding from the client's preference list, splits rects to the
# limits each encoding has, and runs the encoders in worker threads. Rects whose
# encoding carries no per-connection state (Raw, RRE, Hextile, TightPNG) are
# shared through an EncodeCache, so when several viewers want the same rect of
# the same frame in the same format it is encoded once.
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, replace

import trio

from ..encodings.base import Payload, Pixels, RectEncoder
from ..encodings.hextile import HextileEncoder
from ..encodings.raw import RawEncoder
from ..encodings.rre import RREEncoder
from ..encodings.tight import Deferred, TightEncoder, TightSettings
from ..encodings.zlibrect import ZlibEncoder
from ..encodings.zrle import ZRLEEncoder
from ..geometry import Rect
from ..rfb.capabilities import ClientCapabilities
from ..rfb.constants import Encoding
from ..rfb.pixelformat import PixelFormat

#: Tight rects: at most 2048 wide and 65536 pixels, as KasmVNC's EncodeManager.
TIGHT_MAX_WIDTH = 2048
TIGHT_MAX_AREA = 65536
TIGHT_TILE = 256
#: Other encodings: split tall rects into bands so no one call runs long and
#: the cache can share bands between clients with different damage. Each call
#: has a fixed cost: 64-row bands halved ZRLE and Hextile throughput, 256-row
#: bands cost about a third.
BAND_HEIGHT = 256

#: Tight updates of at least this many pixels are analysed and compressed by
#: several worker threads at once (one frame split across the cores); the
#: rects that need the session's zlib streams are finished in order after.
PARALLEL_MIN_AREA = 2 * TIGHT_MAX_AREA

#: Encodings whose output depends only on the pixels and the pixel format.
STATELESS = frozenset({Encoding.RAW, Encoding.RRE, Encoding.HEXTILE, Encoding.TIGHT_PNG})

ENCODER_NAMES: dict[int, str] = {
    Encoding.RAW: "RawEncoder",
    Encoding.RRE: "RREEncoder",
    Encoding.HEXTILE: "HextileEncoder",
    Encoding.ZLIB: "ZlibEncoder",
    Encoding.ZRLE: "ZRLEEncoder",
    Encoding.TIGHT: "TightEncoder",
    Encoding.TIGHT_PNG: "TightPNGEncoder",
}


@dataclass(frozen=True)
class EncodedRect:
    rect: Rect
    encoding: int
    payload: Payload


def split_rect(rect: Rect, encoding: int) -> list[Rect]:
    """Pieces of rect that respect the encoding's limits, in raster order."""
    if encoding in (Encoding.TIGHT, Encoding.TIGHT_PNG):
        # Square-ish tiles within KasmVNC's limits: each tile is more often
        # all text or all photo than a full-width band is, so the choice of
        # sub-encoding fits better (JPEG output on a desktop frame: 192 kB in
        # 256x256 tiles against 356 kB in 34-row bands).
        width = min(rect.w, TIGHT_TILE, TIGHT_MAX_WIDTH)
        band = max(1, min(rect.h, TIGHT_MAX_AREA // width))
    else:
        width, band = rect.w, BAND_HEIGHT
    out = []
    for y in range(rect.y, rect.bottom, band):
        for x in range(rect.x, rect.right, width):
            out.append(Rect(x, y, min(width, rect.right - x), min(band, rect.bottom - y)))
    return out


class EncodeCache:
    """Encoded rects of recent frames, keyed by (frame version, rect, format,
    settings). A rect being encoded is awaited by later askers rather than
    encoded again. Bounded by entry count."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._max = max_entries
        self._done: OrderedDict[Hashable, Payload] = OrderedDict()
        self._inflight: dict[Hashable, trio.Event] = {}
        #: Whole updates (every rect shareable), for viewers whose damage is
        #: the same: one lookup instead of one per rect.
        self._updates: OrderedDict[Hashable, tuple[EncodedRect, ...]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Payload | None:
        payload = self._done.get(key)
        if payload is not None:
            self._done.move_to_end(key)
            self.hits += 1
        return payload

    def put(self, key: Hashable, payload: Payload) -> None:
        self._done[key] = payload
        while len(self._done) > self._max:
            self._done.popitem(last=False)

    def get_update(self, key: Hashable) -> tuple[EncodedRect, ...] | None:
        found = self._updates.get(key)
        if found is not None:
            self.hits += 1
        return found

    def put_update(self, key: Hashable, rects: Sequence[EncodedRect]) -> None:
        self._updates[key] = tuple(rects)
        while len(self._updates) > 64:
            self._updates.popitem(last=False)

    def inflight(self, key: Hashable) -> trio.Event | None:
        return self._inflight.get(key)

    def begin(self, key: Hashable) -> trio.Event:
        event = self._inflight[key] = trio.Event()
        self.misses += 1
        return event

    def end(self, key: Hashable) -> None:
        event = self._inflight.pop(key, None)
        if event is not None:
            event.set()


@dataclass
class EncodeStats:
    """CPU seconds, rects and pixels per encoder name, for one update."""

    cpu: dict[str, float]
    count: dict[str, int]
    area: dict[str, int]
    #: Seconds spent scaling video down (frame stats' videoscaling).
    scaling: float = 0.0

    @classmethod
    def empty(cls) -> EncodeStats:
        return cls({}, {}, {})

    def add(self, name: str, cpu: float, rects: Sequence[Rect]) -> None:
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu
        self.count[name] = self.count.get(name, 0) + len(rects)
        self.area[name] = self.area.get(name, 0) + sum(r.area for r in rects)


class SessionEncoders:
    """One connection's encoders (the stateful ones own zlib streams) and its
    choice of encoding."""

    def __init__(self) -> None:
        self.caps = ClientCapabilities.from_encodings(())
        self.encoding: int = Encoding.RAW
        self._encoders: dict[int, RectEncoder] = {}
        #: Tight rects made independent of the session's zlib streams, so that
        #: they can be shared with other viewers (see TightSettings).
        self.shared_mode = False
        #: The adaptive JPEG quality level in place of the client's (None:
        #: the client's), and video mode (see trivnc.server.adapt).
        self.quality_level: int | None = None
        self.video = False
        self.video_scale = 1.0
        #: WebP in place of JPEG, for a client that announced it, only while
        #: the CPU keeps up (trivnc.server.kasm.use_webp decides).
        self.webp_affordable = True

    def configure(self, caps: ClientCapabilities) -> None:
        self.caps = caps
        self.encoding = next((e for e in caps.preferred if e != Encoding.COPY_RECT), Encoding.RAW)
        self._drop_changed_tight()

    def _drop_changed_tight(self) -> None:
        """Tight settings follow the client's levels and the adaptive and
        sharing choices below: a Tight or TightPNG encoder whose settings no
        longer match is rebuilt at its next use (its zlib streams restart
        then, which the reset bits tell the client; the adaptive code changes
        settings a few times a second at most)."""
        for encoding, png_mode in ((Encoding.TIGHT, False), (Encoding.TIGHT_PNG, True)):
            enc = self._encoders.get(encoding)
            if isinstance(enc, TightEncoder) and enc.settings != self._tight_settings(png_mode):
                del self._encoders[encoding]

    def set_shared_mode(self, shared: bool) -> None:
        """Switch Tight between per-session zlib streams (best compression,
        one viewer) and independent rects (shared encodes, several viewers).
        The new encoder starts with reset bits, so the switch is safe at any
        update boundary."""
        if shared != self.shared_mode:
            self.shared_mode = shared
            self._drop_changed_tight()

    def set_adaptive(
        self, quality_level: int | None, video: bool, video_scale: float = 1.0
    ) -> None:
        """Apply the adaptive quality level and video mode from the next
        rect on."""
        wanted = (quality_level, video, video_scale)
        if wanted != (self.quality_level, self.video, self.video_scale):
            self.quality_level, self.video, self.video_scale = wanted
            self._drop_changed_tight()

    def set_webp_affordable(self, affordable: bool) -> None:
        """Allow or stop WebP from the next rect on."""
        if affordable != self.webp_affordable:
            self.webp_affordable = affordable
            self._drop_changed_tight()

    def _tight_settings(self, png_mode: bool) -> TightSettings:
        settings = TightSettings.from_encodings(self.caps.encodings, png_mode=png_mode)
        if settings.allow_webp and not self.webp_affordable:
            settings = replace(settings, allow_webp=False)
        if self.shared_mode and not png_mode:
            settings = replace(settings, independent_rects=True)
        if self.quality_level is not None and settings.jpeg_allowed:
            settings = replace(settings, quality_level=self.quality_level, fine_quality=None)
        if self.video and settings.jpeg_allowed and not png_mode:
            settings = replace(settings, video=True, video_scale=self.video_scale)
        return settings

    def encoder(self, encoding: int) -> RectEncoder:
        enc = self._encoders.get(encoding)
        if enc is None:
            enc = self._encoders[encoding] = self._make(encoding)
        return enc

    def _make(self, encoding: int) -> RectEncoder:
        level = self.caps.compress_level
        if encoding in (Encoding.TIGHT, Encoding.TIGHT_PNG):
            return TightEncoder(self._tight_settings(encoding == Encoding.TIGHT_PNG))
        if encoding == Encoding.ZRLE:
            return ZRLEEncoder(level=1 if level is None else max(1, min(level, 9)))
        if encoding == Encoding.ZLIB:
            return ZlibEncoder(level=1 if level is None else max(1, min(level, 9)))
        if encoding == Encoding.HEXTILE:
            return HextileEncoder()
        if encoding == Encoding.RRE:
            return RREEncoder()
        return RawEncoder()

    def share_key(self, encoding: int) -> Hashable | None:
        """What besides pixels and pixel format decides the output of an
        encoding whose rects may be shared between sessions; None if none can."""
        if encoding in STATELESS:
            return (encoding,)
        if encoding == Encoding.TIGHT:
            enc = self.encoder(encoding)
            assert isinstance(enc, TightEncoder)
            return (encoding, enc.settings)
        return None

    def pixel_format_changed(self) -> None:
        """Tight caches pixel-format-dependent choices: start it afresh (a new
        Tight encoder sets the reset bits). Zlib and ZRLE streams must never be
        replaced, since the client keeps its inflater for the whole connection
        and nothing in those encodings says "reset"; they take the format on
        every call."""
        self._encoders.pop(Encoding.TIGHT, None)
        self._encoders.pop(Encoding.TIGHT_PNG, None)


def encode_batch(
    encoder: RectEncoder, pixels: Pixels, rects: Sequence[Rect], pf: PixelFormat
) -> tuple[list[Payload], float]:
    """Encode rects in order through one encoder (worker thread); returns the
    payloads and the thread's CPU seconds."""
    start = time.thread_time()
    out = [encoder.encode(pixels[r.slices()], pf) for r in rects]
    return out, time.thread_time() - start


def analyse_batch(
    encoder: TightEncoder, pixels: Pixels, rects: Sequence[Rect], pf: PixelFormat
) -> tuple[list[Payload | Deferred], float]:
    """The stream-free part of Tight for some rects (worker thread; several
    may run at once on one encoder)."""
    start = time.thread_time()
    out = [encoder.analyse(pixels[r.slices()], pf) for r in rects]
    return out, time.thread_time() - start


def finish_batch(
    encoder: TightEncoder, items: Sequence[Payload | Deferred]
) -> tuple[list[Payload], float]:
    """The zlib-stream part of Tight, in rect order (worker thread)."""
    start = time.thread_time()
    out = [encoder.finish(item) for item in items]
    return out, time.thread_time() - start


def _split_by_area(rects: Sequence[Rect], parts: int) -> list[list[Rect]]:
    """Consecutive groups of about equal pixel counts."""
    total = sum(r.area for r in rects)
    groups: list[list[Rect]] = [[]]
    done = 0
    for r in rects:
        if groups[-1] and done >= total * len(groups) / parts and len(groups) < parts:
            groups.append([])
        groups[-1].append(r)
        done += r.area
    return groups


async def encode_parallel(
    encoder: TightEncoder,
    limiter: trio.CapacityLimiter,
    pixels: Pixels,
    rects: Sequence[Rect],
    pf: PixelFormat,
) -> tuple[list[Payload], float]:
    """Tight rects of one update across the worker threads: analysis, fills,
    JPEG, WebP and QOI in parallel (the codecs release the GIL), then the
    rects that use the zlib streams in order. Returns payloads in rect order
    and the CPU seconds of all threads."""
    groups = _split_by_area(rects, max(1, int(limiter.total_tokens)))
    results: list[list[Payload | Deferred]] = [[] for _ in groups]
    cpu = 0.0

    async def run(i: int, group: list[Rect]) -> None:
        nonlocal cpu
        results[i], spent = await trio.to_thread.run_sync(
            analyse_batch, encoder, pixels, group, pf, limiter=limiter
        )
        cpu += spent

    async with trio.open_nursery() as nursery:
        for i, group in enumerate(groups):
            nursery.start_soon(run, i, group)
    items = [item for part in results for item in part]
    if not any(isinstance(item, Deferred) for item in items):
        return [item for item in items if not isinstance(item, Deferred)], cpu
    payloads, spent = await trio.to_thread.run_sync(finish_batch, encoder, items, limiter=limiter)
    return payloads, cpu + spent


def shareable(encoding: int, payload: Payload, independent: bool) -> bool:
    """Whether an encoded rect is the same for every session with the same
    settings. Tight fill, JPEG, WebP and QOI rects touch no zlib stream; with
    independent rects every basic rect restarts its stream, so all are. A reset
    bit in a session's own stream rect ties it to that session."""
    if encoding in STATELESS or (encoding == Encoding.TIGHT and independent):
        return True
    if encoding == Encoding.TIGHT and payload and payload[0]:
        ctl = payload[0][0]
        return ctl & 0x0F == 0 and ctl >> 4 in (0x8, 0x9, 0xB, 0xC)
    return False


async def encode_rects(
    encoders: SessionEncoders,
    cache: EncodeCache,
    limiter: trio.CapacityLimiter,
    version: int,
    pixels: Pixels,
    rects: Sequence[Rect],
    pf: PixelFormat,
    stats: EncodeStats,
) -> list[EncodedRect]:
    """Encode damaged rects of one frame for one session.

    Rects that another session encoded the same way are taken from the cache
    (or awaited while in flight). The session's own rects are encoded in one
    worker-thread call, in order, so stateful encoders' zlib streams see them
    in the order the client will; the result lists them in that same order.
    """
    encoding = encoders.encoding
    pieces = [p for r in rects for p in split_rect(r, encoding)]
    if not pieces:
        return []
    encoder = encoders.encoder(encoding)
    name = ENCODER_NAMES.get(encoding, str(encoding))
    # A viewer alone has no one to share with: skip the cache's bookkeeping.
    share = encoders.share_key(encoding) if encoders.shared_mode else None

    async def batch(todo: list[Rect]) -> list[Payload]:
        if (
            isinstance(encoder, TightEncoder)
            and len(todo) > 1
            and limiter.total_tokens > 1
            and sum(r.area for r in todo) >= PARALLEL_MIN_AREA
        ):
            payloads, cpu = await encode_parallel(encoder, limiter, pixels, todo, pf)
        else:
            payloads, cpu = await trio.to_thread.run_sync(
                encode_batch, encoder, pixels, todo, pf, limiter=limiter
            )
        stats.add(name, cpu, todo)
        if isinstance(encoder, TightEncoder):
            stats.scaling += encoder.take_scaling_time()
        return payloads

    if share is None:
        payloads = await batch(pieces)
        return [EncodedRect(r, encoding, p) for r, p in zip(pieces, payloads, strict=True)]

    # Viewers that keep up all send the same rects of a frame: the first one
    # to encode them records the whole update, the others take it at once.
    whole = ("update", version, tuple(rects), pf, share)
    if (event := cache.inflight(whole)) is not None:
        await event.wait()
    found = cache.get_update(whole)
    if found is not None:
        return list(found)
    cache.begin(whole)
    try:
        out = await _encode_shared(cache, version, pieces, pf, share, encoding, encoders, batch)
        if len(out) == len(pieces) and all(
            shareable(e.encoding, e.payload, encoders.shared_mode) for e in out
        ):
            cache.put_update(whole, out)
        return out
    finally:
        cache.end(whole)


async def _encode_shared(
    cache: EncodeCache,
    version: int,
    pieces: list[Rect],
    pf: PixelFormat,
    share: Hashable,
    encoding: int,
    encoders: SessionEncoders,
    batch: Callable[[list[Rect]], Awaitable[list[Payload]]],
) -> list[EncodedRect]:
    """The rects of an update one by one through the cache: taken, awaited
    while another session encodes them, or encoded here."""

    out: list[EncodedRect] = []
    mine: list[Rect] = []
    waits: list[tuple[Rect, trio.Event]] = []
    for r in pieces:
        key = (version, r, pf, share)
        hit = cache.get(key)
        if hit is not None:
            out.append(EncodedRect(r, encoding, hit))
        elif (event := cache.inflight(key)) is not None:
            waits.append((r, event))
        else:
            cache.begin(key)
            mine.append(r)
    try:
        if mine:
            for r, p in zip(mine, await batch(mine), strict=True):
                out.append(EncodedRect(r, encoding, p))
                if shareable(encoding, p, encoders.shared_mode):
                    cache.put((version, r, pf, share), p)
    finally:
        for r in mine:
            cache.end((version, r, pf, share))
    redo: list[Rect] = []
    for r, event in waits:
        await event.wait()
        hit = cache.get((version, r, pf, share))
        if hit is None:
            redo.append(r)  # not shareable after all, or its encoder went away
        else:
            out.append(EncodedRect(r, encoding, hit))
    if redo:
        for r, p in zip(redo, await batch(redo), strict=True):
            out.append(EncodedRect(r, encoding, p))
    return out
