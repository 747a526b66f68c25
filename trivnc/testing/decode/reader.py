# Decoders are written as generators, the sans-io way: a decoder yields the
# number of bytes it needs next and is sent exactly that many bytes. The same
# decoder then runs over a bytes buffer in unit tests (`run_on_bytes`) and over
# a socket in the test client (which awaits the bytes between steps).
from __future__ import annotations

import struct
from collections.abc import Generator
from typing import TypeVar

T = TypeVar("T")

#: A decoder step: yields a byte count, receives that many bytes, returns T.
Needs = Generator[int, bytes, T]


def read(n: int) -> Needs[bytes]:
    """`data = yield from read(n)`: exactly n bytes."""
    if n == 0:
        return b""
    data = yield n
    return data


def read_u8() -> Needs[int]:
    return (yield from read(1))[0]


def read_u16() -> Needs[int]:
    return int.from_bytes((yield from read(2)), "big")


def read_u32() -> Needs[int]:
    return int.from_bytes((yield from read(4)), "big")


def read_s32() -> Needs[int]:
    value: int = struct.unpack(">i", (yield from read(4)))[0]
    return value


class Truncated(Exception):
    """The buffer ended before the decoder was done."""


def run_on_bytes(gen: Needs[T], data: bytes, *, exact: bool = True) -> T:
    """Drive a decoder over `data`; with `exact`, every byte must be consumed."""
    pos = 0
    try:
        n = next(gen)
        while True:
            if pos + n > len(data):
                raise Truncated(f"needed {n} bytes at offset {pos}, have {len(data) - pos}")
            chunk = data[pos : pos + n]
            pos += n
            n = gen.send(chunk)
    except StopIteration as stop:
        if exact and pos != len(data):
            raise AssertionError(
                f"decoder left {len(data) - pos} of {len(data)} bytes unread"
            ) from None
        result: T = stop.value
        return result
