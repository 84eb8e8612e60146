"""The history of one annotation file: its commit log, its versions, and how a write commits.

This is the code of ``docs/commit-protocol.md`` (read it first): a write commits by
``link(2)``-ing a complete, fsynced temporary as the next numbered entry of the file's log
(``EEXIST``: another writer, perhaps on another host, won that number; the caller re-reads and
re-applies), then renames it over the published file and rolls the published file forward
if a newer entry appeared meanwhile. Replaced contents become versions after the fact. It
relies only on ``link``'s ``EEXIST`` and ``rename``'s atomic replacement, which every POSIX
filesystem's server decides for all its clients, never on ``fcntl`` locks being global.

Everything is reached through :mod:`neurotrale_twisted.core.rootfs` directory handles;
nothing here follows a link. Pure Python and blocking.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from neurotrale_twisted.core.errors import Forbidden, NotFound, ServerError
from neurotrale_twisted.core.rootfs import (
    TEMPORARY_PREFIX,
    VANISHED,
    Directory,
    Follow,
    OpenedFile,
    temporary_owner,
)

log = logging.getLogger(__name__)

#: The directory of the replaced contents clients see, beside the files of a block.
VERSIONS_DIR = ".versions"
#: The directory of the commit logs, beside the files of a block.
LOG_DIR = ".log"
#: A log entry or a version: ``N.json``.
ENTRY = re.compile(r"^([1-9][0-9]{0,17})\.json\Z")
#: Log entries kept behind the head (besides the versions): enough to tell a published copy
#: that a slow writer left behind from a foreign edit (see the protocol's last section).
LOG_KEEP = 8
#: The directory, in a file's log directory, of the marks of trimmed entries: an empty file
#: ``N-SIZE-MTIME_NS`` for each entry trimmed from the log or the versions, so that a copy
#: of it that a stalled writer publishes long after is still known for the server's copy.
MARKS_DIR = "trimmed"
#: A mark: the entry's number, size and mtime (nanoseconds).
MARK = re.compile(r"^([1-9][0-9]{0,17})-([0-9]{1,20})-([0-9]{1,20})\Z")
#: Marks kept behind the head: a writer stalled for fewer commits than this before
#: publishing can still be told from an edit made on disk (see the protocol's last section).
MARKS_KEEP = 4096
#: Marks older than :data:`MARKS_KEEP` are removed at each head that is a multiple of this.
MARKS_TRIM_EVERY = 64
#: Commit attempts before a write gives up with 503 (each lost race is another writer's win).
MAX_ATTEMPTS = 64
#: How often a writer republishes a newer head that appeared while it published.
MAX_ROLLS = 16
#: Age in seconds after which a temporary surely belongs to no live writer.
STALE_AFTER = 600.0
#: How long a writer waits for the same-host lock before going on without it.
LOCK_TIMEOUT = 10.0


def read_whole(opened: OpenedFile) -> bytes | None:
    """The content of an opened file, or None when it vanished while it was read."""
    try:
        return read_settled(opened)
    except OSError as e:
        if e.errno in VANISHED:
            return None
        raise


def read_settled(opened: OpenedFile) -> bytes:
    """The whole content of an opened file, checked against its size once read.

    A file renamed over while it was opened may be read short (FUSE file systems that map
    nodes to paths hand the new file's bytes to a node whose size is the old one's): that
    is ``ESTALE``, for the caller to look again, never a torn content taken for an edit.
    """
    content = opened.read_all()
    if len(content) != os.fstat(opened.file.fileno()).st_size:
        raise OSError(errno.ESTALE, "the file changed while it was read")
    return content


class LostRace(Exception):
    """Another writer committed the number this write wanted: re-read and re-apply."""


class Counter:
    """A thread-safe count of events of this process (lost races, for the figures)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self) -> None:
        """Count one more."""
        with self._lock:
            self.value += 1


#: Commits this process lost to another writer (each one re-read and re-applied).
lost_races = Counter()


# --- the same-host lock -----------------------------------------------------------------


class _Entry:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


_guard = threading.Lock()
_thread_locks: dict[tuple[int, int, str], _Entry] = {}


def _reset_after_fork() -> None:
    # A forked child has only the forking thread: locks held by others would never be freed.
    global _guard, _thread_locks
    _guard = threading.Lock()
    _thread_locks = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


