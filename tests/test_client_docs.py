"""The Python examples of docs/client.md and README.md run as written against a real server and print changes."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import asyncpg
import pytest

from tests.support.server import ServerProcess

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTED_URL = "ws://127.0.0.1:8000/ws"


def _python_blocks(path: Path, after: str) -> list[str]:
    text = path.read_text()
    return re.findall(r"```python\n(.*?)```", text[text.index(after) :], flags=re.DOTALL)


async def _run_until(source: str, server: ServerProcess, db: asyncpg.Connection, expected: list[str]) -> str:
    """Run an example (pointed at `server`), make a change, and return its output once every `expected` appears."""
    assert DOCUMENTED_URL in source
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        source.replace(DOCUMENTED_URL, server.ws_url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # print() on a terminal shows each line; a pipe needs this
    )
    assert process.stdout is not None
    output = ""
    try:
        async with asyncio.timeout(20):
            line = await process.stdout.readline()  # the snapshot: the subscription is live
            output += line.decode()
            await db.execute("INSERT INTO users (name, email) VALUES ('Doc', 'doc-' || gen_random_uuid() || '@x.org')")
            while not all(text in output for text in expected):
                line = await process.stdout.readline()
                assert line, f"the example ended: {output}"
                output += line.decode()
    finally:
        process.kill()
        await process.wait()
    return output


async def test_the_client_guide_example_prints_the_snapshot_and_changes(
    server: ServerProcess, db: asyncpg.Connection
) -> None:
    """docs/client.md's first Python example prints the snapshot's size, then each change and the view's size."""
    example = _python_blocks(ROOT / "docs" / "client.md", "## Python")[0]
    output = await _run_until(example, server, db, ["rows as of seq", " INSERT added ", "users in the view"])
    assert "Traceback" not in output


async def test_the_readme_example_prints_events(server: ServerProcess, db: asyncpg.Connection) -> None:
    """README's "From Python" example prints a Snapshot, then a Change line per change."""
    example = _python_blocks(ROOT / "README.md", "### From Python")[0]
    output = await _run_until(example, server, db, ["Snapshot", "Change INSERT"])
    assert "Traceback" not in output
