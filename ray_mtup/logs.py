"""Logging setup for entry points (the launcher, ``python -m ray_mtup``, the worker loops).

Library modules only call ``logging.getLogger(__name__)``; handlers are configured here, once
per process, by whoever starts it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, MutableMapping


def setup_logging(level: int = logging.INFO) -> None:
    """Configure handlers; only entry points (and worker entry functions) call this.

    penman warns once per odd graph (duplicate triples in gold, broken predictions);
    ray_mtup counts and reports those itself, so penman is quiet unless ``level`` is DEBUG.
    """
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("penman").setLevel(logging.DEBUG if level <= logging.DEBUG else logging.ERROR)
    # bm25s sets its own logger to DEBUG (one line per index built)
    logging.getLogger("bm25s").setLevel(level if level <= logging.DEBUG else logging.WARNING)


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
    _filter_once(PG_CLEANER_LOGGER, _not_a_cleanup_note)


def _filter_once(name: str, keep: Callable[[logging.LogRecord], bool]) -> None:
    """``keep`` as a filter of the logger ``name``, added once however often this runs."""
    log = logging.getLogger(name)
    if keep not in log.filters:
        log.addFilter(keep)


#: Lines that Ray prints in the driver on behalf of its workers and raylet, each about a case that
#: is expected in every run of this project (Ray's log deduplicator skips them; ``-v`` shows them):
#: the raylet's note that Ray Train started more worker processes than there are CPUs, Ray Train's
#: note about its own PreemptionWatcher actor, DeepSpeed choosing the CPU and building its
#: shared-memory op. (Progress bars, the project's and transformers', show only on a terminal:
#: :func:`terminal_bars`.)
RAY_NOISE = (
    r"the maximum expected startup concurrency",
    r"'PreemptionWatcher' .* has constructor arguments in the object store",
    r"Setting accelerator to CPU",
    r"deepspeed_shm_comm_op built successfully",
)
#: ``tune.run``'s logger: its INFO notes are housekeeping (the state files written at the end).
TUNE_RUN_LOGGER = "ray.tune.tune"
#: Ray's note, at every local start, that token authentication is on (its default).
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_TOKEN_AUTH_NOTE = "Token authentication is enabled for this Ray cluster"


def _not_the_token_note(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_TOKEN_AUTH_NOTE)


def quiet_ray_driver(environ: MutableMapping[str, str] = os.environ) -> None:
    """Keep a driver's output to the run's own lines; call it before ``ray`` is imported.

    Ray reads both settings from ``environ`` when it is imported, and a value already there wins:
    ``RAY_DEDUP_LOGS_SKIP_REGEX`` (:data:`RAY_NOISE`), and ``RAY_AIR_NEW_OUTPUT=0``, with which
    Tune's ``verbose=0`` prints nothing (its newer engine prints a configuration table and a
    TensorBoard hint even then). Ray's note that token authentication is on, and ``tune.run``'s
    INFO notes, are dropped.

    >>> import re
    >>> env = {"RAY_AIR_NEW_OUTPUT": "1"}
    >>> quiet_ray_driver(env)
    >>> env["RAY_AIR_NEW_OUTPUT"], [bool(re.search(env["RAY_DEDUP_LOGS_SKIP_REGEX"], line)) for line in (
    ...     "Setting accelerator to CPU. If you have GPU", "INFO ray_mtup.training: run: 1474 train")]
    ('1', [True, False])
    >>> logging.getLogger(TOKEN_AUTH_LOGGER).filter(logging.makeLogRecord({"msg": _TOKEN_AUTH_NOTE + "."}))
    False
    """
    environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", "|".join(f"(?:{line})" for line in RAY_NOISE))
    environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    logging.getLogger(TUNE_RUN_LOGGER).setLevel(logging.WARNING)  # its note that it wrote the state files
    _filter_once(TOKEN_AUTH_LOGGER, _not_the_token_note)


@contextlib.contextmanager
def terminal_bars() -> Iterator[None]:
    """transformers' progress bars (loading weights) for the block only where they are drawn on
    a terminal, as the project's own bars (tqdm's ``disable=None``): not in a Ray worker's log,
    a job's log or a file the output is sent to."""
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)  # absent from older transformers: bars as they are
    if set_hook is None:
        yield
        return
    set_hook(lambda factory, args, kwargs: factory(*args, **{"disable": None, **kwargs}))
    try:
        yield
    finally:
        set_hook(None)
