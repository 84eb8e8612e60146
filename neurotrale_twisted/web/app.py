"""The Klein application: thin routes that parse a request, call the core, shape the answer.

Blocking work (TIFF decoding, compression, annotation reads and writes) runs on the
server's own thread pool; the reactor thread never touches the disk on a hot path. Every
error a route raises (the core's domain errors included) becomes a JSON answer in one handler
below, :meth:`Neurotrale.error`, through ``responses``.
"""

from __future__ import annotations

import html
import math
import os
import re
import traceback
from collections.abc import Callable
from typing import Any, BinaryIO, ParamSpec, TypeVar
from urllib.parse import quote, unquote, unquote_to_bytes

from klein import Klein
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web import http, server
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.static import DirectoryLister, File, formatFileSize, getTypeAndEncoding
from twisted.web.util import redirectTo
from werkzeug.exceptions import HTTPException
from werkzeug.routing import BaseConverter

from neurotrale_twisted.core.annotations.records import ANNOTATION_NAME_PATTERN
from neurotrale_twisted.core.annotations.store import AnnotationStore
from neurotrale_twisted.core.chunks.names import CHUNK_PATTERN, ChunkName
from neurotrale_twisted.core.chunks.source import ChunkSource
from neurotrale_twisted.core.datasets import find_datasets
from neurotrale_twisted.core.errors import BadRequest, DomainError, MethodNotAllowed, NotFound
from neurotrale_twisted.core.health import Health, check_data_root
from neurotrale_twisted.core.identity import file_etag
from neurotrale_twisted.core.paths import DataRoot, clean_segments
from neurotrale_twisted.core.rootfs import OpenedFile
from neurotrale_twisted.core.static import Listing, find_static
from neurotrale_twisted.web import docs, history
from neurotrale_twisted.web.auth import WritePolicy, make_portal
from neurotrale_twisted.web.cors import CorsPolicy
from neurotrale_twisted.web.hits import ReactorHits
from neurotrale_twisted.web.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from neurotrale_twisted.web.metrics import ServerMetrics
from neurotrale_twisted.web.negotiation import (
    Unsatisfiable,
    choose_encoding,
    none_match,
    not_modified,
    requested_range,
)
from neurotrale_twisted.web.protocol import MAX_VERSION_DIGITS
from neurotrale_twisted.web.responses import (
    BodyResource,
    JsonErrorResource,
    error_response,
    error_status,
    json_body,
    range_not_satisfiable,
)
from neurotrale_twisted.web.site import NeurotraleRoot

log = Logger()
P = ParamSpec("P")
T = TypeVar("T")

READ_METHODS = ["GET", "HEAD"]
ANNOTATION_METHODS = ["GET", "HEAD", "PUT", "PATCH", "DELETE"]


class ChunkConverter(BaseConverter):
    """A URL segment that is a chunk name, ``x0-x1_y0-y1_z0-z1`` with an optional ``.tiff``."""

    regex = CHUNK_PATTERN


class AnnotationNameConverter(BaseConverter):
    """A URL segment that is an annotation file name (the core's rule, ending in ``.json``)."""

    regex = ANNOTATION_NAME_PATTERN


