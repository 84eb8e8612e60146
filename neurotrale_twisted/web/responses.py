"""The answers the server makes: JSON bodies, bodies held in memory, and every error.

Every error answer, on a request or written straight on a connection before a request
exists, is built by :func:`error_answer`: the JSON ``{"error": message, "status": status}``
(with no absolute path in the message), its content type and ``Cache-Control: no-store``.
:func:`error_status` is the one place an exception becomes a status code: a core error
(``core.errors``) has its own, a ``PermissionError`` met anywhere is a 403, a routing error
(werkzeug's ``HTTPException``) has its code, and anything else is a 500. Every JSON body is
encoded by :func:`json_bytes`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from twisted.web import http, server
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from werkzeug.exceptions import HTTPException

from neurotrale_twisted.core.errors import DomainError
from neurotrale_twisted.web.body import BodyProducer
from neurotrale_twisted.web.cors import CorsPolicy

JSON = b"application/json"
#: The headers that describe a representation, which an error answer replaces.
_REPRESENTATION_HEADERS = (b"etag", b"last-modified", b"content-encoding", b"content-range")
#: An absolute filesystem path in a message: a ``/`` that begins a word, with more after it.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/(?:[^\s/'\"]+/)+")


def json_bytes(document: object) -> bytes:
    """``document`` encoded as the JSON of every answer."""
    return json.dumps(document).encode("utf-8")


def json_body(request: IRequest, status: int, document: object) -> bytes:
    """Set ``status`` and a JSON content type, and return ``document`` encoded."""
    body = json_bytes(document)
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON)
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


def without_absolute_paths(message: str) -> str:
    """``message`` with every absolute path cut down to its last name.

    An error body never tells a client where the server keeps its files (the log does);
    callers make paths under the data root relative to it first (see
    ``app.Neurotrale.error``).
    """
    return _ABSOLUTE_PATH.sub("", message)


def error_status(error: BaseException) -> int:
    """The status code of the answer to ``error``: a core error's own, 403 for a file the
    server's user may not reach (whatever part of the code met it), 404 or 405 for a request
    no route takes, else 500."""
    if isinstance(error, DomainError):
        return error.status
    if isinstance(error, PermissionError):
        return http.FORBIDDEN
    if isinstance(error, HTTPException):
        return error.code or http.INTERNAL_SERVER_ERROR
    return http.INTERNAL_SERVER_ERROR


@dataclass(frozen=True)
class ErrorAnswer:
    """An error answer: its status, its JSON body and the headers that describe the body."""

    status: int
    body: bytes

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The content type, length and caching of the body."""
        return [
            (b"content-type", JSON),
            (b"content-length", b"%d" % len(self.body)),
            (b"cache-control", b"no-store"),
        ]


def error_answer(status: int, message: str) -> ErrorAnswer:
    """The answer ``{"error": message, "status": status}``; no absolute path in it."""
    return ErrorAnswer(
        status, json_bytes({"error": without_absolute_paths(message), "status": status})
    )


def error_response(request: IRequest, status: int, message: str) -> bytes:
    """Make ``request``'s answer the error ``status``, ``message``; return its body."""
    answer = error_answer(status, message)
    # An error replaces whatever a handler had begun to describe.
    for name in _REPRESENTATION_HEADERS:
        request.responseHeaders.removeHeader(name)
    request.setResponseCode(answer.status)
    for name, value in answer.headers():
        request.setHeader(name, value)
    return answer.body


def range_not_satisfiable(request: IRequest, length: int) -> bytes:
    """The 416 answer to a ``Range`` that selects no byte of a body of ``length`` bytes."""
    body = error_response(request, http.REQUESTED_RANGE_NOT_SATISFIABLE, "range not satisfiable")
    request.setHeader(b"content-range", b"bytes */%d" % length)
    return body


def send_raw_error(
    channel: http.HTTPChannel, cors: CorsPolicy, origin: bytes | None, status: int, message: str
) -> None:
    """Answer ``status`` with a JSON error straight on ``channel``'s connection, then close it.

    For refusals that happen while a request is still arriving (a malformed request, a body
    over the limit, a client too slow to finish its request), before Twisted has a request
    to answer. ``origin`` is the request's ``Origin``, when it arrived.
    """
    answer = error_answer(status, message)
    headers = [
        *answer.headers(),
        (b"connection", b"close"),
        (b"x-content-type-options", b"nosniff"),
        *([(b"vary", b"Origin")] if cors.varies else []),
        *cors.headers(origin),
    ]
    head = [b"HTTP/1.1 %d %s" % (status, http.RESPONSES.get(status, b"Error"))]
    head.extend(name.title() + b": " + value for name, value in headers)
    channel.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + answer.body)  # type: ignore[union-attr]
    channel.loseConnection()


class JsonErrorResource(Resource):
    """A leaf that answers a fixed JSON error: the static files' 404 and 403 pages."""

    isLeaf = True

    def __init__(self, status: int, message: str) -> None:
        super().__init__()
        self.status = status
        self.message = message

    def render(self, request: IRequest) -> bytes:
        """Answer the error (headers only for ``HEAD``, which Twisted would log otherwise)."""
        body = error_response(request, self.status, self.message)
        return b"" if request.method == b"HEAD" else body


class BodyResource(Resource):
    """A leaf that sends a body held in memory, a piece at a time as the client reads it
    (:class:`body.BodyProducer`), so slow clients cost little memory."""

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render(self, request: IRequest) -> bytes | int:
        """Send the body (the handler has set the status and the other headers)."""
        request.setHeader(b"content-length", b"%d" % len(self.body))
        if request.method == b"HEAD":
            return b""
        BodyProducer(request, self.body).start()  # type: ignore[arg-type]  # an http.Request
        return server.NOT_DONE_YET
