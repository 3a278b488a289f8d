"""Logging setup for entry points (the launcher, ``python -m ray_mtup``, the worker loops).

Library modules only call ``logging.getLogger(__name__)``; handlers are configured here, once
per process, by whoever starts it.
"""

from __future__ import annotations

import logging


def setup_logging(level: int = logging.INFO) -> None:
    """Configure handlers; only entry points (and worker entry functions) call this.

    penman warns once per odd graph (duplicate triples in gold, broken predictions);
    ray_mtup counts and reports those itself, so penman is quiet unless ``level`` is DEBUG.
    """
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("penman").setLevel(logging.DEBUG if level <= logging.DEBUG else logging.ERROR)
