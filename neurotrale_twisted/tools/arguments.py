"""``argparse`` as the project's own commands (``neurotrale-ingest``, ``neurotrale-demo``)
use it: a mistake on the command line is one line naming it, with exit status 2, not the
whole usage first (the server's command, :mod:`neurotrale_twisted.process.command`, does the same
for ``twistd``'s options)."""

from __future__ import annotations

import argparse
from typing import NoReturn

#: Exit status of a mistake in the command line.
EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose refusal is ``PROG: error: WHAT (see PROG --help)``."""

    def error(self, message: str) -> NoReturn:
        """Say what is wrong in one line on standard error and exit with status 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
