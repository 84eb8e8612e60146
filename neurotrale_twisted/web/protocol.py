"""What a request must be before anything routes it: its method, its ``Host``, its query.

Twisted takes any word of the request line as the method and does not check ``Host``; the
router (werkzeug) upper-cases the method before matching it, while the write policy compares
it exactly. :func:`request_fault` closes that gap: only the exact method tokens this server
serves go on, so the policy and the router see one and the same method value.

* A method is case-sensitive (RFC 9110 section 9.1): ``delete`` or ``Put`` is not ``DELETE``
  or ``PUT``. A spelling of a known method, and a known method served nowhere (``POST``,
  ``TRACE``, ``CONNECT``, ``QUERY``), is ``405``; a token naming no method we know is ``501``
  (RFC 9110 section 15.6.2); a method that is not a token at all is ``400``.
* RFC 9112 section 3.2: a ``400`` for an HTTP/1.1 request without ``Host``, for any request
  with more than one, and for a ``Host`` that is not ``host[:port]``.
* A query name or value that is not UTF-8 once percent-decoded is ``400``: it could only be
  stored as U+FFFD, which is not what the client sent.
* RFC 9112 section 3.2: the request target is a path (origin form), or ``http://host/path``
  (absolute form, which a server MUST accept: :func:`absolute_form` turns it into the path
  and the ``Host`` it names), or ``*`` (answered by the request itself). Anything else is
  ``400``: Twisted would take ``xhealthz`` for ``/healthz``, dropping its first byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from twisted.web.iweb import IRequest

#: The methods some route of this server answers (exact tokens).
SERVED_METHODS = frozenset({b"GET", b"HEAD", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"})
#: The methods of RFC 9110, PATCH (RFC 5789) and QUERY (the safe method with a body, which
#: schemathesis also tries); any spelling of one of them is a 405.
KNOWN_METHODS = SERVED_METHODS | {b"POST", b"CONNECT", b"TRACE", b"QUERY"}
#: The most digits of ``?version=`` (``int()`` of thousands of digits is slow, then refused).
MAX_VERSION_DIGITS = 9
#: RFC 9110 ``token``: the form a method must have.
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: RFC 3986 ``host [ ":" port ]``: an IP literal in brackets or a registered name (which
#: includes IPv4 addresses), no user information, no path.
_HOST = re.compile(rb"(?:\[[0-9A-Za-z:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]*)?")


#: RFC 9112 section 3.2.2 ``absolute-form`` of an http(s) URI: a host (no user
#: information), then an optional path and query (a fragment is not part of a target).
_ABSOLUTE_FORM = re.compile(rb"[Hh][Tt][Tt][Pp][Ss]?://([^/?#@]+)([/?][^#]*)?", re.DOTALL)


@dataclass(frozen=True)
class Fault:
    """Why a request is refused before routing: its status and the JSON message."""

    status: int
    message: str


def method_fault(method: bytes) -> Fault | None:
    """The refusal of a method that is not exactly one this server serves, or None."""
    if method in SERVED_METHODS:
        return None
    shown = method.decode("latin-1")
    if not _TOKEN.fullmatch(method):
        return Fault(400, "the request method is not a valid token")
    if method in KNOWN_METHODS:
        return Fault(405, f"method {shown} is not allowed here")
    if method.upper() in KNOWN_METHODS:
        exact = method.upper().decode()
        return Fault(405, f"method {shown} is not allowed (methods are case-sensitive: {exact})")
    return Fault(501, f"method {shown} is not implemented")


def absolute_form(target: bytes) -> tuple[bytes, bytes] | None:
    """The host and the origin-form target (``/path?query``) of an absolute-form request
    target ``http://host/path?query``, or None when ``target`` is not one."""
    match = _ABSOLUTE_FORM.fullmatch(target)
    if match is None:
        return None
    rest = match.group(2) or b"/"
    return match.group(1), rest if rest.startswith(b"/") else b"/" + rest


def target_fault(request: IRequest) -> Fault | None:
    """The refusal of a request target that is not a path (after :func:`absolute_form`)."""
    if request.uri.startswith(b"/"):
        return None
    return Fault(400, "the request target must be a path that begins with '/', or an http URL")


def host_fault(request: IRequest) -> Fault | None:
    """The refusal of a missing, repeated or malformed ``Host`` header, or None."""
    hosts = request.requestHeaders.getRawHeaders(b"host") or []
    if len(hosts) > 1:
        return Fault(400, "the request has more than one Host header")
    if not hosts:
        if request.clientproto == b"HTTP/1.1":  # type: ignore[attr-defined]
            return Fault(400, "an HTTP/1.1 request needs a Host header")
        return None
    if not _HOST.fullmatch(hosts[0]):
        return Fault(400, "the Host header is not a host name with an optional port")
    return None


def query_fault(uri: bytes) -> Fault | None:
    """The refusal of a query string whose names or values are not UTF-8, or None."""
    _, _, query = uri.partition(b"?")
    try:
        for item in query.split(b"&"):
            unquote_to_bytes(item.replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError:
        return Fault(400, "the query string is not valid UTF-8")
    return None


def request_fault(request: IRequest) -> Fault | None:
    """The first fault of ``request`` that must stop it before routing, or None."""
    return (
        target_fault(request)
        or host_fault(request)
        or method_fault(request.method)
        or query_fault(request.uri)
    )
