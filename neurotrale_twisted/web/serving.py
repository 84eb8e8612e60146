"""The site as operations see it: metrics per request, the access log, a graceful stop.

:class:`ServingSite` is :class:`~neurotrale_twisted.web.site.NeurotraleSite` plus what running
it in production needs: every request is counted in
:class:`~neurotrale_twisted.web.metrics.ServerMetrics` and tagged with the worker process that
answered it (``X-Neurotrale-Worker``), the access log is in the combined format (with the client
address a trusted proxy forwarded, when told to trust it), and :meth:`ServingSite.drain` lets
the requests in flight finish before the process stops."""

from __future__ import annotations

import ipaddress
import os
import weakref
from typing import Any, Protocol

from twisted.internet import task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import LogEvent, Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from neurotrale_twisted.web.metrics import ServerMetrics, route_of
from neurotrale_twisted.web.site import HttpSettings, NeurotraleSite

log = Logger()

#: The response header naming the worker process that answered.
WORKER_HEADER = b"x-neurotrale-worker"
#: The log namespace of the access log's lines.
ACCESS_NAMESPACE = "neurotrale_twisted.web.access"


class AccessLogFile(Protocol):
    """Where a site writes its access log: what ``HTTPFactory.logFile`` may be."""

    def write(self, data: str, /) -> object:
        """Take one line (``\n``-terminated) of the access log."""

    def close(self) -> None:
        """Write out anything held back; the site logs no more after this."""


def access_event(line: str, when: float) -> LogEvent:
    """The log event of one access-log line (without its ``\n``), made at ``when``."""
    return {
        "log_format": "{log_text}",
        "log_text": line,
        "log_level": LogLevel.info,
        "log_namespace": ACCESS_NAMESPACE,
        "log_time": when,
    }


