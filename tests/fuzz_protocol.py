"""Coverage-guided fuzzing of the RFB server state machine.

    python tests/fuzz_protocol.py --seconds 600            # atheris if installed, else built-in
    python tests/fuzz_protocol.py --engine builtin --seconds 60
    python tests/fuzz_protocol.py --write-corpus           # regenerate fixtures/fuzz/rfb/

Every input is a whole client byte stream. Each is played by `fuzz_harness.replay`
under every security configuration and both dialects, whole and in seeded
chunks, which checks the harness's invariants. Fuzzing starts from the corpus
in fixtures/fuzz/rfb/ and writes every failing input to fixtures/fuzz/crashes/;
the new inputs it finds go to a scratch directory (`--work`), not the fixtures.

Engines: atheris (libFuzzer, instruments trivnc.rfb) when it can be imported,
else a small built-in one: mutations (bit flips, interesting values at length
fields, truncation, splicing, inserted messages) kept when they reach new
line-to-line arcs in trivnc/rfb, measured with sys.settrace.

Exit status: 0 when no input failed, 1 otherwise."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import random
import struct
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CORPUS = ROOT / "fixtures" / "fuzz" / "rfb"
CRASHES = ROOT / "fixtures" / "fuzz" / "crashes"
MAX_LEN = 32768

if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def _harness(instrument: Any = None) -> types.ModuleType:
    """Import the harness (and with it trivnc.rfb), under atheris's
    instrumentation when given."""
    if instrument is None:
        return importlib.import_module("fuzz_harness")
    with instrument.instrument_imports(include=["trivnc.rfb"]):
        return importlib.import_module("fuzz_harness")


# -- the corpus ------------------------------------------------------------------------


#: SetPixelFormat's body for 32 bpp, depth 24, little endian R,G,B,X bytes (what
#: KasmVNC's web client asks for).
RGBX_FORMAT = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 0, 8, 16)


def standard_messages(h: types.ModuleType) -> list[bytes]:
    """One of every standard client message (after a SetEncodings that turns
    on what the others need)."""
    return [
        h.set_encodings(
            [7, 16, 5, 0, 1, -32 + 6, -256 + 2, -312, -313, -0x3F5E1A32, -316, -308, -224, -258]
        ),
        h.set_pixel_format(RGBX_FORMAT),
        h.update_request(False, 0, 0, 640, 480),
        h.update_request(True, 10, 10, 100, 100),
        h.key_event(True, 0x61),
        h.key_event(False, 0x61),
        h.pointer_event(1, 10, 20),
        h.pointer_event(0, 11, 21),
        h.extended_pointer_event(0x01, 5, 5, 0x03),
        h.cut_text("caf\xe9".encode("latin-1")),
        h.extended_clipboard((1 << 24) | (0x1F << 24) | 1, struct.pack(">I", 1 << 20)),
        h.extended_clipboard((1 << 25) | 1),
        h.extended_clipboard(1 << 26),
        h.extended_clipboard((1 << 27) | 1),
        h.clipboard_provide({1: b"hello\r\nworld\x00"}),
        h.enable_continuous_updates(True, 0, 0, 640, 480),
        h.enable_continuous_updates(False, 0, 0, 640, 480),
        h.fence((1 << 31) | 7, b"abc"),
        h.fence(3, b""),
        h.xvp(1, 2),
        h.set_desktop_size(800, 600, [(1, 0, 0, 800, 600, 0)]),
        h.qemu_key_event(True, 0x61, 0x1E),
    ]


def kasm_messages(h: types.ModuleType) -> list[bytes]:
    """What KasmVNC's web client sends, one of each."""
    return [
        h.set_encodings([7, -260, 0, -1024, -1886, -992, -1997, -1023 + 5, -2048 + 50, -312]),
        h.update_request(False, 0, 0, 640, 480),
        h.kasm_pointer_event(1, 10, 10, 0, -3),
        h.key_event(True, 0xFF0D),
        h.cut_text(b"ignored"),
        h.kasm_request_stats(),
        h.kasm_frame_stats(60, 16),
        h.kasm_binary_clipboard([(b"text/plain", b"hello"), (b"image/png", b"\x89PNG")]),
        h.kasm_upgrade_to_udp(b"offer"),
        h.kasm_subscribe_unix_relay(b"relay"),
        h.kasm_unix_relay(b"relay", b"data"),
        h.kasm_video_encoders([7, -260]),
        h.kasm_keep_alive(),
        h.kasm_fixed(188, bytes(9)),
        h.kasm_fixed(189, bytes(7)),
        h.kasm_fixed(190, bytes(3)),
        h.kasm_fixed(191, bytes(3)),
        h.kasm_max_video_resolution(1920, 1080),
        h.fence((1 << 31) | 1, b"k"),
    ]


