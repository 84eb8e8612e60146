"""The site: its requests and connections with their limits, and the root resource.

:class:`NeurotraleSite` makes :class:`LimitedChannel` connections (header size, deadlines,
the cap on open connections) carrying :class:`LimitedRequest` requests (the body limit, the
request target ``*``). Every response passes through :class:`NeurotraleRoot`, which adds the
CORS headers (errors included), answers ``OPTIONS`` preflights, refuses a faulty request
before routing, and folds ``//`` into ``/`` before the Klein routes see the path. Error
answers come from :mod:`.responses`, as everywhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from neurotrale_twisted.web.connections import LogThrottle
from neurotrale_twisted.web.cors import ALLOWED_METHODS, CorsPolicy
from neurotrale_twisted.web.protocol import (
    absolute_form,
    host_fault,
    method_fault,
    request_fault,
)
from neurotrale_twisted.web.responses import error_response, send_raw_error

log = Logger()


@dataclass(frozen=True)
class HttpSettings:
    """Settings of the HTTP layer shared by the site, its channels, requests and root."""

    cors: CorsPolicy = field(default_factory=CorsPolicy)
    #: The largest request body accepted, in bytes.
    max_body: int = 64 * 1024 * 1024
    #: The most bytes the request line and headers of one request may take.
    max_header_bytes: int = 16 * 1024
    #: Seconds a client has to send a whole request (line, headers and body) once it begins.
    request_timeout: float = 60.0
    #: Seconds a client has to send a request's line and headers, from the moment its
    #: connection opens (the first request) or from its first byte (a later one).
    header_timeout: float = 10.0
    #: Seconds an idle keep-alive connection is kept open between requests.
    idle_timeout: float = 60.0
    #: The most connections open at once (None: no cap); see ``connections.py``.
    max_connections: int | None = None


def _settings_of(channel: http.HTTPChannel | None) -> HttpSettings:
    site = getattr(channel, "site", None)
    return getattr(site, "settings", None) or HttpSettings()


class LimitedRequest(server.Request):
    """A request that refuses a body over the site's limit before reading it whole.

    A ``Content-Length`` over the limit, or a chunked body that grows past it, is answered
    at once with 413 and the connection is closed, so the body is never buffered.
    """

    _received = 0
    _refused = False

    def gotLength(self, length: int | None) -> None:
        """Refuse at once a declared body over the limit."""
        if length is not None and length > _settings_of(self.channel).max_body:
            self._refuse()
            # The channel answers ``Expect: 100-continue`` right after this; a 100 after
            # the final 413 would invite the body that was just refused (RFC 9110 10.1.1).
            self.requestHeaders.removeHeader(b"expect")
            length = 0
        super().gotLength(length)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """Take an absolute-form target (``GET http://host/path``) as its path, with the
        ``Host`` it names (RFC 9112 3.2.2: the received ``Host`` is ignored)."""
        split = absolute_form(path)
        if split is not None:
            host, path = split
            self.requestHeaders.setRawHeaders(b"host", [host])
        super().requestReceived(command, path, version)

    def _handleStar(self) -> None:
        """Answer a request for ``*`` as every other answer is made: CORS, ``nosniff``, the
        same refusals before routing, JSON errors; only ``OPTIONS`` is served on it.

        Twisted would answer it bare, ``405`` with no body even for an unknown method.
        """
        settings = _settings_of(self.channel)
        settings.cors.apply(self)
        self.setHeader(b"x-content-type-options", b"nosniff")
        self.setHeader(b"allow", b"OPTIONS")
        fault = host_fault(self) or method_fault(self.method)
        if fault is None and self.method == b"OPTIONS":
            self.setHeader(b"allow", ALLOWED_METHODS)
            self.setHeader(b"content-length", b"0")
        elif fault is None:
            shown = self.method.decode("latin-1")
            self.write(
                error_response(self, http.NOT_ALLOWED, f"method {shown} is not allowed on *")
            )
        else:
            self.write(error_response(self, fault.status, fault.message))
        self.finish()

    def getRequestHostname(self) -> bytes:
        """The host the client named, else the address it reached, else ``localhost``.

        Twisted's answers with the listening address, which a unix socket does not have
        (an HTTP/1.0 request there needs no ``Host``).
        """
        if self.getHeader(b"host") or hasattr(self.getHost(), "host"):
            return bytes(super().getRequestHostname())
        return b"localhost"

    def handleContentChunk(self, data: bytes) -> None:
        """Count the body as it arrives and refuse it when it passes the limit."""
        if self._refused:
            return
        self._received += len(data)
        if self._received > _settings_of(self.channel).max_body:
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        self._refused = True
        settings = _settings_of(self.channel)
        log.info("refused a request body over {limit} bytes", limit=settings.max_body)
        send_raw_error(
            self.channel,
            settings.cors,
            self.getHeader(b"origin"),
            413,
            f"request body is larger than the limit of {settings.max_body} bytes",
        )

    def process(self) -> None:
        """Process the request unless its body was refused (the 413 is already sent)."""
        if not self._refused:
            super().process()

    def processingFailed(self, reason: Failure) -> Failure:
        """An error that no route's handler took (our bug): logged whole, and answered as
        every error is, a JSON 500 (Twisted's own answer is an HTML page)."""
        log.failure(
            "{method} {uri} failed",
            reason,
            method=self.method.decode("latin-1"),
            uri=self.uri.decode("latin-1"),
        )
        self.write(error_response(self, http.INTERNAL_SERVER_ERROR, "internal server error"))
        self.finish()
        return reason


class LimitedChannel(http.HTTPChannel):
    """An HTTP connection with the site's header-size limit and deadlines per request.

    Twisted's idle timeout restarts with every byte, so a client sending one byte a second
    would hold a connection forever. A request's deadlines start when its connection opens
    (the first request) or with its first byte (a later one on a keep-alive connection): its
    line and headers must arrive within ``header_timeout`` seconds and the whole request
    within ``request_timeout``. A connection that sent nothing by then is closed without an
    answer, one that sent part of a request gets 408. Between requests only the idle timeout
    counts. The site counts the connection while it is open (``--max-connections``).
    """

    _deadline: IDelayedCall | None = None
    #: Whether the request the deadline is for has sent a byte.
    _begun = False
    #: Whether the deadline is the headers' (else the whole request's).
    _awaiting_headers = True

    def connectionMade(self) -> None:
        """Apply the header limits of the site, count the connection, start the deadline."""
        settings = _settings_of(self)
        self.totalHeadersSize = settings.max_header_bytes
        self.MAX_LENGTH = settings.max_header_bytes
        _site_of(self).connection_opened()
        super().connectionMade()
        self._start_deadline()

    def dataReceived(self, data: bytes) -> None:
        """Start the deadline of a later request with its first byte."""
        # While a request is answered Twisted only buffers what follows; its deadline
        # starts once it is read.
        if data and not self._handlingRequest:
            if self._deadline is None:
                self._start_deadline()
            self._begun = True
        super().dataReceived(data)

    def lineLengthExceeded(self, line: bytes) -> None:
        """A request line or header line over the limit: 431, then close."""
        self.refuse(431, f"a request or header line is longer than {self.MAX_LENGTH} bytes")

    def _respondToBadRequestAndDisconnect(self) -> None:
        """A request Twisted cannot read (its line, a header, the framing of its body) or
        whose headers are over the limit: a JSON 400 like every other refusal, then close.

        Twisted's own answer is a bare status line, without the CORS headers.
        """
        self.refuse(
            400,
            "the request is not valid HTTP/1.1, or its headers are larger than "
            f"{self.totalHeadersSize} bytes",
        )

    def refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with a JSON error on the connection, then close it: for a
        request still arriving, which Twisted has no request object to answer with."""
        origin = self.requests[-1].getHeader(b"origin") if self.requests else None
        send_raw_error(self, _settings_of(self).cors, origin, status, message)

    def allHeadersReceived(self) -> None:
        """The headers are in: the rest of the request has until the request's deadline."""
        settings = _settings_of(self)
        if self._deadline is not None and self._awaiting_headers:
            self._awaiting_headers = False
            more = settings.request_timeout - _header_window(settings)
            if more > 0 and self._deadline.active():
                self._deadline.delay(more)
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        """The request has arrived whole: its deadline is met."""
        self._cancel_deadline()
        super().allContentReceived()

    def timeoutConnection(self) -> None:
        """Close an idle connection, as Twisted does, counting it instead of logging each."""
        _site_of(self).closed_idle.note()
        if self.abortTimeout is not None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        self.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Forget the deadline of a request that will never arrive; uncount the connection."""
        self._cancel_deadline()
        _site_of(self).connection_closed()
        super().connectionLost(reason)

    def _start_deadline(self) -> None:
        self._awaiting_headers = True
        self._begun = False
        self._deadline = self.callLater(_header_window(_settings_of(self)), self._request_too_slow)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _request_too_slow(self) -> None:
        self._deadline = None
        settings = _settings_of(self)
        if self._awaiting_headers:
            limit, what = _header_window(settings), "request line and headers"
        else:
            limit, what = settings.request_timeout, "request"
        _site_of(self).closed_slow.note()
        if not self._begun:
            # Nothing to answer: a connection opened and left silent.
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.refuse(408, f"the {what} did not arrive within {limit:g} seconds")


def _header_window(settings: HttpSettings) -> float:
    """Seconds a request has for its line and headers (never more than for all of it)."""
    return min(settings.header_timeout, settings.request_timeout)


def _site_of(channel: http.HTTPChannel) -> NeurotraleSite:
    """The site that built ``channel`` (``Site.buildProtocol`` sets it before it connects)."""
    site: NeurotraleSite = channel.site  # type: ignore[attr-defined]
    return site


class NeurotraleSite(server.Site):
    """The site: our request and channel classes, the HTTP settings they read, and the cap
    on open connections.

    Connections speak HTTP/1.1 through :class:`LimitedChannel` (Twisted's HTTP/2 switch
    needs the optional h2 package and TLS, and would bypass the limits). With
    ``settings.max_connections`` connections open, :meth:`admit` refuses a new one (the
    listening ports close it at once, see ``connections.guard_port``; the open ones are
    served as before), and the log says how many were refused once per
    :data:`~neurotrale_twisted.web.connections.LOG_INTERVAL`, never once per refusal.
    """

    protocol = LimitedChannel  # type: ignore[assignment]

    def __init__(self, resource: IResource, settings: HttpSettings, **kwargs: Any) -> None:
        super().__init__(
            resource, requestFactory=LimitedRequest, timeout=settings.idle_timeout, **kwargs
        )
        self.settings = settings
        #: Connections open now (refused ones are never counted).
        self.open_connections = 0
        self.refused = LogThrottle(
            self.reactor,
            "refused {n} new connection(s): {open} were open, the limit (--max-connections "
            "{limit}); the open ones are still served (at most one such line per {interval:g} s)",
            open=0,
            limit=settings.max_connections,
        )
        self.closed_slow = LogThrottle(
            self.reactor,
            "closed {n} connection(s) that sent no complete request line and headers within "
            "{headers:g} s or request within {request:g} s",
            level=LogLevel.info,
            headers=_header_window(settings),
            request=settings.request_timeout,
        )
        self.closed_idle = LogThrottle(
            self.reactor,
            "closed {n} keep-alive connection(s) idle for {idle:g} s",
            level=LogLevel.info,
            idle=settings.idle_timeout,
        )

    def admit(self) -> bool:
        """Whether a new connection may open now; a refusal is counted for the log."""
        limit = self.settings.max_connections
        if limit is None or self.open_connections < limit:
            return True
        self.refused.note(open=self.open_connections)
        return False

    def connection_opened(self) -> None:
        """Count a connection a channel now serves."""
        self.open_connections += 1

    def connection_closed(self) -> None:
        """Uncount a connection that closed."""
        self.open_connections -= 1

    def stopFactory(self) -> None:
        """Log the refusals and closings not logged yet."""
        for throttle in (self.refused, self.closed_slow, self.closed_idle):
            throttle.stop()
        super().stopFactory()


def fold_slashes(postpath: list[bytes]) -> list[bytes]:
    """Drop empty segments (``//`` is ``/``), keeping a trailing one (a directory URL)."""
    folded = [s for s in postpath if s]
    if postpath and postpath[-1] == b"":
        folded.append(b"")
    return folded


class AccessPolicy(Protocol):
    """Decides whether a request reaches the routes (see ``auth.WritePolicy``)."""

    def render(self, request: IRequest, routes: IResource) -> bytes | int:
        """Render ``request`` through ``routes``, or refuse it."""


class NeurotraleRoot(Resource):
    """The site's root: CORS on every answer, preflights, ``//`` folded for the routes, and
    requests refused before routing (:mod:`.protocol`: methods, ``Host``, the query)."""

    isLeaf = True

    def __init__(
        self,
        routes: IResource,
        cors: CorsPolicy,
        access: AccessPolicy | None = None,
        allowed_methods: Callable[[str], Sequence[str]] | None = None,
    ) -> None:
        super().__init__()
        self.routes = routes
        self.cors = cors
        self.access = access
        self.allowed_methods = allowed_methods

    def render(self, request: IRequest) -> bytes | int:
        """Apply CORS, refuse a faulty request, answer ``OPTIONS``, and hand everything
        else to the routes."""
        self.cors.apply(request)
        # Browsers must take our content types as they are (a data file is never a page).
        request.setHeader(b"x-content-type-options", b"nosniff")
        postpath = fold_slashes(request.postpath)
        try:
            path = "/" + "/".join(segment.decode("utf-8") for segment in postpath)
        except UnicodeDecodeError:
            return error_response(request, http.BAD_REQUEST, "the URL path is not valid UTF-8")
        fault = request_fault(request)
        if fault is not None:
            if fault.status == http.NOT_ALLOWED:
                allowed = list(self.allowed_methods(path)) if self.allowed_methods else []
                request.setHeader(b"allow", ", ".join([*allowed, "OPTIONS"]).encode())
            return error_response(request, fault.status, fault.message)
        # From here on the method is one exact token of SERVED_METHODS, the same for the
        # access policy and for the router (which would upper-case any other spelling).
        if request.method == b"OPTIONS":
            return self.cors.preflight(request)
        request.postpath = postpath
        if self.access is not None:
            return self.access.render(request, self.routes)
        answer: bytes | int = self.routes.render(request)
        return answer
