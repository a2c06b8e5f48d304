"""The package stands alone: a wheel built from the sources, installed in a fresh venv, migrates, serves and streams
from a directory that is not the checkout.

The cost is paid once per module, about 15 s with pip's cache warm from `make install` (plus a server start):
building the wheel in a copy of the sources (pip's build isolation fetches setuptools), a venv, and installing the
wheel with its dependencies, from pip's cache when it has them, else from PyPI.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from realtime.dsn import Dsn
from tests.support.databases import create_database, drop_database
from tests.support.server import ServerProcess
from tests.support.ws import StreamClient

ROOT = Path(__file__).resolve().parent.parent
# Exactly what the Dockerfile copies into its image: building the package must need nothing else.
SOURCES = ("pyproject.toml", "README.md", "realtime", "migrations", "triggers", "web_demo")
# Each folder that ships, and where it lands in the wheel (pyproject.toml maps the last three into the package).
SHIPPED = {
    "realtime": "realtime",
    "migrations": "realtime/_migrations",
    "triggers": "realtime/_triggers",
    "web_demo": "realtime/_web_demo",
}
# A cold pip cache downloads every dependency; a warm one needs a fraction of this.
INSTALL_TIMEOUT = 240

pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT + 60)


def _run(command: list[str], cwd: Path | None = None, timeout: float = INSTALL_TIMEOUT) -> str:
    """Run a command to completion; a failure shows its output."""
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} exited with {result.returncode}:\n{result.stdout}{result.stderr}"
    return result.stdout


def _source_files(folder: Path) -> Iterator[Path]:
    return (path for path in folder.rglob("*") if path.is_file() and "__pycache__" not in path.parts)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel` builds from a copy of the sources (an in-tree build would share build/ with others)."""
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dist), str(source)]
    _run(command)
    (built,) = dist.glob("realtime-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel and its dependencies installed, nothing from this checkout."""
    path = tmp_path_factory.mktemp("venv")
    # Without its own pip (ensurepip costs seconds); this environment's pip installs into it through --python.
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)], timeout=60)
    install = [
        sys.executable, "-m", "pip", "--python", str(path / "bin" / "python"),
        "install", "--quiet", "--no-compile", str(wheel),
    ]  # fmt: skip
    _run(install)
    return path


def test_wheel_holds_every_source_file(wheel: Path) -> None:
    """Every file of realtime/, migrations/, triggers/ and web_demo/ is in the wheel, at its mapped place."""
    expected = {
        f"{inside}/{path.relative_to(ROOT / folder).as_posix()}"
        for folder, inside in SHIPPED.items()
        for path in _source_files(ROOT / folder)
    }
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    assert expected - shipped == set()


@pytest.fixture
def empty_url(admin_url: Dsn) -> Iterator[Dsn]:
    """A database with nothing in it, for the installed server to migrate."""
    url = create_database(admin_url, prefix="rt_pkg")
    try:
        yield url
    finally:
        drop_database(admin_url, url)


async def test_installed_wheel_migrates_serves_and_streams_from_any_directory(
    venv: Path, empty_url: Dsn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wheel's `realtime serve`, run elsewhere, migrates an empty database, serves the page, REST and /ws."""
    monkeypatch.delenv("PYTHONPATH", raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    show = "import realtime.resources as r; print(r.migrations(), r.triggers(), r.web_demo())"
    found = _run([str(venv / "bin" / "python"), "-c", show], cwd=elsewhere, timeout=30)
    assert all(Path(path).is_relative_to(venv) for path in found.split()), found

    server = ServerProcess(
        database=empty_url,
        log_path=tmp_path / "server.log",
        env={"MIGRATE_ON_START": "true"},
        program=[str(venv / "bin" / "realtime")],
        cwd=elsewhere,
    )
    try:
        await asyncio.to_thread(server.start, 60.0)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as http:
            page = await http.get("/")
            assert page.status_code == 200
            assert page.text == (ROOT / "web_demo" / "index.html").read_text()

            client = await StreamClient.open(server.ws_url)
            try:
                await client.subscribe(table="users")
                created = await http.post("/users", json={"name": "Wheel", "email": "wheel@example.com"})
                assert created.status_code == 201, created.text
                (change,) = await client.changes(1)
            finally:
                await client.close()
        assert (change["op"], change["row"]["id"]) == ("INSERT", created.json()["id"])
    finally:
        code = await asyncio.to_thread(server.terminate)
    assert code == 0, server.log_text()
