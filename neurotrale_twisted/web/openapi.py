"""The OpenAPI 3 description of every route, served at ``/api/openapi.json``.

It lives beside the routes it describes, keyed by their Klein rules (:data:`ROUTES`), so the
two cannot drift apart unnoticed: ``tests/test_openapi.py`` checks that every rule of
``Neurotrale.app.url_map`` is described with the same methods and that every described path
is routed, and runs schemathesis against the live server to check that the answers keep to
what is written here (status codes, content types, headers, bodies).

Swagger UI 4 (``/api/``) reads OpenAPI 3.0, so the document is 3.0, not 3.1.
"""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from typing import Any

from neurotrale_twisted import project_version
from neurotrale_twisted.core.annotations.records import (
    ANNOTATION_NAME_FORM,
    MAX_ANNOTATION_NAME,
    RECORD_TYPES,
    REQUIRED_COORDINATES,
)
from neurotrale_twisted.core.chunks.names import CHUNK_PATTERN
from neurotrale_twisted.web.history import HISTORY_ASSETS
from neurotrale_twisted.web.protocol import MAX_VERSION_DIGITS

OPENAPI_VERSION = "3.0.3"

#: The Swagger UI files ``/api/{asset}`` serves, and their content types.
SWAGGER_ASSETS: dict[str, str] = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-initializer.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}

Json = dict[str, Any]

#: One path segment the server accepts: not empty, no leading dot (dot-names are hidden), no
#: slash, backslash or NUL. JSON Schema patterns are ECMA 262 regular expressions.
SEGMENT = r"[^./\\\x00][^/\\\x00]*"
#: The server takes segments of up to 255 bytes (the limit of file names); 60 characters keep
#: any text under it.
MAX_PATH = 60

# --- shared pieces ------------------------------------------------------------------------


def _ref(kind: str, name: str) -> Json:
    return {"$ref": f"#/components/{kind}/{name}"}


def _error(description: str) -> Json:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref("schemas", "Error")}},
    }


ERRORS: dict[str, Json] = {
    "400": _error("The request is malformed (a bad path segment, parameter or body)."),
    "403": _error("The request would write through a link that leaves the data root."),
    "404": _error("There is no such thing."),
    "412": _error("`If-Match` no longer matches the stored file; nothing was changed."),
    "413": _error("The request body is over the server's `--max-body` limit."),
    "416": _error("The `Range` selects no byte of the body."),
    "503": _error(
        "The write lost the race for the next commit to other writers too many times in a "
        "row; nothing of it was kept. Send it again."
    ),
    "507": _error(
        "The disk (or the quota) is full; nothing was written, no version was added or removed."
    ),
    "500": _error(
        "The data on disk is inconsistent (a TIFF whose shape or type disagrees with its name "
        "or with `info`); the server's log names the file."
    ),
}


def _errors(*codes: str) -> dict[str, Json]:
    return {code: ERRORS[code] for code in codes}


ETAG = {"ETag": _ref("headers", "ETag")}

TRIPLE: Json = {
    "type": "array",
    "description": "x, y, z in voxels (absolute, may be fractional): three finite numbers, "
    "each within the range of a double.",
    "items": {"type": "number", "format": "double"},
    "minItems": 3,
    "maxItems": 3,
    "example": [1021.5, 388.25, 117],
}


def _any_case(*words: str) -> str:
    """A regular expression matching any of ``words`` in any letter case (JSON Schema
    patterns have no case-insensitive flag)."""
    spelled = ("".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in w) for w in words)
    return "^(" + "|".join(spelled) + ")$"


def _listed(words: list[str] | tuple[str, ...], last: str = "and") -> str:
    """``a``, ``a and b``, ``a, b and c`` (or ``last`` instead of ``and``)."""
    return f" {last} ".join([", ".join(words[:-1]), words[-1]]) if len(words) > 1 else words[0]


def _types_needing(field: str | None) -> list[str]:
    """The record types whose records need coordinate field ``field`` (None: neither)."""
    return [kind for kind in RECORD_TYPES if REQUIRED_COORDINATES.get(kind) == field]


#: The coordinate fields some record types need, in the order the description names them.
_COORDINATE_FIELDS = tuple(dict.fromkeys(REQUIRED_COORDINATES.values()))


