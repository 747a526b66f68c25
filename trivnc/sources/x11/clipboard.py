# The X clipboard, both ways (ICCCM section 2, "Peer-to-Peer Communication by
# Means of Selections"). Reading: XFIXES tells us whenever another client
# takes CLIPBOARD or PRIMARY; we ask the new owner to convert the selection to
# UTF8_STRING (or STRING) into a property on a hidden window of ours, reading
# big values in INCR chunks. Writing: we own both selections and answer
# SelectionRequests, again in INCR chunks when the text is bigger than one
# request may carry.
from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import trio
from Xlib import X, Xatom
from Xlib import error as xerror
from Xlib.display import Display
from Xlib.ext import xfixes
from Xlib.protocol import event as xevent

from ..base import SourceListener

log = logging.getLogger(__name__)

#: Size of one INCR chunk we send. Far below the core protocol's request limit
#: (python-xlib has no BIG-REQUESTS, so 256 KiB per request at most).
INCR_CHUNK = 64 * 1024
#: Outgoing INCR transfers kept at once; a requestor that never reads its
#: chunks must not keep our copies of the text alive forever.
MAX_OUTGOING = 8


@dataclass
class _Incoming:
    """A conversion we asked another selection owner for."""

    target: int
    #: Chunks read so far, once the owner answered with INCR.
    chunks: list[bytes] | None = None
    size: int = 0
    #: Over max_size: the rest of an INCR transfer is drained, not kept.
    refused: bool = False
    value_type: int = 0


@dataclass
class _Outgoing:
    """An INCR transfer we serve to a requestor, one chunk per deletion."""

    requestor: Any
    prop: int
    value_type: int
    data: bytes
    offset: int = 0
    done: bool = field(default=False)