def build_corpus(h: types.ModuleType) -> dict[str, bytes]:
    """File name -> client byte stream. `valid-CONFIG-DIALECT-...` streams
    must reach the normal phase without error under that configuration and
    dialect (tests/test_fuzz_regression.py checks this); `edge-...` ones
    exercise a refusal or a limit."""
    v33, v37, v38 = h.version_string(3), h.version_string(7), h.version_string(8)
    std = b"".join(standard_messages(h))
    kasm = b"".join(kasm_messages(h))
    corpus: dict[str, bytes] = {}
    valid = [
        ("all", v38, "none"),
        ("all", v37, "none"),
        ("all", v38, "vnc"),
        ("all", v37, "vnc"),
        ("all", v33, "vnc"),
        ("all", v38, "plain"),
        ("all", v38, "tls-plain"),
        ("all", v38, "x509-plain"),
        ("all", v37, "x509-plain"),
        ("none", v33, "none"),
        ("vnc", v38, "vnc"),
        ("vencrypt", v38, "x509-plain"),
    ]
    for config, version, route in valid:
        minor = int(version[8:11])
        shake = h.handshake(version, route)
        corpus[f"valid-{config}-standard-3{minor}-{route}.bin"] = shake + std
        if minor == 8:
            corpus[f"valid-{config}-kasm-3{minor}-{route}.bin"] = shake + kasm
    none38 = h.handshake(v38, "none")
    # Dialect.AUTO (the WebSocket): KasmVNC's web client decides with 184 (or
    # its SetEncodings), a standard one with its first pointer event.
    corpus["valid-all-auto-38-none-kasm-client.bin"] = (
        none38 + h.set_pixel_format(RGBX_FORMAT) + h.kasm_video_encoders([-1025]) + kasm
    )
    corpus["valid-all-auto-38-none-kasm-encodings.bin"] = none38 + kasm
    corpus["valid-all-auto-38-none-standard-client.bin"] = none38 + std
    corpus["valid-none-standard-38-none-odd-version.bin"] = (
        h.handshake(h.version_string(889), "none") + std
    )
    corpus["valid-all-standard-38-none-empty-session.bin"] = none38
    corpus["valid-all-standard-38-none-large-cut-text.bin"] = none38 + h.cut_text(b"x" * 4000)
    # Requests for nothing: harmless to the state machine, but they make the
    # server's send task spin (the xfail test in tests/test_fuzz_network.py).
    raw = h.set_encodings([0])
    corpus["valid-all-standard-38-none-empty-update-request.bin"] = (
        none38 + raw + h.update_request(True, 0, 0, 0, 0)
    )
    corpus["valid-all-standard-38-none-off-screen-update-request.bin"] = (
        none38 + raw + h.update_request(True, 60000, 60000, 10, 10)
    )
    edge = {
        "not-rfb": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "rfb-4": h.version_string(0, major=4),
        "vencrypt-only-refuses-33": v33 + b"\x01",
        "wrong-vnc-response": h.handshake(v38, "vnc", vnc_response=bytes(16)),
        "wrong-password": h.handshake(v38, "x509-plain", password=b"guess") + std,
        "long-username": h.handshake(v38, "plain", username=b"u" * 5000),
        "not-utf8-username": h.handshake(v38, "plain", username=b"\xff\xfe"),
        "bad-vencrypt-version": v38 + b"\x13\x00\x01",
        "unoffered-type": v38 + b"\x10",
        "data-before-tls": h.handshake(v38, "x509-plain") + std,
        "cut-text-over-limit": none38 + h.cut_text(b"y" * 5000),
        "cut-text-negative-without-caps": none38 + struct.pack(">Bxxxi", 6, -100) + bytes(100),
        "encodings-over-limit": none38 + h.set_encodings(list(range(2000))),
        "unknown-message": none38 + b"\x07" + bytes(20),
        "fence-65": none38 + h.fence(0, b"f" * 65),
        "clipboard-bomb": none38
        + h.set_encodings([-0x3F5E1A32])
        + h.clipboard_provide({1: bytes(20 * 1024 * 1024)}),
        "clipboard-bad-zlib": none38
        + h.set_encodings([-0x3F5E1A32])
        + h.extended_clipboard((1 << 28) | 1, b"not zlib"),
        "colour-map-format": none38 + h.set_pixel_format(bytes(16)),
        "qemu-subtype-1": none38 + b"\xff\x01" + bytes(10),
        "continuous-updates-without-pseudo": none38 + h.enable_continuous_updates(True, 0, 0, 1, 1),
        "kasm-clipboard-many-items": none38 + h.kasm_binary_clipboard([(b"a", b"")] * 20),
        "kasm-clipboard-over-limit": none38 + h.kasm_binary_clipboard([(b"a", b"z" * 5000)]),
        "kasm-relay-over-limit": none38 + h.kasm_unix_relay(b"r", b"d" * 5000),
        "truncated-mid-message": (none38 + std)[:-7],
        "desktop-size-255-screens": none38 + h.set_desktop_size(1, 1, [(0, 0, 0, 1, 1, 0)] * 255),
    }
    for name, data in edge.items():
        corpus[f"edge-{name}.bin"] = data
    return corpus


