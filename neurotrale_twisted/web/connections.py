"""How many connections one process may hold, and refusals logged once per interval.

A process has a fixed number of file descriptors (``RLIMIT_NOFILE``): every client
connection takes one, and so does every TIFF a decoding thread reads, every annotation
write's lock, temporary and directory handles, the log files and the pipes to the workers.
:func:`raise_open_file_limit` lifts the soft limit (often 1,024) to the hard one at start-up,
and :func:`default_max_connections` keeps a share of the descriptors for files, so that
connections alone can never exhaust them: at ``--max-connections`` the site closes new
connections at once while the open ones are served (``http.NeurotraleSite``).

A flood must not flood the log either: :class:`LogThrottle` turns any number of like events
into at most one line per interval, with their count, and :func:`quiet_accept_errors` does
that for the lines Twisted's listening ports write per connection they cannot accept.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
)
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher
from zope.interface import implementer

log = Logger()

#: Seconds between two log lines about the same kind of refusal.
LOG_INTERVAL = 10.0
#: Descriptors ``select()`` can watch: the most a process on the select reactor may use.
FD_SETSIZE = 1024
#: Descriptors kept for what every process holds besides connections: standard streams, the
#: reactor's epoll and waker, listening sockets, log and metrics files, imports, /proc reads.
BASE_RESERVE = 64
#: Descriptors kept per thread of the pool: a decode holds one TIFF, an annotation write the
#: directory handles of its path, its lock, its temporary and its version (about eight).
PER_THREAD = 8
#: Descriptors kept per worker process, for the parent's pipes to it (three) and a spare.
PER_WORKER = 4
#: The most connections a process holds by default, however high the limit: an idle
#: connection costs about 2 KiB of Python objects, one kept alive after a request about
#: 17 KiB (measured with 5,000), so this bounds what a flood can take to about 300 MiB per
#: process.
DEFAULT_CEILING = 16384


@dataclass(frozen=True)
class OpenFileLimit:
    """The soft limit on open files now (``soft``), the hard one, and the soft one before."""

    soft: int
    hard: int
    before: int


def raise_open_file_limit(ceiling: int | None = None) -> OpenFileLimit:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit (or to ``ceiling``).

    Never lowers it. Where the hard limit is unlimited (macOS) or the kernel refuses it, the
    soft limit is raised as far as the kernel accepts, or left as it was.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    targets = [hard] if hard != resource.RLIM_INFINITY else []
    targets += [1 << 20, 1 << 16, 10240]
    if ceiling is not None:
        targets = [min(t, ceiling) for t in targets]
    for target in targets:
        if target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        return OpenFileLimit(target, hard, soft)
    return OpenFileLimit(soft, hard, soft)


def reserved_descriptors(threads: int, workers: int) -> int:
    """The descriptors a process keeps for everything but client connections."""
    return BASE_RESERVE + PER_THREAD * threads + PER_WORKER * workers


def default_max_connections(limit: int, threads: int, workers: int) -> int:
    """The default ``--max-connections``: the open-file ``limit`` less the reserve for files
    (:func:`reserved_descriptors`), at most :data:`DEFAULT_CEILING`; with a limit too low for
    the reserve, half of it."""
    spare = max(limit - reserved_descriptors(threads, workers), limit // 2)
    return max(1, min(DEFAULT_CEILING, spare))


class LogThrottle:
    """Logs how often something happened, at most once per ``interval`` seconds.

    The first event is logged at once; the ones that follow within the interval are counted
    and logged together when it ends. ``format`` gets the count as ``{n}``, the interval as
    ``{interval}`` and ``fields``.
    """

    def __init__(
        self,
        clock: IReactorTime,
        format: str,
        *,
        interval: float = LOG_INTERVAL,
        level: LogLevel = LogLevel.warn,
        logger: Logger | None = None,
        **fields: Any,
    ) -> None:
        self.clock = clock
        self.format = format
        self.interval = interval
        self.level = level
        self.logger = logger or log
        self.fields = fields
        #: Events not logged yet.
        self.count = 0
        #: Every event noted.
        self.total = 0
        self._next: IDelayedCall | None = None

    def note(self, **fields: Any) -> None:
        """Count one event (``fields`` update the ones the next line shows)."""
        self.count += 1
        self.total += 1
        self.fields.update(fields)
        if self._next is None:
            self._flush()

    def _flush(self) -> None:
        self._next = None
        if not self.count:
            return
        self.logger.emit(
            self.level, self.format, n=self.count, interval=self.interval, **self.fields
        )
        self.count = 0
        self._next = self.clock.callLater(self.interval, self._flush)

    def stop(self) -> None:
        """Log what is counted and not logged yet, and schedule nothing more."""
        if self._next is not None:
            if self._next.active():
                self._next.cancel()
            self._next = None
        if self.count:
            self.logger.emit(
                self.level, self.format, n=self.count, interval=self.interval, **self.fields
            )
            self.count = 0


#: What a Twisted listening port logs per connection it could not accept, or per attempt.
_ACCEPT_RECOVERY = "EMFILE recovery: Closed socket from {address}"
_ACCEPT_FAILED = "Could not accept new connection ({acceptError})"
_ACCEPT_CHATTER = frozenset(
    {
        "EMFILE encountered; releasing reserved file descriptor.",
        "Re-reserving EMFILE recovery file descriptor.",
    }
)


@implementer(ILogObserver)
class _AcceptErrorObserver:
    """Passes a port's log events on, but counts its accept failures in a :class:`LogThrottle`."""

    def __init__(self, throttle: LogThrottle, forward: Callable[[Any], None]) -> None:
        self.throttle = throttle
        self.forward = forward

    def __call__(self, event: Any) -> None:
        text = event.get("log_format")
        if text in _ACCEPT_CHATTER:
            return
        if text == _ACCEPT_RECOVERY:
            self.throttle.note(error="EMFILE")
        elif text == _ACCEPT_FAILED:
            self.throttle.note(error=event.get("acceptError", "?"))
        else:
            self.forward(event)


