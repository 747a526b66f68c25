# Viewers' keyboard and pointer into an X server through XTEST.
#
# RFB (RFC 6143 7.5.4 KeyEvent, 7.5.5 PointerEvent) speaks in keysyms and a
# button mask; XTEST speaks in keycodes and button numbers. The gap is the
# keymap: a keysym has to be found on some key, at a shift level we can reach
# by pressing or lifting Shift, and a keysym the keymap lacks (a euro sign on a
# US map, a dead key, a Cyrillic letter) is put on an unused keycode for as
# long as it is needed, the way x11vnc and TigerVNC do it.
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import trio
from Xlib import XK, X
from Xlib import display as xdisplay
from Xlib import error as xerror
from Xlib.ext import xtest

log = logging.getLogger(__name__)

NO_SYMBOL = 0

#: Keysyms that act as modifiers or locks. They are pressed on whatever key
#: carries them without adjusting Shift: the key's level does not matter to
#: the server, only its modifier bits do.
_MODIFIER_KEYSYMS = frozenset(
    {
        *range(0xFFE1, 0xFFEF),  # Shift_L ... Hyper_R, Caps_Lock, Shift_Lock
        *range(0xFE01, 0xFE14),  # ISO_Lock, ISO_Level3_Shift ... ISO_Level5_Lock
        0xFF7E,  # Mode_switch
        0xFF7F,  # Num_Lock
        0xFF14,  # Scroll_Lock
    }
)
#: Keysyms whose modifier shifts the level beyond what Shift picks; held, they
#: would turn level 0/1 into level 2/3, so they are lifted around a key press.
_LEVEL_SHIFT_KEYSYMS = frozenset({0xFE03, 0xFE11, 0xFF7E})

#: RFB button mask bits for held buttons -> X button numbers.
_HELD_BUTTONS = ((0, 1), (1, 2), (2, 3), (7, 8), (8, 9))
#: RFB mask bits that are wheel steps -> X button numbers (a click each).
_WHEEL_BUTTONS = ((3, 4), (4, 5), (5, 6), (6, 7))
#: A viewer's scroll delta becomes this many clicks at most: a hostile or
#: buggy delta must not turn into millions of X events.
MAX_SCROLL_CLICKS = 32
#: Keysyms are 29-bit values (X11 protocol, "Keysyms").
MAX_KEYSYM = 0x1FFFFFFF
#: XTEST carries coordinates as INT16; RFB's are U16.
MAX_COORDINATE = 0x7FFF
#: Keysyms kept on spare keycodes at once (least recently used goes first).
MAX_EXTRA_KEYSYMS = 16


def _case_pair(keysym: int) -> tuple[int, int]:
    """(lower, upper) of a keysym, for the core protocol rule that a key listing
    only a lowercase letter produces its uppercase when shifted. Covers
    Latin-1 and Unicode keysyms, which is what viewers send for letters."""
    if 0x20 <= keysym <= 0xFF:
        char = chr(keysym)
    elif 0x1000100 <= keysym <= 0x110FFFF:
        char = chr(keysym - 0x1000000)
    else:
        return keysym, keysym
    lower, upper = char.lower(), char.upper()
    if len(lower) != 1 or len(upper) != 1:
        return keysym, keysym

    def back(c: str) -> int:
        code = ord(c)
        return code if code <= 0xFF else code + 0x1000000

    return back(lower), back(upper)


def effective_levels(row: tuple[int, ...] | list[int]) -> tuple[int, int]:
    """The keysyms a key yields without and with Shift in the first group,
    with the core protocol's rules for a missing second entry (X11 protocol,
    section 5 "Keyboards")."""
    first = row[0] if len(row) > 0 else NO_SYMBOL
    second = row[1] if len(row) > 1 else NO_SYMBOL
    if second == NO_SYMBOL:
        lower, upper = _case_pair(first)
        if lower != upper:
            return lower, upper
        return first, first
    return first, second