class DataFile(File):
    """Twisted's static ``File``, serving what :func:`static.find_static` opened.

    It never looks at the disk itself: ``File``'s questions about its path (does it exist,
    its size and time, open it) are answered from the file that was opened, and streamed
    from that open file, or from the listing that was read. Its path is the URL path, for
    the name only (the content type). ``info`` is JSON and unknown types are
    ``application/octet-stream`` (never ``text/html``); a strong ETag with 304 on
    ``If-None-Match`` comes on top of ``File``'s ``Last-Modified``, ``Range`` and ``HEAD``.
    """

    isLeaf = True
    contentTypes = {
        **File.contentTypes,
        ".json": "application/json",
        ".csv": "text/csv",
        ".tif": "image/tiff",
        ".tiff": "image/tiff",
        # A data file must never run script on this origin (where credentials may be cached).
        **dict.fromkeys(
            (".html", ".htm", ".xhtml", ".xht", ".svg", ".svgz", ".xml", ".xsl", ".js", ".mjs"),
            "application/octet-stream",
        ),
    }
    childNotFound = JsonErrorResource(404, "not found")  # type: ignore[assignment]
    forbidden = JsonErrorResource(403, "forbidden")  # type: ignore[assignment]

    def __init__(
        self, found: OpenedFile | Listing, url_path: str, page: bytes | None = None
    ) -> None:
        super().__init__(url_path, defaultType="application/octet-stream")
        self.found = found
        #: The listing's HTML page, when it was made beforehand (off the reactor thread: a
        #: page of 100,000 names takes seconds to make).
        self.page = page

    def _opened(self) -> OpenedFile:
        assert isinstance(self.found, OpenedFile)
        return self.found

    # What File would ask its FilePath, answered from what was opened.
    def restat(self, reraise: bool = True) -> None:
        """Nothing to look up again: the status is that of the open file."""

    def exists(self) -> bool:
        """It was found."""
        return True

    def isdir(self) -> bool:
        """Whether it is a directory (its listing was read)."""
        return isinstance(self.found, Listing)

    def getsize(self) -> int:
        """The size of the open file."""
        return int(self._opened().status.st_size)

    def getModificationTime(self) -> float:
        """The modification time of the open file."""
        return float(self._opened().status.st_mtime)

    def openForReading(self) -> BinaryIO:
        """The open file, which ``File``'s producer reads and closes."""
        return self._opened().file

    def directoryListing(self) -> DataListing:
        """The listing that was read."""
        assert isinstance(self.found, Listing)
        lister = BlockListing if history.is_block_directory(self.path) else DataListing
        return lister(self.found, self.contentTypes, self.contentEncodings, self.defaultType)

    def listing_page(self, uri: bytes) -> bytes:
        """The HTML page listing the directory, titled after the request's ``uri``.

        Pure (no request, no reactor): the static route calls it on the thread pool.
        """
        return self.directoryListing().page(uri)

    def redirect(self, request: IRequest) -> bytes:
        """Redirect a directory's URL to the same URL with a ``/``, relatively.

        ``File`` would send the request's own path plus ``/``: for ``GET //dataset`` that is
        ``//dataset/``, which a browser reads as the host ``dataset``. ``./NAME/`` stays on
        this host and keeps a proxy's path prefix.
        """
        path, _, query = request.uri.partition(b"?")
        location = b"./" + path.rsplit(b"/", 1)[-1] + b"/" + (b"?" + query if query else b"")
        return redirectTo(location, request)

    def render_GET(self, request: IRequest) -> Any:
        """Serve the file, or list the directory (redirecting to the URL with a ``/``)."""
        found = self.found
        if isinstance(found, Listing):
            if request.path.endswith(b"/"):
                request.setHeader(b"content-type", b"text/html; charset=utf-8")
                return self.page or self.listing_page(request.uri)
            return self.redirect(request)
        if self.basename() == "info":
            self.type, self.encoding = "application/json", None
        status = found.status
        etag = file_etag(status)
        if not_modified(request, etag):
            found.close()
            # Finished here: returning b"" would add a ``Content-Length: 0`` to the 304,
            # which is not the length of the file (RFC 9110 8.6).
            request.finish()
            return server.NOT_DONE_YET
        # The date File sends: Request.setLastModified rounds the time up.
        last_modified = http.datetimeToString(math.ceil(status.st_mtime))
        try:
            span = requested_range(request, etag, last_modified, status.st_size)
        except Unsatisfiable:
            found.close()
            # File would answer an empty body under the file's own content type.
            return range_not_satisfiable(request, status.st_size)
        if request.getHeader(b"if-none-match") is not None:
            # File answers 304 to an If-Modified-Since that still holds; with If-None-Match
            # present, which does not match here, RFC 9110 13.2.2 has it ignored.
            request.requestHeaders.removeHeader(b"if-modified-since")
        # File's own reading of Range fails on a suffix longer than the file (a seek before
        # the start: a 500, or a connection left hanging among several ranges): it gets the
        # one range understood here, spelled plainly, or none (several ranges, RFC 9110
        # 14.2 lets a server send the whole file).
        if span is None:
            request.requestHeaders.removeHeader(b"range")
        else:
            request.requestHeaders.setRawHeaders(
                b"range", [b"bytes=%d-%d" % (span[0], span[1] - 1)]
            )
        return super().render_GET(request)

    render_HEAD = render_GET


