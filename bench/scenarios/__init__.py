"""The benchmark scenarios, in the order `python -m bench` runs them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from bench.report import ScenarioResult
from bench.scenarios import cpu, filters, idle, latency, policy, rest, saturation, writecost
from bench.scenarios.common import Context

SCENARIOS: dict[str, Callable[[Context], Awaitable[ScenarioResult]]] = {
    "latency": latency.run,
    "saturation": saturation.run,
    "cpu": cpu.run,
    "idle": idle.run,
    "write": writecost.run,
    "rest": rest.run,
    "filters": filters.run,
    "policy": policy.run,
}
