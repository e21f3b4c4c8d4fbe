"""Entry point for ``python -m mpiopt``."""

from mpiopt.cli import main

raise SystemExit(main())
