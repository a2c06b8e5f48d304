"""Scenario 5: what change capture costs the writers: pgbench UPDATE TPS at 1, 4 and 16 clients.

Three configurations of the same `users` table, each with its consumer attached as in production:

    disabled  realtime's database, `realtime stream disable users`, realtime server running
    notify    the peers' database with the row-payload NOTIFY trigger and one LISTENing connection
    realtime  realtime's database, `realtime stream enable users`, realtime server running

Without realtime's CLI, `disabled` falls back to the peers' table without its trigger.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from bench import db
from bench.config import WRITE_TPS_VS_NOTIFY
from bench.db import PEERS_DB
from bench.report import ScenarioResult, Target
from bench.scenarios.common import Context, prepare
from bench.servers import REALTIME, running
from bench.stats import median, ratio

_TPS = re.compile(r"tps = ([0-9.]+) \(without initial connection time\)")

SCRIPT = """\\set id random(1, {rows})
UPDATE users SET name = 'pgbench ' || :id, updated_at = now(), version = version + 1 WHERE id = :id;
"""


async def pgbench(database: str, clients: int, seconds: float, script: Path) -> dict[str, Any]:
    url = urlsplit(db.PG_BASE)
    cmd = [
        "pgbench",
        "-n",  # no vacuum of pgbench's own tables: the bench has none
        "-h",
        url.hostname or "127.0.0.1",
        "-p",
        str(url.port or 5432),
        "-U",
        url.username or "postgres",
        "-c",
        str(clients),
        "-j",
        str(min(clients, 2)),
        "-T",
        str(max(1, round(seconds))),
        "-f",
        str(script),
        database,
    ]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), seconds + 120)
    text = out.decode(errors="replace")
    match = _TPS.search(text)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"pgbench failed ({proc.returncode}): {text[-500:]}")
    failed = re.search(r"number of failed transactions: (\d+)", text)
    return {"tps": float(match.group(1)), "failed": int(failed.group(1)) if failed else 0}


@asynccontextmanager
async def notify_listener() -> AsyncIterator[None]:
    """A LISTENing connection, so NOTIFY pays for a real consumer; it discards what it receives."""
    conn = await asyncpg.connect(db.dsn(PEERS_DB))
    try:
        await conn.add_listener(db.NOTIFY_CHANNEL, lambda *_: None)
        yield
    finally:
        await conn.close()


@asynccontextmanager
async def configured(ctx: Context, config: str, with_realtime: bool) -> AsyncIterator[str]:
    """Set up one configuration; yields the database pgbench should write to."""
    if config == "notify":
        await db.set_notify_trigger(True)
        await db.reset_users(PEERS_DB, ctx.sizes.seed_rows)
        async with notify_listener():
            yield PEERS_DB
    elif not with_realtime:
        if config == "realtime":
            raise RuntimeError(f"realtime not run: {ctx.unavailable.get('realtime', 'not selected')}")
        await db.set_notify_trigger(False)
        await db.reset_users(PEERS_DB, ctx.sizes.seed_rows)
        try:
            yield PEERS_DB
        finally:
            await db.set_notify_trigger(True)
    else:
        await db.set_realtime_stream(config == "realtime")
        try:
            await db.reset_users(db.REALTIME_DB, ctx.sizes.seed_rows)
            async with running(REALTIME, ctx.log_dir, ctx.workers):
                yield db.REALTIME_DB
        finally:
            # Leave streaming on: every other scenario expects it.
            await db.set_realtime_stream(True)


async def _vacuum(database: str) -> None:
    conn = await asyncpg.connect(db.dsn(database))
    try:
        await conn.execute("VACUUM users")
    finally:
        await conn.close()


async def run(ctx: Context) -> ScenarioResult:
    sz = ctx.sizes
    configs = ["disabled", "notify", "realtime"]
    result = ScenarioResult(
        name="write",
        title="write cost: pgbench UPDATE users TPS (higher is better)",
        params={"clients": list(sz.write_clients), "seconds": sz.write_seconds, "rows": sz.seed_rows},
        columns=["config", "round", *[f"tps @{c}" for c in sz.write_clients]],
    )
    with_realtime = REALTIME in ctx.servers and await prepare(ctx, REALTIME)
    if not with_realtime:
        result.notes.append("realtime not run: 'disabled' is the peers' table without a trigger")
        configs.remove("realtime")
    await db.setup_peers_db()
    with tempfile.TemporaryDirectory(prefix="bench-pgbench-") as tmp:
        script = Path(tmp) / "update.sql"
        script.write_text(SCRIPT.format(rows=sz.seed_rows))
        for round_index in range(ctx.round_count()):
            order = configs if round_index % 2 == 0 else list(reversed(configs))
            for config in order:
                row: list[Any] = [config, round_index + 1]
                try:
                    async with configured(ctx, config, with_realtime) as database:
                        for clients in sz.write_clients:
                            await _vacuum(database)
                            res = await pgbench(database, clients, sz.write_seconds, script)
                            result.runs.append({"config": config, "round": round_index + 1, "clients": clients, **res})
                            row.append(res["tps"])
                            print(f"   {config} @{clients}: {res['tps']:,.0f} tps", flush=True)
                except Exception as exc:
                    result.notes.append(f"{config} round {round_index + 1} failed: {exc}")
                    continue
                result.rows.append(row)
    with contextlib.suppress(Exception):
        await db.set_notify_trigger(True)
    for config in configs:
        for clients in sz.write_clients:
            value = median(r["tps"] for r in result.runs if r["config"] == config and r["clients"] == clients)
            if value is not None:
                result.summary.setdefault(config, {})[str(clients)] = value
    top = str(sz.write_clients[-1])
    rt = result.summary.get("realtime", {}).get(top)
    notify = result.summary.get("notify", {}).get(top)
    disabled = result.summary.get("disabled", {}).get(top)
    result.ratios[f"realtime/notify @{top}"] = ratio(rt, notify)
    result.ratios[f"realtime/disabled @{top}"] = ratio(rt, disabled)
    result.ratios[f"notify/disabled @{top}"] = ratio(notify, disabled)
    if rt is not None:
        result.targets.append(Target(f"realtime/notify TPS @{top}", ratio(rt, notify), ">=", WRITE_TPS_VS_NOTIFY))
    return result
