"""How a process ends when a background task it cannot work without dies (the stream pipeline's listener,
stuck-send watchdog or retention pruner): it is restarted, never left running half broken.

Lifecycle of a death:
    died      the pipeline records it (/readyz answers 503 from that moment) and `task_died` sends this process
              SIGTERM: the server stops exactly as when an orchestrator stops it, WebSockets closed with 1012 and
              the position to resume from, requests under way answered, the lifespan shut down
    exit      with EXIT_STATUS once shut down. A worker of `realtime serve --workers N` (or a process of any
              other server hosting the app) ends itself at the end of the lifespan, and uvicorn's supervisor
              starts a new worker in its place. `realtime serve` with one worker runs the app in its own process;
              it takes the status and returns it from `main()` after its own cleanup (an embedded PostgreSQL is
              stopped first), and the orchestrator restarts it

Why SIGTERM and then an explicit status: SIGTERM is the one way to ask uvicorn for its graceful shutdown from
inside the app, and after that shutdown uvicorn re-raises the signal, so a worker would otherwise end killed by
SIGTERM (indistinguishable from an ordinary stop) and `realtime serve` would exit 0.

The process-wide record lives here, not on the pipeline, because the exit status belongs to the process.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass

_log = logging.getLogger(__name__)

# EX_SOFTWARE (sysexits.h): an internal software error. Not 1, which Python uses for an uncaught exception, nor 3,
# which uvicorn's supervisor reads as "failed to start" and answers by stopping every worker.
EXIT_STATUS = 70


@dataclass
class _Fate:
    death: str | None = None  # what died and of what, once something has
    caller_exits: bool = False


_fate = _Fate()


def task_died(description: str) -> None:
    """Record that a task this process needs has died (`description` says which and of what) and start the
    graceful shutdown, as a SIGTERM from outside would. Only the first death is recorded and signalled."""
    if _fate.death is not None:
        return
    _fate.death = description
    os.kill(os.getpid(), signal.SIGTERM)


def death() -> str | None:
    """What died in this process, or None."""
    return _fate.death


def caller_takes_exit_status() -> None:
    """The code that runs the server in this process ends it, with `exit_status()`, after the server returns;
    `end_if_dead` then leaves the process alone (`realtime serve` with one worker)."""
    _fate.caller_exits = True


def exit_status() -> int:
    """EXIT_STATUS if a task of this process died, else 0."""
    return EXIT_STATUS if _fate.death is not None else 0


def end_if_dead() -> None:
    """Called last in the app's shutdown: end the process with EXIT_STATUS if a task died, unless its caller takes
    the status. Everything the app held is closed by then; only the server's own closing log lines are skipped."""
    if _fate.death is None or _fate.caller_exits:
        return
    _log.critical("exiting with status %d: %s", EXIT_STATUS, _fate.death)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(EXIT_STATUS)
