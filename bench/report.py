"""How results leave the harness: one plain-text table per scenario and one JSON file next to it."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

Cell = str | int | float | None


@dataclass
class Target:
    """One pass/fail line: `value op limit`, e.g. realtime p99 <= 25 ms."""

    name: str
    value: float | None
    op: str  # "<=" or ">="
    limit: float

    @property
    def passed(self) -> bool | None:
        if self.value is None or math.isnan(self.value):
            return None
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit


@dataclass
class ScenarioResult:
    name: str
    title: str
    params: dict[str, Any]
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    ratios: dict[str, float | None] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _version(cmd: Sequence[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    mem_kib = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        # The machine is shared: the load average at the start tells how much of it the bench had.
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
        "node": _version(["node", "--version"]),
        "pgbench": _version(["pgbench", "--version"]),
        "kernel": platform.release(),
    }


def _fmt(cell: Cell) -> str:
    if cell is None:
        return "-"
    if isinstance(cell, float):
        if math.isnan(cell):
            return "-"
        if abs(cell) >= 100:
            return f"{cell:,.0f}"
        if abs(cell) >= 10:
            return f"{cell:.1f}"
        return f"{cell:.2f}"
    if isinstance(cell, int):
        return f"{cell:,}"
    return cell


def render_table(columns: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    text = [[_fmt(c) for c in row] for row in rows]
    widths = [max([len(col)] + [len(r[i]) for r in text]) for i, col in enumerate(columns)]
    lines = ["  ".join(col.ljust(w) for col, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in text:
        lines.append(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
    return "\n".join(lines)


def render(result: ScenarioResult) -> str:
    out = [f"== {result.title}", render_table(result.columns, result.rows)]
    for key, value in result.ratios.items():
        out.append(f"   ratio {key}: {_fmt(value)}")
    for t in result.targets:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t.passed]
        out.append(f"   target {t.name}: {_fmt(t.value)} {t.op} {_fmt(t.limit)}  {verdict}")
    out.extend(f"   note: {n}" for n in result.notes)
    return "\n".join(out)


def _clean(value: Any) -> Any:
    """JSON has no NaN: write null instead."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(result: ScenarioResult, results_dir: Path, machine: dict[str, Any], quick: bool) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "scenario": result.name,
        "title": result.title,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "machine": machine,
        "params": result.params,
        "summary": result.summary,
        "ratios": result.ratios,
        "targets": [{**asdict(t), "passed": t.passed} for t in result.targets],
        "runs": result.runs,
        "notes": result.notes,
        "table": {"columns": result.columns, "rows": result.rows},
    }
    path = results_dir / f"{result.name}.json"
    path.write_text(json.dumps(_clean(payload), indent=2) + "\n")
    return path
