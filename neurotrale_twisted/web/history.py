"""The history page of an annotation file (``GET {file}.json?history``) and its links.

The page lists the kept versions of one file, newest first, with what each changed against
the version before it, shows any version's records, and puts a version back by a click. It
is built on the HTTP API alone: its script (``/api/history.js``) reads ``?versions`` and
``?version=N`` and restores with a ``PUT`` carrying ``If-Match`` of the content the page
showed, so a concurrent edit is refused (412) rather than overwritten. The script and its
style sheet are files of this package, served by :mod:`neurotrale_twisted.web.docs` under
``/api/``; the page's Content-Security-Policy allows nothing else (no inline script, no
other host), so it works on a closed network.

Directory listings of annotation blocks (``{dataset}/annotations/{block}/``) link each
annotation file's history page (``web.BlockListing``).
"""

from __future__ import annotations

import html
import os
from importlib import resources
from urllib.parse import quote

from neurotrale_twisted.core.annotations.records import ANNOTATION_NAME

#: The page's files under ``/api/``, and their content types.
HISTORY_ASSETS: dict[str, str] = {
    "history.js": "text/javascript; charset=utf-8",
    "history.css": "text/css; charset=utf-8",
}

#: Nothing but this host's script, style sheet, images and API; no inline script or style.
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    b"img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
)


def asset(name: str) -> bytes:
    """The content of the page's file ``name`` (one of :data:`HISTORY_ASSETS`)."""
    return (resources.files(__package__) / "static" / name).read_bytes()


def page(dataset: list[str], block: str, name: str) -> bytes:
    """The history page of ``{dataset}/annotations/{block}/{name}``.

    ``dataset`` is the URL's segments, empty ones (``//``) included. Links are relative to
    the page's URL, so the page works behind a proxy's path prefix: the API's files are
    ``len(dataset) + 2`` directories up.
    """
    up = "../" * (len(dataset) + 2)
    where = html.escape("/".join([*(s for s in dataset if s), "annotations", block]))
    shown = html.escape(name)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>History of {shown}</title>
<link rel="stylesheet" href="{up}api/history.css">
<link rel="icon" type="image/png" href="{up}api/favicon-16x16.png">
<script src="{up}api/history.js" defer></script>
</head>
<body>
<header>
<h1>History of <code>{shown}</code></h1>
<p class="where"><a href="./">{where}/</a></p>
</header>
<p id="status" role="status">Loading the versions&hellip;</p>
<p id="message" role="alert" hidden></p>
<table id="versions">
<thead><tr><th>version</th><th>saved (UTC)</th><th>size</th><th>records</th>
<th>added</th><th>removed</th><th>changed</th><th></th></tr></thead>
<tbody></tbody>
</table>
<section id="records" hidden>
<h2 id="records-title"></h2>
<p id="records-removed" hidden></p>
<table>
<thead><tr><th>id</th><th>type</th><th>anntype</th><th>where</th><th>reviewed</th>
<th>visited</th><th>against the version before</th></tr></thead>
<tbody></tbody>
</table>
</section>
<noscript><p>This page needs JavaScript. The versions are also at
<a href="{quote(name)}?versions">{shown}?versions</a>.</p></noscript>
</body>
</html>
""".encode()


def is_block_directory(path: str) -> bool:
    """Whether directory ``path`` is an annotation block (its parent is ``annotations``)."""
    return os.path.basename(os.path.dirname(path)) == "annotations"


def is_annotation_name(name: str) -> bool:
    """Whether ``name`` is an annotation file name (whose history page exists)."""
    return ANNOTATION_NAME.match(name) is not None
