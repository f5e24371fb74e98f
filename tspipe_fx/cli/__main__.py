"""``python -m tspipe_fx.cli``."""

from tspipe_fx.cli.commands import main

raise SystemExit(main())
