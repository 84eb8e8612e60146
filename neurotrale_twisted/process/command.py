"""The command line as people meet it: ``twistd neurotrale ...`` and ``neurotrale ...``.

``twistd`` prints its whole usage before a mistake and says ``Usage: twistd [options]``;
a busy port ends in a traceback. Here each of these is one line naming what is wrong,
with exit status 2 for a mistake in the command (an unknown option, a bad value) and 1 for
a data root or a port that cannot be served. The options are
:mod:`neurotrale_twisted.process.options`'s, the service
:mod:`neurotrale_twisted.process.service`'s; the Twisted plugin (``twisted/plugins``) names this
module, so ``twistd neurotrale`` gets the same behaviour as ``neurotrale``.

``neurotrale ARGS`` (also ``python -m neurotrale_twisted ARGS``) is ``twistd --nodaemon
--pidfile= neurotrale ARGS``, run by twistd itself, for people who have never met twistd.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import NoReturn, cast

from twisted.application.service import MultiService
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorCore
from twisted.python import usage

from neurotrale_twisted.process import service
from neurotrale_twisted.process.options import MAX_PORT, CannotServe
from neurotrale_twisted.process.options import Options as ServerOptions

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


class Options(ServerOptions):
    """The server's options; a refusal is one line and an exit, not a page of usage."""

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """Parse ``options``, or say in one line what is wrong with them and exit."""
        try:
            super().parseOptions(options)
        except CannotServe as e:
            fail(str(e), EXIT_FAILED)
        except usage.UsageError as e:
            fail(f"{e} (see {PROGRAM} --help)", EXIT_USAGE)

    def postOptions(self) -> None:
        """The server's checks, then each ``--listen`` checked before anything starts."""
        super().postOptions()
        for description in self["listen"]:
            check_endpoint(description)

    def getSynopsis(self) -> str:
        """``Usage: neurotrale [options]``, or twistd's own for ``twistd neurotrale``."""
        if PROGRAM == "neurotrale":
            return "Usage: neurotrale [options]"
        return str(super().getSynopsis())


def check_endpoint(description: str) -> None:
    """Refuse a ``--listen`` description that cannot be listened on, before anything starts
    (and before ``twistd`` becomes a daemon): a mistake in it is a usage error, a file it
    names that is missing (a TLS key, a UNIX socket's directory) is :class:`CannotServe`."""
    from twisted.internet import endpoints, reactor

    said = f"--listen {description!r}"
    try:
        endpoint = endpoints.serverFromString(reactor, description)
    except OSError as e:  # ssl: a key or certificate that cannot be read
        raise CannotServe(f"{said}: {e.strerror or e}: {e.filename!r}") from None
    except (ValueError, KeyError, TypeError, IndexError) as e:
        if description.strip().lower().startswith("systemd:"):
            raise CannotServe(f"{said}: systemd passed no such socket (LISTEN_FDS)") from None
        raise usage.UsageError(f"{said}: {e}") from None
    except Exception as e:  # OpenSSL's errors: a key or certificate that is not one
        raise CannotServe(f"{said}: {e}") from None
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= MAX_PORT:
        raise usage.UsageError(f"{said}: the port must be 0 to {MAX_PORT}")
    if isinstance(endpoint, endpoints.UNIXServerEndpoint):
        directory = os.path.dirname(os.fsdecode(endpoint._address)) or "."
        if not os.path.isdir(directory):
            raise CannotServe(f"{said}: the directory {directory!r} does not exist")


class _Startup(MultiService):
    """The server's services; a port that cannot be opened is one line and exit status 1.

    ``twistd`` (the command) is the options' parent: as a daemon, its first process waits
    on ``statusPipe`` for the daemon to say it started, and would wait forever for one that
    exits without saying so.
    """

    def __init__(self, twistd: usage.Options | None, listen: list[str]) -> None:
        super().__init__()
        self.twistd = twistd
        self.listen = listen

    def privilegedStartService(self) -> None:
        """Open the listening ports (as twistd does, before dropping privileges)."""
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            where = f"{e.interface or '*'}:{e.port}"
            why = getattr(e.socketError, "strerror", None) or str(e.socketError)
            self.refuse(f"cannot listen on {where}: {why}")
        except (OSError, OverflowError) as e:  # e.g. a UNIX socket's directory just went
            self.refuse(f"cannot listen on {', '.join(self.listen)}: {e}")

    def refuse(self, message: str) -> NoReturn:
        """Say ``message`` and exit 1; as a daemon, through the pipe twistd waits on."""
        twistd = self.twistd
        if twistd is not None and (pipe := twistd.get("statusPipe")) is not None:
            # twistd's waiting process prints what follows "1 " (at most 98 bytes), exits 1.
            os.write(pipe, b"1 " + message.encode()[:98])
            os.close(pipe)
            twistd["statusPipe"] = None
            _remove_own_pidfile(twistd.get("pidfile"))
        fail(message, EXIT_FAILED)


def _remove_own_pidfile(pidfile: str | None) -> None:
    """Remove ``pidfile`` if it names this process (twistd wrote it before the failure)."""
    if not pidfile:
        return
    try:
        with open(pidfile) as f:
            if f.read().strip() == str(os.getpid()):
                os.remove(pidfile)
    except OSError:
        pass


def makeService(options: ServerOptions, reactor: IReactorCore | None = None) -> MultiService:
    """:func:`neurotrale_twisted.process.service.makeService`, with one-line start-up failures.

    twistd calls it with the options alone, once it has installed the reactor: that one is
    used unless ``reactor`` is given.
    """
    if reactor is None:
        from twisted.internet import reactor as installed

        reactor = cast(IReactorCore, installed)
    top = _Startup(getattr(options, "parent", None), list(options["listen"]))
    service.makeService(options, reactor).setServiceParent(top)
    return top


def main(argv: list[str] | None = None) -> None:
    """``neurotrale ARGS``: run ``twistd --nodaemon --pidfile= neurotrale ARGS``."""
    global PROGRAM
    from twisted.scripts import twistd

    args = list(sys.argv[1:] if argv is None else argv)
    PROGRAM = "neurotrale"
    sys.argv = ["neurotrale", "--nodaemon", "--pidfile=", "neurotrale", *args]
    twistd.run()
