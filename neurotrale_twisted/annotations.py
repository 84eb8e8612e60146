"""Annotation files: block resolution, record validation, locked atomic writes, versions.

An annotation file is ``{dataset}/annotations/{blockdir}/{name}.json``, a JSON array of
records (see the contract's "Annotations" section). This module is pure Python and blocking:
the web layer calls it from a thread pool.

Safety rules every write follows, because losing an annotation is the worst thing this
server can do:

* everything is validated before anything on disk is touched, so a refused write leaves the
  file byte-identical and creates nothing (no directory, lock file or version);
* writes to one file are serialised across threads (a :class:`threading.Lock` per file) and
  across processes (``fcntl.lockf`` on a dot lock file beside it), for the whole
  read-modify-write;
* the new content goes to a temporary dot-file in the same directory, is fsynced, renamed
  over the file and the directory is fsynced, so readers see the old file or the new one;
* the replaced content is kept as a numbered version in ``{blockdir}/.versions/{name}/``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import BadRequest, NotFound, PreconditionFailed, ServerError
from .paths import DataRoot, clean_segments

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
#: A kept version inside ``.versions/{name}/``.
_VERSION_FILE = re.compile(r"^([1-9][0-9]*)\.json\Z")

_VERSIONS_DIR = ".versions"
_TMP_MARK = ".tmp-"

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


# --- locking ----------------------------------------------------------------------------


class _FileLock:
    """A thread lock for one file, with the number of threads using or waiting for it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


_registry_guard = threading.Lock()
_file_locks: dict[str, _FileLock] = {}


def _reset_after_fork() -> None:
    # A forked child has only the forking thread: locks held by the parent's other threads
    # would never be released there.
    global _registry_guard, _file_locks
    _registry_guard = threading.Lock()
    _file_locks = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


@contextlib.contextmanager
def _thread_lock(key: str) -> Iterator[None]:
    """Hold the process-wide thread lock of ``key``; entries vanish when unused."""
    with _registry_guard:
        entry = _file_locks.get(key)
        if entry is None:
            entry = _file_locks[key] = _FileLock()
        entry.users += 1
    try:
        with entry.lock:
            yield
    finally:
        with _registry_guard:
            entry.users -= 1
            if entry.users == 0:
                del _file_locks[key]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold the exclusive lock of annotation file ``path`` against threads and processes.

    POSIX record locks belong to the process, not the thread, and closing any descriptor of
    the lock file drops them; the thread lock, keyed by the resolved path, comes first so
    that only one thread of this process ever has the lock file open.
    """
    key = os.path.join(os.path.realpath(path.parent), path.name)
    with _thread_lock(key):
        lock_path = path.parent / f".{path.name}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


# --- small file-system helpers ----------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    """Make a directory's entries (a rename, a new name) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some file systems cannot fsync a directory; the rename is still atomic there.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _write_new(path: Path, content: bytes, mode: int | None) -> None:
    """Atomically replace ``path`` with ``content`` (temporary dot-file, fsync, rename).

    ``mode`` is the permission bits to give the file (those of the file it replaces), or
    None for the default. The caller holds the file's lock, so no other temporary file of
    this name is live. Raises ``OSError`` and leaves ``path`` as it was on failure.
    """
    tmp = _temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _temporary_name(target: Path) -> Path:
    """A fresh name for a temporary file that will be renamed to ``target``."""
    return target.parent / f".{target.name}{_TMP_MARK}{secrets.token_hex(8)}"


def _temporaries_of(name: str) -> re.Pattern[str]:
    """The names :func:`_temporary_name` gives for ``name``, and those of no other name."""
    return re.compile(r"\." + re.escape(name) + re.escape(_TMP_MARK) + r"[0-9a-f]{16}\Z")


#: Every temporary file inside a versions directory.
_VERSION_TEMPORARY = re.compile(r"\..*" + re.escape(_TMP_MARK) + r"[0-9a-f]{16}\Z")


