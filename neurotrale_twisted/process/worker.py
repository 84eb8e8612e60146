"""One worker process of the pool (:mod:`neurotrale_twisted.process.workers`).

It is started by the parent with the parent's import path, what it inherits (its index and
its listening sockets, :class:`~neurotrale_twisted.process.adopted.Inherited`) and the parent's own
command-line options, which it parses with the same
:class:`~neurotrale_twisted.process.options.Options` (their checks and defaults included). It builds
the same application, serves on the inherited sockets, and logs JSON lines on its stdout for
the parent to relay (its access-log lines in batches, :mod:`.accesslines`). It stops on
SIGTERM, after answering the requests it is busy with, and when its stdin (a pipe from the
parent) closes, so none outlives a killed parent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import cast

from twisted.internet import abstract, fdesc
from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFDSet,
    IReactorFromThreads,
    IReactorTime,
)
from twisted.logger import Logger, globalLogBeginner, jsonFileLogObserver
from twisted.python.failure import Failure

from neurotrale_twisted.process.accesslines import BatchedAccessLog
from neurotrale_twisted.process.adopted import Inherited
from neurotrale_twisted.process.options import Options
from neurotrale_twisted.process.service import makeService

log = Logger()


class _ParentWatch(abstract.FileDescriptor):
    """Reads the child's stdin, a pipe from the parent: end of file means the parent is gone."""

    def __init__(self, on_close: Callable[[], None]) -> None:
        super().__init__()
        self.on_close = on_close
        fdesc.setNonBlocking(0)

    def fileno(self) -> int:
        """Standard input."""
        return 0

    def doRead(self) -> object:
        """Discard what the parent sends; report the end of the pipe."""
        return fdesc.readFromFD(0, lambda data: None)

    def connectionLost(self, reason: Failure) -> None:
        """The parent went away: stop serving."""
        super().connectionLost(reason)
        self.on_close()


def main(argv: Sequence[str]) -> None:
    """A worker process: ``argv`` is what it inherits (JSON) then the parent's options. Builds
    the application, serves until told to stop (SIGTERM) or until the parent goes away."""
    from twisted.internet import reactor as installed

    reactor = cast(IReactorCore, installed)
    inherited_json, *arguments = argv
    inherited = Inherited.from_json(inherited_json)
    index = inherited.index
    stdout = sys.stdout
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(stdout, recordSeparator="")])

    options = Options()
    options.parseOptions(arguments)
    # A worker has no workers of its own: its reserve of descriptors is a single process's.
    options["workers"] = 1
    access_log = BatchedAccessLog(stdout, cast(IReactorTime, reactor))
    top = makeService(options, reactor, inherited, access_log)
    top.privilegedStartService()

    stopping: list[bool] = []
    reactor.addSystemEventTrigger("before", "shutdown", stopping.append, True)

    def stop(why: str) -> None:
        # Once: a worker can be told twice (SIGTERM from the parent and from a `kill` of the
        # whole process group), and a second reactor.stop() is an error.
        if not stopping:
            stopping.append(True)
            log.info("worker {index}: {why}; stopping", index=index, why=why)
            reactor.stop()

    def parent_gone() -> None:
        stop("the parent process is gone")

    def install_signal_handlers() -> None:
        # Ctrl-C in a terminal reaches the whole process group; the parent stops the
        # workers itself, in order, so a worker must not stop (and be restarted) first.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(
            signal.SIGTERM,
            lambda *_: cast(IReactorFromThreads, reactor).callFromThread(stop, "received SIGTERM"),
        )

    reactor.callWhenRunning(install_signal_handlers)
    cast(IReactorFDSet, reactor).addReader(_ParentWatch(parent_gone))
    reactor.callWhenRunning(top.startService)
    reactor.callWhenRunning(
        log.info,
        "worker {index} serving on {n} inherited socket(s)",
        index=index,
        n=len(inherited.sockets),
    )
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    # Everything is stopped and logged; skip the interpreter's slow teardown of numpy & co.
    with contextlib.suppress(OSError):  # the parent is gone: nobody reads what is left
        access_log.close()
        stdout.flush()
    os._exit(0)