class DataListing(DirectoryLister):
    """Twisted's directory listing page, of names read beforehand (it looks at no disk).

    Names are HTML-escaped and URL-quoted as Twisted does.
    """

    def __init__(
        self,
        listing: Listing,
        content_types: dict[str, str],
        content_encodings: dict[str, str],
        default_type: str,
    ) -> None:
        names = [n.name for n in listing.names]
        super().__init__("", names, content_types, content_encodings, default_type)
        self.listing = listing

    def page(self, uri: bytes) -> bytes:
        """The listing's HTML page for a request of ``uri``: what ``render`` answers,
        made without the request (so that it can be made on a pool thread)."""
        dirs, files = self._getFilesAndDirectories([])
        table = "".join(self._buildTableContent(dirs + files))
        header = f"Directory listing for {html.escape(unquote(uri.decode('latin-1')))}"
        shown, total = len(self.listing.names), self.listing.total
        if total > shown:
            header += f" (the first {shown} of {total} names)"
        return (self.template % {"header": header, "tableContent": table}).encode("utf-8")

    def render(self, request: IRequest) -> bytes:
        """The page, for a request (on the reactor thread)."""
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return self.page(request.uri)

    def _getFilesAndDirectories(
        self, directory: list[str]
    ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        dirs: list[dict[str, str]] = []
        files: list[dict[str, str]] = []
        for entry in self.listing.names:
            href, text = quote(entry.name, "/"), html.escape(entry.name)
            if entry.is_dir:
                dirs.append(
                    {
                        "text": text + "/",
                        "href": href + "/",
                        "size": "",
                        "type": "[Directory]",
                        "encoding": "",
                    }
                )
                continue
            mimetype, encoding = getTypeAndEncoding(
                entry.name, self.contentTypes, self.contentEncodings, self.defaultType
            )
            files.append(
                {
                    "text": text,
                    "href": href,
                    "type": f"[{mimetype}]",
                    "encoding": f"[{encoding}]" if encoding else "",
                    "size": formatFileSize(entry.size),
                }
            )
        return dirs, files


class BlockListing(DataListing):
    """The listing of an annotation block: each annotation file links its history page."""

    template = DirectoryLister.template.replace(
        "<th>Content encoding</th>", "<th>Content encoding</th>\n            <th>History</th>"
    )
    linePattern = DirectoryLister.linePattern.replace("</tr>", "    <td>%(history)s</td>\n</tr>")

    def _getFilesAndDirectories(
        self, directory: list[str]
    ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        dirs, files = super()._getFilesAndDirectories(directory)
        for entry in dirs:
            entry["history"] = ""
        for entry in files:
            # ``text`` is the escaped name, ``href`` the quoted one.
            name = html.unescape(entry["text"])
            entry["history"] = (
                f'<a class="history" href="{entry["href"]}?history">history</a>'
                if history.is_annotation_name(name)
                else ""
            )
        return dirs, files


class Neurotrale:
    """The application: one data root, its chunk source and annotation store, a thread pool."""

    app = Klein()
    app.url_map.converters["chunk"] = ChunkConverter
    app.url_map.converters["annotation"] = AnnotationNameConverter
    app.url_map.merge_slashes = False

    def __init__(
        self,
        root: DataRoot,
        pool: ThreadPool,
        reactor: IReactorFromThreads,
        keep_versions: int = 20,
        cors: CorsPolicy | None = None,
        metrics: ServerMetrics | None = None,
        cache_bytes: int = 32 * 1024 * 1024,
        read_only: bool = False,
        htpasswd: str | None = None,
        auth_reads: bool = False,
    ) -> None:
        self.read_only = read_only
        self.htpasswd = htpasswd
        self.auth_reads = auth_reads
        self.root = root
        self.pool = pool
        self.reactor = reactor
        self.metrics = metrics or ServerMetrics()
        self.chunks = ChunkSource(root, cache_bytes=cache_bytes, observer=self.metrics)
        self.hits = ReactorHits(self.chunks, IReactorTime(reactor))
        self.annotations = AnnotationStore(
            root, keep_versions=keep_versions, on_retry=self.metrics.commit_retried
        )
        self.cors = cors or CorsPolicy()

    def resource(self) -> IResource:
        """The site's root resource: the routes behind CORS, slash folding and the write policy.

        Raises ``OSError`` when the htpasswd file cannot be read.
        """
        routes = ChunkRoutes(self, self.app.resource())
        portal = (
            None if self.htpasswd is None else make_portal(self.htpasswd, routes, self._in_thread)
        )
        policy = WritePolicy(self.read_only, portal, self.auth_reads)
        return NeurotraleRoot(routes, self.cors, policy, self.allowed_methods)

    def allowed_methods(self, path: str) -> list[str]:
        """The methods the route at URL ``path`` answers (``OPTIONS`` aside), for ``Allow``."""
        adapter = self.app.url_map.bind("localhost", path_info=path)
        return sorted(adapter.allowed_methods()) or READ_METHODS

    def _in_thread(self, f: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        return deferToThreadPool(self.reactor, self.pool, f, *args, **kwargs)

    # --- index ----------------------------------------------------------------------------

    @app.route("/", methods=READ_METHODS)
    @app.route("/index.html", methods=READ_METHODS)
    async def index(self, request: IRequest) -> bytes:
        """An HTML page linking every dataset under the root.

        The links are relative, so the page also works behind a proxy's path prefix.
        """
        datasets = await self._in_thread(find_datasets, self.root)
        items = "\n".join(
            f'<li><a href="{quote(d)}/">{html.escape(d)}</a> '
            f"<code>precomputed://{html.escape(self._base_url(request))}/{html.escape(d)}</code></li>"
            for d in datasets
        )
        page = (
            "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>NeuroTrALE datasets</title>"
            "</head><body><h1>Datasets</h1>\n"
            f"<ul>\n{items}\n</ul>\n"
            f"<p>{len(datasets)} dataset(s). API documentation: <a href='api/'>api/</a></p>"
            "</body></html>\n"
        ).encode()
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-length", b"%d" % len(page))
        return page

    @staticmethod
    def _base_url(request: IRequest) -> str:
        host = (request.getHeader(b"host") or b"localhost").decode("latin-1")
        scheme = "https" if request.isSecure() else "http"
        return f"{scheme}://{host}"

    # --- API documentation (before the static files' catch-all, which it shadows) --------

    @app.route("/api", methods=READ_METHODS)
    def api_redirect(self, request: IRequest) -> bytes:
        """``/api`` is ``/api/`` (a relative ``Location`` keeps a proxy's path prefix)."""
        request.setResponseCode(http.MOVED_PERMANENTLY)
        request.setHeader(b"location", b"api/")
        return b""

    @app.route("/api/", methods=READ_METHODS)
    async def api_page(self, request: IRequest) -> bytes:
        """Swagger UI's page."""
        return await self._docs_file(request, "index.html")

    @app.route("/api/openapi.json", methods=READ_METHODS)
    async def api_document(self, request: IRequest) -> bytes:
        """The OpenAPI document of every route here."""
        return await self._docs_file(request, "openapi.json")

    @app.route("/api/<asset>", methods=READ_METHODS)
    async def api_asset(self, request: IRequest, asset: str) -> bytes:
        """One of Swagger UI's files, from this host."""
        return await self._docs_file(request, asset)

    async def _docs_file(self, request: IRequest, name: str) -> bytes:
        coding = choose_encoding(request.getHeader(b"accept-encoding"))
        return docs.respond(request, await self._in_thread(docs.prepare, name, coding))

    # --- image chunks ---------------------------------------------------------------------

    @app.route("/<path:dataset>/<key>/<chunk:chunk>", methods=READ_METHODS)
    async def chunk(
        self, request: IRequest, dataset: str, key: str, chunk: str
    ) -> bytes | IResource:
        """One image chunk in the precomputed raw encoding, compressed when the client accepts."""
        name = ChunkName.parse(chunk)
        if name is None:
            raise NotFound(f"{chunk!r} is not a chunk name")
        segments = clean_segments(dataset.split("/"))
        clean_segments([key])
        range_header = request.getHeader(b"range")
        # A range answer is never compressed: its offsets are offsets of the raw bytes.
        coding = None if range_header else choose_encoding(request.getHeader(b"accept-encoding"))
        inm = request.getHeader(b"if-none-match")

        def client_has(etag: str) -> bool:
            return inm is not None and none_match(inm, etag)

        answer = self.hits.answer(segments, key, name, coding, client_has)
        if answer is None:
            answer = await self._in_thread(
                self.chunks.respond, segments, key, name, coding, client_has
            )
        request.setHeader(b"vary", b"Accept-Encoding")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"last-modified", http.datetimeToString(answer.modified))
        request.setHeader(b"etag", answer.etag.encode())
        body = answer.body
        if body is None:
            request.setResponseCode(http.NOT_MODIFIED)
            return b""
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"accept-ranges", b"bytes")
        if answer.coding is not None:
            request.setHeader(b"content-encoding", answer.coding.encode())
        last_modified = request.responseHeaders.getRawHeaders(b"last-modified", [b""])[0]
        try:
            # If-Range naming another version: the whole body, identity as for any range.
            span = requested_range(request, answer.etag, last_modified, len(body))
        except Unsatisfiable:
            return range_not_satisfiable(request, len(body))
        if span is not None:
            start, end = span
            request.setResponseCode(http.PARTIAL_CONTENT)
            request.setHeader(b"content-range", b"bytes %d-%d/%d" % (start, end - 1, len(body)))
            body = body[start:end]
        return BodyResource(body)

    # --- annotations ----------------------------------------------------------------------

    @app.route("/<path:dataset>/annotations/<block>/<annotation:name>", methods=ANNOTATION_METHODS)
    async def annotation(self, request: IRequest, dataset: str, block: str, name: str) -> bytes:
        """Read, replace, upsert into or delete from one annotation file."""
        method = request.method
        segments = dataset.split("/")
        version = _version_query(request)  # a bad one is refused whatever else is asked
        if method in (b"GET", b"HEAD") and b"history" in _query_names(request):
            return await self._history_page(request, segments, block, name)
        if method in (b"GET", b"HEAD"):
            return await self._read_annotation(request, segments, block, name, version)
        store = self.annotations
        if_match = _header(request, b"if-match")
        record_id = _query(request, b"id")
        if method == b"DELETE" and record_id is None:
            raise BadRequest("DELETE needs ?id=RECORD_ID")
        content = request.content

        def write() -> Any:
            dataset_dir = self.root.name_of(segments)
            path = store.locate(dataset_dir, block, name, for_write=True)
            body = content.read() if content is not None else b""
            if method == b"PUT":
                return store.put(path, body, if_match)
            if method == b"PATCH":
                return store.patch(path, body, record_id, if_match)
            if method == b"DELETE":
                return store.delete(path, record_id, if_match)
            # Never "otherwise delete": the root lets only exact tokens through, so this is a bug.
            raise MethodNotAllowed(f"method {method.decode('latin-1')} is not allowed here")

        result = await self._in_thread(write)
        request.setHeader(b"etag", result.etag.encode())
        request.setHeader(b"cache-control", b"no-store")
        if method == b"PUT":
            status = http.CREATED if result.created else http.OK
            return json_body(request, status, {"filename": result.filename, "count": result.count})
        return json_body(request, http.OK, {"id": result.record_id})

    async def _history_page(
        self, request: IRequest, segments: list[str], block: str, name: str
    ) -> bytes:
        """``?history``: the HTML page of the file's versions (404 when there is no file)."""
        store = self.annotations

        def exists() -> None:
            dataset_dir = self.root.name_of(segments)
            store.read(store.locate(dataset_dir, block, name, for_write=False))

        await self._in_thread(exists)
        page = history.page(segments, block, name)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", history.CONTENT_SECURITY_POLICY)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"content-length", b"%d" % len(page))
        return page

    async def _read_annotation(
        self, request: IRequest, segments: list[str], block: str, name: str, version: int | None
    ) -> bytes:
        """The file's content, its ``?versions`` listing, or its ``?version=N``."""
        store = self.annotations
        want_list = b"versions" in _query_names(request)

        def read() -> Any:
            dataset_dir = self.root.name_of(segments)
            path = store.locate(dataset_dir, block, name, for_write=False)
            if want_list:
                return store.versions(path)
            if version is not None:
                return store.read_version(path, version)
            return store.read(path)

        result = await self._in_thread(read)
        request.setHeader(b"cache-control", b"no-cache")
        if want_list:
            return json_body(request, http.OK, result)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"last-modified", http.datetimeToString(result.modified))
        if not_modified(request, result.etag):
            return b""
        request.setHeader(b"content-length", b"%d" % len(result.content))
        return bytes(result.content)

    # --- operations -----------------------------------------------------------------------

    @app.route("/healthz", methods=READ_METHODS)
    async def healthz(self, request: IRequest) -> bytes:
        """200 while the data root is readable, else 503 (a hung mount counts after 5 s, and
        so does a server that is stopping)."""
        request.setHeader(b"cache-control", b"no-store")
        if getattr(getattr(request, "site", None), "draining", False):
            return json_body(
                request, 503, {"status": "stopping", "detail": "the server is stopping"}
            )
        check = self._in_thread(check_data_root, self.root.fs)
        check.addTimeout(5, self.reactor)  # type: ignore[arg-type]
        try:
            health = await check
        except Exception:
            health = Health(False, "the data root did not answer within 5 s")
        return json_body(request, http.OK if health.ok else 503, health.document())

    @app.route("/metrics", methods=READ_METHODS)
    async def metrics_text(self, request: IRequest) -> bytes:
        """The Prometheus metrics, summed over every worker process."""
        body = await self._in_thread(self.metrics.render)
        request.setHeader(b"content-type", METRICS_CONTENT_TYPE.encode())
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"%d" % len(body))
        return body

    # --- everything else: the static files ------------------------------------------------

    @app.route("/<path:rest>", methods=READ_METHODS)
    async def static(self, request: IRequest, rest: str) -> IResource:
        """Any other file or directory under the root: found and opened through the data
        root's file layer on the thread pool, then streamed by Twisted's static ``File``
        from the file that was opened."""
        segments = clean_segments(rest.split("/"))
        found = await self._in_thread(find_static, self.root.fs, segments)
        resource = DataFile(found, "/" + "/".join(segments))
        if isinstance(found, Listing) and request.path.endswith(b"/"):
            resource.page = await self._in_thread(resource.listing_page, request.uri)
        return resource

    # --- errors ---------------------------------------------------------------------------

    @app.handle_errors(Exception)
    def error(self, request: IRequest, failure: Failure) -> bytes:
        """Any error of a route, as JSON, with the status ``responses.error_status`` gives it:
        a core error with its message, no route for this path or method (404, 405), a file
        the server's user may not reach (403, the path in the log only), and anything else,
        which is our bug, logged whole and answered a plain 500."""
        error = failure.value
        assert error is not None  # a Failure always holds its exception
        status = error_status(error)
        if isinstance(error, HTTPException):
            return self._routing_error(request, error, status)
        method, uri = request.method.decode("latin-1"), request.uri.decode("latin-1")
        if isinstance(error, PermissionError):
            log.warn("{method} {uri}: {error}", method=method, uri=uri, error=error)
            return error_response(request, status, "the server may not read or write this")
        if not isinstance(error, DomainError):
            log.failure("{method} {uri} failed", failure, method=method, uri=uri)
            return error_response(request, status, "internal server error")
        if status >= 500 or error.detail is not None:
            # The operator's side of it: for a 403 of permissions too, the path and the errno.
            message = error.message if error.detail is None else f"{error.message} ({error.detail})"
            if status == 500 and error.__cause__ is not None:
                # Where the system call failed, for the bug report a 500 deserves.
                message += "\n" + "".join(traceback.format_exception(error.__cause__)).rstrip()
            emit = log.error if status >= 500 else log.warn
            emit("{method} {uri}: {message}", method=method, uri=uri, message=message)
        # Paths under the root become relative to it (error_response drops any other).
        message = error.message.replace(str(self.root.root).rstrip(os.sep) + os.sep, "")
        return error_response(request, status, message)

    @staticmethod
    def _routing_error(request: IRequest, error: HTTPException, status: int) -> bytes:
        """No route for this path (404) or for this method (405, with ``Allow``)."""
        if status == http.NOT_ALLOWED and (refusal := _bad_annotation_name(request)):
            return error_response(request, http.BAD_REQUEST, refusal)
        if status == http.NOT_ALLOWED:
            allowed = sorted(getattr(error, "valid_methods", None) or READ_METHODS)
            request.setHeader(b"allow", ", ".join([*allowed, "OPTIONS"]).encode())
            return error_response(
                request, status, f"method {request.method.decode()} is not allowed here"
            )
        return error_response(request, status, error.description or "not found")


