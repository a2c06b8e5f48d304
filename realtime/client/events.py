"""What a subscription yields (`Snapshot`, `Change`, `Reset`) and the errors that end one.

Events are built from the server's frames (docs/protocol.md); `Change.frame` keeps the frame itself, so a
program can pass it on unchanged (as `realtime tail --json` does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeAlias

Row: TypeAlias = dict[str, Any]
Op: TypeAlias = Literal["INSERT", "UPDATE", "DELETE", "TRUNCATE"]
ViewEffect: TypeAlias = Literal["added", "modified", "removed", "reset"]

_OPS: tuple[Op, ...] = ("INSERT", "UPDATE", "DELETE", "TRUNCATE")
_VIEWS: tuple[ViewEffect, ...] = ("added", "modified", "removed", "reset")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every row the subscription's filter matched at position `seq` (the server's chunks, assembled).

    It arrives first on a subscription made with `snapshot=True`, and after every `Reset`; it replaces whatever the
    program held for the subscription.
    """

    subscription: str
    table: str
    seq: int
    rows: list[Row]


@dataclass(frozen=True, slots=True)
class Change:
    """One committed change as it touches the subscription's view (docs/protocol.md, "change").

    `view`: `added`/`modified` upsert `row` under `key`, `removed` deletes `key`, `reset` (a TRUNCATE) empties the
    view. `tx` is the transaction's id and `tx_end` marks the subscription's last frame of that transaction; a frame
    without `tx` (recorded before the server stamped transactions) stands alone.
    """

    subscription: str
    table: str
    seq: int
    op: Op
    view: ViewEffect
    key: Row | None
    row: Row | None
    old: Row | None
    ts: datetime
    tx: str | None
    tx_end: bool
    frame: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_frame(cls, frame: dict[str, Any]) -> Change:
        op, view = frame["op"], frame["view"]
        if op not in _OPS or view not in _VIEWS:
            raise ValueError(f"a change frame with op {op!r} and view {view!r}")
        tx = frame.get("tx")
        return cls(
            subscription=str(frame["id"]),
            table=str(frame["table"]),
            seq=int(frame["seq"]),
            op=op,
            view=view,
            key=frame.get("key"),
            row=frame.get("row"),
            old=frame.get("old"),
            ts=datetime.fromisoformat(frame["ts"]),
            tx=None if tx is None else str(tx),
            tx_end=frame.get("tx_end") is True,
            frame=frame,
        )


@dataclass(frozen=True, slots=True)
class Reset:
    """The server could not replay what this subscription missed (`cursor_expired`: retention removed it).

    Nothing derived from earlier events can be trusted any more; a `Snapshot` of the current rows follows, and
    changes after it. This is never silent: every gap the client cannot fill shows as a `Reset`.
    """

    subscription: str
    table: str
    reason: str


Event: TypeAlias = Snapshot | Change | Reset


class RealtimeError(Exception):
    """A refusal from the server (`code` is the protocol's error code) or a failure of the client itself."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class SubscriptionError(RealtimeError):
    """The server refused the subscription for good (`unknown_table`, `invalid_filter`, `forbidden`, ...).

    Raised by the subscription's iterator once the events buffered before it have been read; never retried.
    """


class AuthenticationError(RealtimeError):
    """The server refused the token (`unauthorized`, `forbidden`), or wants one and the client has none.

    The client stops: every subscription's iterator raises this after its buffered events.
    """


class ClientError(RealtimeError):
    """The client cannot go on for a reason of its own: the URL is refused for good (an HTTP status other than
    429 or 5xx answering the upgrade), or a frame from the server broke the protocol."""
