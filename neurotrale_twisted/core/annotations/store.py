"""The annotation store the web layer calls: read, PUT, PATCH, DELETE, versions.

An annotation file is ``{dataset}/annotations/{blockdir}/{name}.json``, a JSON array of
records (see the contract's "Annotations" section). This module is pure Python and blocking:
the web layer calls it from a thread pool.

Safety rules every write follows, because losing an annotation is the worst thing this
server can do:

* everything is validated before anything on disk is touched, so a refused write leaves the
  file byte-identical and creates nothing (no directory, lock file or version);
* every access walks from the data root's directory handle without following links
  (:mod:`.places`, :mod:`neurotrale_twisted.core.rootfs`), and is made relative to the
  handles walked: a directory swapped for a link during a write makes it fail, never reach
  outside the root;
* a write commits by linking a complete, fsynced temporary as the next entry of the file's
  log, then renames it over the file (:mod:`.commitlog`, ``docs/commit-protocol.md``): that
  holds between hosts whose ``fcntl`` locks are not shared; the same-host lock only makes
  lost races rare;
* the replaced contents become numbered versions in ``{blockdir}/.versions/{name}/`` after
  the fact: a failed write leaves no version and evicts nothing.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from neurotrale_twisted.core.annotations import blocks
from neurotrale_twisted.core.annotations.commitlog import (
    MAX_ATTEMPTS,
    History,
    LostRace,
    State,
    open_child,
    remove_old_temporaries,
    same_host_lock,
)
from neurotrale_twisted.core.annotations.places import (
    check_place,
    disk_errors,
    file_parts,
    has_info,
    open_block_for_read,
    open_dataset,
)
from neurotrale_twisted.core.annotations.records import (
    parse_patch,
    parse_records,
    quoted,
    serialise,
    stored_records,
)
from neurotrale_twisted.core.annotations.versions import (
    StoredFile,
    current_file,
    etag_of,
    list_versions,
    version_file,
)
from neurotrale_twisted.core.errors import (
    BadRequest,
    NotFound,
    PreconditionFailed,
    Unavailable,
)
from neurotrale_twisted.core.paths import DataRoot
from neurotrale_twisted.core.rootfs import Directory

log = logging.getLogger(__name__)


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


class AnnotationStore:
    """Annotation files of the datasets under a :class:`DataRoot`: find, read, write, undo.

    Safe for any number of threads, worker processes and hosts sharing the files (see
    ``docs/commit-protocol.md``). Paths given to and returned by it are names only: every
    access walks from the data root's handle (:mod:`.places`), never following a link for a
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

    def locate(self, dataset: Path, block: str, name: str, *, for_write: bool) -> Path:
        """The path of annotation file ``name`` of URL block ``block`` in ``dataset``, for the
        reads and writes below: :func:`.blocks.locate` (which says what it raises)."""
        return blocks.locate(self.root, dataset, block, name, for_write=for_write)

    # -- reading --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _history_for_read(self, path: Path) -> Iterator[tuple[History, State]]:
        segments, block, name = file_parts(self.root, path, for_write=False)
        where = "/".join([*segments, "annotations", block, name])
        with (
            disk_errors(self.root, where, reading=True),
            open_block_for_read(self.root, segments, block) as directory,
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
            return current_file(path.name, state)

    def versions(self, path: Path) -> list[dict[str, object]]:
        """The kept versions of ``path``, newest first (:func:`.versions.list_versions`).

        Raises :class:`NotFound` when the file has no versions and does not exist.
        """
        with self._history_for_read(path) as (history, state):
            return list_versions(path.name, history, state)

    def read_version(self, path: Path, version: int) -> StoredFile:
        """The content of version ``version`` of ``path``. Raises :class:`NotFound` if gone."""
        if not 1 <= version < 10**18:
            raise NotFound(f"{path.name} has no version {version}")
        with self._history_for_read(path) as (history, state):
            return version_file(path.name, history, state, version)

    # -- writing --------------------------------------------------------------------------

    def put(self, path: Path, body: bytes, if_match: str | None = None) -> WriteResult:
        """Replace the file with the records of ``body`` (a JSON array), creating it if needed.

        The records are stored re-serialised as compact UTF-8 JSON. Raises
        :class:`BadRequest` for an invalid body, :class:`PreconditionFailed` when
        ``if_match`` does not match, :class:`Forbidden` when the path passes through a link.
        """
        records = parse_records(body)
        content = serialise(records)

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
        record, rid = parse_patch(body, record_id)
        serialise([record])  # refuse an unstorable record before touching anything
        where = path.name

        def change(old: bytes | None) -> tuple[bytes, int]:
            records = stored_records(where, old) if old is not None else []
            for i, existing in enumerate(records):
                if isinstance(existing, dict) and existing.get("id") == rid:
                    records[i] = record
                    break
            else:
                records.append(record)
            return serialise(records), len(records)

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
            records = stored_records(where, old)
            kept = [r for r in records if not (isinstance(r, dict) and r.get("id") == rid)]
            if len(kept) == len(records):
                raise NotFound(f"{path.name} has no record with id {quoted(rid)}")
            return serialise(kept), len(kept)

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
        segments, block, name = file_parts(self.root, path, for_write=True)
        where = "/".join([*segments, "annotations", block, name])
        with (
            disk_errors(self.root, where),
            open_dataset(self.root, segments, for_write=True) as dataset,
        ):
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
                    if not has_info(self.root, dataset, for_write=True):
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
        def unmoved() -> None:
            check_place(self.root, segments, block, directory)

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
                        history.commit(state.content, number, unmoved)
                        number += 1
                    history.commit(new, number, unmoved)
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
