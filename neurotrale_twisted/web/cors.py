"""Cross-origin resource sharing: which origins may read our answers, and preflights.

Every answer carries the headers of :class:`CorsPolicy` (errors included, and the refusals
written on a connection before a request exists, see ``responses.send_raw_error``), and
``OPTIONS`` is answered by :meth:`CorsPolicy.preflight`.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.web import http
from twisted.web.iweb import IRequest

from neurotrale_twisted.web.negotiation import add_vary

#: Headers a browser script may read from our answers.
EXPOSED_HEADERS = b"ETag, Content-Length, Content-Range, Content-Encoding, Last-Modified"
ALLOWED_METHODS = b"GET, HEAD, PUT, PATCH, DELETE, OPTIONS"
DEFAULT_ALLOWED_HEADERS = b"Content-Type, If-Match, If-None-Match, Range, Authorization"


@dataclass(frozen=True)
class CorsPolicy:
    """Which origins may read our answers from a browser script.

    ``origins`` holds ``*`` (anyone, never with credentials) or exact origins such as
    ``https://viewer.lab.org``, which are echoed back and may send credentials.
    """

    origins: tuple[str, ...] = ("*",)

    @property
    def varies(self) -> bool:
        """Whether answers depend on the request's ``Origin`` (``Vary: Origin``)."""
        return "*" not in self.origins

    def headers(self, origin: bytes | None) -> list[tuple[bytes, bytes]]:
        """The CORS response headers for a request from ``origin`` (None: not known)."""
        headers = [(b"access-control-expose-headers", EXPOSED_HEADERS)]
        if not self.varies:
            headers.append((b"access-control-allow-origin", b"*"))
        elif origin is not None and origin.decode("latin-1") in self.origins:
            headers.append((b"access-control-allow-origin", origin))
            headers.append((b"access-control-allow-credentials", b"true"))
        return headers

    def apply(self, request: IRequest) -> None:
        """Add the CORS response headers for ``request`` (every response gets them)."""
        if self.varies:
            add_vary(request, b"Origin")
        for name, value in self.headers(request.getHeader(b"origin")):
            request.setHeader(name, value)

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
