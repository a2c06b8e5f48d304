"""Where the files that ship with the code are: the Alembic migrations, the capture SQL and the demo page.

The repository keeps them at the top level (`migrations/`, `triggers/`, `web_demo/`, as the layout says), and
pyproject.toml maps them into the package as `realtime._migrations`, `realtime._triggers` and
`realtime._web_demo`. So each has two possible homes, and exactly one exists in any given installation:

    wheel, `pip install .`      site-packages/realtime/_migrations, _triggers, _web_demo
    checkout, `pip install -e .` <repository>/migrations, triggers, web_demo (beside the package)

`importlib.resources` cannot tell them apart by itself: in an editable install only a folder with an
`__init__.py` is importable under its mapped name, and `triggers/` and `web_demo/` are not Python packages.
Both Alembic and StaticFiles need real directories, so a zipped package is not supported.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def migrations() -> Path:
    """Alembic's script directory (env.py, versions/)."""
    return _locate("_migrations", "migrations")


def triggers() -> Path:
    """The versioned change-capture SQL that the migrations run (triggers/README.md)."""
    return _locate("_triggers", "triggers")


def web_demo() -> Path:
    """The static demo page served at `/`."""
    return _locate("_web_demo", "web_demo")


def _locate(installed: str, checkout: str) -> Path:
    inside = _PACKAGE / installed
    if inside.is_dir():
        return inside
    beside = _PACKAGE.parent / checkout
    if beside.is_dir():
        return beside
    # A wheel built without the mapping in pyproject.toml: say what is missing rather than serve half an app.
    raise FileNotFoundError(f"realtime is installed without its {checkout}/: neither {inside} nor {beside} exists")
