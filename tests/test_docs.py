"""The docs stay true to the code: every setting is documented, every error code is in the protocol doc."""

import re
from pathlib import Path

from realtime.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_readme_documents_every_setting() -> None:
    """README's configuration table has one row per Settings field and no stale rows."""
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", readme, flags=re.MULTILINE))
    assert documented == {name.upper() for name in Settings.model_fields}


def test_protocol_doc_lists_every_error_code() -> None:
    """Every error code the server can send appears in docs/protocol.md."""
    sources = "\n".join(p.read_text() for p in (ROOT / "realtime" / "stream").glob("*.py"))
    codes = set(re.findall(r'(?:ProtocolError|refuse|bad)\(\s*"([a-z_]+)"', sources))
    protocol = (ROOT / "docs" / "protocol.md").read_text()
    assert codes
    assert {code for code in codes if f"`{code}`" not in protocol} == set()
