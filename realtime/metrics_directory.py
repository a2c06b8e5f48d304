"""The directory where the worker processes of `realtime serve` write their metrics (prometheus-client's
multiprocess mode), prepared before the first worker starts and cleaned when serve ends.

prometheus-client finds the directory in the environment variable PROMETHEUS_MULTIPROC_DIR, in every worker; serve
puts it there. Unless that setting names one (a volume the operator chose), serve makes a private temporary
directory and removes it on the way out. A named one is emptied of metric files at start and at the end: values
of an earlier run would otherwise be added to this one's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from realtime.config import Settings
from realtime.metrics import MULTIPROCESS_ENVIRONMENT

# prometheus-client's files: counter_<pid>.db, gauge_<mode>_<pid>.db, histogram_<pid>.db, summary_<pid>.db.
_METRIC_FILES = ("counter_*.db", "gauge_*_*.db", "histogram_*.db", "summary_*.db")
_log = logging.getLogger(__name__)


@contextlib.contextmanager
def prepared(settings: Settings) -> Iterator[Path | None]:
    """The directory, set in the environment for the workers while the block runs; None when metrics are off."""
    if not settings.metrics_enabled:
        yield None
        return
    given = settings.prometheus_multiproc_dir
    if given is not None:
        directory = given
        directory.mkdir(parents=True, exist_ok=True)
        _empty(directory)
    else:
        directory = Path(tempfile.mkdtemp(prefix="realtime-metrics-"))
    os.environ[MULTIPROCESS_ENVIRONMENT] = str(directory)
    _log.info("metrics directory %s", directory)
    try:
        yield directory
    finally:
        if given:
            _empty(directory)
        else:
            shutil.rmtree(directory, ignore_errors=True)
            os.environ.pop(MULTIPROCESS_ENVIRONMENT, None)


def _empty(directory: Path) -> None:
    """Remove prometheus-client's files, and nothing else the directory may hold."""
    for pattern in _METRIC_FILES:
        for path in directory.glob(pattern):
            path.unlink(missing_ok=True)
