"""A nox session that tests a GUI application on a trivnc desktop.

    nox -f docs/examples/nox_gui/noxfile.py                  # from trivnc's repository
    nox -f docs/examples/nox_gui/noxfile.py -- -k click      # arguments go to pytest

`gui_tests` installs trivnc with pytest and pytest-trio into a virtualenv and
runs test_app.py: trivnc's pytest plugin (installed with trivnc) starts a
private Xvfb served by trivnc for each test, app.py runs on it, and a VNC
client in the test looks at it and types and clicks. Screenshots of failed
tests and a JUnit report are kept in the artifacts directory (ARTIFACTS, else
artifacts/ beside this file) for CI to upload, whether the tests passed or not.

Needs Xvfb on the machine (Debian/Ubuntu: apt-get install xvfb). Copy this
directory into a project of your own and change APP_TESTS and TRIVNC.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

HERE = Path(__file__).resolve().parent
#: The tests to run (they start the application themselves).
APP_TESTS = [str(HERE / "test_app.py")]
#: Where trivnc comes from: the TRIVNC variable (a path or a requirement),
#: else the checkout this example sits in, else the package index.
_CHECKOUT = HERE.parents[2]
TRIVNC = os.environ.get("TRIVNC") or (
    str(_CHECKOUT) if (_CHECKOUT / "trivnc" / "testing" / "pytest_plugin.py").exists() else "trivnc"
)
ARTIFACTS = Path(os.environ.get("ARTIFACTS") or HERE / "artifacts").resolve()

nox.options.sessions = ["gui_tests"]
nox.options.default_venv_backend = "venv"


@nox.session
def gui_tests(session: nox.Session) -> None:
    """The application's tests on a trivnc desktop; screenshots of failures
    go to ARTIFACTS/screenshots, the JUnit report to ARTIFACTS/junit.xml."""
    if shutil.which("Xvfb") is None:
        session.error("Xvfb is not installed (Debian/Ubuntu: sudo apt-get install xvfb)")
    session.install(TRIVNC, "pytest>=8", "pytest-trio>=0.8", "httpx>=0.27")
    screenshots = ARTIFACTS / "screenshots"
    # Only this run's screenshots: a stale one would look like a new failure.
    shutil.rmtree(screenshots, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        session.run(
            "pytest",
            # The example's own pytest.ini (trio_mode, the desktop's size).
            "-c",
            str(HERE / "pytest.ini"),
            "--rootdir",
            str(HERE),
            f"--trivnc-artifacts={screenshots}",
            f"--junitxml={ARTIFACTS / 'junit.xml'}",
            *APP_TESTS,
            *session.posargs,
        )
    finally:
        kept = sorted(screenshots.glob("*.png")) if screenshots.is_dir() else []
        if kept:
            session.log(f"{len(kept)} screenshot(s) of failed tests in {screenshots}:")
            for path in kept:
                session.log(f"  {path.name}")