class X11Clipboard:
    """Shares the X display's CLIPBOARD and PRIMARY selections as text.

    Owns its own connection, used only on the trio thread. Text from other X
    clients goes to `listener.clipboard_changed`; `set_text` makes trivnc the
    owner of both selections. Texts over `max_size` bytes (UTF-8) are refused
    both ways.
    """

    def __init__(
        self, display_name: str, listener: SourceListener, max_size: int = 1 << 20
    ) -> None:
        self.display_name = display_name
        self.listener = listener
        self.max_size = max_size
        self._display: Any = None
        self._window: Any = None
        self._text: str | None = None
        self._last_text: str | None = None
        self._owned: set[int] = set()
        self._incoming: dict[int, _Incoming] = {}
        self._outgoing: OrderedDict[tuple[int, int], _Outgoing] = OrderedDict()

    # -- setup and event loop ------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch and serve the selections until cancelled or the X server goes
        away."""
        try:
            d = Display(self.display_name)
        except (xerror.DisplayError, OSError) as exc:
            log.error("X11 clipboard: cannot open display %s: %s", self.display_name, exc)
            task_status.started()
            return
        try:
            if not d.query_extension("XFIXES").present:
                log.warning("X11 clipboard: no XFIXES on %s; clipboard not shared", d)
                task_status.started()
                return
            self._setup(d)
            task_status.started()
            while True:
                while d.pending_events():
                    ev = d.next_event()
                    try:
                        self._handle_event(ev)
                    except xerror.XError as exc:
                        log.warning("X11 clipboard: X error while handling %s: %s", ev, exc)
                    d.flush()
                await trio.lowlevel.wait_readable(d.fileno())
        except xerror.XError as exc:
            # Setup failed (XFIXES refused a request): this feature is off.
            log.warning("X11 clipboard: stopped by X error: %s", exc)
        except (xerror.ConnectionClosedError, OSError) as exc:
            log.warning("X11 clipboard: connection to %s lost: %s", self.display_name, exc)
        finally:
            self._display = self._window = None
            with contextlib.suppress(xerror.ConnectionClosedError, OSError):
                d.close()

    def _setup(self, d: Any) -> None:
        d.set_error_handler(self._on_x_error)
        atom = d.intern_atom
        self._clipboard = atom("CLIPBOARD")
        self._utf8 = atom("UTF8_STRING")
        self._text_atom = atom("TEXT")
        self._targets = atom("TARGETS")
        self._incr = atom("INCR")
        # One property per selection, so that a CLIPBOARD transfer and a
        # PRIMARY transfer can run at the same time without mixing.
        self._props = {
            self._clipboard: atom("TRIVNC_CLIPBOARD"),
            Xatom.PRIMARY: atom("TRIVNC_PRIMARY"),
        }
        root = d.screen().root
        # Never mapped: it only carries properties and owns selections.
        self._window = root.create_window(
            -10, -10, 1, 1, 0, X.CopyFromParent, event_mask=X.PropertyChangeMask
        )
        self._window.set_wm_name("trivnc clipboard")
        d.xfixes_query_version()  # XFIXES answers nothing else before this
        # Only new owners matter: a selection whose owner went away holds
        # nothing to fetch, and viewers keep the last text they got.
        mask = xfixes.XFixesSetSelectionOwnerNotifyMask
        for selection in self._props:
            d.xfixes_select_selection_input(self._window, selection, mask)
        self._owner_notify = d.extension_event.SetSelectionOwnerNotify
        self._display = d
        if self._text is not None:
            self._take_ownership()  # set_text() was called before we connected
        else:
            # Whatever is on the clipboard already is the viewers' to see.
            for selection in self._props:
                if d.get_selection_owner(selection) != X.NONE:
                    self._convert(selection, self._utf8, X.CurrentTime)
        d.flush()

    @staticmethod
    def _on_x_error(err: Any, request: Any = None) -> None:
        # Asynchronous errors: typically a requestor window that vanished
        # before we answered it.
        log.warning("X11 clipboard: X error %s", err)

    def _handle_event(self, ev: Any) -> None:
        if (ev.type, getattr(ev, "sub_code", None)) == self._owner_notify:
            self._owner_changed(ev)
        elif ev.type == X.SelectionNotify:
            self._selection_notify(ev)
        elif ev.type == X.PropertyNotify:
            self._property_notify(ev)
        elif ev.type == X.SelectionRequest:
            self._selection_request(ev)
        elif ev.type == X.SelectionClear:
            self._owned.discard(ev.atom)

    # -- reading other clients' selections --------------------------------------------

    def _owner_changed(self, ev: Any) -> None:
        if ev.selection not in self._props:
            return
        if _xid(ev.owner) in (X.NONE, self._window.id):
            return  # cleared, or our own set_text
        self._owned.discard(ev.selection)
        self._convert(ev.selection, self._utf8, ev.timestamp)

    def _convert(self, selection: int, target: int, time: int) -> None:
        # A newer owner replaces any transfer still running for this selection.
        self._incoming[selection] = _Incoming(target)
        self._window.delete_property(self._props[selection])
        self._window.convert_selection(selection, target, self._props[selection], time)

    def _selection_notify(self, ev: Any) -> None:
        incoming = self._incoming.get(ev.selection)
        if (
            incoming is None
            or _xid(ev.requestor) != self._window.id
            or ev.target != incoming.target
        ):
            return
        if ev.property == X.NONE:
            if incoming.target == self._utf8:
                self._convert(ev.selection, Xatom.STRING, ev.time)  # an older client
            else:
                del self._incoming[ev.selection]
                log.debug("X11 clipboard: the owner offers no text")
            return
        prop = self._props[ev.selection]
        limit_words = self.max_size // 4 + 1
        reply = self._window.get_property(prop, X.AnyPropertyType, 0, limit_words)
        self._window.delete_property(prop)
        if reply is None:
            del self._incoming[ev.selection]
            return
        if reply.property_type == self._incr:
            # Our deletion above tells the owner to send the first chunk.
            announced = int(reply.value[0]) if len(reply.value) else 0
            incoming.chunks = []
            if announced > self.max_size:
                log.warning(
                    "X11 clipboard: refusing %d bytes of selection (max %d)",
                    announced,
                    self.max_size,
                )
                incoming.refused = True
            return
        del self._incoming[ev.selection]
        if reply.bytes_after:
            log.warning("X11 clipboard: refusing a selection over %d bytes", self.max_size)
            return
        self._deliver(reply.property_type, _as_bytes(reply.value))

    def _property_notify(self, ev: Any) -> None:
        if ev.state == X.PropertyDelete:
            self._chunk_taken(ev)
            return
        if _xid(ev.window) != self._window.id:
            return
        selection = next((s for s, p in self._props.items() if p == ev.atom), None)
        incoming = self._incoming.get(selection) if selection is not None else None
        if selection is None or incoming is None or incoming.chunks is None:
            return  # the owner writing before its SelectionNotify, or not ours
        if incoming.refused:
            # Drain without reading: a zero-length write marks the end.
            reply = self._window.get_property(ev.atom, X.AnyPropertyType, 0, 0)
            self._window.delete_property(ev.atom)
            if reply is None or reply.bytes_after == 0:
                del self._incoming[selection]
            return
        room = self.max_size - incoming.size
        reply = self._window.get_property(ev.atom, X.AnyPropertyType, 0, room // 4 + 1)
        self._window.delete_property(ev.atom)
        if reply is None:
            del self._incoming[selection]
            return
        chunk = _as_bytes(reply.value)
        if not chunk and not reply.bytes_after:
            del self._incoming[selection]
            self._deliver(incoming.value_type, b"".join(incoming.chunks))
            return
        incoming.value_type = reply.property_type
        incoming.size += len(chunk) + reply.bytes_after
        if incoming.size > self.max_size:
            log.warning("X11 clipboard: refusing a selection over %d bytes", self.max_size)
            incoming.refused = True
            incoming.chunks = []
            return
        incoming.chunks.append(chunk)

    def _deliver(self, value_type: int, data: bytes) -> None:
        if value_type == Xatom.STRING:
            text = data.decode("latin-1")
        else:
            text = data.decode("utf-8", errors="replace")
        if text != self._last_text:
            self._last_text = text
            self.listener.clipboard_changed(text)

    # -- owning the selections ----------------------------------------------------------

    async def set_text(self, text: str) -> None:
        """Make `text` the content of CLIPBOARD and PRIMARY."""
        size = len(text.encode("utf-8"))
        if size > self.max_size:
            log.warning("X11 clipboard: refusing %d bytes of text (max %d)", size, self.max_size)
            return
        self._text = self._last_text = text
        if self._display is None:
            return  # run() takes ownership once it has connected
        try:
            self._take_ownership()
            self._display.flush()
        except (xerror.XError, xerror.ConnectionClosedError, OSError) as exc:
            log.warning("X11 clipboard: cannot take the selection: %s", exc)

    def _take_ownership(self) -> None:
        for selection in self._props:
            self._window.set_selection_owner(selection, X.CurrentTime)
            self._owned.add(selection)
            self._incoming.pop(selection, None)

    def _selection_request(self, ev: Any) -> None:
        requestor = ev.requestor
        # Obsolete clients pass no property: ICCCM says use the target's name.
        prop = ev.property if ev.property != X.NONE else ev.target
        answered = self._answer(requestor, prop, ev.selection, ev.target)
        notify = xevent.SelectionNotify(
            time=ev.time,
            requestor=requestor,
            selection=ev.selection,
            target=ev.target,
            property=prop if answered else X.NONE,
        )
        requestor.send_event(notify, event_mask=0)

    def _answer(self, requestor: Any, prop: int, selection: int, target: int) -> bool:
        if self._text is None or selection not in self._owned:
            return False
        if target == self._targets:
            offered = [self._targets, self._utf8, Xatom.STRING, self._text_atom]
            requestor.change_property(prop, Xatom.ATOM, 32, offered)
            return True
        if target in (self._utf8, self._text_atom):
            value_type, data = self._utf8, self._text.encode("utf-8")
        elif target == Xatom.STRING:
            value_type, data = Xatom.STRING, self._text.encode("latin-1", errors="replace")
        else:
            return False
        if len(data) <= INCR_CHUNK:
            requestor.change_property(prop, value_type, 8, data)
            return True
        # Too big for one request: announce INCR and send a chunk each time
        # the requestor deletes the property.
        requestor.change_attributes(event_mask=X.PropertyChangeMask)
        requestor.change_property(prop, self._incr, 32, [len(data)])
        self._outgoing[(requestor.id, prop)] = _Outgoing(requestor, prop, value_type, data)
        while len(self._outgoing) > MAX_OUTGOING:
            _key, dropped = self._outgoing.popitem(last=False)
            log.warning("X11 clipboard: abandoning a stalled transfer to %#x", dropped.requestor.id)
        return True

    def _chunk_taken(self, ev: Any) -> None:
        transfer = self._outgoing.get((_xid(ev.window), ev.atom))
        if transfer is None:
            return
        chunk = transfer.data[transfer.offset : transfer.offset + INCR_CHUNK]
        transfer.offset += len(chunk)
        # The last write is empty: that tells the requestor we are done.
        transfer.requestor.change_property(transfer.prop, transfer.value_type, 8, chunk)
        if not chunk:
            del self._outgoing[(_xid(ev.window), ev.atom)]
            if not any(t.requestor.id == _xid(ev.window) for t in self._outgoing.values()):
                transfer.requestor.change_attributes(event_mask=X.NoEventMask)


def _xid(value: Any) -> int:
    """python-xlib decodes window fields as Window objects, which never
    compare equal to plain ids (X.NONE included)."""
    return int(getattr(value, "id", value))


def _as_bytes(value: Any) -> bytes:
    """python-xlib returns 8-bit property data as bytes (or str on old
    versions); anything else is not text."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("latin-1")
    return b""
