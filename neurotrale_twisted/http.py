"""Cross-cutting HTTP: CORS, errors as JSON, content encoding, ETags, ranges, body limits.

Every response passes through :class:`NeurotraleRoot`, which adds the CORS headers (errors
included), answers ``OPTIONS`` preflights, and folds ``//`` into ``/`` before the Klein
routes see the path. :func:`error_response` is the one place a domain error becomes a status
code and a JSON body.
"""

from __future__ import annotations

import gzip
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import zstandard
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

log = Logger()

#: Headers a browser script may read from our answers.
EXPOSED_HEADERS = b"ETag, Content-Length, Content-Range, Content-Encoding, Last-Modified"
ALLOWED_METHODS = b"GET, HEAD, PUT, PATCH, DELETE, OPTIONS"
DEFAULT_ALLOWED_HEADERS = b"Content-Type, If-Match, If-None-Match, Range, Authorization"
#: Encodings we produce, best first. ``deflate`` is never chosen: cloud-volume cannot decode it.
SUPPORTED_ENCODINGS = ("zstd", "gzip")


@dataclass(frozen=True)
class CorsPolicy:
    """Which origins may read our answers from a browser script.

    ``origins`` holds ``*`` (anyone, never with credentials) or exact origins such as
    ``https://viewer.lab.org``, which are echoed back and may send credentials.
    """

    origins: tuple[str, ...] = ("*",)

    def apply(self, request: IRequest) -> None:
        """Add the CORS response headers for ``request`` (every response gets them)."""
        if "*" in self.origins:
            request.setHeader(b"access-control-allow-origin", b"*")
        else:
            add_vary(request, b"Origin")
            origin = request.getHeader(b"origin")
            if origin is not None and origin.decode("latin-1") in self.origins:
                request.setHeader(b"access-control-allow-origin", origin)
                request.setHeader(b"access-control-allow-credentials", b"true")
        request.setHeader(b"access-control-expose-headers", EXPOSED_HEADERS)

    def preflight(self, request: IRequest) -> bytes:
        """Answer an ``OPTIONS`` preflight: 204 with the methods and headers allowed."""
        request.setResponseCode(http.NO_CONTENT)
        request.setHeader(b"access-control-allow-methods", ALLOWED_METHODS)
        asked = request.getHeader(b"access-control-request-headers")
        request.setHeader(b"access-control-allow-headers", asked or DEFAULT_ALLOWED_HEADERS)
        request.setHeader(b"access-control-max-age", b"86400")
        # No ``Allow`` here: it would have to name the methods of the route at this path, and
        # browsers read only ``Access-Control-Allow-Methods``.
        return b""


def add_vary(request: IRequest, token: bytes) -> None:
    """Add ``token`` to the response's ``Vary`` header, keeping what is there."""
    current = request.responseHeaders.getRawHeaders(b"vary", [])
    tokens = [t.strip() for value in current for t in value.split(b",") if t.strip()]
    if token.lower() not in (t.lower() for t in tokens):
        tokens.append(token)
    request.setHeader(b"vary", b", ".join(tokens))