RECORD: Json = {
    "type": "object",
    "description": (
        "One annotation. Fields the viewer reads may never be `null`; unknown fields are kept "
        "as they are. "
        + "; ".join(
            f"{_listed([f'`{kind}`' for kind in _types_needing(field)])} records need `{field}`"
            for field in _COORDINATE_FIELDS
        )
        + "."
    ),
    "required": ["id", "type"],
    "properties": {
        "id": {
            "type": "string",
            "minLength": 1,
            "description": "Unique within the file (the viewer makes 40 hex digits; UUIDs do).",
        },
        "type": {
            "type": "string",
            "description": f"{_listed(RECORD_TYPES, 'or')}, in any letter case.",
            "pattern": _any_case(*RECORD_TYPES),
        },
        "point": TRIPLE,
        "points": {"type": "array", "items": TRIPLE},
        "anntype": {"type": "string", "example": "neuron"},
        "reviewed": {"type": "boolean"},
        "visited": {"type": "boolean"},
        "length": {"type": "number", "format": "double"},
        "description": {"type": "string"},
        "segments": {"type": "array", "items": {"type": "string"}},
    },
    "additionalProperties": True,
    "anyOf": [
        *(
            {
                "properties": {"type": {"pattern": _any_case(*_types_needing(field))}},
                "required": [field],
            }
            for field in _COORDINATE_FIELDS
        ),
        {"properties": {"type": {"pattern": _any_case(*_types_needing(None))}}},
    ],
    "example": {
        "point": [1021.5, 388.25, 117],
        "type": "point",
        "id": "9f1c0d6a3b2e4f5a6b7c8d9e0f1a2b3c4d5e6f70",
        "anntype": "neuron",
        "reviewed": False,
        "visited": False,
    },
}

COMPONENTS: Json = {
    "schemas": {
        "Error": {
            "type": "object",
            "required": ["error", "status"],
            "properties": {
                "error": {"type": "string", "description": "What is wrong, for a person."},
                "status": {"type": "integer", "description": "The HTTP status code again."},
            },
            "example": {"error": "fibers.json does not exist", "status": 404},
        },
        "Record": RECORD,
        "AnnotationFile": {
            "type": "array",
            "items": _ref("schemas", "Record"),
            "description": "A whole annotation file: records with ids unique in the file.",
        },
        "Version": {
            "type": "object",
            "required": ["version", "modified", "size", "count"],
            "properties": {
                "version": {"type": "integer", "minimum": 1},
                "modified": {"type": "string", "format": "date-time"},
                "size": {"type": "integer", "minimum": 0, "description": "bytes"},
                "count": {"type": "integer", "minimum": 0, "description": "records"},
            },
        },
    },
    "parameters": {
        "dataset": {
            "name": "dataset",
            "in": "path",
            "required": True,
            "description": "The dataset's directory under the data root; it may have several "
            "segments (`lab/2024/brain1`, which Swagger UI sends as `lab%2F2024%2Fbrain1`).",
            "schema": {
                "type": "string",
                "pattern": f"^{SEGMENT}(/{SEGMENT})*$",
                "maxLength": MAX_PATH,
            },
            "example": "demo-brain",
        },
        "block": {
            "name": "block",
            "in": "path",
            "required": True,
            "description": "`x{X}y{Y}z{Z}`, a point in voxels that falls in the block (the viewer "
            "sends the last place the user double-clicked). The name of an existing block "
            "directory works too. A write to a new block needs a point inside the volume (400).",
            "schema": {
                "type": "string",
                "pattern": "^x-?[0-9]+y-?[0-9]+z-?[0-9]+$",
                "maxLength": 255,
            },
            "example": "x0y0z0",
        },
        "name": {
            "name": "name",
            "in": "path",
            "required": True,
            "description": "The annotation file: letters, digits, `-`, `_` and `.`, ending in "
            "`.json` (`fibers.json`, `centroids.json`, `z-0117.json`, ...).",
            "schema": {
                "type": "string",
                "pattern": f"^{ANNOTATION_NAME_FORM}$",
                "maxLength": MAX_ANNOTATION_NAME,
            },
            "example": "fibers.json",
        },
        "If-Match": {
            "name": "If-Match",
            "in": "header",
            "required": False,
            "description": "Write only if the file still has this ETag (else 412).",
            "schema": {"type": "string"},
        },
        "If-None-Match": {
            "name": "If-None-Match",
            "in": "header",
            "required": False,
            "description": "Answer 304 with no body when the ETag still matches.",
            "schema": {"type": "string"},
        },
        "Range": {
            "name": "Range",
            "in": "header",
            "required": False,
            "description": "One byte range (`bytes=0-1023`, `bytes=-10`); answered with 206.",
            "schema": {"type": "string"},
        },
    },
    "headers": {
        "ETag": {
            "description": "A strong entity tag of this representation.",
            "required": True,
            "schema": {"type": "string", "pattern": '^"[^"]+"$'},
        },
    },
}