def write_corpus(directory: Path) -> None:
    h = _harness()
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in sorted(build_corpus(h).items()):
        (directory / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes")


# -- running one input -----------------------------------------------------------------


def _target(h: types.ModuleType) -> Callable[[bytes], None]:
    def one_input(data: bytes) -> None:
        h.replay(data, chunkings=("whole", "seeded"), limits=(h.SMALL_LIMITS,))

    return one_input


def save_crash(data: bytes, crashes: Path, error: BaseException) -> Path:
    crashes.mkdir(parents=True, exist_ok=True)
    path = crashes / f"crash-{hashlib.sha1(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    print(f"FAILED: {type(error).__name__}: {error}; input saved to {path}", flush=True)
    return path


# -- atheris -----------------------------------------------------------------------------


def run_atheris(atheris: Any, seconds: int, corpus: Path, crashes: Path, work: Path) -> int:
    h = _harness(atheris)
    target = _target(h)
    crashes.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.argv[0],
        f"-max_total_time={seconds}",
        f"-max_len={MAX_LEN}",
        f"-artifact_prefix={crashes}/",
        "-timeout=20",
        "-rss_limit_mb=4096",
        "-print_final_stats=1",
        str(work),  # new inputs go here; the fixtures stay as committed
        str(corpus),
    ]
    atheris.Setup(argv, target)
    atheris.Fuzz()  # exits the process; a failing input ends up in `crashes`
    return 0


# -- the built-in engine -------------------------------------------------------------------

_INTERESTING = (
    0,
    1,
    2,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x10000,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
    64,
    65,
    4096,
    4097,
    1024,
    1025,
    10 * 1024 * 1024,
    10 * 1024 * 1024 + 1,
)
_FORMATS = {1: ">B", 2: ">H", 4: ">I"}


def mutate(data: bytes, rng: random.Random, pool: list[bytes], words: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 4))):
        op = rng.randrange(9)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip a bit
            i = min(pos, len(buf) - 1)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # an interesting value at what may be a length field
            width = rng.choice((1, 2, 4))
            value = rng.choice(_INTERESTING) & ((1 << (8 * width)) - 1)
            if rng.random() < 0.3:
                value = (-value) & ((1 << (8 * width)) - 1)
            buf[pos : pos + width] = struct.pack(_FORMATS[width], value)
        elif op == 2:  # random bytes in
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and buf:  # a range out
            del buf[pos : pos + rng.randint(1, 32)]
        elif op == 4 and buf:  # a range copied elsewhere
            start = rng.randrange(len(buf))
            piece = buf[start : start + rng.randint(1, 64)]
            at = rng.randrange(len(buf) + 1)
            buf[at:at] = piece
        elif op == 5:  # truncate
            del buf[pos:]
        elif op == 6 and pool:  # splice with another input
            other = rng.choice(pool)
            buf = buf[:pos] + other[rng.randrange(len(other) + 1) :]
        elif op == 7 and words:  # a whole valid message in
            buf[pos:pos] = rng.choice(words)
        elif op == 8 and buf:  # a random byte
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
    return bytes(buf[:MAX_LEN])


