"""The command line as people meet it: ``twistd neurotrale ...`` and ``neurotrale ...``.

``twistd`` prints its whole usage before a mistake and says ``Usage: twistd [options]``;
a busy port ends in a traceback. Here each of these is one line naming what is wrong,
with exit status 2 for a mistake in the command (an unknown option, a bad value) and 1 for
a data root or a port that cannot be served. The options and the service are
:mod:`neurotrale_twisted.service`'s; the Twisted plugin (``twisted/plugins``) names this
module, so ``twistd neurotrale`` gets the same behaviour as ``neurotrale``.

``neurotrale ARGS`` (also ``python -m neurotrale_twisted ARGS``) is ``twistd --nodaemon
--pidfile= neurotrale ARGS``, run by twistd itself, for people who have never met twistd.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from twisted.application.service import MultiService
from twisted.internet.error import CannotListenError
from twisted.python import usage

from . import service
from .service import CannotServe

#: How the command was invoked, for its messages ("neurotrale" when run by :func:`main`).
PROGRAM = "twistd neurotrale"

#: Exit statuses: a mistake in the command line; something it names cannot be served.
EXIT_USAGE = 2
EXIT_FAILED = 1


def fail(message: str, status: int) -> NoReturn:
    """Say what is wrong in one line on the real standard error, and exit with ``status``.

    ``sys.__stderr__``: once twistd has started logging, ``sys.stderr`` goes to the log.
    """
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"{PROGRAM}: error: {message}\n")
    stream.flush()
    raise SystemExit(status)


class Options(service.Options):
    """The server's options; a refusal is one line and an exit, not a page of usage."""

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Parse ``options``, or say in one line what is wrong with them and exit."""
        try:
            super().parseOptions(options)
        except CannotServe as e:
            fail(str(e), EXIT_FAILED)
        except usage.UsageError as e:
            fail(f"{e} (see {PROGRAM} --help)", EXIT_USAGE)

    def getSynopsis(self) -> str:
        """``Usage: neurotrale [options]``, or twistd's own for ``twistd neurotrale``."""
        if PROGRAM == "neurotrale":
            return "Usage: neurotrale [options]"
        return str(super().getSynopsis())


class _Startup(MultiService):
    """The server's services; a port that cannot be opened is one line and exit status 1."""

    def privilegedStartService(self) -> None:
        """Open the listening ports (as twistd does, before dropping privileges)."""
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            where = f"{e.interface or '*'}:{e.port}"
            why = getattr(e.socketError, "strerror", None) or str(e.socketError)
            fail(f"cannot listen on {where}: {why}", EXIT_FAILED)


def makeService(options: service.Options) -> MultiService:
    """:func:`neurotrale_twisted.service.makeService`, with one-line start-up failures."""
    top = _Startup()
    service.makeService(options).setServiceParent(top)
    return top


def main(argv: list[str] | None = None) -> None:
    """``neurotrale ARGS``: run ``twistd --nodaemon --pidfile= neurotrale ARGS``."""
    global PROGRAM
    from twisted.scripts import twistd

    args = list(sys.argv[1:] if argv is None else argv)
    PROGRAM = "neurotrale"
    sys.argv = ["neurotrale", "--nodaemon", "--pidfile=", "neurotrale", *args]
    twistd.run()  # type: ignore[no-untyped-call]