# --- the operations -----------------------------------------------------------------------


def _with_head(get: Json) -> Json:
    """``get`` and the matching ``head``: same parameters and statuses, no bodies."""
    head = copy.deepcopy(get)
    head["summary"] = "Headers only: " + get["summary"][0].lower() + get["summary"][1:]
    head["operationId"] = get["operationId"] + "Head"
    head.pop("description", None)
    for response in head["responses"].values():
        response.pop("content", None)
    return {"get": get, "head": head}


def _html(description: str) -> Json:
    return {"description": description, "content": {"text/html": {"schema": {"type": "string"}}}}


def _path(name: str, description: str, example: str, **schema: Any) -> Json:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", **schema},
        "example": example,
    }


INDEX = _with_head(
    {
        "tags": ["files"],
        "summary": "The index: every dataset under the data root",
        "operationId": "index",
        "description": "An HTML page linking each dataset with its `precomputed://` URL.",
        "responses": {"200": _html("The index page.")},
    }
)

CHUNK_PARAMETERS = [
    _ref("parameters", "dataset"),
    _path("key", "A scale's `key` in `info`.", "1_1_1", pattern=f"^{SEGMENT}$", maxLength=MAX_PATH),
    _path(
        "chunk",
        "`x0-x1_y0-y1_z0-z1` in voxels, ends exclusive; `.tiff` or `.tif` may follow.",
        "0-64_0-64_0-32",
        pattern=f"^{CHUNK_PATTERN}$",
    ),
]

CHUNK = _with_head(
    {
        "tags": ["images"],
        "summary": "One image chunk, decoded from its TIFF file",
        "operationId": "getChunk",
        "description": (
            "Reads `{dataset}/{key}/{chunk}.tiff` (or `.tif`) and answers its voxels in the "
            "precomputed **raw** encoding: little-endian, x varying fastest, then y, z, "
            "channel. The body is exactly (x1-x0)·(y1-y0)·(z1-z0)·num_channels·itemsize bytes "
            "(edge chunks are smaller, not padded). The body is compressed with zstd or gzip "
            "when `Accept-Encoding` allows and it shrinks (never for a `Range`); answers carry "
            "`Vary: Accept-Encoding` and `Cache-Control: no-cache`. A missing chunk is a plain "
            "404: viewers fill it with zeros."
        ),
        "parameters": [
            _ref("parameters", "Range"),
            _ref("parameters", "If-None-Match"),
        ],
        "responses": {
            "200": {
                "description": "The chunk's voxels.",
                "headers": ETAG,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            },
            "206": {
                "description": "The byte range asked for (never compressed).",
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            },
            "304": {"description": "The client's copy (`If-None-Match`) is current."},
            **_errors("400", "404", "416", "500"),
        },
    }
)

ANNOTATION_PARAMETERS = [
    _ref("parameters", "dataset"),
    _ref("parameters", "block"),
    _ref("parameters", "name"),
]
WRITE_ERRORS = {
    **_errors("400", "403", "404", "412", "413", "500", "503", "507"),
    "405": _error(
        "The path is not an annotation file's (a plain file, which only takes GET and HEAD). "
        "A write to `annotations/{block}/{name}` whose name breaks the rule (letters, digits, "
        "`-`, `_`, `.`; ends with `.json`; no leading `.`, no `..`) is a 400 naming the rule."
    ),
}

