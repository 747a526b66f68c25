"""Developer sessions: tests, lint, typecheck (the default), e2e, bench and demo."""

from __future__ import annotations

import os
import pathlib

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.reuse_existing_virtualenvs = True

HERE = pathlib.Path(__file__).parent


def _system_deps(session: nox.Session) -> None:
    """Debian packages the real-client tests need (Xvfb, TigerVNC viewer,
    vncsnapshot, x11vnc); installed only when missing."""
    session.run("bash", str(HERE / "tests" / "system-deps.sh"), external=True)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite, real clients included."""
    _system_deps(session)
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs, env={"PYTHONHASHSEED": "0"})


@nox.session
def e2e(session: nox.Session) -> None:
    """Only the tests that drive trivnc with real third-party clients."""
    _system_deps(session)
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "realclient", *session.posargs)


@nox.session
def fuzz(session: nox.Session) -> None:
    """Coverage-guided fuzzing of the RFB state machine (atheris; seconds as
    the first argument, default 600), then the fuzz tests with many examples.
    Failing inputs land in fixtures/fuzz/crashes/."""
    session.install("-e", ".[test]")
    session.install("--only-binary=atheris", "atheris==3.0.0")
    seconds = session.posargs[0] if session.posargs else "600"
    session.run("python", "tests/fuzz_protocol.py", "--seconds", seconds)
    session.run(
        "pytest",
        "-p",
        "no:cacheprovider",
        "tests/test_fuzz_protocol.py",
        "tests/test_fuzz_regression.py",
        "tests/test_fuzz_network.py",
        env={"TRIVNC_FUZZ_EXAMPLES": "10000"},
    )


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site (docs/mkdocs.yml), warnings as errors. The site
    goes to docs/site/, or to the directory given after `--`."""
    session.install("-e", ".[docs]")
    site = session.posargs[0] if session.posargs else str(HERE / "docs" / "site")
    session.run(
        "mkdocs",
        "build",
        "--strict",
        "--config-file",
        str(HERE / "docs" / "mkdocs.yml"),
        "--site-dir",
        site,
    )


@nox.session
def gui_example(session: nox.Session) -> None:
    """docs/examples/nox_gui: a GUI application's tests on a trivnc desktop,
    with screenshots of failures and a JUnit report kept in
    docs/examples/nox_gui/artifacts/."""
    _system_deps(session)
    session.install("-e", ".[test]")
    example = HERE / "docs" / "examples" / "nox_gui"
    artifacts = example / "artifacts"
    session.run(
        "pytest",
        "-c",
        str(example / "pytest.ini"),
        "--rootdir",
        str(example),
        f"--trivnc-artifacts={artifacts / 'screenshots'}",
        f"--junitxml={artifacts / 'junit.xml'}",
        str(example / "test_app.py"),
        *session.posargs,
    )


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff==0.17.6")
    session.run("ruff", "check", "trivnc", "tests", "bench", "docs", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[test,docs]", "mypy==2.4.1", "nox")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Encoder throughput against the bare codec calls, one vs ten viewers on
    the demo desktop, and trivnc beside x11vnc and X0tigervnc on the same Xvfb
    workloads (see docs/performance.md): bench/x11_targets.py runs
    bench/x11_workloads.py's workloads with PSNR, plus ten viewers and a
    2 MB/s link, and prints issue 6's table and targets."""
    _system_deps(session)
    session.install("-e", ".[test]")
    out = HERE / "bench" / "results"
    out.mkdir(exist_ok=True)
    session.run("python", "bench/encoders.py", "--json", str(out / "encoders.json"))
    session.run("python", "bench/viewers.py", "--json", str(out / "viewers.json"))
    session.run("python", "bench/xvfb_compare.py", "--json", str(out / "xvfb_compare.json"))
    session.run("python", "bench/x11_targets.py", "--json", str(out / "x11_targets.json"))
    session.run("python", "bench/load.py", "--json", str(out / "load.json"))


@nox.session
def demo(session: nox.Session) -> None:
    """Run `trivnc` on the built-in demo desktop; arguments pass through."""
    session.install("-e", ".")
    args = session.posargs or ["--insecure-no-auth"]
    session.run("trivnc", *args, env={"PYTHONUNBUFFERED": "1", **os.environ})
