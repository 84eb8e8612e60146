"""The format of an annotation file: its name, its records, and its bytes.

An annotation file is a JSON array of records (the contract's "Records" section) stored under
a name that :data:`ANNOTATION_NAME` accepts. This module is the one definition of those rules:
the file-name rule and the record types are imported from here by the routes, the OpenAPI
description and the metrics. It parses request bodies strictly, validates records, and
turns records into the canonical bytes a file holds and back. Pure Python, no disk access.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable

from neurotrale_twisted.core.errors import BadRequest, ServerError

# --- the rules ----------------------------------------------------------------------------

#: The longest annotation file name: room is left for the dot-files made beside it (lock and
#: temporary files) within the usual 255-byte name limit.
MAX_ANNOTATION_NAME = 230
#: The form of an annotation file name, as a regular expression without anchors that Python
#: and ECMA 262 (an OpenAPI ``pattern``) read alike: runs of letters, digits, ``-`` and ``_``
#: joined by single dots, ending in ``.json`` (so never ``..`` nor a leading ``.``).
ANNOTATION_NAME_FORM = r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.json"
#: The whole file-name rule without anchors: the form, at most :data:`MAX_ANNOTATION_NAME`
#: characters. The length is looked ahead to the end of the text, so it is the regex of a
#: URL converter only as the last segment of its route.
ANNOTATION_NAME_PATTERN = rf"(?=.{{1,{MAX_ANNOTATION_NAME}}}\Z){ANNOTATION_NAME_FORM}"
#: A valid annotation file name (use ``match``): :data:`ANNOTATION_NAME_PATTERN`, anchored.
ANNOTATION_NAME: re.Pattern[str] = re.compile(rf"^{ANNOTATION_NAME_PATTERN}\Z")

#: The record types (the ``type`` field), accepted in any letter case.
RECORD_TYPES = ("point", "polygon", "linestring", "line", "axis_aligned_bounding_box", "ellipsoid")
#: The coordinate field a record of a type must have (``point`` or ``points``); the types not
#: named here need neither.
REQUIRED_COORDINATES: dict[str, str] = {
    "point": "point",
    "polygon": "points",
    "linestring": "points",
}

# --- JSON ---------------------------------------------------------------------------------


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large")
    return value


def _loads(body: bytes) -> object:
    """Parse strict JSON (no NaN/Infinity, no overflowing numbers) from UTF-8 bytes.

    Raises :class:`BadRequest` with a message starting ``invalid JSON:``.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(
            f"invalid JSON: the body is not UTF-8 ({e.reason} at byte {e.start})"
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise BadRequest(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise BadRequest("invalid JSON: nested too deeply") from None
    except ValueError as e:
        raise BadRequest(f"invalid JSON: {e}") from None


def _dumps(records: list[object]) -> bytes:
    """The canonical bytes of a file holding ``records``: compact UTF-8 JSON.

    Strings holding lone surrogates (legal in JSON escapes, not encodable in UTF-8) make the
    whole file fall back to ASCII escapes, which keeps it valid JSON and loses nothing.
    Raises ``ValueError`` (NaN, infinity) or ``RecursionError`` for unstorable data.
    """
    text = json.dumps(records, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(records, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__  # pragma: no cover - json never yields anything else


def _is_finite_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        try:
            float(value)  # a JavaScript reader turns an int past the float range into Infinity
        except OverflowError:
            return False
        return True
    return isinstance(value, float) and math.isfinite(value)


def _is_triple(value: object) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(_is_finite_number(v) for v in value)


def quoted(text: str, limit: int = 80) -> str:
    """``text`` as a message shows it: JSON-quoted, cut after ``limit`` characters."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return json.dumps(text, ensure_ascii=False)


# --- records ------------------------------------------------------------------------------


def _check_record(record: object, label: str) -> dict[str, object]:
    """Check one record against the contract's rules; ``label`` names it in messages.

    Raises :class:`BadRequest` naming the record, its id and the field.
    """
    if not isinstance(record, dict):
        raise BadRequest(f"{label}: must be an object, got {_json_kind(record)}")
    rid = record.get("id")
    where = f"{label} (id {quoted(rid)})" if isinstance(rid, str) and rid else label

    def fail(field: str, problem: str) -> BadRequest:
        return BadRequest(f'{where}: field "{field}" {problem}')

    for field in ("id", "type"):
        if field not in record:
            raise fail(field, "is required")
    for field, value in record.items():
        if value is None and field in _VIEWER_FIELDS:
            raise fail(field, "may not be null")
    if not isinstance(rid, str) or rid == "":
        raise fail("id", f"must be a non-empty string, got {_json_kind(rid)}")

    kind = record["type"]
    if not isinstance(kind, str) or kind.lower() not in RECORD_TYPES:
        got = quoted(kind) if isinstance(kind, str) else _json_kind(kind)
        raise fail("type", f"must be one of {', '.join(RECORD_TYPES)} (any letter case), got {got}")
    kind = kind.lower()
    required = REQUIRED_COORDINATES.get(kind)

    if "point" in record:
        if not _is_triple(record["point"]):
            raise fail("point", "must be three finite numbers")
    elif required == "point":
        raise fail("point", f"is required for type {quoted(kind)}")

    if "points" in record:
        points = record["points"]
        if not isinstance(points, list):
            raise fail("points", f"must be an array of points, got {_json_kind(points)}")
        for i, point in enumerate(points):
            if not _is_triple(point):
                raise BadRequest(f'{where}: field "points"[{i}] must be three finite numbers')
    elif required == "points":
        raise fail("points", f"is required for type {quoted(kind)}")

    for field, check, what in _OPTIONAL_FIELDS:
        if field in record and not check(record[field]):
            raise fail(field, f"must be {what}, got {_json_kind(record[field])}")

    segments = record.get("segments")
    if isinstance(segments, list):
        for i, segment in enumerate(segments):
            if not isinstance(segment, str):
                raise BadRequest(
                    f'{where}: field "segments"[{i}] must be a string, got {_json_kind(segment)}'
                )
    return record


_OPTIONAL_FIELDS: tuple[tuple[str, Callable[[object], bool], str], ...] = (
    ("anntype", lambda v: isinstance(v, str), "a string"),
    ("reviewed", lambda v: isinstance(v, bool), "a boolean"),
    ("visited", lambda v: isinstance(v, bool), "a boolean"),
    ("length", _is_finite_number, "a number"),
    ("description", lambda v: isinstance(v, str), "a string"),
    ("segments", lambda v: isinstance(v, list), "an array of strings"),
)

#: Fields the viewer reads: none of them may be null.
_VIEWER_FIELDS = frozenset({"id", "type", "point", "points"} | {f[0] for f in _OPTIONAL_FIELDS})


def validate_records(data: object) -> list[dict[str, object]]:
    """Check that ``data`` (parsed JSON) is a valid annotation file: an array of records.

    Every element must be an object with a non-empty string ``id`` unique in the array, a
    known ``type``, well-formed coordinates and no null in a field the viewer reads. Returns
    the records themselves (unknown fields untouched). Raises :class:`BadRequest` with a
    message naming the record by index and id, and the field.
    """
    if not isinstance(data, list):
        raise BadRequest(
            f"an annotation file must be a JSON array of records, got {_json_kind(data)}"
        )
    seen: dict[str, int] = {}
    records: list[dict[str, object]] = []
    for index, item in enumerate(data):
        record = _check_record(item, f"record {index}")
        rid = record["id"]
        assert isinstance(rid, str)
        if rid in seen:
            raise BadRequest(
                f'record {index} (id {quoted(rid)}): field "id" is not unique '
                f"(record {seen[rid]} has the same id)"
            )
        seen[rid] = index
        records.append(record)
    return records


def parse_records(body: bytes) -> list[dict[str, object]]:
    """Parse a request body (UTF-8 JSON) into validated records.

    Raises :class:`BadRequest`: ``invalid JSON: ...`` with line and column for bad JSON,
    else the message of :func:`validate_records`.
    """
    return validate_records(_loads(body))


def parse_patch(body: bytes, record_id: str | None) -> tuple[dict[str, object], str]:
    """The record of a PATCH body and the id it acts on. Raises :class:`BadRequest`."""
    if record_id is not None and record_id == "":
        raise BadRequest("the id parameter may not be empty")
    data = _loads(body)
    if not isinstance(data, dict):
        raise BadRequest(f"a PATCH body must be one record (a JSON object), got {_json_kind(data)}")
    if "id" not in data:
        if record_id is None:
            raise BadRequest('the record to PATCH needs an id: give ?id= or an "id" field')
        data["id"] = record_id
    record = _check_record(data, "record")
    rid = record["id"]
    assert isinstance(rid, str)
    if record_id is not None and rid != record_id:
        raise BadRequest(
            f"the id parameter {quoted(record_id)} differs from the record's id {quoted(rid)}"
        )
    return record, rid


# --- a file's bytes -----------------------------------------------------------------------


def serialise(records: list[dict[str, object]] | list[object]) -> bytes:
    """The canonical bytes of a file holding ``records``.

    Raises :class:`BadRequest` when they cannot be stored as JSON (NaN, nested too deeply).
    """
    try:
        return _dumps(list(records))
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"the records cannot be stored as JSON: {e}") from None


def stored_records(where: str, content: bytes) -> list[object]:
    """The elements of the array a stored file holds; an empty file counts as no records.

    ``where`` names the file in messages. Raises :class:`ServerError` when the file is not a
    JSON array: it is kept as it is.
    """
    if not content.strip():
        return []
    try:
        data = _loads(content)
    except BadRequest as e:
        raise ServerError(f"{where} holds {e.message}; PUT a whole new file") from None
    if not isinstance(data, list):
        raise ServerError(f"{where} is not a JSON array; PUT a whole new file")
    return data


def count_records(content: bytes) -> int:
    """How many records a stored content holds; 0 when it is not a JSON array."""
    try:
        data = json.loads(content)
    except (ValueError, RecursionError):
        return 0
    return len(data) if isinstance(data, list) else 0
