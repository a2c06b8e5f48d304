"""PostgreSQL connection URLs in the three spellings the service needs (libpq, asyncpg, SQLAlchemy)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit, urlunsplit


@dataclass(frozen=True)
class Dsn:
    """A `postgresql://` URL; query parameters such as `host=/socket/dir` are kept as they are."""

    parts: SplitResult

    @classmethod
    def parse(cls, url: str) -> Dsn:
        parts = urlsplit(url)
        scheme = parts.scheme.split("+", 1)[0]
        if scheme not in ("postgresql", "postgres"):
            raise ValueError(f"not a PostgreSQL URL: {url!r}")
        return cls(parts._replace(scheme="postgresql"))

    def libpq(self) -> str:
        return urlunsplit(self.parts)

    def asyncpg(self) -> str:
        return self.libpq()

    def sqlalchemy(self) -> str:
        return urlunsplit(self.parts._replace(scheme="postgresql+asyncpg"))

    @property
    def database(self) -> str:
        return self.parts.path.lstrip("/") or "postgres"

    def with_database(self, name: str) -> Dsn:
        return Dsn(self.parts._replace(path=f"/{name}"))

    def redacted(self) -> str:
        """The URL with any password masked, for logs."""
        netloc = self.parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            if ":" in userinfo:
                userinfo = userinfo.split(":", 1)[0] + ":***"
            netloc = f"{userinfo}@{host}"
        return urlunsplit(self.parts._replace(netloc=netloc))