#: A path segment the chunk fast path takes as it is: no percent-escape, no ``.`` or ``..``
#: (anything else goes through Klein, whose answer is the reference).
_PLAIN_SEGMENT = re.compile(rb"(?!\.\.?$)[A-Za-z0-9_.\-]+")
_CHUNK_SEGMENT = re.compile(CHUNK_PATTERN.encode())


class ChunkRoutes(Resource):
    """The routes, with chunk URLs answered before Klein and werkzeug see them.

    Routing a chunk's URL through Klein cost an eighth of the reactor thread (py-spy, issue
    13). A ``GET`` or ``HEAD`` of ``/{dataset...}/{key}/{chunk name}`` in plain segments is
    exactly what the chunk route matches (no other route ends in a chunk name), so it goes
    straight to :meth:`Neurotrale.chunk`, its errors to the same handlers; everything else,
    and any spelling with escapes, goes to Klein. It sits where Klein's resource sat, behind
    `site.NeurotraleRoot` (CORS, method, ``Host`` and query checks) and the access
    policy, so every request passes the same checks as before.
    """

    isLeaf = True

    def __init__(self, app: Neurotrale, routes: IResource) -> None:
        super().__init__()
        self.app = app
        self.routes = routes

    def render(self, request: IRequest) -> Any:
        """Answer a chunk here; hand any other request to the routes."""
        postpath: list[bytes] = request.postpath
        if (
            request.method not in (b"GET", b"HEAD")
            or len(postpath) < 3
            or not _CHUNK_SEGMENT.fullmatch(postpath[-1])
            or not all(_PLAIN_SEGMENT.fullmatch(segment) for segment in postpath[:-1])
        ):
            return self.routes.render(request)
        dataset = b"/".join(postpath[:-2]).decode("ascii")
        answer = ensureDeferred(
            self.app.chunk(request, dataset, postpath[-2].decode("ascii"), postpath[-1].decode())
        )
        finished: list[object] = []
        request.notifyFinish().addBoth(finished.append)  # type: ignore[attr-defined]
        request.notifyFinish().addErrback(lambda _: answer.cancel())  # type: ignore[attr-defined]

        def send(result: bytes | IResource) -> None:
            if finished:
                return
            if isinstance(result, bytes):
                request.write(result)
                request.finish()
            else:
                request.render(result)  # type: ignore[attr-defined]

        def failed(failure: Failure) -> None:
            if not finished:
                send(self.app.error(request, failure))

        answer.addCallbacks(send, failed)
        return server.NOT_DONE_YET