@contextlib.contextmanager
def same_host_lock(block: Directory, name: str) -> Iterator[None]:
    """Serialise the writers of ``name`` on this host (threads, then processes), for speed.

    Only an optimisation: each wait is bounded by :data:`LOCK_TIMEOUT`, after which the
    write goes on without the lock (the commit protocol is safe without it). The lock file
    ``.NAME.lock`` is opened without following a link; a link, directory or FIFO there
    refuses the write with :class:`ServerError` (the operator removes it).
    """
    lock_name = f".{name}.lock"
    try:
        fd = block.open_lock(lock_name)
    except NotFound:
        raise ServerError(
            f"cannot access {block.child_path(lock_name)}: not a regular file "
            "(a link, a directory or a FIFO); remove it"
        ) from None
    try:
        dev, ino = block.identity()
        key = (dev, ino, name)
        with _guard:
            entry = _thread_locks.setdefault(key, _Entry())
            entry.users += 1
        try:
            held = entry.lock.acquire(timeout=LOCK_TIMEOUT)
            try:
                locked = held and _lockf(fd)
                try:
                    yield
                finally:
                    if locked:
                        fcntl.lockf(fd, fcntl.LOCK_UN)
            finally:
                if held:
                    entry.lock.release()
        finally:
            with _guard:
                entry.users -= 1
                if entry.users == 0:
                    del _thread_locks[key]
    finally:
        os.close(fd)


def _lockf(fd: int) -> bool:
    """Take the ``fcntl`` lock of ``fd``, waiting at most :data:`LOCK_TIMEOUT`; False if not."""
    deadline = time.monotonic() + LOCK_TIMEOUT
    pause = 0.001
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
                return False  # no locks on this filesystem: the protocol alone holds
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            log.warning("went on without the lock of a file after %s s", LOCK_TIMEOUT)
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


# --- directories ------------------------------------------------------------------------


def open_child(parent: Directory, name: str, *, create: bool, for_write: bool) -> Directory | None:
    """Subdirectory ``name`` of ``parent``, never through a link; None when it is missing.

    With ``create`` a missing one is made (durably). For writes a link there is
    :class:`Forbidden` and anything else that is not a directory :class:`ServerError`; for
    reads both count as missing.
    """
    try:
        return parent.subdir(name)
    except NotFound:
        pass
    status = parent.lstat(name)
    if status is None:
        if not create:
            return None
        directory = parent.make_subdir(name)
        parent.sync()
        return directory
    if not for_write:
        return None
    if stat.S_ISLNK(status.st_mode):
        raise Forbidden("writes may not leave the data root")
    if stat.S_ISDIR(status.st_mode):
        # Made by another writer since (or swapped back and forth): open it once more.
        try:
            return parent.subdir(name)
        except NotFound:
            raise NotFound(f"{parent.child_path(name)} changed while it was opened") from None
    raise ServerError(f"{parent.child_path(name)} is not a directory")


def entry_numbers(directory: Directory | None) -> list[int]:
    """The numbers of the ``N.json`` names in ``directory`` (whatever they are), ascending."""
    if directory is None:
        return []
    return sorted(int(m[1]) for m in map(ENTRY.match, directory.names()) if m)


def _open_regular(directory: Directory | None, name: str) -> OpenedFile | None:
    """Regular file ``name`` opened for reading (never through a link), or None (also when
    it vanishes while it is opened)."""
    if directory is None:
        return None
    try:
        return directory.open_file(name)
    except NotFound:
        return None
    except OSError as e:
        if e.errno in VANISHED:  # removed between its open and its fstat (FUSE, NFS)
            return None
        raise


# --- the state of a file ----------------------------------------------------------------


@dataclass(frozen=True)
class State:
    """What a file holds now, decided from its log's head and its published copy."""

    #: The current content; None when there is no file.
    content: bytes | None
    #: The mtime of what ``content`` was read from.
    modified: float
    #: The head entry's number; 0 without a log.
    head: int
    #: The number the next commit takes (above every log entry and version).
    next: int
    #: "new" (nothing), "synced", "behind" (the published copy lags the head) or "foreign"
    #: (the published copy is an edit made on disk, not yet in the log).
    kind: str
    #: ``modified`` in nanoseconds, where it matters: a published copy that was touched.
    modified_ns: int = 0


