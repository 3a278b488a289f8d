"""``python -m ray_mtup``: the command line (see :mod:`ray_mtup.cli`)."""

from ray_mtup.cli import main

raise SystemExit(main())
