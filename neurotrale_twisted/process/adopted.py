"""How a worker process serves on a listening socket it inherited from the parent.

The parent describes each socket it passes down as a :class:`SharedSocket` (its descriptor
number in the child, its address family, the ``ssl:`` description whose certificate wraps
it); :class:`Inherited` is what a worker is given: its index in the pool and those sockets.
:class:`AdoptedEndpoint` listens on one with Twisted's ``AdoptedStreamServerEndpoint``
(``reactor.adoptStreamPort``).

Two things Twisted offers no public way to do sit here, each with its reason:

- **A UNIX socket a worker must leave alone** (:class:`_AdoptedUNIXPort`). Twisted's UNIX
  port, adopted or not, makes its socket file mode 0666 when it starts listening, and when it
  stops shuts the socket down and deletes its file. An adopted socket is the parent's: it
  still serves on it after a worker stops, and the operator chose its mode (``mode=660``).
  The port here keeps the mode and skips the shutdown and the deletion. It builds on
  ``unix.Port._fromListeningDescriptor`` and ``_shouldShutdown``, which
  ``adoptStreamPort`` and the adopted TCP port use themselves.
- **The TLS context of an ``ssl:`` endpoint description** (:func:`tls_context`). The
  endpoint parser builds the certificate options (key, certificate, chain, DH parameters,
  method) but hands them only to ``listenSSL``. They are caught here with public interfaces
  alone: the description is parsed with ``serverFromString`` against a stand-in
  ``IReactorSSL`` whose ``listenSSL`` keeps the context factory and opens nothing, so every
  process wraps its adopted socket exactly as the parent's endpoint wraps its own.

``tests/test_adopted.py`` checks both, and that the first one is still needed.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import cast

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import fdesc, tcp, unix
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, execute
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IListeningPort,
    IOpenSSLContextFactory,
    IProtocolFactory,
    IReactorSocket,
    IReactorSSL,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from neurotrale_twisted.web.connections import guard_port
from neurotrale_twisted.web.serving import ServingSite

#: The address families a shared socket may have, by the name :class:`SharedSocket` uses.
FAMILIES = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}


@dataclass(frozen=True)
class SharedSocket:
    """A listening socket the parent passes to its children.

    ``fd`` is its number in the child, ``family`` ``INET``, ``INET6`` or ``UNIX``, and
    ``tls`` the ``ssl:`` endpoint description whose certificate wraps it, if any.
    """

    fd: int
    family: str
    tls: str | None = None


@dataclass(frozen=True)
class Inherited:
    """What a worker process is given by the parent: its index in the pool (1, 2, ...) and
    the listening sockets it serves on. Travels on the worker's command line as JSON."""

    index: int
    sockets: tuple[SharedSocket, ...]

    def to_json(self) -> str:
        """This, as the one command-line argument :meth:`from_json` reads."""
        return json.dumps({"index": self.index, "sockets": [asdict(s) for s in self.sockets]})

    @classmethod
    def from_json(cls, text: str) -> Inherited:
        """Read what :meth:`to_json` wrote; ValueError, KeyError or TypeError when it is not."""
        spec = json.loads(text)
        sockets = tuple(SharedSocket(**shared) for shared in spec["sockets"])
        for shared in sockets:
            if shared.family not in FAMILIES:
                raise ValueError(f"unknown address family {shared.family!r}")
        return cls(int(spec["index"]), sockets)


@implementer(IListeningPort)
class _NotListening:
    """What the stand-in reactor of :func:`tls_context` returns: a port that never opened."""

    def __init__(self, address: IAddress) -> None:
        self.address = address

    def startListening(self) -> None:
        """Nothing to open."""

    def stopListening(self) -> None:
        """Nothing to close."""

    def getHost(self) -> IAddress:
        """The address it would have listened on."""
        return self.address


@implementer(IReactorSSL)
class _ContextCatcher:
    """A stand-in reactor for an ``ssl:`` endpoint: ``listenSSL`` keeps the context factory."""

    def __init__(self) -> None:
        self.context: IOpenSSLContextFactory | None = None

    def listenSSL(
        self,
        port: int,
        factory: IProtocolFactory,
        contextFactory: IOpenSSLContextFactory,
        backlog: int = 50,
        interface: str = "",
    ) -> IListeningPort:
        """Keep ``contextFactory``; open nothing."""
        self.context = contextFactory
        return _NotListening(IPv4Address("TCP", interface or "0.0.0.0", port))

    def connectSSL(self, *args: object, **kwargs: object) -> IConnector:
        """Never used: only server descriptions are parsed here."""
        raise NotImplementedError("only listenSSL is caught")