class History:
    """The log and versions of annotation file ``name`` in block directory ``block``.

    ``for_write`` makes links and non-directories in the history's place refusals (see
    :func:`open_child`) instead of absences. ``follow`` lets the published copy (never the
    history) be read through a link, for reads where the operator allows it. Close it (or use
    it as a context manager) to close the handles it opened; ``block`` stays the caller's.
    """

    def __init__(
        self,
        block: Directory,
        name: str,
        keep_versions: int,
        *,
        for_write: bool,
        follow: Follow = False,
    ) -> None:
        self.block = block
        self.name = name
        self.keep_versions = keep_versions
        self.for_write = for_write
        self.follow: Follow = False if for_write else follow
        self._dirs: list[Directory] = []
        self.versions_top = self._child(block, VERSIONS_DIR)
        self.log_top = self._child(block, LOG_DIR)
        self.versions = self._child(self.versions_top, name)
        self.log = self._child(self.log_top, name)

    def _child(self, parent: Directory | None, name: str, create: bool = False) -> Directory | None:
        if parent is None:
            return None
        child = open_child(parent, name, create=create, for_write=self.for_write)
        if child is not None:
            self._dirs.append(child)
        return child

    def close(self) -> None:
        """Close the handles of the history's directories."""
        for directory in self._dirs:
            directory.close()
        self._dirs = []

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------

    def _head(self) -> tuple[int, int]:
        """(the highest log entry, the highest number in use anywhere), probing past the listing.

        A listing cached by a network filesystem may be stale: the names above it are probed
        with ``lstat`` until one is missing.
        """
        logged = entry_numbers(self.log)
        top = max([0, *logged, *entry_numbers(self.versions)])
        head = max(logged, default=0)
        if self.log is not None:
            while self.log.lstat(f"{top + 1}.json") is not None:
                top += 1
                head = top
        return head, top

    def state(self) -> State:
        """The file's content now (see "What the current content is" in the protocol).

        A file that vanishes while it is read (renamed over, or trimmed, by another writer;
        ``ESTALE`` on NFS) makes it look again. For writes, a published copy that is not a
        regular file is :class:`ServerError`.
        """
        for attempt in range(8):
            head, top = self._head()
            published: OpenedFile | None = None
            try:
                published = self._published()
                return self._decide(head, top, published)
            except OSError as e:
                if e.errno not in VANISHED or attempt == 7:
                    raise
                time.sleep(0.001 * attempt)
            finally:
                if published is not None:
                    published.close()
        raise AssertionError("unreachable")  # pragma: no cover

    def _published(self) -> OpenedFile | None:
        if self.for_write:
            status = self.block.lstat(self.name)
            if status is not None and not stat.S_ISREG(status.st_mode):
                raise ServerError(f"{self.block.child_path(self.name)} is not a regular file")
        try:
            return self.block.open_file(self.name, follow=self.follow)
        except NotFound:
            return None

    def _decide(self, head: int, top: int, published: OpenedFile | None) -> State:
        entry: OpenedFile | None = None
        number = head
        # The newest entry that is a regular file (a link planted in the log is never read).
        while number > 0:
            entry = _open_regular(self.log, f"{number}.json")
            if entry is not None:
                break
            if self._is_regular_entry(number):
                # There, but it could not be opened or its status read: on FUSE file systems
                # that map nodes to paths, a new entry linked from another writer's temporary
                # can look vanished for a moment. Building on an older entry would drop this
                # one's change (its number is taken, so the commit would not lose a race):
                # look again.
                raise OSError(errno.ESTALE, "a log entry could not be read")
            number -= 1
        try:
            if entry is None:
                if published is None:
                    return State(None, 0.0, 0, top + 1, "new")
                content = read_settled(published)
                return State(content, published.status.st_mtime, 0, top + 1, "foreign")
            entry_content = read_settled(entry)
            if published is None:
                return State(entry_content, entry.status.st_mtime, number, top + 1, "behind")
            if _same_copy(published.status, entry.status):
                return State(entry_content, entry.status.st_mtime, number, top + 1, "synced")
            copy_of = self._copied_entry(published.status)
            if copy_of is not None and copy_of > number:
                # Published by a writer that committed after the head was looked for.
                raise OSError(errno.ESTALE, "the log moved on while it was read")
            if copy_of is None:
                # Not the server's copy of an entry (or a copy touched since): read it.
                content = read_settled(published)
                mtime, mtime_ns = published.status.st_mtime, published.status.st_mtime_ns
                if content == entry_content:
                    return State(content, mtime, number, top + 1, "synced", mtime_ns)
                if not self._is_an_entry(content, number):
                    return State(content, mtime, number, top + 1, "foreign")
            return State(entry_content, entry.status.st_mtime, number, top + 1, "behind")
        finally:
            if entry is not None:
                entry.close()

    def _is_regular_entry(self, number: int) -> bool:
        """Whether log entry ``number`` is there now as a regular file."""
        if self.log is None:
            return False
        status = self.log.lstat(f"{number}.json")
        return status is not None and stat.S_ISREG(status.st_mode)

    def _copied_entry(self, status: os.stat_result) -> int | None:
        """The number of the log entry or version that a file with ``status`` is the server's
        copy of (same size and mtime), or None; nothing is read. An entry trimmed since counts
        too, by its mark (:data:`MARKS_DIR`)."""
        for directory in (self.log, self.versions):
            for number in entry_numbers(directory):
                assert directory is not None
                other = directory.lstat(f"{number}.json")
                if other is not None and _same_copy(status, other):
                    return number
        wanted = (status.st_size, status.st_mtime_ns)
        for number, size, mtime_ns in self._marks():
            if (size, mtime_ns) == wanted:
                return number
        return None

    def _marks(self) -> list[tuple[int, int, int]]:
        """The marks of trimmed entries: (number, size, mtime in nanoseconds) of each."""
        if self.log is None:
            return []
        marks = open_child(self.log, MARKS_DIR, create=False, for_write=self.for_write)
        if marks is None:
            return []
        with marks:
            return [(int(m[1]), int(m[2]), int(m[3])) for m in map(MARK.match, marks.names()) if m]

    def _is_an_entry(self, content: bytes, head: int) -> bool:
        """Whether ``content`` is that of a log entry or a version other than ``head``: a
        published copy behind (a writer died before publishing, or published late), not an
        edit made on disk. Only the entries of the same size are read."""
        for directory in (self.log, self.versions):
            for number in entry_numbers(directory):
                if number == head:
                    continue
                assert directory is not None
                other = directory.lstat(f"{number}.json")
                if other is None or other.st_size != len(content):
                    continue
                opened = _open_regular(directory, f"{number}.json")
                if opened is None:
                    continue
                with opened:
                    if read_whole(opened) == content:
                        return True
        return False

    def listed(self, head: int) -> list[tuple[int, OpenedFile]]:
        """The versions clients see, newest first, opened: entries older than ``head``.

        The newest ``keep_versions`` of them, from ``.versions`` or, where a writer died
        before linking one there, from the log. Links and non-regular files are skipped.
        """
        numbers = {n for n in entry_numbers(self.versions) if n < head}
        numbers |= {n for n in entry_numbers(self.log) if n < head}
        found: list[tuple[int, OpenedFile]] = []
        for number in sorted(numbers, reverse=True)[: self.keep_versions]:
            opened = _open_regular(self.versions, f"{number}.json")
            if opened is None:
                opened = _open_regular(self.log, f"{number}.json")
            if opened is not None:
                found.append((number, opened))
        return found

    # -- writing --------------------------------------------------------------------------

    def remove_stale_temporaries(self, now: float) -> None:
        """Remove the temporaries of writers that are gone, from this file's log directory.

        Gone: made on this host by a process that no longer exists, or older than
        :data:`STALE_AFTER` (another host's writer; a write takes milliseconds).
        """
        if self.log is None:
            return
        for name in self.log.names():
            if not name.startswith(TEMPORARY_PREFIX):
                continue
            pid = temporary_owner(name, self.name)
            status = self.log.lstat(name)
            if status is None:
                continue
            if (pid is not None and not _alive(pid)) or now - status.st_mtime > STALE_AFTER:
                with contextlib.suppress(OSError):
                    self.log.remove(name)

    def commit(self, content: bytes, number: int, check_place: Callable[[], None]) -> None:
        """Make ``content`` log entry ``number``.

        Writes and fsyncs a temporary in the log directory, runs ``check_place`` (which
        raises when the block directory was moved or swapped meanwhile), then links the
        temporary as ``number`` exclusively and fsyncs the directory. Raises
        :class:`LostRace` when ``number`` is taken, and ``OSError`` for disk trouble; on any
        failure the temporary is removed and no entry is made. The temporary's name is
        removed after the link too: the entry is never the published copy's inode (an edit
        made in place on the published file must not rewrite the history).
        """
        if self.log is None:
            self.log_top = self.log_top or self._child(self.block, LOG_DIR, create=True)
            self.log = self._child(self.log_top, self.name, create=True)
        assert self.log is not None
        temporary = self.log.write_temporary(content, purpose=self.name)
        try:
            check_place()
            self.log.link(temporary, f"{number}.json")
        except FileExistsError:
            self.log.remove(temporary)
            lost_races.add()
            raise LostRace() from None
        finally:
            self.discard(temporary)
        self.log.sync()

    def keep_modified(self, state: State) -> None:
        """Give the head entry the published copy's mtime before a commit replaces it.

        The published copy is a copy, not a link of the entry: this keeps a version's
        ``modified`` the time the file it replaced was last modified on disk. Best effort.
        """
        if self.log is None or state.kind != "synced" or state.head == 0:
            return
        with contextlib.suppress(OSError):
            status = self.log.lstat(f"{state.head}.json")
            if status is not None and state.modified_ns and status.st_mtime_ns != state.modified_ns:
                self.log.set_modified(f"{state.head}.json", state.modified_ns)

    def discard(self, temporary: str) -> None:
        """Remove a temporary that will not be published."""
        if self.log is not None:
            with contextlib.suppress(OSError):
                self.log.remove(temporary)

    def publish(self, content: bytes, number: int) -> int:
        """Publish ``content`` (entry ``number``) over the published copy; roll forward.

        When a newer entry exists already, the newest is published instead; after the
        rename, a head that moved meanwhile is republished, up to :data:`MAX_ROLLS` times.
        Returns the number of the entry published last.
        """
        assert self.log is not None
        newer = self._newest_from(number)
        status = self.log.lstat(f"{number}.json")
        if newer != number or status is None:
            number = self._republish(newer)
        else:
            self._publish_copy(content, status.st_mtime_ns)
        for _ in range(MAX_ROLLS):
            newer = self._newest_from(number)
            if newer == number:
                return number
            number = self._republish(newer)
        return number

    def repair(self, head: int) -> int:
        """Republish entry ``head`` over a published copy that is behind it; return ``head``."""
        return self._republish(head)

    def _newest_from(self, number: int) -> int:
        assert self.log is not None
        while self.log.lstat(f"{number + 1}.json") is not None:
            number += 1
        return number

    def _republish(self, number: int) -> int:
        """Publish a fresh copy of log entry ``number`` again; return ``number``.

        An entry gone meanwhile (trimmed: far behind a newer head) is left to the writer
        of that head.
        """
        opened = _open_regular(self.log, f"{number}.json")
        if opened is not None:
            with opened:
                content = read_whole(opened)
            if content is not None:
                self._publish_copy(content, opened.status.st_mtime_ns)
        return number

    def _publish_copy(self, content: bytes, mtime_ns: int) -> None:
        """Rename a fresh, fsynced copy of ``content`` over the published file, durably.

        A copy, never a link of a log entry: the published file is what people and other
        tools edit on disk, in place as often as not (``cp``, ``truncate``, editors), and
        that must never change an entry or a version. It gets the entry's mtime
        (``mtime_ns``), so that its size and mtime tell it is that entry's copy without
        reading it (a file renamed over all the time may be read torn on some FUSE file
        systems). The temporary is never left behind.
        """
        assert self.log is not None
        temporary = self.log.write_temporary(content, purpose=self.name)
        try:
            with contextlib.suppress(OSError):  # then it is told by its bytes, read
                self.log.set_modified(temporary, mtime_ns)
            self.log.rename(temporary, self.name, target_dir=self.block)
        finally:
            self.discard(temporary)
        self.block.sync()

    def after_commit(self, head: int) -> None:
        """Make the entries older than ``head`` versions, then trim versions and the log.

        Runs after the write is committed and published: a failure here is logged, never
        raised (the write stands; the next writer finishes the job).
        """
        try:
            self._link_versions(head)
            self._trim(head)
        except (OSError, ServerError, Forbidden) as e:
            log.warning(
                "%s: versions not updated after a commit: %s",
                self.block.child_path(self.name),
                e,
            )

    def _link_versions(self, head: int) -> None:
        if self.keep_versions == 0 or self.log is None:
            return
        wanted = [n for n in entry_numbers(self.log) if head - self.keep_versions <= n < head]
        if not wanted:
            return
        if self.versions is None:
            self.versions_top = self.versions_top or self._child(
                self.block, VERSIONS_DIR, create=True
            )
            self.versions = self._child(self.versions_top, self.name, create=True)
        assert self.versions is not None
        made = False
        for number in wanted:
            if self.versions.lstat(f"{number}.json") is None:
                with contextlib.suppress(FileExistsError, FileNotFoundError):
                    self.log.link(f"{number}.json", f"{number}.json", target_dir=self.versions)
                    made = True
        if made:
            self.versions.sync()

    def _trim(self, head: int) -> None:
        """Remove the versions beyond ``keep_versions``, and the log entries more than
        :data:`LOG_KEEP` behind ``head``, each of these marked before it goes.

        A version is a link of its log entry (same size and mtime): the entry's mark, made
        when the log lets it go, serves for both, whichever goes first.
        """
        if self.versions is not None:
            older = [n for n in entry_numbers(self.versions) if n < head]
            for number in older[: max(0, len(older) - self.keep_versions)]:
                self.versions.remove(f"{number}.json")
        if self.log is not None:
            old = [n for n in entry_numbers(self.log) if n < head - LOG_KEEP]
            published = self._published_entry(old)
            doomed = [n for n in old if n != published]
            if doomed:
                self._mark(doomed, head)
            for number in doomed:
                self.log.remove(f"{number}.json")

    def _mark(self, doomed: list[int], head: int) -> None:
        """Leave a mark of each log entry in ``doomed`` before it goes; drop the marks more
        than :data:`MARKS_KEEP` behind ``head`` now and then.

        Not fsynced (it would cost every commit an fsync more): a file system orders a
        create before the removal that follows it (a journal, an NFS server's sync
        operations), and a mark lost to a power cut only reopens the stalled-writer case for
        that one entry.
        """
        assert self.log is not None
        marks = self._child(self.log, MARKS_DIR, create=True)
        assert marks is not None
        for number in doomed:
            status = self.log.lstat(f"{number}.json")
            if status is None or not stat.S_ISREG(status.st_mode):
                continue
            with contextlib.suppress(FileExistsError):
                marks.create_empty(f"{number}-{status.st_size}-{status.st_mtime_ns}")
        if head % MARKS_TRIM_EVERY == 0:
            for name in marks.names():
                match = MARK.match(name)
                if match and int(match[1]) < head - MARKS_KEEP:
                    marks.remove(name)

    def _published_entry(self, numbers: list[int]) -> int | None:
        """Which of log entries ``numbers`` the published copy is a copy of, if any.

        That entry is never trimmed: however far behind the published copy fell (its
        writers could commit but never publish: a disk with room for an entry and not for
        a copy as well), it must still be told from an edit made on disk (rule 3).
        """
        status = self.block.lstat(self.name)
        if self.log is None or status is None or not stat.S_ISREG(status.st_mode):
            return None
        content: bytes | None = None
        for number in numbers:
            other = self.log.lstat(f"{number}.json")
            if other is None or other.st_size != status.st_size:
                continue
            if _same_copy(status, other):
                return number
            if content is None:
                published = _open_regular(self.block, self.name)
                if published is None:
                    return None
                with published:
                    content = read_whole(published)
                if content is None:
                    return None
            entry = _open_regular(self.log, f"{number}.json")
            if entry is not None:
                with entry:
                    if read_whole(entry) == content:
                        return number
        return None