def json_body(request: IRequest, status: int, document: Any) -> bytes:
    """Set ``status`` and a JSON content type, and return ``document`` encoded."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    body = json.dumps(document).encode("utf-8")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


def error_response(request: IRequest, status: int, message: str) -> bytes:
    """The JSON error answer ``{"error": message, "status": status}``."""
    request.setHeader(b"cache-control", b"no-store")
    # An error replaces whatever a handler had begun to describe.
    for name in (b"etag", b"last-modified", b"content-encoding", b"content-range"):
        request.responseHeaders.removeHeader(name)
    return json_body(request, status, {"error": message, "status": status})


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


# --- ETags and conditional requests -------------------------------------------------------


def _etag_list(header: bytes | None) -> list[str]:
    if header is None:
        return []
    return [t.strip() for t in header.decode("latin-1").split(",") if t.strip()]


def none_match(header: bytes | None, etag: str) -> bool:
    """True when an ``If-None-Match`` header names ``etag`` (weak comparison) or is ``*``."""
    tags = _etag_list(header)
    return "*" in tags or etag.removeprefix("W/") in (t.removeprefix("W/") for t in tags)


# --- content encoding ---------------------------------------------------------------------


_CODING = re.compile(r"^\s*([A-Za-z0-9*_-]+)\s*(?:;\s*q\s*=\s*([0-9.]+))?\s*$")


def choose_encoding(accept_encoding: bytes | None) -> str | None:
    """The best encoding of :data:`SUPPORTED_ENCODINGS` the client accepts, or None.

    zstd is preferred to gzip; a ``q=0`` refuses a coding; ``*`` stands for any coding
    not named. ``deflate`` is never chosen.
    """
    if not accept_encoding:
        return None
    weights: dict[str, float] = {}
    for item in accept_encoding.decode("latin-1").split(","):
        match = _CODING.match(item)
        if match is None:
            continue
        try:
            weights[match.group(1).lower()] = float(match.group(2) or 1)
        except ValueError:
            continue
    best: tuple[float, str] | None = None
    for coding in SUPPORTED_ENCODINGS:
        q = weights.get(coding, weights.get("*", 0.0))
        if q > 0 and (best is None or q > best[0]):
            best = (q, coding)
    return best[1] if best else None


_zstd = threading.local()


def compress(body: bytes, coding: str) -> bytes:
    """Compress ``body`` with ``coding`` at a fast level (runs on a worker thread)."""
    if coding == "gzip":
        return gzip.compress(body, compresslevel=1, mtime=0)
    if coding == "zstd":
        compressor = getattr(_zstd, "compressor", None)
        if compressor is None:
            compressor = _zstd.compressor = zstandard.ZstdCompressor(level=1)
        return bytes(compressor.compress(body))
    raise ValueError(f"unsupported coding {coding!r}")


def encode_body(body: bytes, coding: str | None) -> tuple[bytes, str | None]:
    """``body`` in ``coding`` when that makes it smaller; else the body as it is, and None."""
    if coding is None or len(body) < 256:
        return body, None
    encoded = compress(body, coding)
    if len(encoded) >= len(body):
        return body, None
    return encoded, coding


# --- byte ranges --------------------------------------------------------------------------


_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")


class Unsatisfiable(Exception):
    """A ``Range`` that selects no byte of the body (416)."""


def single_range(header: bytes | None, length: int) -> tuple[int, int] | None:
    """The ``(start, end_exclusive)`` a single-range ``Range`` header asks for, or None.

    None means "send the whole body" (no header, a multi-range or a malformed one, which
    RFC 9110 lets a server ignore). Raises :class:`Unsatisfiable` for a range past the end.
    """
    if header is None:
        return None
    match = _RANGE.match(header.decode("latin-1"))
    if match is None or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if first:
        start = int(first)
        end = min(int(last) + 1, length) if last else length
        if start >= length or end <= start:
            raise Unsatisfiable()
        return start, end
    suffix = int(last)
    if suffix == 0:
        raise Unsatisfiable()
    return max(0, length - suffix), length


# --- the request and the root resource ----------------------------------------------------


@dataclass(frozen=True)
class HttpSettings:
    """Settings of the HTTP layer shared by the site, its requests and the root resource."""

    cors: CorsPolicy = field(default_factory=CorsPolicy)
    #: The largest request body accepted, in bytes.
    max_body: int = 64 * 1024 * 1024


class LimitedRequest(server.Request):
    """A request that refuses a body over the site's limit before reading it whole.

    A ``Content-Length`` over the limit, or a chunked body that grows past it, is answered
    at once with 413 and the connection is closed, so the body is never buffered.
    """

    _received = 0
    _refused = False

    def _settings(self) -> HttpSettings:
        site = getattr(self.channel, "site", None)
        return getattr(site, "settings", None) or HttpSettings()

    def gotLength(self, length: int | None) -> None:
        """Refuse at once a declared body over the limit."""
        if length is not None and length > self._settings().max_body:
            self._refuse()
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        """Count the body as it arrives and refuse it when it passes the limit."""
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._settings().max_body:
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        self._refused = True
        settings = self._settings()
        limit = settings.max_body
        body = json.dumps(
            {"error": f"request body is larger than the limit of {limit} bytes", "status": 413}
        ).encode()
        headers = [
            b"HTTP/1.1 413 Payload Too Large",
            b"Content-Type: application/json",
            b"Content-Length: %d" % len(body),
            b"Connection: close",
            b"Access-Control-Expose-Headers: " + EXPOSED_HEADERS,
        ]
        origin = self.getHeader(b"origin")
        if "*" in settings.cors.origins:
            headers.append(b"Access-Control-Allow-Origin: *")
        elif origin is not None and origin.decode("latin-1") in settings.cors.origins:
            headers.append(b"Access-Control-Allow-Origin: " + origin)
        log.info("refused a request body over {limit} bytes", limit=limit)
        transport = self.channel.transport
        assert transport is not None
        transport.write(b"\r\n".join(headers) + b"\r\n\r\n" + body)
        transport.loseConnection()

    def process(self) -> None:
        """Process the request unless its body was refused (the 413 is already sent)."""
        if not self._refused:
            super().process()


class NeurotraleSite(server.Site):
    """The site: our request class and the HTTP settings it reads."""

    def __init__(self, resource: IResource, settings: HttpSettings, **kwargs: Any) -> None:
        super().__init__(resource, requestFactory=LimitedRequest, **kwargs)
        self.settings = settings


def fold_slashes(postpath: list[bytes]) -> list[bytes]:
    """Drop empty segments (``//`` is ``/``), keeping a trailing one (a directory URL)."""
    folded = [s for s in postpath if s]
    if postpath and postpath[-1] == b"":
        folded.append(b"")
    return folded


class NeurotraleRoot(Resource):
    """The site's root: CORS on every answer, preflights, and ``//`` folded for the routes."""

    isLeaf = True

    def __init__(self, routes: IResource, cors: CorsPolicy) -> None:
        super().__init__()
        self.routes = routes
        self.cors = cors

    def render(self, request: IRequest) -> Any:
        """Apply CORS, answer ``OPTIONS``, and hand everything else to the routes."""
        self.cors.apply(request)
        if request.method == b"OPTIONS":
            return self.cors.preflight(request)
        request.postpath = fold_slashes(request.postpath)  # type: ignore[attr-defined]
        return self.routes.render(request)
