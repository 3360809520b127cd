"""Installing trickle: the wheel owns one top-level name, `trickle`, and the console script it installs
serves from a folder whose own modules carry the names of the checkout's top-level ones."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.sse import parse_events, text_of
from tests.test_process import serving

# What the checkout holds that a wheel is built from; the rest (virtual environments, build outputs,
# results) is left behind so that the wheel is built from the sources alone.
LEFT_BEHIND = shutil.ignore_patterns(
    ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "test-artifacts", "results"
)
# The checkout's top-level modules, which a user's own project may have too.
DECOYS = ("api", "config", "generation", "notify", "server")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source") / "trickle"
    shutil.copytree(ROOT, source, ignore=LEFT_BEHIND)
    out = tmp_path_factory.mktemp("wheel")
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
    ]
    subprocess.run([*command, str(source)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("trickle-*.whl")
    return built


def checkout_modules() -> set[str]:
    """Every module and data file of the checkout that the installed package must carry."""
    found = {"server.py", "notify.py"}
    for package in ("api", "config", "generation"):
        for path in (ROOT / package).rglob("*"):
            if path.is_file() and path.suffix in {".py", ".html"} and "__pycache__" not in path.parts:
                found.add(path.relative_to(ROOT).as_posix())
    return found


def test_the_wheel_owns_only_the_name_trickle_and_carries_every_module(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"trickle"}
    carried = {name.removeprefix("trickle/") for name in names if name.startswith("trickle/")}
    assert carried == checkout_modules()
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    assert "trickle = trickle.config.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel installed; its dependencies are this interpreter's
    (a path file, which adds the folder but not the editable install's own path files there)."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (Path(site) / "dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    install = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(python),
        "install",
        "-q",
        "--no-deps",
        "--no-index",
    ]
    subprocess.run([*install, str(wheel)], check=True, capture_output=True, timeout=300)
    return venv


@pytest.fixture
def unrelated(tmp_path: Path) -> Path:
    """A project folder with its own modules named like the checkout's: importing any of them fails."""
    for name in DECOYS:
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('the project folder\\'s own {name}.py')\n")
    return tmp_path


def test_the_installed_package_is_imported_from_site_packages_not_the_folder(
    installed: Path, unrelated: Path
) -> None:
    probe = (
        "import trickle.server, trickle.config.cli as c; print(trickle.server.__file__); print(c.version())"
    )
    result = subprocess.run(
        [str(installed / "bin" / "python"), "-c", probe],
        cwd=unrelated,
        env={**os.environ, "PYTHONPATH": str(unrelated)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    where, version = result.stdout.splitlines()
    assert Path(where).is_relative_to(installed) and not Path(where).is_relative_to(ROOT)
    assert version != "0+unknown"


@pytest.fixture
def served(installed: Path, unrelated: Path, model_dir: Path) -> Iterator[str]:
    program = [str(installed / "bin" / "trickle")]
    with serving(model_dir, program, env={"PYTHONPATH": str(unrelated)}, cwd=unrelated) as (url, process):
        yield url
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
        assert process.returncode == 0


def test_the_console_script_serves_from_an_unrelated_folder(served: str) -> None:
    body = json.dumps({"prompt": "The baker", "max_new_tokens": 4, "min_new_tokens": 4}).encode()
    headers = {"Content-Type": "application/json"}
    with urllib.request.urlopen(
        urllib.request.Request(f"{served}/stream", data=body, headers=headers)
    ) as reply:
        events = parse_events(reply.read().decode())
    assert events[-1].event == "end" and events[-1].json()["usage"]["completion_tokens"] == 4
    assert text_of(events)
