"""Settings: the one place that reads the environment (and an optional `.env` file)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from realtime.dsn import Dsn

LogLevel = Literal["critical", "error", "warning", "info", "debug"]
LogFormat = Literal["text", "json"]


class Settings(BaseSettings):
    """Every tunable of the service; README.md documents each one (names are upper-cased env vars)."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    database_url: str | None = Field(
        default=None,
        description="PostgreSQL 14+ to use. Unset: start an embedded PostgreSQL in EMBEDDED_DATA_DIR.",
    )
    embedded_data_dir: Path = Field(
        default=Path(".realtime/pgdata"),
        description="Data directory of the embedded PostgreSQL (created on first start, reused after).",
    )
    migrate_on_start: bool = Field(default=True, description="Apply migrations when `serve` starts.")

    host: str = Field(default="127.0.0.1", description="Interface `serve` binds to.")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port `serve` listens on.")
    workers: int = Field(default=1, ge=1, le=64, description="Worker processes for `serve`.")
    log_level: LogLevel = Field(default="info", description="Log level of the service and uvicorn.")
    log_format: LogFormat = Field(
        default="text",
        description="`text`: a line per record for people; `json`: one JSON object per line (time, level, logger,"
        " message, and the request id, connection id, client, subscription id or seq the line is about) for a"
        " log pipeline. uvicorn's access and error lines too.",
    )

    max_body_bytes: int = Field(
        default=1_048_576, ge=1024, description="Largest HTTP request body accepted (larger ones get 413)."
    )
    http_max_header_bytes: int = Field(
        default=32_768, ge=1024, le=1_048_576, description="Largest request head (request line + headers): 431."
    )
    http_max_headers: int = Field(default=100, ge=8, le=10_000, description="Most request headers accepted: 431.")
    http_header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="A connection must send a complete request head within this time of opening (or of its"
        " first byte after a response); else it is closed (408).",
    )
    forwarded_allow_ips: str = Field(
        default="",
        description="Proxies trusted to set X-Forwarded-For/-Proto (comma-separated addresses or networks,"
        " `*` for any). Empty: none; the socket's peer is the client.",
    )

    pool_size: int = Field(default=20, ge=1, le=200, description="Connections kept in each process's pool.")
    # Overflow connections are closed as soon as they are returned while the pool is full, so under a steady load
    # just above POOL_SIZE they are opened and closed again for every few requests; the default has none.
    pool_max_overflow: int = Field(
        default=0, ge=0, le=200, description="Extra connections opened under load and closed when returned."
    )
    pool_timeout: float = Field(
        default=5.0,
        gt=0,
        description="Seconds a REST request may spend on the database, from asking for a connection to its commit;"
        " then 503.",
    )
    statement_timeout_ms: int = Field(
        default=5_000, ge=0, description="statement_timeout of pool connections (0 disables)."
    )
    idle_in_transaction_timeout_ms: int = Field(
        default=60_000,
        ge=0,
        description="idle_in_transaction_session_timeout of pool connections (0 disables): a last line of"
        " defence; no code path leaves a transaction open while it waits on a client.",
    )

    listener_batch_size: int = Field(
        default=1000, ge=1, le=100_000, description="Changelog rows read per query by the listener."
    )
    listener_heartbeat_s: float = Field(
        default=2.0, gt=0, description="Seconds between listener heartbeats (self-NOTIFY round trips)."
    )
    listener_heartbeat_timeout_s: float = Field(
        default=5.0, gt=0, description="A heartbeat not back within this many seconds means a dead link."
    )
    listener_backoff_initial_s: float = Field(default=0.1, gt=0, description="First reconnect delay.")
    listener_backoff_max_s: float = Field(default=5.0, gt=0, description="Cap of the reconnect delay.")

    ws_queue_size: int = Field(
        default=1000, ge=1, description="Frames queued per WebSocket before it is closed with 4008."
    )
    ws_queue_bytes: int = Field(
        default=1_048_576, ge=4096, description="Bytes queued per WebSocket before it is closed with 4008."
    )
    ws_coalesce_max_keys: int = Field(
        default=10_000,
        ge=1,
        description="Rows a coalescing subscription may hold merged while its connection is behind; past it, 4008.",
    )
    ws_max_connections: int = Field(
        default=10_000, ge=1, description="Open WebSockets per process; more are refused with 503 before the upgrade."
    )
    ws_max_connections_per_client: int = Field(
        default=256, ge=1, description="Open WebSockets per client address and process; more get 429."
    )
    ws_max_subscriptions_total: int = Field(
        default=100_000, ge=1, description="Subscriptions per process; more get `too_many_subscriptions`."
    )
    ws_max_filter_values: int = Field(
        default=10_000,
        ge=1,
        description="Filter values (each `in` list item counts) held by one connection's subscriptions.",
    )
    ws_messages_per_s: float = Field(
        default=50.0, gt=0, description="Client frames per second a connection may send, on average."
    )
    ws_message_burst: int = Field(
        default=200,
        ge=1,
        description="Client frames a connection may send at once above that rate (e.g. subscribing to many"
        " tables right after connecting).",
    )
    ws_rate_limit_close_after: int = Field(
        default=100,
        ge=1,
        description="Frames refused as `rate_limited` before the connection is closed 1008 (forgiven once the"
        " client keeps to the rate long enough to refill its burst).",
    )
    ws_send_timeout_s: float = Field(
        default=10.0, gt=0, description="A send that does not finish in this time closes the socket (4008)."
    )
    ws_max_subscriptions: int = Field(default=100, ge=1, description="Subscriptions allowed per connection.")
    ws_max_frame_bytes: int = Field(default=65_536, ge=256, description="Largest client frame accepted.")
    ws_ping_interval_s: float = Field(
        default=20.0, gt=0, description="Protocol-level WebSocket pings that detect dead peers."
    )
    ws_ping_timeout_s: float = Field(default=20.0, gt=0, description="A ping unanswered this long closes.")
    sse_heartbeat_s: float = Field(
        default=15.0, gt=0, le=3600, description="Seconds between the comment lines that keep an SSE stream alive."
    )
    sse_ticket_ttl_s: float = Field(
        default=30.0, gt=0, le=600, description="Seconds a ticket from POST /sse/tickets may wait to be used."
    )
    ws_compression: bool = Field(
        default=False, description="permessage-deflate on WebSockets (costs ~hundreds of KiB per socket)."
    )
    snapshot_chunk_rows: int = Field(default=500, ge=1, le=10_000, description="Rows per snapshot frame.")
    stream_max_concurrent_reads: int = Field(
        default=4,
        ge=1,
        description="Snapshot and replay reads running at once per process (each holds a pool connection only"
        " while it reads one chunk); the rest of the pool stays for REST.",
    )
    stream_read_wait_s: float = Field(
        default=5.0,
        gt=0,
        description="How long a subscribe waits for a read slot before `unavailable` with `retry_after_ms`.",
    )
    stream_snapshot_budget_bytes: int = Field(
        default=268_435_456,
        ge=1_048_576,
        description="Memory all snapshots being sent may hold at once per process: past it a snapshot subscribe"
        " gets `unavailable` with `retry_after_ms`.",
    )
    stream_snapshot_max_bytes: int = Field(
        default=67_108_864,
        ge=65_536,
        description="Largest snapshot one subscribe may take (rows are read, then sent): `snapshot_too_large`.",
    )
    shutdown_timeout_s: float = Field(default=5.0, gt=0, description="Bound on graceful WebSocket close.")

    retention_max_age_s: int = Field(
        default=86_400, ge=60, description="Changelog rows older than this are pruned (seconds)."
    )
    retention_max_rows: int = Field(
        default=1_000_000, ge=1_000, description="At most this many changelog rows are kept."
    )
    retention_interval_s: float = Field(default=60.0, gt=0, description="Seconds between prune runs.")

    allowed_origins: str = Field(
        default="",
        description="Browser origins allowed to open /ws and to call REST cross-origin (comma-separated, e.g."
        " `https://app.example.com`; `*` for any). Empty: the server's own origin and loopback origins.",
    )
    allowed_hosts: str = Field(
        default="",
        description="Host header values accepted (comma-separated; `*.example.com` patterns; `*` for any). Empty:"
        " loopback names when HOST is a loopback address, else any.",
    )

    auth_mode: Literal["", "none"] = Field(
        default="",
        description="`none`: serve without authentication on purpose (needed to serve open on a non-loopback"
        " HOST). Empty: authentication is on when a key is configured, else open on loopback only.",
    )
    auth_jwt_secret: str | None = Field(default=None, description="HS256 secret that signs bearer tokens.")
    auth_jwks_url: str | None = Field(
        default=None, description="JWKS URL of the identity provider (RS256/ES256 tokens; keys cached)."
    )
    auth_public_key_file: Path | None = Field(
        default=None, description="PEM public key that verifies RS256/ES256 tokens."
    )
    auth_audience: str | None = Field(default=None, description="Required `aud` of tokens, when set.")
    auth_issuer: str | None = Field(default=None, description="Required `iss` of tokens, when set.")
    auth_role_claim: str = Field(
        default="role", description="Claim holding the role; a dotted path such as `app_metadata.role` is allowed."
    )
    auth_leeway_s: float = Field(default=30.0, ge=0, le=300, description="Clock skew allowed on `exp`/`nbf`/`iat`.")
    auth_timeout_s: float = Field(
        default=10.0, gt=0, description="A WebSocket must authenticate within this time of opening, else 4001."
    )
    auth_policy_file: Path | None = Field(default=None, description="TOML file of the row-level policies.")
    auth_dev_tokens: bool = Field(
        default=False,
        description="Development only: `POST /auth/dev-token` signs a token for any `sub` and `role` it is asked"
        " for, with AUTH_JWT_SECRET (the demo page's sign-in picker uses it). Needs AUTH_JWT_SECRET; `serve`"
        " refuses it on a HOST other than a loopback address.",
    )
    auth_operator_roles: str = Field(
        default="operator",
        description="Roles (comma-separated) whose bearer token sees the details of /readyz when HEALTH_DETAILS is"
        " `auto`, and reads /metrics when a token key is set. Empty: no role does.",
    )
    health_details: Literal["auto", "public"] = Field(
        default="auto",
        description="Who sees what /readyz found (positions, counts, errors) besides ready or not: `auto`, everybody"
        " on an open server and tokens of an AUTH_OPERATOR_ROLES role when a token key is set; `public`, everybody.",
    )
    metrics_enabled: bool = Field(default=True, description="Serve Prometheus metrics at /metrics.")
    metrics_token: str | None = Field(
        default=None,
        description="Bearer credential a scraper sends to read /metrics (besides operator tokens). Unset: /metrics"
        " is open on an open server and needs an AUTH_OPERATOR_ROLES token when a token key is set.",
    )
    prometheus_multiproc_dir: Path | None = Field(
        default=None,
        description="Where the workers of `serve` write metrics for /metrics to add up (emptied at start and exit);"
        " unset: a private temporary directory. prometheus-client's own variable, which `serve` sets for workers.",
    )

    @field_validator("database_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("database_url")
    @classmethod
    def _is_postgres_url(cls, value: str | None) -> str | None:
        if value is not None:
            Dsn.parse(value)  # raises ValueError with the reason
        return value

    @model_validator(mode="after")
    def _backoff_is_ordered(self) -> Settings:
        if self.listener_backoff_max_s < self.listener_backoff_initial_s:
            raise ValueError("LISTENER_BACKOFF_MAX_S must be >= LISTENER_BACKOFF_INITIAL_S")
        return self

    @field_validator("auth_jwt_secret", "auth_jwks_url", "auth_audience", "auth_issuer", "metrics_token", mode="before")
    @classmethod
    def _blank_auth_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("metrics_token")
    @classmethod
    def _metrics_token_is_long_enough(cls, value: str | None) -> str | None:
        if value is not None and (len(value) < 16 or not value.isascii() or not value.isprintable()):
            raise ValueError("must be at least 16 printable ASCII characters, e.g. `openssl rand -hex 16`")
        return value

    @field_validator("auth_public_key_file", "prometheus_multiproc_dir", mode="before")
    @classmethod
    def _blank_key_file_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("auth_jwt_secret")
    @classmethod
    def _secret_is_long_enough(cls, value: str | None) -> str | None:
        # RFC 7518 3.2: an HS256 key must be at least as long as the hash (256 bits).
        if value is not None and len(value.encode()) < 32:
            raise ValueError("must be at least 32 bytes (HS256 needs a 256-bit key), e.g. `openssl rand -hex 32`")
        return value

    @field_validator("auth_jwks_url")
    @classmethod
    def _jwks_url_is_http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError("must be an https:// (or http://) URL")
        return value

    @field_validator("auth_role_claim")
    @classmethod
    def _role_claim_is_a_path(cls, value: str) -> str:
        if not value or any(not part for part in value.split(".")):
            raise ValueError("must be a claim name or a dotted path such as `app_metadata.role`")
        return value

    @property
    def auth_key_sources(self) -> list[str]:
        """The token key settings that are set (at most one, see `_one_auth_key_source`)."""
        sources = {
            "AUTH_JWT_SECRET": self.auth_jwt_secret,
            "AUTH_JWKS_URL": self.auth_jwks_url,
            "AUTH_PUBLIC_KEY_FILE": self.auth_public_key_file,
        }
        return [name for name, value in sources.items() if value is not None]

    @property
    def auth_enabled(self) -> bool:
        """Whether requests must carry a bearer token: exactly when a key to verify tokens is configured."""
        return bool(self.auth_key_sources)

    @property
    def operator_roles(self) -> frozenset[str]:
        """AUTH_OPERATOR_ROLES as a set of role names (blanks around and between the commas ignored)."""
        return frozenset(role.strip() for role in self.auth_operator_roles.split(",") if role.strip())

    @model_validator(mode="after")
    def _one_auth_key_source(self) -> Settings:
        sources = self.auth_key_sources
        if len(sources) > 1:
            raise ValueError(f"set only one of {', '.join(sources)}: each is a different way to verify tokens")
        if sources and self.auth_mode == "none":
            raise ValueError(f"AUTH_MODE=none (serve open) contradicts {sources[0]} (verify tokens); unset one")
        return self

    @model_validator(mode="after")
    def _dev_tokens_have_a_secret(self) -> Settings:
        if self.auth_dev_tokens and self.auth_jwt_secret is None:
            raise ValueError(
                "AUTH_DEV_TOKENS needs AUTH_JWT_SECRET: dev tokens are signed with it (and tokens of an identity"
                " provider, AUTH_JWKS_URL or AUTH_PUBLIC_KEY_FILE, come from that provider)"
            )
        return self

    @model_validator(mode="after")
    def _reads_leave_room_for_rest(self) -> Settings:
        if self.stream_max_concurrent_reads >= self.pool_size + self.pool_max_overflow:
            raise ValueError("STREAM_MAX_CONCURRENT_READS must be below POOL_SIZE + POOL_MAX_OVERFLOW")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
