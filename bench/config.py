"""Scenario sizes: the full benchmark and the `--quick` smoke run, side by side so they stay comparable."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    rounds: int  # each scenario runs every server this many times, alternating the order
    seed_rows: int  # rows in `users` at the start of every run (ids 1..seed_rows)

    latency_subscribers: int
    latency_rate: float  # changes per second
    latency_seconds: float
    latency_writers: int

    saturation_subscribers: tuple[int, ...]
    saturation_start: float  # deliveries per second of the first step
    saturation_factor: float  # each step offers this many times the previous rate
    saturation_step_seconds: float
    saturation_max_steps: int
    saturation_writers: int
    saturation_rounds: int

    idle_counts: tuple[int, ...]
    idle_settle_seconds: float

    write_clients: tuple[int, ...]
    write_seconds: float

    rest_connections: int
    rest_seconds: float
    rest_warmup_seconds: float

    filter_counts: tuple[int, ...]
    filter_rate: float
    filter_seconds: float
    filter_rows_changed: int
    filter_idle_seconds: float
    # Broadcasting peers send every change to every subscriber; cap the frames one run makes them send so
    # a 10,000-subscriber run stays within minutes. CPU is reported per change, so fewer changes still compare.
    filter_frame_budget: int

    policy_subscribers: int  # each one authenticated as its own member, about its own row
    policy_rate: float  # changes per second of the fixed-rate window (each one reaches one subscriber)
    policy_seconds: float
    policy_writers: int
    policy_start: float  # changes (= deliveries) per second of the climb's first step
    policy_factor: float
    policy_step_seconds: float
    policy_max_steps: int
    policy_rows_per_commit: int  # each UPDATE changes this many rows, so commits are not the limit


FULL = Sizes(
    rounds=2,
    seed_rows=10_000,
    latency_subscribers=1_000,
    latency_rate=20,
    latency_seconds=20,
    latency_writers=4,
    saturation_subscribers=(100, 1_000),
    saturation_start=5_000,
    saturation_factor=1.5,
    saturation_step_seconds=6,
    saturation_max_steps=14,
    saturation_writers=8,
    saturation_rounds=1,
    idle_counts=(1_000, 10_000),
    idle_settle_seconds=3,
    write_clients=(1, 4, 16),
    write_seconds=10,
    rest_connections=32,
    rest_seconds=10,
    rest_warmup_seconds=2,
    filter_counts=(100, 1_000, 10_000),
    filter_rate=50,
    filter_seconds=20,
    filter_rows_changed=4,
    # One keepalive interval of the servers that ping (WS_PING_INTERVAL_S, uvicorn's default: 20 s): every
    # connection pings once in the idle sample as in the 20 s window, so subtracting the idle rate removes the
    # ping traffic, which grows with open connections, not with changes. With 5 s the 10,000-connection window
    # caught a whole round of pings that the sample had missed (0.5 ms per change of apparent growth).
    filter_idle_seconds=20,
    filter_frame_budget=300_000,
    policy_subscribers=1_000,
    policy_rate=2_000,
    policy_seconds=20,
    policy_writers=4,
    policy_start=3_000,
    policy_factor=1.5,
    policy_step_seconds=6,
    policy_max_steps=10,
    policy_rows_per_commit=10,
)

QUICK = Sizes(
    rounds=1,
    seed_rows=2_000,
    latency_subscribers=50,
    latency_rate=20,
    latency_seconds=3,
    latency_writers=2,
    saturation_subscribers=(20, 50),
    saturation_start=500,
    saturation_factor=2,
    saturation_step_seconds=2,
    saturation_max_steps=3,
    saturation_writers=4,
    saturation_rounds=1,
    idle_counts=(50, 200),
    idle_settle_seconds=1,
    write_clients=(1, 4),
    write_seconds=3,
    rest_connections=8,
    rest_seconds=3,
    rest_warmup_seconds=1,
    filter_counts=(10, 50, 200),
    filter_rate=20,
    filter_seconds=3,
    filter_rows_changed=2,
    filter_idle_seconds=1,
    filter_frame_budget=5_000,
    policy_subscribers=50,
    policy_rate=100,
    policy_seconds=3,
    policy_writers=2,
    policy_start=200,
    policy_factor=2,
    policy_step_seconds=2,
    policy_max_steps=3,
    policy_rows_per_commit=5,
)

# The pass/fail lines every report checks realtime against.
P50_LIMIT_MS = 5.0
P99_LIMIT_MS = 25.0
SATURATION_P99_MS = 100.0
CPU_PER_FRAME_VS_NODE = 0.7
MAX_RATE_VS_NODE = 1.2
IDLE_KIB_PER_CONN = 16.0
WRITE_TPS_VS_NOTIFY = 1.0
REST_VS_SEED = 1.5
# Server CPU per change may not grow by more than this between the smallest and largest filter run; the
# slack absorbs the noise of a shared machine, a per-subscriber cost would grow 10-100x.
FILTER_CPU_GROWTH = 1.5
# Server CPU per delivered frame with per-user row-level rules, against the same frames without rules.
POLICY_CPU_VS_UNRESTRICTED = 1.1
# Supabase's published Postgres Changes throughput with RLS: 3,000 (Micro to Medium compute) to 4,000 (Large to
# 16XL) messages/s in total, whatever the number of clients (supabase.com/docs/guides/realtime/benchmarks, the
# estimator's table in apps/docs/data/realtime/throughput.json of supabase/supabase).
SUPABASE_RLS_MESSAGES_PER_S = (3_000, 4_000)

# Above this many deliveries a second one loadgen process gets busy; split the subscribers over two.
SHARD_THRESHOLD = 8_000
