"""Sending a body held in memory: pieces pushed while the connection takes them.

Writing a large body at once would copy it whole into the connection's buffer for as long
as the client takes to read it. Twisted's ``NoRangeStaticProducer`` avoids that with a *pull*
producer, which the Cooperator drives one 64 KiB piece per tick: a tick of the reactor and a
``BytesIO`` copy per piece, a third of the reactor thread's time for 512 KiB chunks (py-spy,
issue 13). :class:`BodyProducer` is a *push* producer instead: it writes pieces of the body
until the transport says it has enough buffered (``pauseProducing``), and goes
on when the transport has drained it (``resumeProducing``), so a slow client still holds at
most about one piece beyond the transport's buffer.
"""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer
from twisted.web.http import Request
from zope.interface import implementer

#: Bytes written at once: Twisted's transports send at most 128 KiB per ``send`` call.
PIECE = 128 * 1024


@implementer(IPushProducer)
class BodyProducer:
    """Writes ``body`` to ``request`` piece by piece, then finishes the request."""

    def __init__(self, request: Request, body: bytes) -> None:
        self.request: Request | None = request
        self.body = body
        self.offset = 0
        self.paused = False

    def start(self) -> None:
        """Register with the request and write until the transport pushes back."""
        assert self.request is not None
        self.request.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        """Write pieces until paused; finish the request after the last one."""
        self.paused = False
        while not self.paused and self.request is not None:
            if self.offset >= len(self.body):
                request, self.request = self.request, None
                request.unregisterProducer()
                request.finish()
                return
            # A copy of the piece: transports take bytes only (a memoryview is refused).
            piece = self.body[self.offset : self.offset + PIECE]
            self.offset += len(piece)
            self.request.write(piece)

    def pauseProducing(self) -> None:
        """The transport holds enough: stop until it asks again."""
        self.paused = True

    def stopProducing(self) -> None:
        """The connection is gone: write nothing more."""
        self.request = None
