"""`realtime serve` with a fault planted in the stuck-send watchdog, for the supervision tests only.

The listener and the pruner can be killed from outside (a changelog row the listener cannot read, a prune
function that answers NULL); the watchdog reads nothing from outside that could make it fail. So this entry point,
which the service never uses, wraps the hub's stuck-send check so that it raises once the process has received
SIGUSR1, and then runs the real `realtime serve`. With one worker the app runs in this process, so the planted
fault is in the serving process. Run it as `python -m tests.support.planted_fault serve ...`.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

from realtime.cli import main
from realtime.stream.hub import Hub

PLANTED = "fault planted by the test: the watchdog's stuck-send check raises"
_armed = False
_expire_stuck_sends = Hub.expire_stuck_sends


def _arm(signum: int, frame: FrameType | None) -> None:
    global _armed
    _armed = True


def _failing_expire_stuck_sends(self: Hub, now: float, send_timeout: float) -> int:
    if _armed:
        raise RuntimeError(PLANTED)
    return _expire_stuck_sends(self, now, send_timeout)


if __name__ == "__main__":
    Hub.expire_stuck_sends = _failing_expire_stuck_sends  # type: ignore[method-assign]
    signal.signal(signal.SIGUSR1, _arm)
    sys.exit(main())
