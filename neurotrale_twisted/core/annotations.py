"""Annotation files: block resolution, record validation, and the store that writes them.

An annotation file is ``{dataset}/annotations/{blockdir}/{name}.json``, a JSON array of
records (see the contract's "Annotations" section). This module is pure Python and blocking:
the web layer calls it from a thread pool.

Safety rules every write follows, because losing an annotation is the worst thing this
server can do:

* everything is validated before anything on disk is touched, so a refused write leaves the
  file byte-identical and creates nothing (no directory, lock file or version);
* every access walks from the data root's directory handle without following links
  (:mod:`.rootfs`), and is made relative to the handles walked: a directory swapped for a
  link during a write makes it fail, never reach outside the root;
* a write commits by linking a complete, fsynced temporary as the next entry of the file's
  log, then renames it over the file (:mod:`.commitlog`, ``docs/commit-protocol.md``): that
  holds between hosts whose ``fcntl`` locks are not shared; the same-host lock only makes
  lost races rare;
* the replaced contents become numbered versions in ``{blockdir}/.versions/{name}/`` after
  the fact: a failed write leaves no version and evicts nothing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import random
import re
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from neurotrale_twisted.core.commitlog import (
    MAX_ATTEMPTS,
    History,
    LostRace,
    State,
    open_child,
    read_whole,
    remove_old_temporaries,
    same_host_lock,
)
from neurotrale_twisted.core.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    PreconditionFailed,
    ServerError,
    StorageFull,
    Unavailable,
)
from neurotrale_twisted.core.paths import DataRoot, clean_segments
from neurotrale_twisted.core.rootfs import Directory

log = logging.getLogger(__name__)

__all__ = [
    "ANNOTATION_NAME",
    "AnnotationStore",
    "StoredFile",
    "WriteResult",
    "etag_of",
    "parse_records",
    "validate_records",
]

#: A valid annotation file name: letters, digits, ``-``, ``_`` and ``.``, ending in ``.json``,
#: never ``..`` nor a leading ``.``. The length cap leaves room for the dot-files made beside
#: it (lock and temporary files) within the usual 255-byte name limit.
ANNOTATION_NAME: re.Pattern[str] = re.compile(r"^(?!\.)(?!.*\.\.)[A-Za-z0-9_.-]{1,225}\.json\Z")

#: The block name the viewer builds from a point: ``x{X}y{Y}z{Z}``, voxel coordinates.
_BLOCK_POINT = re.compile(r"^x(-?[0-9]+)y(-?[0-9]+)z(-?[0-9]+)\Z")
#: A block directory named the legacy way: ``x{i+1:04d}_y{j+1:04d}``.
_LEGACY_BLOCK = re.compile(r"^x[0-9]{4}_y[0-9]{4}\Z")

_TYPES = ("point", "polygon", "linestring", "line", "axis_aligned_bounding_box", "ellipsoid")
_NEEDS_POINTS = frozenset({"polygon", "linestring"})


@dataclass(frozen=True)
class StoredFile:
    """The content of an annotation file (or of one of its versions) as read from disk."""

    content: bytes
    #: Strong ETag with its quotes: ``"<first 32 hex digits of the content's SHA-256>"``.
    etag: str
    #: ``st_mtime`` of the file.
    modified: float


@dataclass(frozen=True)
class WriteResult:
    """What a successful write did, for the web layer to answer with."""

    #: The file's name, e.g. ``fibers.json``.
    filename: str
    #: The ETag of the content now stored.
    etag: str
    #: True when the file did not exist before this write.
    created: bool
    #: Number of records in the file after the write.
    count: int
    #: For PATCH and DELETE, the id acted on; None for PUT.
    record_id: str | None


def etag_of(content: bytes) -> str:
    """The strong ETag (with its quotes) of a file holding ``content``."""
    return '"' + hashlib.sha256(content).hexdigest()[:32] + '"'


# --- JSON and records ------------------------------------------------------------------


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


def _quoted(text: str, limit: int = 80) -> str:
    if len(text) > limit:
        text = text[:limit] + "..."
    return json.dumps(text, ensure_ascii=False)


def _check_record(record: object, label: str) -> dict[str, object]:
    """Check one record against the contract's rules; ``label`` names it in messages.

    Raises :class:`BadRequest` naming the record, its id and the field.
    """
    if not isinstance(record, dict):
        raise BadRequest(f"{label}: must be an object, got {_json_kind(record)}")
    rid = record.get("id")
    where = f"{label} (id {_quoted(rid)})" if isinstance(rid, str) and rid else label

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
    if not isinstance(kind, str) or kind.lower() not in _TYPES:
        got = _quoted(kind) if isinstance(kind, str) else _json_kind(kind)
        raise fail("type", f"must be one of {', '.join(_TYPES)} (any letter case), got {got}")
    kind = kind.lower()

    if "point" in record:
        if not _is_triple(record["point"]):
            raise fail("point", "must be three finite numbers")
    elif kind == "point":
        raise fail("point", 'is required for type "point"')

    if "points" in record:
        points = record["points"]
        if not isinstance(points, list):
            raise fail("points", f"must be an array of points, got {_json_kind(points)}")
        for i, point in enumerate(points):
            if not _is_triple(point):
                raise BadRequest(f'{where}: field "points"[{i}] must be three finite numbers')
    elif kind in _NEEDS_POINTS:
        raise fail("points", f"is required for type {_quoted(kind)}")

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
                f'record {index} (id {_quoted(rid)}): field "id" is not unique '
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


def _parse_patch(body: bytes, record_id: str | None) -> tuple[dict[str, object], str]:
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
            f"the id parameter {_quoted(record_id)} differs from the record's id {_quoted(rid)}"
        )
    return record, rid


# --- If-Match ---------------------------------------------------------------------------


def _if_match_allows(if_match: str, current: bytes | None) -> bool:
    """Whether an ``If-Match`` header value lets a write to a file holding ``current`` go on.

    Uses the strong comparison: a weak tag never matches, and nothing matches a missing file.
    """
    if current is None:
        return False
    etag = etag_of(current)
    for token in if_match.split(","):
        token = token.strip()
        if token == "*" or token == etag:
            return True
    return False


def _count_records(content: bytes) -> int:
    try:
        data = json.loads(content)
    except (ValueError, RecursionError):
        return 0
    return len(data) if isinstance(data, list) else 0


def _iso(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- the store --------------------------------------------------------------------------


class AnnotationStore:
    """Annotation files of the datasets under a :class:`DataRoot`: find, read, write, undo.

    Safe for any number of threads, worker processes and hosts sharing the files (see
    ``docs/commit-protocol.md``). Paths given to and returned by it are names only: every
    access walks from the data root's handle (:mod:`.rootfs`), never following a link for a
    write. ``keep_versions`` is how many replaced contents are kept per file (0 keeps none);
    ``on_retry`` is told of each commit lost to another writer (for the metrics).
    Raises ``ValueError`` for a negative ``keep_versions``.
    """

    def __init__(
        self,
        root: DataRoot,
        keep_versions: int = 20,
        on_retry: Callable[[], None] | None = None,
    ) -> None:
        if keep_versions < 0:
            raise ValueError("keep_versions may not be negative")
        self.root = root
        self.keep_versions = keep_versions
        #: Told each time a commit is lost to another writer and re-applied (for the metrics).
        self.on_retry = on_retry

    # -- names and walking ----------------------------------------------------------------

    def _segments(self, path: Path, *, for_write: bool) -> list[str]:
        """``path``'s components below the data root, found lexically (no disk access)."""
        try:
            parts = list(path.relative_to(self.root.root).parts)
        except ValueError:
            if for_write:
                raise Forbidden("writes may not leave the data root") from None
            raise NotFound("not found") from None
        if any(p in ("", ".", "..") or "\x00" in p for p in parts):
            raise BadRequest("bad path")
        return parts

    def _file_parts(self, path: Path, *, for_write: bool) -> tuple[list[str], str, str]:
        """(dataset segments, block directory, file name) of an annotation file's path."""
        parts = self._segments(path, for_write=for_write)
        if len(parts) < 4 or parts[-3] != "annotations":
            raise BadRequest("not the path of an annotation file")
        if not ANNOTATION_NAME.match(parts[-1]):
            raise BadRequest(f"bad annotation file name {_quoted(parts[-1])}")
        return parts[:-3], parts[-2], parts[-1]

    def _enter(self, parent: Directory, name: str, *, for_write: bool) -> Directory | None:
        """Subdirectory ``name`` of ``parent`` or None; a read follows a link if allowed.

        For writes a link is :class:`Forbidden` and a non-directory :class:`ServerError`.
        """
        if not for_write:
            try:
                return parent.subdir(name, follow=self.root.fs.read_follow)
            except NotFound:
                return None
        return open_child(parent, name, create=False, for_write=for_write)

    def _open_dataset(self, segments: list[str], *, for_write: bool) -> Directory:
        """The dataset directory, walked from the root; :class:`NotFound` without ``info``."""
        where = "/".join(segments)
        current = self.root.fs.root()
        try:
            for name in segments:
                child = self._enter(current, name, for_write=for_write)
                current.close()
                if child is None:
                    raise NotFound(f"no dataset with an info file at {where!r}")
                current = child
            if not self._has_info(current, for_write=for_write):
                raise NotFound(f"no dataset with an info file at {where!r}")
        except BaseException:
            current.close()
            raise
        return current

    def _has_info(self, dataset: Directory, *, for_write: bool) -> bool:
        status = dataset.stat("info", follow=False if for_write else self.root.fs.read_follow)
        return status is not None and stat.S_ISREG(status.st_mode)

    def _open_block_for_read(self, segments: list[str], block: str) -> Directory:
        """The block directory for a read (links followed where the operator allows)."""
        return self.root.fs.open_dir([*segments, "annotations", block])

    def _check_place(self, segments: list[str], block: str, held: Directory) -> None:
        """Raise :class:`NotFound` unless the root still leads to ``held`` through the path.

        Run just before a commit: a dataset moved away (or whose ``info`` is gone), or an
        ``annotations`` or block directory swapped since the write began, fails the write.
        """
        gone = NotFound(f"{held.relative} was moved or replaced during the write")
        try:
            with self._open_dataset(segments, for_write=True) as dataset:
                annotations = open_child(dataset, "annotations", create=False, for_write=True)
                if annotations is None:
                    raise gone
                with annotations:
                    current = open_child(annotations, block, create=False, for_write=True)
                    if current is None:
                        raise gone
                    with current:
                        if current.identity() != held.identity():
                            raise gone
        except (NotFound, Forbidden, ServerError):
            raise gone from None

    @contextlib.contextmanager
    def _disk_errors(self, where: str) -> Iterator[None]:
        """Turn an ``OSError`` into :class:`StorageFull` (507) or :class:`ServerError` (500).

        The client's message names ``where`` (relative to the data root), never an absolute
        path; the log gets the absolute one and the system's message.
        """
        try:
            yield
        except OSError as e:
            detail = f"{os.path.join(self.root.root, where)}: {e!r}"
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(
                    f"no space left to write {where} (the disk is full or over quota); "
                    "nothing was changed",
                    detail=detail,
                ) from e
            raise ServerError(f"cannot access {where}: {e.strerror or e}", detail=detail) from e

    # -- finding the file -----------------------------------------------------------------

    def locate(self, dataset: Path, block: str, name: str, *, for_write: bool) -> Path:
        """The path of annotation file ``name`` of URL block ``block`` in ``dataset``.

        Follows the contract's block resolution: an existing ``annotations/{block}``
        directory; else the block of ``block_info.csv`` that holds the point, under either
        naming; else, for writes only, a directory for the write to create, named as the
        dataset already names its blocks. Nothing is created here. The path is a name: the
        reads and writes that take it walk from the data root again.

        Raises :class:`BadRequest` for a bad file or block name, or (writes) a point outside
        the volume or a block name that is not ``x{X}y{Y}z{Z}``; :class:`NotFound` (reads)
        when no directory matches, and for reads and writes alike when ``dataset`` is no
        dataset (has no ``info`` file); :class:`Forbidden` (writes) when a path would pass
        through a link; :class:`ServerError` when ``block_info.csv`` or ``info`` is unreadable.
        """
        segments = self._segments(dataset, for_write=for_write)
        with (
            self._disk_errors("/".join(segments)),
            self._open_dataset(segments, for_write=for_write) as directory,
        ):
            if not ANNOTATION_NAME.match(name):
                raise BadRequest(
                    f"bad annotation file name {_quoted(name)}: use letters, digits, '-', '_' and "
                    "'.', ending in '.json'"
                )
            if clean_segments([block]) != [block]:
                raise BadRequest(f"bad block name {_quoted(block)}")
            dirname = self._block_dirname(directory, block, for_write=for_write)
            return dataset / "annotations" / dirname / name

    def _block_dirname(self, dataset: Directory, block: str, *, for_write: bool) -> str:
        annotations = self._enter(dataset, "annotations", for_write=for_write)
        try:
            if annotations is not None and self._is_block(annotations, block, for_write):
                return block
            size = self._block_size(annotations) if annotations is not None else None
            match = _BLOCK_POINT.match(block)
            point = (int(match[1]), int(match[2]), int(match[3])) if match else None
            index: tuple[int, int, int] | None = None
            if size is not None and point is not None:
                # A point outside the volume names no block, even one whose directory exists.
                try:
                    self._check_inside(dataset, point)
                except BadRequest as e:
                    raise e if for_write else NotFound(e.message) from None
                index = (point[0] // size[0], point[1] // size[1], point[2] // size[2])
                assert annotations is not None
                for candidate in (_block_dir_name(index), _legacy_dir_name(index)):
                    if self._is_block(annotations, candidate, for_write):
                        return candidate

            if not for_write:
                raise NotFound(f"no annotation block {block} in this dataset")
            if point is None:
                raise BadRequest(
                    f"block {_quoted(block)} does not exist and is not x{{X}}y{{Y}}z{{Z}}"
                )
            if index is None:  # with a block size, the point was checked above
                self._check_inside(dataset, point)
                if block != _block_dir_name(point):
                    raise BadRequest(
                        f"block {_quoted(block)} does not exist; write it as "
                        f"{_block_dir_name(point)} (no leading zeros)"
                    )
                return block
            assert annotations is not None
            legacy = self._uses_legacy_names(annotations)
            return _legacy_dir_name(index) if legacy else _block_dir_name(index)
        finally:
            if annotations is not None:
                annotations.close()

    def _is_block(self, annotations: Directory, name: str, for_write: bool) -> bool:
        directory = self._enter(annotations, name, for_write=for_write)
        if directory is None:
            return False
        directory.close()
        return True

    def _block_size(self, annotations: Directory) -> tuple[int, int, int] | None:
        """The block size of ``annotations/block_info.csv``, read afresh; None without one.

        Tolerates a header line, blank lines, whitespace and ``#`` comments. Raises
        :class:`ServerError` when the file exists but gives no block size.
        """
        try:
            raw, _ = annotations.read_file("block_info.csv", follow=self.root.fs.read_follow)
        except NotFound:
            return None
        for line in raw.decode("utf-8", "replace").splitlines():
            line = line.strip().lstrip("\ufeff")
            if not line or line.startswith("#"):
                continue
            parts = [p for p in re.split(r"[,;\s]+", line) if p]
            if len(parts) != 3:
                continue
            try:
                numbers = [float(p) for p in parts]
            except ValueError:
                continue  # a header line
            if all(math.isfinite(n) and n >= 1 and n == int(n) for n in numbers):
                return int(numbers[0]), int(numbers[1]), int(numbers[2])
        csv = annotations.child_path("block_info.csv")
        raise ServerError(f"{csv} does not give a block size 'sx,sy,sz'")

    def _check_inside(self, dataset: Directory, point: tuple[int, int, int]) -> None:
        """Raise :class:`BadRequest` unless ``point`` lies in the volume of ``info``."""
        try:
            raw, _ = dataset.read_file("info", follow=self.root.fs.read_follow)
            size = json.loads(raw)["scales"][0]["size"]
            bounds = (int(size[0]), int(size[1]), int(size[2]))
        except (NotFound, OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise ServerError(
                f"{dataset.child_path('info')} gives no volume size (scales[0].size)"
            ) from e
        if any(not 0 <= p < s for p, s in zip(point, bounds, strict=True)):
            raise BadRequest(
                f"point ({point[0]}, {point[1]}, {point[2]}) is outside the volume "
                f"(size {bounds[0]} x {bounds[1]} x {bounds[2]})"
            )

    @staticmethod
    def _uses_legacy_names(annotations: Directory) -> bool:
        return any(
            _LEGACY_BLOCK.match(e.name) and e.is_dir(follow_symlinks=False)
            for e in annotations.entries()
        )

    # -- reading --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _history_for_read(self, path: Path) -> Iterator[tuple[History, State]]:
        segments, block, name = self._file_parts(path, for_write=False)
        where = "/".join([*segments, "annotations", block, name])
        with (
            self._disk_errors(where),
            self._open_block_for_read(segments, block) as directory,
            History(
                directory,
                name,
                self.keep_versions,
                for_write=False,
                follow=self.root.fs.read_follow,
            ) as history,
        ):
            yield history, history.state()

    def read(self, path: Path) -> StoredFile:
        """The current content of annotation file ``path``, with its ETag and mtime.

        The current content is the newest commit when the file on disk lags behind it (a
        writer died between committing and publishing). Raises :class:`NotFound` when it is
        missing (or not a regular file, or out of bounds).
        """
        with self._history_for_read(path) as (_, state):
            if state.content is None:
                raise NotFound(f"{path.name} does not exist")
            return StoredFile(state.content, etag_of(state.content), state.modified)

    @staticmethod
    def _listing_limit(state: State) -> int:
        # Versions are the entries older than the current content: the head, unless the file
        # on disk is an edit not yet in the log (then the head was replaced by it too).
        return state.next if state.kind == "foreign" else state.head

    def versions(self, path: Path) -> list[dict[str, object]]:
        """The kept versions of ``path``, newest first.

        Each is ``{"version": N, "modified": ISO 8601 UTC time, "size": bytes, "count":
        records}``. Raises :class:`NotFound` when the file has no versions and does not exist.
        """
        with self._history_for_read(path) as (history, state):
            found: list[dict[str, object]] = []
            for number, opened in history.listed(self._listing_limit(state)):
                with opened:
                    content = read_whole(opened)
                if content is None:
                    continue  # trimmed by another writer meanwhile
                found.append(
                    {
                        "version": number,
                        "modified": _iso(opened.status.st_mtime),
                        "size": len(content),
                        "count": _count_records(content),
                    }
                )
            if not found and state.content is None:
                raise NotFound(f"{path.name} does not exist")
            return found

    def read_version(self, path: Path, version: int) -> StoredFile:
        """The content of version ``version`` of ``path``. Raises :class:`NotFound` if gone."""
        if not 1 <= version < 10**18:
            raise NotFound(f"{path.name} has no version {version}")
        with self._history_for_read(path) as (history, state):
            chosen: StoredFile | None = None
            for number, opened in history.listed(self._listing_limit(state)):
                with opened:
                    content = read_whole(opened) if number == version else None
                    if content is not None:
                        chosen = StoredFile(content, etag_of(content), opened.status.st_mtime)
            if chosen is None:
                raise NotFound(f"{path.name} has no version {version}")
            return chosen

    # -- writing --------------------------------------------------------------------------

    def put(self, path: Path, body: bytes, if_match: str | None = None) -> WriteResult:
        """Replace the file with the records of ``body`` (a JSON array), creating it if needed.

        The records are stored re-serialised as compact UTF-8 JSON. Raises
        :class:`BadRequest` for an invalid body, :class:`PreconditionFailed` when
        ``if_match`` does not match, :class:`Forbidden` when the path passes through a link.
        """
        records = parse_records(body)
        content = self._serialise(records)

        def change(old: bytes | None) -> tuple[bytes, int]:
            return content, len(records)

        return self._write(path, if_match, change, record_id=None, must_exist=False)

    def patch(
        self, path: Path, body: bytes, record_id: str | None, if_match: str | None = None
    ) -> WriteResult:
        """Replace the record with the id in place, or append it; create the file if missing.

        The id is ``record_id`` (the ``?id=`` parameter) or else the body's ``id``; the body
        is one record. Raises :class:`BadRequest` for an invalid body, no id or two different
        ids, :class:`PreconditionFailed` when ``if_match`` does not match,
        :class:`Forbidden` when the path passes through a link, and :class:`ServerError` when
        the stored file is not a JSON array.
        """
        record, rid = _parse_patch(body, record_id)
        self._serialise([record])  # refuse an unstorable record before touching anything
        where = path.name

        def change(old: bytes | None) -> tuple[bytes, int]:
            records = self._stored_records(where, old) if old is not None else []
            for i, existing in enumerate(records):
                if isinstance(existing, dict) and existing.get("id") == rid:
                    records[i] = record
                    break
            else:
                records.append(record)
            return self._serialise(records), len(records)

        return self._write(path, if_match, change, record_id=rid, must_exist=False)

    def delete(self, path: Path, record_id: str | None, if_match: str | None = None) -> WriteResult:
        """Remove the record with id ``record_id`` from the file (the old file is kept).

        Raises :class:`BadRequest` without an id, :class:`NotFound` when the file or the
        record is missing, :class:`PreconditionFailed` when ``if_match`` does not match,
        :class:`ServerError` when the stored file is not a JSON array.
        """
        if record_id is None or record_id == "":
            raise BadRequest("DELETE needs the id of the record to remove (?id=)")
        rid = record_id
        where = path.name

        def change(old: bytes | None) -> tuple[bytes, int]:
            if old is None:
                raise NotFound(f"{path.name} does not exist")
            records = self._stored_records(where, old)
            kept = [r for r in records if not (isinstance(r, dict) and r.get("id") == rid)]
            if len(kept) == len(records):
                raise NotFound(f"{path.name} has no record with id {_quoted(rid)}")
            return self._serialise(kept), len(kept)

        return self._write(path, if_match, change, record_id=rid, must_exist=True)

    def _write(
        self,
        path: Path,
        if_match: str | None,
        change: Callable[[bytes | None], tuple[bytes, int]],
        *,
        record_id: str | None,
        must_exist: bool,
    ) -> WriteResult:
        """The read-modify-commit shared by every write (``docs/commit-protocol.md``).

        ``change`` gets the current content (None when the file is missing) and returns the
        new content and its record count; it runs again after each lost race.
        """
        segments, block, name = self._file_parts(path, for_write=True)
        where = "/".join([*segments, "annotations", block, name])
        with self._disk_errors(where), self._open_dataset(segments, for_write=True) as dataset:
            annotations = open_child(dataset, "annotations", create=False, for_write=True)
            directory = (
                open_child(annotations, block, create=False, for_write=True)
                if annotations is not None
                else None
            )
            try:
                if directory is None or directory.lstat(name) is None:
                    # Refusals decidable now come first, so that they create nothing.
                    self._refuse_missing(directory, name, if_match, must_exist)
                if directory is None:
                    if not self._has_info(dataset, for_write=True):
                        raise NotFound(f"no dataset with an info file at {'/'.join(segments)!r}")
                    if annotations is None:
                        annotations = open_child(
                            dataset, "annotations", create=True, for_write=True
                        )
                    assert annotations is not None
                    directory = open_child(annotations, block, create=True, for_write=True)
                assert directory is not None
                return self._commit(
                    segments, block, directory, name, if_match, change, record_id, must_exist
                )
            finally:
                for handle in (directory, annotations):
                    if handle is not None:
                        handle.close()

    def _refuse_missing(
        self, directory: Directory | None, name: str, if_match: str | None, must_exist: bool
    ) -> None:
        """Refuse a DELETE or an ``If-Match`` write of a file that does not exist."""
        if not (must_exist or if_match is not None):
            return
        if directory is not None:
            with History(directory, name, self.keep_versions, for_write=True) as history:
                if history.state().content is not None:
                    return  # committed, not yet published
        if must_exist:
            raise NotFound(f"{name} does not exist")
        raise PreconditionFailed(f"If-Match given but {name} does not exist")

    def _commit(
        self,
        segments: list[str],
        block: str,
        directory: Directory,
        name: str,
        if_match: str | None,
        change: Callable[[bytes | None], tuple[bytes, int]],
        record_id: str | None,
        must_exist: bool,
    ) -> WriteResult:
        def check_place() -> None:
            self._check_place(segments, block, directory)

        with (
            same_host_lock(directory, name),
            History(directory, name, self.keep_versions, for_write=True) as history,
        ):
            history.remove_stale_temporaries(time.time())
            for attempt in range(MAX_ATTEMPTS):
                state = history.state()
                if state.content is None and must_exist:
                    raise NotFound(f"{name} does not exist")
                if if_match is not None and not _if_match_allows(if_match, state.content):
                    raise PreconditionFailed(f"{name} has changed (If-Match does not match)")
                new, count = change(state.content)
                etag = etag_of(new)
                if new == state.content:
                    if state.kind == "behind":
                        self._finish(history, partial(history.repair, state.head), state.head)
                    return WriteResult(name, etag, False, count, record_id)
                number = state.next
                history.keep_modified(state)
                try:
                    if state.kind == "foreign":
                        # An edit made on disk is kept as an entry (and a version) first.
                        assert state.content is not None
                        history.commit(state.content, number, check_place)
                        number += 1
                    history.commit(new, number, check_place)
                except LostRace:
                    if self.on_retry is not None:
                        self.on_retry()
                    if attempt >= 2:
                        time.sleep(random.uniform(0, 0.002 * min(attempt, 25)))
                    continue
                self._finish(history, partial(history.publish, new, number), number)
                return WriteResult(name, etag, state.content is None, count, record_id)
        raise Unavailable(
            f"{name} is being written by many clients at once; try again",
        )

    @staticmethod
    def _finish(history: History, publish: Callable[[], int], number: int) -> None:
        """Publish a commit and update the versions; the commit stands whatever fails here.

        Readers and the next writer serve and republish the newest commit, so a failure
        to publish is logged and the write is still acknowledged.
        """
        try:
            published = publish()
        except OSError as e:
            log.warning(
                "%s: committed %d but could not publish it yet: %r",
                history.block.child_path(history.name),
                number,
                e,
            )
            published = number
        history.after_commit(max(number, published))

    @staticmethod
    def _stored_records(where: str, content: bytes) -> list[object]:
        """The elements of the stored array; an empty file counts as no records.

        Raises :class:`ServerError` when the file is not a JSON array: it is kept as it is.
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

    @staticmethod
    def _serialise(records: list[dict[str, object]] | list[object]) -> bytes:
        try:
            return _dumps(list(records))
        except (ValueError, RecursionError) as e:
            raise BadRequest(f"the records cannot be stored as JSON: {e}") from None


def _block_dir_name(index: tuple[int, int, int]) -> str:
    return f"x{index[0]}y{index[1]}z{index[2]}"


def _legacy_dir_name(index: tuple[int, int, int]) -> str:
    return f"x{index[0] + 1:04d}_y{index[1] + 1:04d}"


def remove_stale_temporaries(root: DataRoot, dataset: str, older_than: float, now: float) -> int:
    """Remove the temporary files that writers which died left under a dataset's annotations.

    Run at start-up: a temporary file older than ``older_than`` seconds belongs to no live
    writer (a write takes milliseconds), so removing it is safe even while another server
    shares the directory. Lock files stay. ``dataset`` is the dataset's ``/``-separated path
    relative to the root; links are never followed. Returns the number of files removed.
    """
    try:
        top = root.fs.open_dir([*dataset.split("/"), "annotations"], for_write=True)
    except (NotFound, OSError):
        return 0
    with top:
        return remove_old_temporaries(top, older_than, now)