Arc = tuple[object, int, int]


def traced(run: Callable[[bytes], None], data: bytes, prefix: str) -> set[Arc]:
    """Run and return the line-to-line arcs taken in files under `prefix`."""
    arcs: set[Arc] = set()

    def global_trace(frame: types.FrameType, event: str, arg: object) -> Any:
        code = frame.f_code
        if not code.co_filename.startswith(prefix):
            return None
        last = -code.co_firstlineno

        def local(frame: types.FrameType, event: str, arg: object) -> Any:
            nonlocal last
            if event == "line":
                arcs.add((code, last, frame.f_lineno))
                last = frame.f_lineno
            return local

        return local

    sys.settrace(global_trace)
    try:
        run(data)
    finally:
        sys.settrace(None)
    return arcs


def run_builtin(seconds: float, corpus: Path, crashes: Path, work: Path, seed: int) -> int:
    h = _harness()
    target = _target(h)
    prefix = _rfb_dir(h)
    rng = random.Random(seed)
    seeds = [p.read_bytes() for p in sorted(corpus.glob("*")) if p.is_file()]
    seeds += [p.read_bytes() for p in sorted(work.glob("*")) if p.is_file()]
    words = standard_messages(h) + kasm_messages(h)
    pool: list[bytes] = []
    seen: set[Arc] = set()
    failures: set[bytes] = set()
    execs = 0

    def run_one(data: bytes) -> set[Arc] | None:
        nonlocal execs
        execs += 1
        try:
            return traced(target, data, prefix)
        except Exception as exc:
            if data not in failures:
                failures.add(data)
                traceback.print_exc()
                save_crash(data, crashes, exc)
            return None

    for data in seeds:
        arcs = run_one(data[:MAX_LEN])
        if arcs is not None:
            seen |= arcs
            pool.append(data[:MAX_LEN])
    print(f"seeded: {len(pool)} inputs, {len(seen)} arcs", flush=True)
    if not pool:
        pool.append(b"")
    deadline = time.monotonic() + seconds
    report = time.monotonic() + 10
    while time.monotonic() < deadline:
        child = mutate(rng.choice(pool), rng, pool, words)
        arcs = run_one(child)
        if arcs is not None and not arcs <= seen:
            seen |= arcs
            pool.append(child)
            (work / f"new-{hashlib.sha1(child).hexdigest()[:16]}.bin").write_bytes(child)
        if time.monotonic() > report:
            report += 10
            print(f"{execs} execs, {len(pool)} inputs, {len(seen)} arcs", flush=True)
    print(f"done: {execs} execs, {len(pool)} inputs, {len(seen)} arcs, {len(failures)} failing")
    return 1 if failures else 0


def _rfb_dir(h: types.ModuleType) -> str:
    module = sys.modules[h.ServerConnection.__module__]
    assert module.__file__ is not None
    return str(Path(module.__file__).parent) + "/"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="how long to fuzz (60)")
    parser.add_argument("--engine", choices=("auto", "atheris", "builtin"), default="auto")
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="seed inputs (read only)")
    parser.add_argument("--crashes", type=Path, default=CRASHES, help="where failing inputs go")
    parser.add_argument("--work", type=Path, help="where new inputs go (default: a temporary dir)")
    parser.add_argument("--seed", type=int, default=None, help="built-in engine's random seed")
    parser.add_argument("--write-corpus", action="store_true", help="regenerate --corpus, exit")
    args = parser.parse_args(argv)
    if args.write_corpus:
        write_corpus(args.corpus)
        return 0
    atheris = None
    if args.engine != "builtin":
        try:
            atheris = importlib.import_module("atheris")
        except ImportError:
            if args.engine == "atheris":
                parser.error("atheris is not installed (pip install --only-binary=:all: atheris)")
    with tempfile.TemporaryDirectory(prefix="trivnc-fuzz-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        if atheris is not None:
            return run_atheris(atheris, args.seconds, args.corpus, args.crashes, work)
        seed = args.seed if args.seed is not None else random.randrange(1 << 32)
        print(f"built-in engine, seed {seed}", flush=True)
        return run_builtin(args.seconds, args.corpus, args.crashes, work, seed)


if __name__ == "__main__":
    sys.exit(main())