ANNOTATION_READ = _with_head(
    {
        "tags": ["annotations"],
        "summary": "An annotation file, its versions, one old version, or its history page",
        "operationId": "getAnnotations",
        "description": (
            "With no query: the file as stored (`Cache-Control: no-cache`, a strong ETag, 304 "
            "on `If-None-Match`). With `?versions`: the versions kept of it, newest first. "
            "With `?version=N`: that version's content, which can be put back with a PUT. "
            "With `?history`: an HTML page for people, listing the versions with what each "
            "changed, showing their records, and restoring one by a click (a PUT with "
            "`If-Match`); it comes before the other parameters."
        ),
        "parameters": [
            {
                "name": "history",
                "in": "query",
                "required": False,
                "allowEmptyValue": True,
                "description": "Present (with any value, or none): the HTML history page.",
                "schema": {"type": "string"},
            },
            {
                "name": "versions",
                "in": "query",
                "required": False,
                "allowEmptyValue": True,
                "description": "Present (with any value, or none): list the kept versions.",
                "schema": {"type": "string"},
            },
            {
                "name": "version",
                "in": "query",
                "required": False,
                "description": "Answer this kept version's content instead of the file's.",
                "schema": {"type": "integer", "minimum": 1, "maximum": 10**MAX_VERSION_DIGITS - 1},
            },
            _ref("parameters", "If-None-Match"),
        ],
        "responses": {
            "200": {
                "description": "The file (or the version asked for), the list of versions, or "
                "(`?history`) the history page.",
                "content": {
                    "application/json": {
                        "schema": {
                            "anyOf": [
                                _ref("schemas", "AnnotationFile"),
                                {"type": "array", "items": _ref("schemas", "Version")},
                            ]
                        }
                    },
                    "text/html": {"schema": {"type": "string"}},
                },
            },
            "304": {"description": "The client's copy (`If-None-Match`) is current."},
            **_errors("400", "404", "500"),
        },
    }
)

ANNOTATION_WRITES: Json = {
    "put": {
        "tags": ["annotations"],
        "summary": "Replace the whole file (the viewer's only write)",
        "operationId": "putAnnotations",
        "description": (
            "Creates the file, and its block directory, when missing. Any `Content-Type` is "
            "accepted (the viewer sends `text/plain;charset=UTF-8`). The records are checked "
            "before anything is touched; the replaced content is kept as a version. Atomic "
            "and serialised per file."
        ),
        "parameters": [_ref("parameters", "If-Match")],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref("schemas", "AnnotationFile")}},
        },
        "responses": {
            "200": {
                "description": "Replaced.",
                "headers": ETAG,
                "content": {"application/json": {"schema": _ref("schemas", "Written")}},
            },
            "201": {
                "description": "Created.",
                "headers": ETAG,
                "content": {"application/json": {"schema": _ref("schemas", "Written")}},
            },
            **WRITE_ERRORS,
        },
    },
    "patch": {
        "tags": ["annotations"],
        "summary": "Replace one record by id, or append it",
        "operationId": "patchAnnotation",
        "description": (
            "The record's id is `?id=`, else the body's `id` (400 when both are given and "
            "differ). Creates the file when missing."
        ),
        "parameters": [
            {
                "name": "id",
                "in": "query",
                "required": False,
                "description": "The id of the record to replace or append.",
                "schema": {"type": "string", "minLength": 1},
            },
            _ref("parameters", "If-Match"),
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref("schemas", "PatchedRecord")}},
        },
        "responses": {
            "200": {
                "description": "Stored.",
                "headers": ETAG,
                "content": {"application/json": {"schema": _ref("schemas", "RecordId")}},
            },
            **WRITE_ERRORS,
        },
    },
    "delete": {
        "tags": ["annotations"],
        "summary": "Remove one record by id",
        "operationId": "deleteAnnotation",
        "parameters": [
            {
                "name": "id",
                "in": "query",
                "required": True,
                "description": "The id of the record to remove.",
                "schema": {"type": "string", "minLength": 1},
            },
            _ref("parameters", "If-Match"),
        ],
        "responses": {
            "200": {
                "description": "Removed (the file's old content is kept as a version).",
                "headers": ETAG,
                "content": {"application/json": {"schema": _ref("schemas", "RecordId")}},
            },
            **WRITE_ERRORS,
        },
    },
}
COMPONENTS["schemas"]["PatchedRecord"] = {
    **RECORD,
    "description": "A record, whose `id` may be left out when `?id=` gives it.",
    "required": ["type"],
}
COMPONENTS["schemas"]["Written"] = {
    "type": "object",
    "required": ["filename", "count"],
    "properties": {"filename": {"type": "string"}, "count": {"type": "integer", "minimum": 0}},
    "example": {"filename": "z-0117.json", "count": 2},
}
COMPONENTS["schemas"]["RecordId"] = {
    "type": "object",
    "required": ["id"],
    "properties": {"id": {"type": "string"}},
}