class PublishedAccessLog:
    """The access log as events of the process's own log (twistd's log file or stdout).

    Each line is one event, published straight to the log's observers: not through the
    legacy ``log.msg`` bridge that Twisted's default ``log.logfile`` takes.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock

    def write(self, data: str, /) -> object:
        """Publish one line."""
        globalLogPublisher(access_event(data.rstrip("\n"), self.clock.seconds()))
        return None

    def close(self) -> None:
        """Nothing is held back."""


class _ForwardedRequest:
    """A request seen through a trusted proxy: the client is the address the proxy forwarded."""

    def __init__(self, request: IRequest, client: IAddress) -> None:
        self._request = request
        self._client = client

    def getClientAddress(self) -> IAddress:
        """The address the proxy saw the request come from."""
        return self._client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def forwarded_client(request: IRequest) -> IAddress | None:
    """The client address a proxy put last in ``X-Forwarded-For``, or None.

    The last address is the one our proxy added; earlier ones come from the client (or from
    proxies we know nothing of) and can say anything.
    """
    headers = request.requestHeaders.getRawHeaders(b"x-forwarded-for") or []
    addresses = [a.strip() for value in headers for a in value.split(b",") if a.strip()]
    if not addresses:
        return None
    try:
        ip = ipaddress.ip_address(addresses[-1].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        return IPv6Address("TCP", str(ip), 0)
    return IPv4Address("TCP", str(ip), 0)


def trusted_proxy_log_formatter(timestamp: str, request: IRequest) -> str:
    """The combined log format with the client address taken from ``X-Forwarded-For``."""
    client = forwarded_client(request)
    if client is not None:
        request = _ForwardedRequest(request, client)  # type: ignore[assignment]
    return str(http.combinedLogFormatter(timestamp, request))


class ServingSite(NeurotraleSite):
    """The site with metrics, the worker header, the access log and in-flight tracking.

    ``worker`` is this process's index in the pool (0: the parent, or a single process).
    ``trust_proxy`` logs the client address that the reverse proxy forwarded.
    """

    def __init__(
        self,
        resource: IResource,
        settings: HttpSettings,
        metrics: ServerMetrics,
        *,
        worker: int = 0,
        trust_proxy: bool = False,
        access_log: AccessLogFile | None = None,
        **kwargs: Any,
    ) -> None:
        formatter = trusted_proxy_log_formatter if trust_proxy else http.combinedLogFormatter
        super().__init__(resource, settings, logFormatter=formatter, **kwargs)
        self.metrics = metrics
        self.worker = worker
        #: Where the access log goes: this process's log unless told otherwise.
        self.access_log = access_log or PublishedAccessLog(self.reactor)
        #: Requests being answered now.
        self.active: set[server.Request] = set()
        #: The connections requests came on, while they are open.
        self.channels: weakref.WeakSet[http.HTTPChannel] = weakref.WeakSet()
        self.draining = False

    def logPrefix(self) -> str:
        """The name in log lines such as "NeurotraleSite starting on 9000"."""
        return "NeurotraleSite"

    def log(self, request: http.Request) -> None:
        """Write the access-log line of ``request`` to :attr:`access_log`: also while the
        process stops (Twisted's own ``log`` stops with the listening ports, before the
        answers in flight are sent)."""
        when = self._logDateTime
        if self._logDateTimeCall is None:  # stopped with the ports: no longer updated
            when = http.datetimeToLogString(self.reactor.seconds())
        self.access_log.write(self._logFormatter(when, request) + "\n")

    def getResourceFor(self, request: server.Request) -> IResource:
        """Start measuring ``request`` and tag its answer, then find its resource."""
        started = self.reactor.seconds()
        route = route_of(request.path)
        method = request.method.decode("latin-1")
        self.active.add(request)
        self.channels.add(request.channel)
        self.metrics.request_started()
        # The pid now, not when the site was made: twistd may daemonize (fork) in between.
        request.setHeader(WORKER_HEADER, b"%d; pid=%d" % (self.worker, os.getpid()))
        if self.draining:
            _close_after(request)

        def done(result: object) -> None:
            self.active.discard(request)
            self.metrics.request_finished(
                route,
                method,
                request.code,
                request.sentLength,
                self.reactor.seconds() - started,
            )
            if isinstance(result, Failure):
                return None  # the client went away; nothing more to say

        request.notifyFinish().addBoth(done)
        resource: IResource = super().getResourceFor(request)
        return resource

    def drain(self, clock: IReactorTime, timeout: float) -> Deferred[None]:
        """Fire once the requests in flight are answered and sent (or ``timeout`` seconds passed).

        Idle keep-alive connections are closed at once, busy ones after their answer: a
        connection is only closed once what was written to it is sent, so no answer is cut
        short. Call it once the ports stopped listening.
        """
        self.draining = True
        busy = {request.channel for request in self.active}
        for channel in list(self.channels):
            if not _is_open(channel):
                continue
            if channel in busy:
                channel.persistent = False
            else:
                channel.loseConnection()
        deadline = clock.seconds() + timeout
        finished: Deferred[None] = Deferred()

        def check() -> None:
            still_open = [c for c in self.channels if _is_open(c)]
            if (not self.active and not still_open) or clock.seconds() >= deadline:
                if self.active or still_open:
                    log.warn(
                        "stopping with {n} request(s) unanswered and {c} connection(s) "
                        "still sending after {t} s",
                        n=len(self.active),
                        c=len(still_open),
                        t=timeout,
                    )
                poll.stop()

        poll = task.LoopingCall(check)
        poll.clock = clock
        poll.start(0.02).addCallback(lambda _: finished.callback(None))
        return finished


def _is_open(channel: http.HTTPChannel) -> bool:
    """Whether the connection of ``channel`` is still open (through a TLS wrapper too)."""
    transport = getattr(channel, "transport", None)
    while transport is not None and hasattr(transport, "wrappedProtocol"):
        transport = getattr(transport, "transport", None)
    return transport is not None and not getattr(transport, "disconnected", True)


def _close_after(request: server.Request) -> None:
    """Close the connection of ``request`` once it is answered (no keep-alive)."""
    channel = getattr(request, "channel", None)
    if channel is not None and hasattr(channel, "persistent"):
        channel.persistent = False