class X11Input:
    """Injects viewers' keys and pointer into the X display `display_name`.

    Owns its own connection, used only on the trio thread; `run()` must be
    running for keymap changes made by others to be noticed.
    """

    def __init__(self, display_name: str) -> None:
        self.display_name = display_name
        self._display: Any = None
        self._closed = False
        self._min_keycode = 8
        self._keymap: list[tuple[int, ...]] = []
        #: keysym -> [(keycode, level)] for levels 0 and 1 of group 1.
        self._index: dict[int, list[tuple[int, int]]] = {}
        self._shift_keycodes: list[int] = []
        self._level_shift_keycodes: set[int] = set()
        self._spare_keycodes: list[int] = []
        #: keysym -> the spare keycode it was put on, least recently used first.
        self._extra: OrderedDict[int, int] = OrderedDict()
        #: keysym the viewer holds -> keycode we pressed for it.
        self._pressed: dict[int, int] = {}
        self._buttons = 0
        self._position: tuple[int, int] | None = None

    # -- connection and events -------------------------------------------------

    def _connect(self) -> Any:
        """The Display, opened on first use (input may arrive before `run()`
        has been scheduled). None once closed or if the server is gone."""
        if self._display is None and not self._closed:
            try:
                d = xdisplay.Display(self.display_name)
            except (xerror.DisplayError, OSError) as exc:
                log.error("X11 input: cannot open display %s: %s", self.display_name, exc)
                self._closed = True
                return None
            d.set_error_handler(self._on_x_error)
            try:
                if not d.query_extension("XTEST").present:
                    log.error("X11 input: display %s has no XTEST extension", self.display_name)
                    d.close()
                    self._closed = True
                    return None
                self._display = d
                self._min_keycode = d.display.info.min_keycode
                self._load_keymap()
                self._load_modifiers()
            except (xerror.XError, xerror.ConnectionClosedError, OSError) as exc:
                log.error("X11 input: cannot read the keymap of %s: %s", self.display_name, exc)
                self._display = None
                self._closed = True
                return None
        return self._display

    @staticmethod
    def _on_x_error(err: Any, request: Any = None) -> None:
        # Errors of requests without replies arrive asynchronously; a bad
        # keycode or a lost race with a keymap change is logged, not fatal.
        log.warning("X11 input: X error %s", err)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve this connection's events (MappingNotify refreshes the keymap)
        until cancelled or the X server goes away; then release every key and
        button still held and give back the spare keycodes."""
        d = self._connect()
        task_status.started()
        if d is None:
            return
        try:
            while True:
                while d.pending_events():
                    self._handle_event(d.next_event())
                await trio.lowlevel.wait_readable(d.fileno())
        except (xerror.XError, xerror.ConnectionClosedError, OSError) as exc:
            log.warning("X11 input: connection to %s lost: %s", self.display_name, exc)
            self._display = None
        finally:
            self.close()

    def _handle_event(self, ev: Any) -> None:
        if ev.type != X.MappingNotify:
            return
        try:
            if ev.request == X.MappingKeyboard:
                self._load_keymap()
            elif ev.request == X.MappingModifier:
                self._load_modifiers()
        except xerror.XError as exc:
            log.warning("X11 input: reading the keymap failed: %s", exc)

    def close(self) -> None:
        """Release everything held, restore the spare keycodes, disconnect."""
        d, self._display = self._display, None
        self._closed = True
        if d is None:
            return
        try:
            self._release_all(d)
            for keycode in self._extra.values():
                d.change_keyboard_mapping(keycode, [(NO_SYMBOL, NO_SYMBOL)])
            self._extra.clear()
            # A round trip before closing: requests still queued when a
            # client hangs up were seen to be dropped by Xvfb.
            d.sync()
            d.close()
        except (xerror.XError, xerror.ConnectionClosedError, OSError) as exc:
            log.debug("X11 input: while closing: %r", exc)

    # -- keymap ------------------------------------------------------------------

    def _load_keymap(self) -> None:
        d = self._display
        info = d.display.info
        rows = d.get_keyboard_mapping(info.min_keycode, info.max_keycode - info.min_keycode + 1)
        self._keymap = [tuple(row) for row in rows]
        # Our own assignments survive a refresh only if the key still carries
        # them: someone else (setxkbmap) may have rewritten the whole map.
        for keysym, keycode in list(self._extra.items()):
            if self._row(keycode)[:1] != (keysym,):
                del self._extra[keysym]
        ours = set(self._extra.values())
        self._spare_keycodes = [
            self._min_keycode + i
            for i, row in enumerate(self._keymap)
            # Keycode 8 is avoided: some clients treat the lowest keycode
            # specially. Highest first keeps our keys away from real ones.
            if self._min_keycode + i > 8
            and (all(s == NO_SYMBOL for s in row) or self._min_keycode + i in ours)
        ][::-1]
        self._rebuild_index()

    def _rebuild_index(self) -> None:
        index: dict[int, list[tuple[int, int]]] = {}
        level_shift: set[int] = set()
        for i, row in enumerate(self._keymap):
            keycode = self._min_keycode + i
            for level, keysym in enumerate(effective_levels(row)):
                if keysym != NO_SYMBOL:
                    entries = index.setdefault(keysym, [])
                    if (keycode, level) not in entries:
                        entries.append((keycode, level))
            if any(s in _LEVEL_SHIFT_KEYSYMS for s in row):
                level_shift.add(keycode)
        self._index = index
        self._level_shift_keycodes = level_shift

    def _load_modifiers(self) -> None:
        modmap = self._display.get_modifier_mapping()
        self._shift_keycodes = [k for k in modmap[X.ShiftMapIndex] if k]

    def _row(self, keycode: int) -> tuple[int, ...]:
        i = keycode - self._min_keycode
        return self._keymap[i] if 0 <= i < len(self._keymap) else ()

    def _set_row(self, keycode: int, row: tuple[int, ...]) -> None:
        i = keycode - self._min_keycode
        if 0 <= i < len(self._keymap):
            self._keymap[i] = row
            self._rebuild_index()

    def _assign_spare(self, d: Any, keysym: int) -> int | None:
        """Put `keysym` on a spare keycode (both levels, so Shift does not
        matter) and return it, evicting the least recently used assignment
        whose key is not held."""
        keycode = self._extra.get(keysym)
        if keycode is not None:
            self._extra.move_to_end(keysym)
            return keycode
        used = set(self._extra.values())
        free = [k for k in self._spare_keycodes if k not in used]
        if free and len(self._extra) < MAX_EXTRA_KEYSYMS:
            keycode = free[0]
        else:
            held = set(self._pressed.values())
            victim = next((ks for ks, kc in self._extra.items() if kc not in held), None)
            if victim is None:
                log.warning("X11 input: no spare keycode for keysym %#x", keysym)
                return None
            keycode = self._extra.pop(victim)
        d.change_keyboard_mapping(keycode, [(keysym, keysym)])
        self._extra[keysym] = keycode
        self._set_row(keycode, (keysym, keysym))
        log.debug("X11 input: keysym %#x put on keycode %d", keysym, keycode)
        return keycode

    # -- keys --------------------------------------------------------------------

    async def key_event(self, keysym: int, down: bool) -> None:
        """Press or release the key for an X11 keysym."""
        if not 0 < keysym <= MAX_KEYSYM:
            return  # NoSymbol, or not a keysym at all (they have 29 bits)
        d = self._connect()
        if d is None:
            return
        try:
            if down:
                self._key_down(d, keysym)
            else:
                self._key_up(d, keysym)
            d.flush()
        except (xerror.XError, xerror.ConnectionClosedError, OSError) as exc:
            log.warning("X11 input: key event %#x failed: %s", keysym, exc)

    def _key_down(self, d: Any, keysym: int) -> None:
        held = set(self._pressed.values())
        shift_held = [k for k in self._shift_keycodes if k in held]
        candidates = self._index.get(keysym, [])
        if keysym in _MODIFIER_KEYSYMS or keysym in self._extra:
            # Level is irrelevant for modifiers and for our own keys.
            choice: tuple[int, int | None] | None = (candidates[0][0], None) if candidates else None
        else:
            wanted = 1 if shift_held else 0
            ordered = sorted(candidates, key=lambda c: (c[1] != wanted, c[0]))
            choice = ordered[0] if ordered else None
            if choice is not None and (choice[0], 1 - choice[1]) in candidates:
                # Same keysym on both levels: no need to touch Shift.
                choice = (choice[0], None)
        if choice is None:
            keycode = self._assign_spare(d, keysym)
            if keycode is None:
                return
            choice = (keycode, None)
        keycode, level = choice

        lift: list[int] = []
        add: list[int] = []
        if level is not None:
            # A held AltGr would move us to level 2/3: lift it for this press.
            lift = [k for k in self._level_shift_keycodes if k in held]
            if level == 0:
                lift += shift_held
            elif not shift_held:
                add = self._shift_keycodes[:1] or self._keycodes_for(XK.XK_Shift_L)
        for k in lift:
            xtest.fake_input(d, X.KeyRelease, k)
        for k in add:
            xtest.fake_input(d, X.KeyPress, k)
        xtest.fake_input(d, X.KeyPress, keycode)
        for k in add:
            xtest.fake_input(d, X.KeyRelease, k)
        for k in lift:
            xtest.fake_input(d, X.KeyPress, k)
        self._pressed[keysym] = keycode

    def _keycodes_for(self, keysym: int) -> list[int]:
        return [kc for kc, _level in self._index.get(keysym, [])[:1]]

    def _key_up(self, d: Any, keysym: int) -> None:
        keycode = self._pressed.pop(keysym, None)
        if keycode is None:
            # Some viewers release a different keysym than they pressed
            # ("1" after "!" once Shift is up): release the key it lives on
            # if we are holding that key.
            held = set(self._pressed.values())
            keycode = next((kc for kc, _ in self._index.get(keysym, []) if kc in held), None)
            if keycode is None:
                return
            for ks in [ks for ks, kc in self._pressed.items() if kc == keycode]:
                del self._pressed[ks]
        if keycode in self._pressed.values():
            return  # another keysym still holds the same key
        xtest.fake_input(d, X.KeyRelease, keycode)

    async def release_all(self) -> None:
        """Release every key and button a viewer left held (on disconnect)."""
        d = self._display
        if d is None:
            return
        try:
            self._release_all(d)
        except (xerror.XError, xerror.ConnectionClosedError, OSError) as exc:
            log.warning("X11 input: releasing held input failed: %s", exc)

    def _release_all(self, d: Any) -> None:
        for keycode in reversed(dict.fromkeys(self._pressed.values())):
            xtest.fake_input(d, X.KeyRelease, keycode)
        self._pressed.clear()
        for bit, button in _HELD_BUTTONS:
            if self._buttons & (1 << bit):
                xtest.fake_input(d, X.ButtonRelease, button)
        self._buttons = 0
        d.flush()

    # -- pointer -----------------------------------------------------------------

    async def pointer_event(self, x: int, y: int, buttons: int) -> None:
        """Move to (x, y) if it changed, then press or release the buttons
        whose bits changed; wheel bits click once when they become set."""
        d = self._connect()
        if d is None:
            return
        try:
            self._move(d, x, y)
            changed = buttons ^ self._buttons
            for bit, button in _HELD_BUTTONS:
                if changed & (1 << bit):
                    kind = X.ButtonPress if buttons & (1 << bit) else X.ButtonRelease
                    xtest.fake_input(d, kind, button)
            for bit, button in _WHEEL_BUTTONS:
                if changed & buttons & (1 << bit):
                    self._click(d, button, 1)
            self._buttons = buttons
            d.flush()
        except (xerror.XError, xerror.ConnectionClosedError, OSError) as exc:
            log.warning("X11 input: pointer event failed: %s", exc)

    async def scroll_event(self, x: int, y: int, dx: int, dy: int) -> None:
        """KasmVNC's scroll deltas: each step is one wheel click (dy > 0 scrolls
        down, dx > 0 right)."""
        d = self._connect()
        if d is None:
            return
        try:
            self._move(d, x, y)
            self._click(d, 5 if dy > 0 else 4, min(abs(dy), MAX_SCROLL_CLICKS))
            self._click(d, 7 if dx > 0 else 6, min(abs(dx), MAX_SCROLL_CLICKS))
            d.flush()
        except (xerror.XError, xerror.ConnectionClosedError, OSError) as exc:
            log.warning("X11 input: scroll event failed: %s", exc)

    def _move(self, d: Any, x: int, y: int) -> None:
        # The server clamps to the screen; we only keep values packable.
        x = min(max(x, 0), MAX_COORDINATE)
        y = min(max(y, 0), MAX_COORDINATE)
        if self._position != (x, y):
            xtest.fake_input(d, X.MotionNotify, x=x, y=y)
            self._position = (x, y)

    @staticmethod
    def _click(d: Any, button: int, count: int) -> None:
        for _ in range(count):
            xtest.fake_input(d, X.ButtonPress, button)
            xtest.fake_input(d, X.ButtonRelease, button)