def tls_context(description: str) -> IOpenSSLContextFactory:
    """The TLS context factory the ``ssl:`` endpoint ``description`` listens with.

    Raises what ``serverFromString`` raises for a bad description, and ValueError when it is
    no ``ssl:`` description.
    """
    if description.split(":", 1)[0].strip().lower() != "ssl":
        raise ValueError(f"{description!r} is not an ssl: endpoint description")
    catcher = _ContextCatcher()
    serverFromString(catcher, description).listen(_NoFactory())
    assert catcher.context is not None  # the ssl: endpoint listens with listenSSL
    return catcher.context


@implementer(IProtocolFactory)
class _NoFactory:
    """The factory :func:`tls_context` hands to an endpoint that never listens."""

    def buildProtocol(self, addr: object) -> None:
        """Never called."""

    def doStart(self) -> None:
        """Never called."""

    def doStop(self) -> None:
        """Never called."""


class _AdoptedUNIXPort(unix.Port):
    """A UNIX socket adopted from the parent: stopping it leaves the socket alone.

    Twisted's UNIX port shuts its socket down and removes its file when it stops; both are
    the parent's, which still serves on them (TCP ports adopted with ``adoptStreamPort``
    already skip the shutdown). The mode is set before it starts, to the file's own.
    """

    _shouldShutdown = False

    def connectionLost(self, reason: Failure) -> None:
        """Close this process's descriptor of the socket; leave its file in place."""
        tcp.Port.connectionLost(self, reason)


def _adopt_unix(reactor: IReactorSocket, fd: int, factory: IProtocolFactory) -> IListeningPort:
    """Listen on the inherited UNIX socket ``fd`` without changing, shutting or deleting it."""
    port = _AdoptedUNIXPort._fromListeningDescriptor(reactor, fd, factory)
    with socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        path = probe.getsockname()
    if isinstance(path, str) and path and not path.startswith("\0"):
        port.mode = stat.S_IMODE(os.stat(path).st_mode)  # the parent's mode, not 0666
    port.startListening()
    os.close(fd)  # the port holds its own duplicate
    return cast(IListeningPort, port)


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """The endpoint of a socket inherited from the parent.

    It listens once: in TLS when the socket is an ``ssl:`` endpoint's, and letting the port
    accept only the connections ``admit`` allows (:func:`~.connections.guard_port`), its
    share of them (``held``: the connections this process has open).
    """

    def __init__(
        self,
        shared: SharedSocket,
        reactor: IReactorSocket,
        admit: Callable[[], bool],
        clock: IReactorTime,
        held: Callable[[], int] | None = None,
    ) -> None:
        self.shared = shared
        self.reactor = reactor
        self.admit = admit
        self.clock = clock
        self.held = held

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        """Adopt the socket with ``factory``; the inherited descriptor is closed (the port
        holds its own)."""
        shared = self.shared
        if shared.tls is not None:
            factory = TLSMemoryBIOFactory(tls_context(shared.tls), False, factory)
        if shared.family == "UNIX":
            fdesc.setNonBlocking(shared.fd)
            listening = execute(_adopt_unix, self.reactor, shared.fd, factory)
        else:
            endpoint = AdoptedStreamServerEndpoint(self.reactor, shared.fd, FAMILIES[shared.family])
            listening = endpoint.listen(factory)

        def guard(port: IListeningPort) -> IListeningPort:
            guard_port(port, self.admit, self.clock, self.held)
            return port

        return listening.addCallback(guard)


def serve_inherited(
    inherited: Inherited,
    site: ServingSite,
    top: service.MultiService,
    reactor: IReactorSocket,
    clock: IReactorTime,
) -> None:
    """Add to ``top`` one listener per socket a worker inherited."""
    for shared in inherited.sockets:
        endpoint = AdoptedEndpoint(
            shared, reactor, site.admit, clock, lambda: site.open_connections
        )
        StreamServerEndpointService(endpoint, site).setServiceParent(top)
