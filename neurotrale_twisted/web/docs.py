"""The interactive API documentation at ``/api/``: Swagger UI, served entirely by this server.

The old service's Swagger page loaded its scripts from a CDN, which is a blank page on the
closed lab networks these servers run on. Here every file comes from this host: Swagger UI's
own files from the ``swagger-ui-bundle`` package, the page and its start-up script from this
module, the OpenAPI document from :mod:`neurotrale_twisted.web.openapi`. The page's
``Content-Security-Policy`` tells the browser to load nothing from anywhere else.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field

from swagger_ui_bundle import swagger_ui_path
from twisted.web.iweb import IRequest

from neurotrale_twisted.core.encoding import encode_body
from neurotrale_twisted.core.errors import NotFound
from neurotrale_twisted.web import history
from neurotrale_twisted.web.negotiation import add_vary, not_modified
from neurotrale_twisted.web.openapi import SWAGGER_ASSETS, openapi_json

#: The page at ``/api/``. Paths are relative so that it works behind a proxy's path prefix.
PAGE = b"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>NeuroTrALE precomputed service: API</title>
<link rel="stylesheet" href="swagger-ui.css">
<link rel="icon" type="image/png" href="favicon-32x32.png" sizes="32x32">
<link rel="icon" type="image/png" href="favicon-16x16.png" sizes="16x16">
</head>
<body>
<div id="swagger-ui"></div>
<script src="swagger-ui-bundle.js"></script>
<script src="swagger-initializer.js"></script>
</body>
</html>
"""

#: Swagger UI's start-up script. ``validatorUrl: null`` keeps it from asking
#: validator.swagger.io for a badge; ``BaseLayout`` has no bar for loading other documents.
INITIALIZER = b"""window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    defaultModelsExpandDepth: 0,
    displayRequestDuration: true
  });
});
"""

#: Load nothing from anywhere but this host (Swagger UI needs inline styles and data: images).
CONTENT_SECURITY_POLICY = (
    b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    b"object-src 'none'; base-uri 'none'; frame-ancestors 'self'; form-action 'self'"
)


@dataclass
class DocsFile:
    """One file of the documentation, with its compressed forms made on first use."""

    body: bytes
    content_type: str
    digest: str = field(init=False)
    _encoded: dict[str | None, tuple[bytes, str | None]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.digest = hashlib.sha256(self.body).hexdigest()[:32]

    def encoded(self, coding: str | None) -> tuple[bytes, str | None]:
        """The body in ``coding`` when that shrinks it (else as it is), and the coding used."""
        with self._lock:
            if coding not in self._encoded:
                self._encoded[coding] = encode_body(self.body, coding)
            return self._encoded[coding]


@dataclass(frozen=True)
class PreparedFile:
    """A documentation file ready to send in one content coding."""

    file: DocsFile
    body: bytes
    coding: str | None

    @property
    def etag(self) -> str:
        """A strong ETag of this representation (each coding has its own)."""
        suffix = f"-{self.coding}" if self.coding else ""
        return f'"{self.file.digest}{suffix}"'


_files: dict[str, DocsFile] = {}
_files_lock = threading.Lock()


def _load(name: str) -> DocsFile:
    if name == "index.html":
        return DocsFile(PAGE, "text/html; charset=utf-8")
    if name == "openapi.json":
        return DocsFile(openapi_json(), "application/json")
    if name == "swagger-initializer.js":
        return DocsFile(INITIALIZER, SWAGGER_ASSETS[name])
    if name in history.HISTORY_ASSETS:
        return DocsFile(history.asset(name), history.HISTORY_ASSETS[name])
    if name not in SWAGGER_ASSETS:
        raise NotFound(f"no documentation file {name!r}")
    return DocsFile((swagger_ui_path / name).read_bytes(), SWAGGER_ASSETS[name])


def prepare(name: str, coding: str | None) -> PreparedFile:
    """The documentation file ``name`` (``index.html``, ``openapi.json``, a Swagger UI file or
    one of the history page's files) in ``coding``. Reads the disk the first time: call it off
    the reactor thread.

    Raises :class:`NotFound` for any other name.
    """
    with _files_lock:
        docs_file = _files.get(name)
        if docs_file is None:
            docs_file = _files[name] = _load(name)
    body, used = docs_file.encoded(coding)
    return PreparedFile(docs_file, body, used)


def respond(request: IRequest, prepared: PreparedFile) -> bytes:
    """Set the headers of ``prepared`` on ``request`` and return its body (empty for a 304)."""
    request.setHeader(b"content-type", prepared.file.content_type.encode())
    request.setHeader(b"cache-control", b"no-cache")
    request.setHeader(b"x-content-type-options", b"nosniff")
    add_vary(request, b"Accept-Encoding")
    if prepared.file.content_type.startswith("text/html"):
        request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY)
    if not_modified(request, prepared.etag):
        return b""
    if prepared.coding is not None:
        request.setHeader(b"content-encoding", prepared.coding.encode())
    request.setHeader(b"content-length", b"%d" % len(prepared.body))
    return prepared.body