def _remove_stale_temporaries(directory: Path, pattern: re.Pattern[str]) -> None:
    """Remove the temporary files matching ``pattern`` that a writer that died left behind.

    Called with the file's lock held: no live writer has such a file then.
    """
    try:
        with os.scandir(directory) as entries:
            stale = [e.path for e in entries if e.name.startswith(".") and pattern.match(e.name)]
    except FileNotFoundError:
        return
    for name in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def _read_bytes(path: Path) -> tuple[bytes, os.stat_result]:
    """The content and the status of a file, read through one descriptor.

    Raises ``FileNotFoundError``, ``IsADirectoryError`` or ``NotADirectoryError`` as
    ``open`` does.
    """
    with open(path, "rb") as f:
        status = os.fstat(f.fileno())
        if stat.S_ISDIR(status.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        return f.read(), status


def _is_dir(path: Path) -> bool:
    """Whether ``path`` is a directory (through links); False for any name the OS refuses."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _count_records(content: bytes) -> int:
    try:
        data = json.loads(content)
    except (ValueError, RecursionError):
        return 0
    return len(data) if isinstance(data, list) else 0


# --- the store --------------------------------------------------------------------------


class AnnotationStore:
    """Annotation files of the datasets under a :class:`DataRoot`: find, read, write, undo.

    Thread-safe and process-safe: any number of threads and worker processes may use stores
    over the same files at once. ``keep_versions`` is how many replaced contents are kept
    per file (0 keeps none). Raises ``ValueError`` for a negative ``keep_versions``.
    """

    def __init__(self, root: DataRoot, keep_versions: int = 20) -> None:
        if keep_versions < 0:
            raise ValueError("keep_versions may not be negative")
        self.root = root
        self.keep_versions = keep_versions

    # -- finding the file -----------------------------------------------------------------

    def locate(self, dataset: Path, block: str, name: str, *, for_write: bool) -> Path:
        """The path of annotation file ``name`` of URL block ``block`` in ``dataset``.

        Follows the contract's block resolution: an existing ``annotations/{block}``
        directory; else the block of ``block_info.csv`` that holds the point, under either
        naming; else, for writes only, a directory for the write to create, named as the
        dataset already names its blocks. Nothing is created here.

        Raises :class:`BadRequest` for a bad file or block name, or (writes) a point outside
        the volume or a block name that is not ``x{X}y{Y}z{Z}``; :class:`NotFound` (reads)
        when no directory matches, and for reads and writes alike when ``dataset`` is no
        dataset (has no ``info`` file); :class:`Forbidden` (writes) when a path would leave
        the data root; :class:`ServerError` when ``block_info.csv`` or ``info`` is unreadable.
        """
        with self._disk_errors():
            if not (dataset / "info").is_file():
                raise NotFound(f"no dataset with an info file at {self._relative(dataset)!r}")
            if not ANNOTATION_NAME.match(name):
                raise BadRequest(
                    f"bad annotation file name {_quoted(name)}: use letters, digits, '-', '_' and "
                    "'.', ending in '.json'"
                )
            if clean_segments([block]) != [block]:
                raise BadRequest(f"bad block name {_quoted(block)}")
            check = self.root.check_writable if for_write else self.root.check_readable
            annotations = dataset / "annotations"
            check(annotations)

            literal = annotations / block
            if _is_dir(literal):
                return self._checked(literal / name, check)

            size = self._block_size(annotations, check)
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
                for candidate in (_block_dir_name(index), _legacy_dir_name(index)):
                    directory = annotations / candidate
                    if _is_dir(directory):
                        return self._checked(directory / name, check)

            if not for_write:
                raise NotFound(f"no annotation block {block} in this dataset")
            if point is None:
                raise BadRequest(
                    f"block {_quoted(block)} does not exist and is not x{{X}}y{{Y}}z{{Z}}"
                )
            if index is None:  # with a block size, the point was checked above
                self._check_inside(dataset, point)
            if index is not None:
                legacy = self._uses_legacy_names(annotations)
                dirname = _legacy_dir_name(index) if legacy else _block_dir_name(index)
            else:
                if block != _block_dir_name(point):
                    raise BadRequest(
                        f"block {_quoted(block)} does not exist; write it as "
                        f"{_block_dir_name(point)} (no leading zeros)"
                    )
                dirname = block
            return self._checked(annotations / dirname / name, check)

    @staticmethod
    def _checked(path: Path, check: Callable[[Path], None]) -> Path:
        check(path.parent)
        check(path)
        return path

    def _block_size(
        self, annotations: Path, check: Callable[[Path], None]
    ) -> tuple[int, int, int] | None:
        """The block size of ``annotations/block_info.csv``, read afresh; None without one.

        Tolerates a header line, blank lines, whitespace and ``#`` comments. Raises
        :class:`ServerError` when the file exists but gives no block size.
        """
        csv = annotations / "block_info.csv"
        try:
            check(csv)
            text = csv.read_bytes().decode("utf-8", "replace")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        for line in text.splitlines():
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
        raise ServerError(f"{self._relative(csv)} does not give a block size 'sx,sy,sz'")

    def _check_inside(self, dataset: Path, point: tuple[int, int, int]) -> None:
        """Raise :class:`BadRequest` unless ``point`` lies in the volume of ``info``.

        ``locate`` has already made sure that ``dataset`` has an ``info`` file.
        """
        info = dataset / "info"
        try:
            size = json.loads(info.read_bytes())["scales"][0]["size"]
            bounds = (int(size[0]), int(size[1]), int(size[2]))
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise ServerError(
                f"{self._relative(info)} gives no volume size (scales[0].size)"
            ) from e
        if any(not 0 <= p < s for p, s in zip(point, bounds, strict=True)):
            raise BadRequest(
                f"point ({point[0]}, {point[1]}, {point[2]}) is outside the volume "
                f"(size {bounds[0]} x {bounds[1]} x {bounds[2]})"
            )

    @staticmethod
    def _uses_legacy_names(annotations: Path) -> bool:
        try:
            with os.scandir(annotations) as entries:
                return any(_LEGACY_BLOCK.match(e.name) and e.is_dir() for e in entries)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def _relative(self, path: str | os.PathLike[str]) -> str:
        """``path`` as the operator and the client may see it: relative to the data root."""
        try:
            return str(Path(path).relative_to(self.root.root))
        except ValueError:
            return Path(path).name

    @contextlib.contextmanager
    def _disk_errors(self) -> Iterator[None]:
        """Turn an unexpected ``OSError`` (disk full, permissions, no locks) into ServerError.

        The message names the file relative to the root, never an absolute path.
        """
        try:
            yield
        except OSError as e:
            where = self._relative(e.filename) if isinstance(e.filename, str) else "a file"
            raise ServerError(f"cannot access {where}: {e.strerror or e}") from e

    # -- reading --------------------------------------------------------------------------

    def read(self, path: Path) -> StoredFile:
        """The current content of annotation file ``path``, with its ETag and mtime.

        Raises :class:`NotFound` when it is missing (or not a file, or out of bounds).
        """
        with self._disk_errors():
            self.root.check_readable(path)
            try:
                content, status = _read_bytes(path)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise NotFound(f"{path.name} does not exist") from None
            return StoredFile(content=content, etag=etag_of(content), modified=status.st_mtime)

    def versions(self, path: Path) -> list[dict[str, object]]:
        """The kept versions of ``path``, newest first.

        Each is ``{"version": N, "modified": ISO 8601 UTC time, "size": bytes, "count":
        records}``. Raises :class:`NotFound` when the file has no versions and does not exist.
        """
        with self._disk_errors():
            directory = self._versions_dir(path)
            self.root.check_readable(directory)
            found: list[dict[str, object]] = []
            for number in sorted(self._version_numbers(directory), reverse=True):
                try:
                    content, status = _read_bytes(directory / f"{number}.json")
                except (FileNotFoundError, IsADirectoryError):
                    continue  # trimmed meanwhile
                modified = datetime.fromtimestamp(status.st_mtime, tz=timezone.utc)
                found.append(
                    {
                        "version": number,
                        "modified": modified.isoformat(timespec="milliseconds").replace(
                            "+00:00", "Z"
                        ),
                        "size": len(content),
                        "count": _count_records(content),
                    }
                )
            if not found and not path.is_file():
                raise NotFound(f"{path.name} does not exist")
            return found

    def read_version(self, path: Path, version: int) -> StoredFile:
        """The content of version ``version`` of ``path``. Raises :class:`NotFound` if gone."""
        with self._disk_errors():
            directory = self._versions_dir(path)
            self.root.check_readable(directory)
            if not 1 <= version < 10**18:
                raise NotFound(f"{path.name} has no version {version}")
            try:
                content, status = _read_bytes(directory / f"{version}.json")
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise NotFound(f"{path.name} has no version {version}") from None
            return StoredFile(content=content, etag=etag_of(content), modified=status.st_mtime)

    # -- writing --------------------------------------------------------------------------

    def put(self, path: Path, body: bytes, if_match: str | None = None) -> WriteResult:
        """Replace the file with the records of ``body`` (a JSON array), creating it if needed.

        The records are stored re-serialised as compact UTF-8 JSON. Raises
        :class:`BadRequest` for an invalid body, :class:`PreconditionFailed` when
        ``if_match`` does not match, :class:`Forbidden` when the path leaves the data root.
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
        :class:`Forbidden` when the path leaves the data root, and :class:`ServerError` when
        the stored file is not a JSON array.
        """
        record, rid = _parse_patch(body, record_id)
        self._serialise([record])  # refuse an unstorable record before touching anything

        def change(old: bytes | None) -> tuple[bytes, int]:
            records = self._stored_records(path, old) if old is not None else []
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

        def change(old: bytes | None) -> tuple[bytes, int]:
            if old is None:
                raise NotFound(f"{path.name} does not exist")
            records = self._stored_records(path, old)
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
        """The locked read-modify-write shared by every write.

        ``change`` gets the current content (None when the file is missing) and returns the
        new content and its record count; it is called with the lock held.
        """
        with self._disk_errors():
            if not ANNOTATION_NAME.match(path.name):
                raise BadRequest(f"bad annotation file name {_quoted(path.name)}")
            self.root.check_writable(path.parent)
            self.root.check_writable(path)
            # Refusals decidable without the lock come first, so that they create nothing.
            if (if_match is not None or must_exist) and not path.is_file():
                if must_exist:
                    raise NotFound(f"{path.name} does not exist")
                raise PreconditionFailed(f"If-Match given but {path.name} does not exist")

            self._make_dirs(path.parent)
            with _file_lock(path):
                _remove_stale_temporaries(path.parent, _temporaries_of(path.name))
                old, mode = self._read_current(path)
                if if_match is not None and not _if_match_allows(if_match, old):
                    raise PreconditionFailed(f"{path.name} has changed (If-Match does not match)")
                new, count = change(old)
                etag = etag_of(new)
                if new == old:
                    return WriteResult(path.name, etag, False, count, record_id)
                if old is not None:
                    self._keep_version(path)
                _write_new(path, new, mode)
                self._trim_versions(path)
            return WriteResult(path.name, etag, old is None, count, record_id)

    def _make_dirs(self, directory: Path) -> None:
        """Create ``directory`` and its missing parents, durably, inside the root."""
        if directory.is_dir():
            return
        self.root.check_writable(directory)
        if directory.parent != directory:
            self._make_dirs(directory.parent)
        try:
            directory.mkdir()
        except FileExistsError:
            if not directory.is_dir():
                raise ServerError(f"{self._relative(directory)} is not a directory") from None
            return
        self.root.check_writable(directory)
        _fsync_dir(directory.parent)

    def _read_current(self, path: Path) -> tuple[bytes | None, int | None]:
        """The file's content and permission bits, or (None, None) when it is missing."""
        try:
            content, status = _read_bytes(path)
        except FileNotFoundError:
            return None, None
        except (IsADirectoryError, NotADirectoryError):
            raise ServerError(f"{self._relative(path)} is not a file") from None
        return content, stat.S_IMODE(status.st_mode)

    def _stored_records(self, path: Path, content: bytes) -> list[object]:
        """The elements of the stored array; an empty file counts as no records.

        Raises :class:`ServerError` when the file is not a JSON array: it is kept as it is.
        """
        if not content.strip():
            return []
        try:
            data = _loads(content)
        except BadRequest as e:
            raise ServerError(
                f"{self._relative(path)} holds {e.message}; PUT a whole new file"
            ) from None
        if not isinstance(data, list):
            raise ServerError(f"{self._relative(path)} is not a JSON array; PUT a whole new file")
        return data

    @staticmethod
    def _serialise(records: list[dict[str, object]] | list[object]) -> bytes:
        try:
            return _dumps(list(records))
        except (ValueError, RecursionError) as e:
            raise BadRequest(f"the records cannot be stored as JSON: {e}") from None

    # -- versions -------------------------------------------------------------------------

    @staticmethod
    def _versions_dir(path: Path) -> Path:
        return path.parent / _VERSIONS_DIR / path.name

    @staticmethod
    def _version_numbers(directory: Path) -> list[int]:
        try:
            names = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [int(m[1]) for m in map(_VERSION_FILE.match, names) if m]

    def _keep_version(self, path: Path) -> None:
        """Keep the current content of ``path`` as its next numbered version (lock held).

        A hard link keeps the old inode, its bytes and its mtime without copying; where
        links are not possible the content is copied and the mtime set.
        """
        if self.keep_versions == 0:
            return
        directory = self._versions_dir(path)
        self.root.check_writable(directory)
        self._make_dirs(directory)
        _remove_stale_temporaries(directory, _VERSION_TEMPORARY)
        numbers = self._version_numbers(directory)
        target = directory / f"{max(numbers, default=0) + 1}.json"
        linked = False
        if not os.path.islink(path):
            try:
                os.link(path, target, follow_symlinks=False)
                linked = True
            except OSError:
                pass  # no hard links here (or across devices): copy instead
        if not linked:
            content, status = _read_bytes(path)
            _write_new(target, content, None)
            os.utime(target, ns=(status.st_atime_ns, status.st_mtime_ns))
        _fsync_dir(directory)

    def _trim_versions(self, path: Path) -> None:
        """Delete the oldest versions beyond ``keep_versions`` (lock held)."""
        directory = self._versions_dir(path)
        numbers = sorted(self._version_numbers(directory))
        for number in numbers[: max(0, len(numbers) - self.keep_versions)]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(directory / f"{number}.json")


def _block_dir_name(index: tuple[int, int, int]) -> str:
    return f"x{index[0]}y{index[1]}z{index[2]}"


def _legacy_dir_name(index: tuple[int, int, int]) -> str:
    return f"x{index[0] + 1:04d}_y{index[1] + 1:04d}"


def remove_stale_temporaries(annotations: Path, older_than: float, now: float) -> int:
    """Remove the temporary files that writers which died left under ``annotations``.

    Run at start-up: a temporary file older than ``older_than`` seconds belongs to no live
    writer (a write takes milliseconds), so removing it is safe even while another server
    shares the directory. Lock files stay: they are the locking mechanism itself, and
    removing one that another process holds would let two writers in at once. Returns the
    number of files removed.
    """
    removed = 0
    for directory, _, names in os.walk(annotations):
        for name in names:
            if not (name.startswith(".") and _VERSION_TEMPORARY.match(name)):
                continue
            path = os.path.join(directory, name)
            with contextlib.suppress(OSError):
                if now - os.lstat(path).st_mtime > older_than:
                    os.unlink(path)
                    removed += 1
    return removed
