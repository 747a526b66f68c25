"""Every stored fuzz input, replayed through the RFB state machine: the seed
corpus (fixtures/fuzz/rfb/, written by `python tests/fuzz_protocol.py
--write-corpus`) and every input that once broke it (fixtures/fuzz/crashes/).

Each runs under every security configuration, every dialect (AUTO too), small and default
limits, whole, in seeded chunks and byte by byte (`fuzz_harness.replay`).
`valid-CONFIG-DIALECT-*` inputs must also get through the handshake, with
no error, under their configuration and dialect."""

from __future__ import annotations

from pathlib import Path

import fuzz_harness as h
import fuzz_protocol
import pytest

from trivnc.rfb import events as ev
from trivnc.rfb.connection import Dialect, State

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "fuzz"
CORPUS = FIXTURES / "rfb"
CRASHES = FIXTURES / "crashes"


def _inputs(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix != ".md")


INPUTS = _inputs(CORPUS) + _inputs(CRASHES)


def test_the_corpus_covers_every_handshake_and_dialect() -> None:
    names = {p.name for p in _inputs(CORPUS)}
    assert set(fuzz_protocol.build_corpus(h)) <= names, "run tests/fuzz_protocol.py --write-corpus"
    valid = [n for n in names if n.startswith("valid-")]
    for route in ("none", "vnc", "plain", "tls-plain", "x509-plain"):
        assert any(n.endswith(f"-{route}.bin") for n in valid), route
    for version in ("33", "37", "38"):
        assert any(f"-{version}-" in n for n in valid), version
    for dialect in Dialect:
        assert any(f"-{dialect.value}-" in n for n in valid), dialect


@pytest.mark.parametrize("path", INPUTS, ids=[p.name for p in INPUTS])
def test_replay(path: Path) -> None:
    outcomes = h.replay(path.read_bytes())
    if not path.name.startswith("valid-"):
        return
    _, config, dialect_name, _ = path.name.split("-", 3)
    dialect = Dialect(dialect_name)
    for index in range(2):
        outcome = outcomes[config, dialect, index]
        assert outcome.error is None, outcome.error
        assert outcome.state is State.NORMAL
        init = [i for i, e in enumerate(outcome.events) if isinstance(e, ev.ClientInit)]
        assert len(init) == 1
        if "empty-session" not in path.name:
            assert len(outcome.events) > init[0] + 1, "no message after the handshake"
