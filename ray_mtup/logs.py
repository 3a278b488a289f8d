"""Logging setup for entry points (the launcher, ``python -m ray_mtup``, the worker loops).

Library modules only call ``logging.getLogger(__name__)``; handlers are configured here, once
per process, by whoever starts it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


def setup_logging(level: int = logging.INFO) -> None:
    """Configure handlers; only entry points (and worker entry functions) call this.

    penman warns once per odd graph (duplicate triples in gold, broken predictions);
    ray_mtup counts and reports those itself, so penman is quiet unless ``level`` is DEBUG.
    """
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("penman").setLevel(logging.DEBUG if level <= logging.DEBUG else logging.ERROR)


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
    """The loggers ``names`` at WARNING for the block (a library's INFO notes about a case that
    is expected here), their own levels restored after it.

    >>> with quiet("matplotlib.category"):
    ...     logging.getLogger("matplotlib.category").getEffectiveLevel() == logging.WARNING
    True
    """
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


#: Ray Train's placement-group cleaner, which notes at WARNING that it removed the placement group
#: of a trial whose controller ended: what every trial that ASHA stops does.
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_PG_CLEANED = "Detected that the Ray Train controller actor"


def _not_a_cleanup_note(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_PG_CLEANED)


def ray_worker_setup() -> None:
    """``worker_process_setup_hook`` of the embedded Ray: drops the cleaner's note about a trial
    stopped as planned, keeping its other warnings (a failed clean-up still shows).

    >>> ray_worker_setup()
    >>> log = logging.getLogger(PG_CLEANER_LOGGER)
    >>> log.filter(logging.makeLogRecord({"msg": _PG_CLEANED + " (a1) is dead."})), bool(
    ...     log.filter(logging.makeLogRecord({"msg": "Failed to clean up placement group: x"})))
    (False, True)
    """
    log = logging.getLogger(PG_CLEANER_LOGGER)
    if _not_a_cleanup_note not in log.filters:
        log.addFilter(_not_a_cleanup_note)
