"""The ``tspipe-fx`` command line (:mod:`.main`), the models it names (:mod:`.models`), and the demo."""

from tspipe_fx.cli.commands import main

__all__ = ["main"]