def _same_copy(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether two files are one content's copies as the server made them: same size and
    mtime (a copy gets its entry's mtime; an edit on disk changes the mtime)."""
    return (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- start-up clean-up ------------------------------------------------------------------

#: Temporaries made by the code before the commit log (``.NAME.tmp-<16 hex>``).
_OLD_TEMPORARY = re.compile(r"^\..*\.tmp-[0-9a-f]{16}\Z")


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary of some writer, of this code or of older versions."""
    return name.startswith(TEMPORARY_PREFIX) or bool(_OLD_TEMPORARY.match(name))


def remove_old_temporaries(top: Directory, older_than: float, now: float, depth: int = 0) -> int:
    """Remove the temporaries older than ``older_than`` seconds anywhere under ``top``.

    Lock files stay (removing one another process holds would let two writers in on one
    host). Links are never followed. Returns the number removed.
    """
    removed = 0
    for entry in list(top.entries()):
        name = entry.name
        if entry.is_dir(follow_symlinks=False):
            if depth < 8:
                with contextlib.suppress(NotFound, OSError), top.subdir(name) as sub:
                    removed += remove_old_temporaries(sub, older_than, now, depth + 1)
            continue
        if not is_temporary(name):
            continue
        status = top.lstat(name)
        if status is not None and now - status.st_mtime > older_than:
            with contextlib.suppress(OSError):
                if top.remove(name):
                    removed += 1
    return removed
