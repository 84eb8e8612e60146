"""Which representation a request gets: conditional requests, byte ranges, content coding.

The headers are parsed by ``werkzeug.http`` (``If-None-Match``, ``If-Range``, ``Range``,
``Accept-Encoding``); this module holds the decisions RFC 9110 asks of a server on top of
them, the same for every route that answers a body (chunks, annotation files, static files,
the documentation and the history page's files).
"""

from __future__ import annotations

import re

from twisted.web import http
from twisted.web.iweb import IRequest
from werkzeug.http import (
    parse_accept_header,
    parse_date,
    parse_etags,
    parse_if_range_header,
    parse_range_header,
    unquote_etag,
)

#: Encodings we produce, best first. ``deflate`` is never chosen: cloud-volume cannot decode it.
SUPPORTED_ENCODINGS = ("zstd", "gzip")


def add_vary(request: IRequest, token: bytes) -> None:
    """Add ``token`` to the response's ``Vary`` header, keeping what is there."""
    current = request.responseHeaders.getRawHeaders(b"vary", [])
    tokens = [t.strip() for value in current for t in value.split(b",") if t.strip()]
    if token.lower() not in (t.lower() for t in tokens):
        tokens.append(token)
    request.setHeader(b"vary", b", ".join(tokens))


# --- ETags and conditional requests -------------------------------------------------------


def none_match(header: bytes | None, etag: str) -> bool:
    """True when an ``If-None-Match`` header names ``etag`` (weak comparison) or is ``*``.

    Any spelling of the list (``"a","b"``, ``"x" ,W/"a"``) is understood, and a weak tag
    (``W/"a"``) matches: the weak comparison of RFC 9110 13.1.2. werkzeug also reads an
    unquoted ``a`` as the tag ``"a"``; every entity-tag is quoted (RFC 9110 8.8.3), so such
    a value names nothing here.
    """
    if header is None:
        return False
    value = header.decode("latin-1")
    tags = parse_etags(value)
    tag, _ = unquote_etag(etag)
    return tags.star_tag or (tags.contains_weak(tag) and f'"{tag}"' in value)


def not_modified(request: IRequest, etag: str) -> bool:
    """Send ``etag`` as the ETag; True, with the status 304, when ``If-None-Match`` names it.

    The caller sends no body (and no ``Content-Length`` that would not be the
    representation's).
    """
    request.setHeader(b"etag", etag.encode())
    if none_match(request.getHeader(b"if-none-match"), etag):
        request.setResponseCode(http.NOT_MODIFIED)
        return True
    return False


def if_range_holds(request: IRequest, etag: str, last_modified: bytes) -> bool:
    """Whether the request's ``Range`` may be served (RFC 9110 13.1.5).

    True without ``If-Range``, or when it names this representation: its strong ``etag``
    (a weak tag never matches), or the ``last_modified`` date the answer carries.
    Otherwise the range is ignored and the whole body sent: the client holds the start of
    another version.
    """
    header: bytes | None = request.getHeader(b"if-range")
    if header is None:
        return True
    value = header.decode("latin-1").strip()
    if_range = parse_if_range_header(value)
    if if_range.date is not None:
        return if_range.date == parse_date(last_modified.decode("latin-1"))
    # werkzeug keeps the tag of a weak ``W/"a"`` (and of an unquoted ``a``): neither is a
    # strong validator, which the strong comparison asks for.
    return value.startswith('"') and if_range.etag == unquote_etag(etag)[0]


# --- content encoding ---------------------------------------------------------------------


def choose_encoding(accept_encoding: bytes | None) -> str | None:
    """The best encoding of :data:`SUPPORTED_ENCODINGS` the client accepts, or None.

    The highest weight wins, zstd on a tie; a ``q=0`` refuses a coding; ``*`` stands for
    any coding not named. ``deflate`` is never chosen.
    """
    if not accept_encoding:
        return None
    accepted = parse_accept_header(accept_encoding.decode("latin-1"))
    return accepted.best_match(SUPPORTED_ENCODINGS)


# --- byte ranges --------------------------------------------------------------------------


class Unsatisfiable(Exception):
    """A ``Range`` that selects no byte of the body (416)."""


#: A single range werkzeug takes for malformed that RFC 9110 14.1.1 calls unsatisfiable (416,
#: not the whole body): a suffix of no bytes (``-0``), or a last position before the first.
_EMPTY_RANGE = re.compile(
    r"[ \t]*bytes[ \t]*=[ \t]*(?:-[ \t]*0+|[0-9]+[ \t]*-[ \t]*[0-9]+)[ \t]*", re.IGNORECASE
)


def single_range(header: bytes | None, length: int) -> tuple[int, int] | None:
    """The ``(start, end_exclusive)`` a single-range ``Range`` header asks for, or None.

    None means "send the whole body" (no header, several ranges, another unit or a malformed
    header, which RFC 9110 14.2 lets a server ignore). A suffix longer than the body is the
    whole body. Raises :class:`Unsatisfiable` for a range that selects no byte.
    """
    if header is None:
        return None
    value = header.decode("latin-1")
    asked = parse_range_header(value)
    if asked is None:
        if _EMPTY_RANGE.fullmatch(value):
            raise Unsatisfiable()
        return None
    if asked.units != "bytes" or len(asked.ranges) != 1:
        return None
    start, end = asked.ranges[0]
    if start < 0:  # a suffix: the last -start bytes
        start = max(0, length + start)
    end = length if end is None else min(end, length)
    if start >= end:
        raise Unsatisfiable()
    return start, end


def requested_range(
    request: IRequest, etag: str, last_modified: bytes, length: int
) -> tuple[int, int] | None:
    """The span of a body of ``length`` bytes the request's ``Range`` asks for, or None.

    None (the whole body) also when its ``If-Range`` names another version than ``etag`` and
    ``last_modified`` (:func:`if_range_holds`). Raises :class:`Unsatisfiable` as
    :func:`single_range` does.
    """
    if not if_range_holds(request, etag, last_modified):
        return None
    return single_range(request.getHeader(b"range"), length)
