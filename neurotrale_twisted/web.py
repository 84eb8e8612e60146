"""The Klein application: thin routes that parse a request, call the core, shape the answer.

Blocking work (TIFF decoding, compression, annotation reads and writes) runs on the
server's own thread pool; the reactor thread never touches the disk on a hot path. Domain
errors raised by the core become JSON answers in one handler below.
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar
from urllib.parse import quote, unquote_to_bytes

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.static import File
from werkzeug.exceptions import HTTPException
from werkzeug.routing import BaseConverter

from . import docs
from .annotations import AnnotationStore
from .auth import WritePolicy, make_portal
from .chunks import CHUNK_PATTERN, ChunkName, ChunkResponse, ChunkSource, file_etag
from .datasets import find_datasets
from .errors import BadRequest, DomainError, NotFound
from .health import Health, check_data_root
from .http import (
    BodyResource,
    CorsPolicy,
    JsonErrorResource,
    NeurotraleRoot,
    Unsatisfiable,
    choose_encoding,
    error_response,
    json_body,
    none_match,
    single_range,
)
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import ServerMetrics
from .paths import DataRoot, clean_segments

log = Logger()
P = ParamSpec("P")
T = TypeVar("T")

READ_METHODS = ["GET", "HEAD"]
ANNOTATION_METHODS = ["GET", "HEAD", "PUT", "PATCH", "DELETE"]


class ChunkConverter(BaseConverter):
    """A URL segment that is a chunk name, ``x0-x1_y0-y1_z0-z1`` with an optional ``.tiff``."""

    regex = CHUNK_PATTERN


class AnnotationNameConverter(BaseConverter):
    """A URL segment that is an annotation file name ending in ``.json``."""

    regex = r"[A-Za-z0-9_.\-]+\.json"


class DataFile(File):
    """Twisted's static ``File``, made safe for a data root.

    Dot-names are neither listed nor served; ``info`` is JSON and unknown types are
    ``application/octet-stream`` (never ``text/html``); a strong ETag with 304 on
    ``If-None-Match`` comes on top of ``File``'s ``Last-Modified``, ``Range`` and ``HEAD``.
    It is a leaf: the route resolves the whole path through :class:`DataRoot` first.
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
    data_root: DataRoot | None = None

    def listNames(self) -> list[str]:
        """The names a directory listing shows: no dot-names, no links out of the root."""
        names = [n for n in super().listNames() if not n.startswith(".")]
        root = self.data_root
        if root is None:
            return names
        return [n for n in names if root.may_read(os.path.join(self.path, n))]

    def render_GET(self, request: IRequest) -> Any:
        """Serve the file, or list the directory (redirecting to the URL with a ``/``)."""
        self.restat(False)
        if not self.exists():
            return self.childNotFound.render(request)
        if self.isdir():
            if request.path.endswith(b"/"):
                return self.directoryListing().render(request)
            return self.redirect(request)
        if self.basename() == "info":
            self.type, self.encoding = "application/json", None
        status = os.stat(self.path)
        if request.setETag(file_etag(status).encode()) is http.CACHED:
            return b""
        try:
            single_range(request.getHeader(b"range"), status.st_size)
        except Unsatisfiable:
            # File would answer an empty body under the file's own content type.
            body = error_response(
                request, http.REQUESTED_RANGE_NOT_SATISFIABLE, "range not satisfiable"
            )
            request.setHeader(b"content-range", b"bytes */%d" % status.st_size)
            return body
        return super().render_GET(request)

    render_HEAD = render_GET


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
        self.annotations = AnnotationStore(
            root, keep_versions=keep_versions, on_retry=self.metrics.commit_retried
        )
        self.cors = cors or CorsPolicy()

    def resource(self) -> IResource:
        """The site's root resource: the routes behind CORS, slash folding and the write policy.

        Raises ``OSError`` when the htpasswd file cannot be read.
        """
        routes = self.app.resource()
        portal = (
            None if self.htpasswd is None else make_portal(self.htpasswd, routes, self._in_thread)
        )
        policy = WritePolicy(self.read_only, portal, self.auth_reads)
        return NeurotraleRoot(routes, self.cors, policy)

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
        segments = dataset.split("/")  # checked by DataRoot.for_reading on the thread
        clean_segments([key])
        range_header = request.getHeader(b"range")
        # A range answer is never compressed: its offsets are offsets of the raw bytes.
        coding = None if range_header else choose_encoding(request.getHeader(b"accept-encoding"))
        inm = request.getHeader(b"if-none-match")

        def client_has(etag: str) -> bool:
            return inm is not None and none_match(inm, etag)

        def respond() -> ChunkResponse:
            # Resolving links touches the disk: off the reactor thread, like the rest.
            dataset_dir = self.root.for_reading(segments)
            return self.chunks.respond(dataset_dir, key, name, coding, client_has)

        answer = await self._in_thread(respond)
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
        try:
            span = single_range(range_header, len(body))
        except Unsatisfiable:
            refusal = error_response(
                request, http.REQUESTED_RANGE_NOT_SATISFIABLE, "range not satisfiable"
            )
            request.setHeader(b"content-range", b"bytes */%d" % len(body))
            return refusal
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
        if method in (b"GET", b"HEAD"):
            return await self._read_annotation(request, segments, block, name)
        store = self.annotations
        if_match = _header(request, b"if-match")
        record_id = _query(request, b"id")
        if method == b"DELETE" and record_id is None:
            raise BadRequest("DELETE needs ?id=RECORD_ID")
        content = request.content  # type: ignore[attr-defined]

        def write() -> Any:
            dataset_dir = self.root.for_writing(segments)
            path = store.locate(dataset_dir, block, name, for_write=True)
            body = content.read() if content is not None else b""
            if method == b"PUT":
                return store.put(path, body, if_match)
            if method == b"PATCH":
                return store.patch(path, body, record_id, if_match)
            return store.delete(path, record_id, if_match)

        result = await self._in_thread(write)
        request.setHeader(b"etag", result.etag.encode())
        request.setHeader(b"cache-control", b"no-store")
        if method == b"PUT":
            status = http.CREATED if result.created else http.OK
            return json_body(request, status, {"filename": result.filename, "count": result.count})
        return json_body(request, http.OK, {"id": result.record_id})

    async def _read_annotation(
        self, request: IRequest, segments: list[str], block: str, name: str
    ) -> bytes:
        store = self.annotations
        version = _query(request, b"version")
        want_list = b"versions" in _query_names(request)
        if version is not None and not (version.isascii() and version.isdigit()):
            raise BadRequest("?version= must be a positive integer")

        def read() -> Any:
            dataset_dir = self.root.for_reading(segments)
            path = store.locate(dataset_dir, block, name, for_write=False)
            if want_list:
                return store.versions(path)
            if version is not None:
                return store.read_version(path, int(version))
            return store.read(path)

        result = await self._in_thread(read)
        request.setHeader(b"cache-control", b"no-cache")
        if want_list:
            return json_body(request, http.OK, result)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"last-modified", http.datetimeToString(result.modified))
        if request.setETag(result.etag.encode()) is http.CACHED:
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
        check = self._in_thread(check_data_root, self.root.root)
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
    def static(self, request: IRequest, rest: str) -> IResource:
        """Any other file or directory under the root, through Twisted's static ``File``."""
        path = self.root.for_reading(rest.split("/"))
        resource = DataFile(str(path), defaultType="application/octet-stream")
        resource.data_root = self.root
        return resource

    # --- errors ---------------------------------------------------------------------------

    @app.handle_errors(DomainError)
    def domain_error(self, request: IRequest, failure: Failure) -> bytes:
        """A core error: its status and message, as JSON."""
        error = failure.value
        assert isinstance(error, DomainError)
        if error.status >= 500:
            log.error(
                "{method} {uri}: {message}",
                method=request.method.decode(),
                uri=request.uri.decode("latin-1"),
                message=error.message
                if error.detail is None
                else f"{error.message} ({error.detail})",
            )
        return error_response(request, error.status, error.message)

    @app.handle_errors(HTTPException)
    def routing_error(self, request: IRequest, failure: Failure) -> bytes:
        """No route for this path or method (404, 405), as JSON."""
        error = failure.value
        assert isinstance(error, HTTPException)
        status = error.code or 500
        if status == http.NOT_ALLOWED:
            allowed = sorted(getattr(error, "valid_methods", None) or READ_METHODS)
            request.setHeader(b"allow", ", ".join([*allowed, "OPTIONS"]).encode())
            return error_response(
                request, status, f"method {request.method.decode()} is not allowed here"
            )
        return error_response(request, status, error.description or "not found")

    @app.handle_errors(Exception)
    def unexpected_error(self, request: IRequest, failure: Failure) -> bytes:
        """Anything else is our bug: log it whole, answer a plain 500."""
        log.failure(
            "{method} {uri} failed",
            failure,
            method=request.method.decode(),
            uri=request.uri.decode("latin-1"),
        )
        return error_response(request, http.INTERNAL_SERVER_ERROR, "internal server error")


def _header(request: IRequest, name: bytes) -> str | None:
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")


def _query_names(request: IRequest) -> set[bytes]:
    """The names in the query string, including bare ones such as ``?versions``.

    Twisted's ``request.args`` drops a name that has no ``=``.
    """
    _, _, query = request.uri.partition(b"?")
    return {unquote_to_bytes(item.partition(b"=")[0]) for item in query.split(b"&") if item}


def _query(request: IRequest, name: bytes) -> str | None:
    values = request.args.get(name)  # type: ignore[attr-defined]
    return None if not values else values[0].decode("utf-8", "replace")