@implementer(IProtocolFactory)
class _Admission:
    """A listening port's factory behind a gate: no protocol (the port closes the new
    connection at once, before TLS or HTTP see it) while ``admit`` says no. Once the port
    stops, the accept failures not logged yet are."""

    def __init__(
        self,
        factory: IProtocolFactory,
        admit: Callable[[], bool],
        accept_errors: LogThrottle | None,
    ) -> None:
        self.factory = factory
        self.admit = admit
        self.accept_errors = accept_errors

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        """The port's own protocol for the connection, or None to close it."""
        return self.factory.buildProtocol(addr) if self.admit() else None

    def doStart(self) -> None:
        """Start the port's own factory."""
        self.factory.doStart()

    def doStop(self) -> None:
        """Stop the port's own factory, and log the accept failures still counted."""
        if self.accept_errors is not None:
            self.accept_errors.stop()
        self.factory.doStop()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.factory, name)


def guard_port(
    port: object,
    admit: Callable[[], bool],
    clock: IReactorTime,
    held: Callable[[], int] | None = None,
) -> None:
    """Let ``port`` accept only the connections ``admit`` allows, and log sparingly.

    The gate sits in front of whatever factory the port has (the site, or the TLS wrapper
    of an ``ssl:`` endpoint around it): Twisted's port closes a connection whose factory
    builds no protocol at once, in its accept loop, so a flood at the cap holds no extra
    descriptor even for a moment. See :func:`quiet_accept_errors` for the log. ``held``
    (the connections this process has open) is for a port other processes accept on too:
    see :func:`share_accepts`.
    """
    factory = getattr(port, "factory", None)
    if factory is None or isinstance(factory, _Admission):
        return
    accept_errors = quiet_accept_errors(port, clock)
    port.factory = _Admission(factory, admit, accept_errors)  # type: ignore[attr-defined]
    if held is not None:
        share_accepts(port, held, clock)


#: How long a process sharing a listening socket leaves it to the others after an accept.
TURN = 0.0001


def share_accepts(port: object, held: Callable[[], int], clock: IReactorTime) -> None:
    """Let the processes that accept on ``port``'s socket share its new connections.

    Every worker listens on the same socket, and the kernel wakes them all; the first one
    the scheduler runs took every connection a client had just opened (Twisted's
    ``tcp.Port`` accepts up to ``numberAccepts`` at once, and a fast process is back for
    the next before the others run): the 32 of a benchmark, the six of a browser, all on one
    process and one core. Measured with two processes and 32 connections opened at once:
    32/0 to 20/12 before. Here a process accepts one connection, then, holding any, leaves
    the socket to the others for :data:`TURN` seconds, time enough for a woken process on an
    idle core to take the next one: 16/16 and 3/3 since. It still accepts up to 10,000
    connections a second (clients that open one per request are not held back), and a
    process whose accept was refused (``held`` says none) does not wait. A port that is not
    a ``tcp.Port`` (no ``numberAccepts``) is left alone.
    """
    if not isinstance(getattr(port, "numberAccepts", None), int):
        return
    read = port.doRead  # type: ignore[attr-defined]
    resting: list[object] = []

    def resume() -> None:
        resting.clear()
        if getattr(port, "connected", False) and not getattr(port, "disconnecting", False):
            port.startReading()  # type: ignore[attr-defined]

    def accept_one() -> object:
        port.numberAccepts = 1  # type: ignore[attr-defined]
        result = read()
        if held() > 0 and not resting and getattr(port, "connected", False):
            port.stopReading()  # type: ignore[attr-defined]
            resting.append(clock.callLater(TURN, resume))
        return result

    port.doRead = accept_one  # type: ignore[attr-defined]


def quiet_accept_errors(port: object, clock: IReactorTime) -> LogThrottle | None:
    """Make ``port`` log the connections it fails to accept once per interval, not each.

    Out of descriptors, a Twisted ``tcp.Port`` (and the TLS and UNIX ports built on it)
    closes each new connection and logs two or three lines for it. Returns the throttle, or
    None for a port that does not log that way.
    """
    logger = getattr(port, "_logger", None)
    if not isinstance(logger, Logger):
        return None
    throttle = LogThrottle(
        clock,
        "could not accept {n} new connection(s) ({error}: out of file descriptors or memory); "
        "each was closed at once (at most one such line per {interval:g} s)",
        error="EMFILE",
    )
    observer = _AcceptErrorObserver(throttle, globalLogPublisher)
    port._logger = Logger(namespace=logger.namespace, source=port, observer=observer)  # type: ignore[attr-defined]
    return throttle