STATIC_PARAMETERS = [
    _path(
        "rest",
        "A path under the data root (several segments, such as `demo-brain/info`).",
        "demo-brain/info",
        pattern=f"^{SEGMENT}(/{SEGMENT})*/?$",
        maxLength=MAX_PATH,
    )
]

STATIC = _with_head(
    {
        "tags": ["files"],
        "summary": "Any other file as it is on disk, or a directory listing",
        "operationId": "getFile",
        "description": (
            "`info` and `.json` files are `application/json`, `.csv` is `text/csv`, unknown "
            "types are `application/octet-stream` (never `text/html`). `Last-Modified`, a strong "
            "ETag, 304, `Range` (206). A directory is an HTML listing (its URL without the "
            "final `/` redirects to it). Dot-files are never listed nor served."
        ),
        "parameters": [
            _ref("parameters", "Range"),
            _ref("parameters", "If-None-Match"),
        ],
        "responses": {
            "200": {
                "description": "The file, of its own type; or a directory's HTML listing.",
                "content": {"*/*": {}},
            },
            "206": {
                "description": "The byte range asked for.",
                "content": {"*/*": {}},
            },
            "301": {"description": "A directory: its URL ends with `/`."},
            "304": {"description": "The client's copy is current."},
            **_errors("400", "404", "416"),
        },
    }
)

API_PAGE = _with_head(
    {
        "tags": ["documentation"],
        "summary": "This documentation (Swagger UI, served from this host)",
        "operationId": "apiDocs",
        "responses": {"200": _html("The Swagger UI page.")},
    }
)

API_REDIRECT = _with_head(
    {
        "tags": ["documentation"],
        "summary": "Redirects to /api/",
        "operationId": "apiRedirect",
        "responses": {"301": {"description": "`Location: api/`."}},
    }
)

