"""What a read of an annotation file answers: its current content and its kept versions.

Both come from the file's :class:`~neurotrale_twisted.core.annotations.commitlog.History`:
the current content is the newest commit (``docs/commit-protocol.md``, "What the current
content is"), the versions are the replaced contents kept beside it, newest first. Each
content read is a :class:`StoredFile` with its strong ETag. Pure Python and blocking.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone

from neurotrale_twisted.core.annotations.commitlog import History, State, read_whole
from neurotrale_twisted.core.annotations.records import count_records
from neurotrale_twisted.core.errors import NotFound


@dataclass(frozen=True)
class StoredFile:
    """The content of an annotation file (or of one of its versions) as read from disk."""

    content: bytes
    #: Strong ETag with its quotes: ``"<first 32 hex digits of the content's SHA-256>"``.
    etag: str
    #: ``st_mtime`` of the file.
    modified: float


def etag_of(content: bytes) -> str:
    """The strong ETag (with its quotes) of a file holding ``content``."""
    return '"' + hashlib.sha256(content).hexdigest()[:32] + '"'


def current_file(name: str, state: State) -> StoredFile:
    """The current content of file ``name`` in ``state``. Raises :class:`NotFound` without one."""
    if state.content is None:
        raise NotFound(f"{name} does not exist")
    return StoredFile(state.content, etag_of(state.content), state.modified)


def _listing_limit(state: State) -> int:
    # Versions are the entries older than the current content: the head, unless the file
    # on disk is an edit not yet in the log (then the head was replaced by it too).
    return state.next if state.kind == "foreign" else state.head


def list_versions(name: str, history: History, state: State) -> list[dict[str, object]]:
    """The kept versions of file ``name``, newest first.

    Each is ``{"version": N, "modified": ISO 8601 UTC time, "size": bytes, "count":
    records}``. Raises :class:`NotFound` when the file has no versions and does not exist.
    """
    found: list[dict[str, object]] = []
    for number, opened in history.listed(_listing_limit(state)):
        with opened:
            content = read_whole(opened)
        if content is None:
            continue  # trimmed by another writer meanwhile
        found.append(
            {
                "version": number,
                "modified": _iso(opened.status.st_mtime),
                "size": len(content),
                "count": count_records(content),
            }
        )
    if not found and state.content is None:
        raise NotFound(f"{name} does not exist")
    return found


def version_file(name: str, history: History, state: State, number: int) -> StoredFile:
    """The content of version ``number`` of file ``name``. Raises :class:`NotFound` if gone."""
    chosen: StoredFile | None = None
    for listed_number, opened in history.listed(_listing_limit(state)):
        with opened:
            content = read_whole(opened) if listed_number == number else None
            if content is not None:
                chosen = StoredFile(content, etag_of(content), opened.status.st_mtime)
    if chosen is None:
        raise NotFound(f"{name} has no version {number}")
    return chosen


def _iso(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