def _bad_annotation_name(request: IRequest) -> str | None:
    """Why a write to ``.../annotations/{block}/{name}`` was not routed, when ``name`` is no
    annotation file name (the router only knows that the static route takes no writes)."""
    if request.method not in (b"PUT", b"PATCH", b"DELETE"):
        return None
    segments = request.path.split(b"/")
    if len(segments) < 5 or segments[-3] != b"annotations":
        return None
    name = unquote_to_bytes(segments[-1]).decode("utf-8", "replace")
    return (
        f"{name!r} is not an annotation file name: use letters, digits, '-', '_' and '.', "
        "end with '.json', and do not begin with '.' nor hold '..'"
    )


def _header(request: IRequest, name: bytes) -> str | None:
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")


def _version_query(request: IRequest) -> int | None:
    """``?version=N``, or None; :class:`BadRequest` when it is not a whole number."""
    version = _query(request, b"version")
    if version is None:
        return None
    if not (version.isascii() and version.isdigit() and len(version) <= MAX_VERSION_DIGITS):
        raise BadRequest(
            f"?version= must be a positive integer of at most {MAX_VERSION_DIGITS} digits"
        )
    return int(version)


def _query_names(request: IRequest) -> set[bytes]:
    """The names in the query string, including bare ones such as ``?versions``.

    Twisted's ``request.args`` drops a name that has no ``=``.
    """
    _, _, query = request.uri.partition(b"?")
    return {unquote_to_bytes(item.partition(b"=")[0]) for item in query.split(b"&") if item}


def _query(request: IRequest, name: bytes) -> str | None:
    """The first value of query parameter ``name``; :class:`BadRequest` if it is not UTF-8."""
    values = request.args.get(name)
    if not values:
        return None
    try:
        return str(values[0].decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest(f"?{name.decode('latin-1')}= is not valid UTF-8") from None