API_DOCUMENT = _with_head(
    {
        "tags": ["documentation"],
        "summary": "This OpenAPI document",
        "operationId": "openapi",
        "responses": {
            "200": {
                "description": "OpenAPI 3.0.",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        },
    }
)

API_ASSET = _with_head(
    {
        "tags": ["documentation"],
        "summary": "A file of Swagger UI, or of the annotation history page",
        "operationId": "apiAsset",
        "responses": {
            "200": {
                "description": "The file.",
                "content": {
                    media: {"schema": {"type": "string"}}
                    for media in sorted(
                        {t.split(";")[0] for t in (SWAGGER_ASSETS | HISTORY_ASSETS).values()}
                    )
                },
            },
            "304": {"description": "The client's copy is current."},
            **_errors("404"),
        },
    }
)

HEALTH = _with_head(
    {
        "tags": ["operations"],
        "summary": "Whether this server can serve (for load balancers and orchestrators)",
        "operationId": "health",
        "responses": {
            "200": {
                "description": "Healthy.",
                "content": {"application/json": {"schema": _ref("schemas", "Health")}},
            },
            "503": {
                "description": "Unhealthy (the data root is unreadable, or the server is "
                "stopping); the body says why.",
                "content": {"application/json": {"schema": _ref("schemas", "Health")}},
            },
        },
    }
)
COMPONENTS["schemas"]["Health"] = {
    "type": "object",
    "description": "The server's state; `status` says it in one word.",
    "properties": {"status": {"type": "string", "example": "ok"}},
    "additionalProperties": True,
}

METRICS = _with_head(
    {
        "tags": ["operations"],
        "summary": "Counters and timings in the Prometheus text format",
        "operationId": "metrics",
        "responses": {
            "200": {
                "description": "Prometheus text exposition format 0.0.4.",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    }
)

PREFLIGHT: Json = {
    "tags": ["CORS"],
    "summary": "CORS preflight (answered for every path)",
    "description": (
        "Browsers send it before a cross-origin PUT, PATCH or DELETE, or a request with "
        "headers beyond the simple ones. Every other answer, errors included, carries "
        "`Access-Control-Allow-Origin` (`*` unless `--cors-origin` names origins) and "
        "`Access-Control-Expose-Headers`."
    ),
    "responses": {
        "204": {
            "description": "The methods and headers a browser may use.",
            "headers": {
                "Access-Control-Allow-Methods": {
                    "required": True,
                    "schema": {
                        "type": "string",
                        "example": "GET, HEAD, PUT, PATCH, DELETE, OPTIONS",
                    },
                },
                "Access-Control-Allow-Headers": {"schema": {"type": "string"}},
                "Access-Control-Max-Age": {"schema": {"type": "integer"}},
            },
        }
    },
}

#: The path items of the document, keyed by the Klein rule that routes them.
ROUTES: dict[str, Json] = {
    "/": INDEX,
    "/index.html": INDEX,
    "/api": API_REDIRECT,
    "/api/": API_PAGE,
    "/api/openapi.json": API_DOCUMENT,
    "/api/<asset>": {
        "parameters": [
            _path(
                "asset",
                "The file's name.",
                "swagger-ui.css",
                enum=sorted(SWAGGER_ASSETS | HISTORY_ASSETS),
            )
        ],
        **API_ASSET,
    },
    "/healthz": HEALTH,
    "/metrics": METRICS,
    "/<path:dataset>/<key>/<chunk:chunk>": {"parameters": CHUNK_PARAMETERS, **CHUNK},
    "/<path:dataset>/annotations/<block>/<annotation:name>": {
        "parameters": ANNOTATION_PARAMETERS,
        **ANNOTATION_READ,
        **ANNOTATION_WRITES,
    },
    "/<path:rest>": {"parameters": STATIC_PARAMETERS, **STATIC},
}

TAGS = [
    {"name": "images", "description": "Neuroglancer precomputed chunks decoded from TIFF files."},
    {"name": "annotations", "description": "NeuroTrALE annotation files: read, write, undo."},
    {"name": "files", "description": "The index, `info` files and other files under the root."},
    {"name": "operations", "description": "Health and metrics for operators."},
    {"name": "documentation", "description": "This page and its description."},
    {"name": "CORS", "description": "Preflights, as browsers send them."},
]

_PARAMETER = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def openapi_path(rule: str) -> str:
    """The OpenAPI path of a Klein rule: ``/<path:dataset>/info`` -> ``/{dataset}/info``."""
    return _PARAMETER.sub(r"{\1}", rule)


def _resolved(parameter: Json) -> Json:
    """A parameter itself, following a ``$ref`` into :data:`COMPONENTS`."""
    if "$ref" not in parameter:
        return parameter
    resolved: Json = COMPONENTS["parameters"][parameter["$ref"].rsplit("/", 1)[1]]
    return resolved


def openapi_document(version: str | None = None) -> Json:
    """The OpenAPI 3.0 document describing every route, with ``version`` as the API's version
    (this package's version when None)."""
    if version is None:
        version = project_version()
    paths: Json = {}
    for rule, item in ROUTES.items():
        path = openapi_path(rule)
        described = copy.deepcopy(item)
        if path == "/index.html":
            for operation in described.values():
                operation["operationId"] += "Html"
        get_id = described["get"]["operationId"]
        described["options"] = {
            **copy.deepcopy(PREFLIGHT),
            "operationId": "preflight" + get_id[:1].upper() + get_id[1:],
        }
        shared = described.pop("parameters", [])
        if shared:
            for operation in described.values():
                operation["parameters"] = shared + operation.get("parameters", [])
            # A preflight is answered for any path: its parameters are any text.
            described["options"]["parameters"] = [
                {"name": _resolved(p)["name"], "in": "path", "required": True}
                | {"schema": {"type": "string", "minLength": 1}}
                for p in shared
            ]
        paths[path] = described
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "NeuroTrALE precomputed service",
            "version": version,
            "description": (
                "Serves Neuroglancer **precomputed** image chunks decoded from TIFF files, and "
                "stores the NeuroTrALE annotation files people draw. Every answer carries CORS "
                'headers; errors are JSON `{"error": ..., "status": N}`.\n\n'
                "Try it with the demo dataset: `neurotrale-demo demo-data`, then serve "
                "`demo-data`; the examples below name its files."
            ),
        },
        "tags": TAGS,
        "paths": paths,
        "components": copy.deepcopy(COMPONENTS),
    }


@cache
def openapi_json() -> bytes:
    """:func:`openapi_document` encoded once, as ``/api/openapi.json`` serves it."""
    return json.dumps(openapi_document(), indent=1).encode("utf-8")
